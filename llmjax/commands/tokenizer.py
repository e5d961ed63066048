"""`llmjax tokenizer`: train a SentencePiece model, or inspect one.

  llmjax tokenizer train --dataset shakespeare --model_type bpe --vocab_size 4000 \\
      --output DIR/spm
  llmjax tokenizer train --input notes/ README.md --whitespace_exact --byte_fallback \\
      --output DIR/spm
  llmjax tokenizer info --model DIR/spm.model --text "To be, or not to be"
"""

import argparse
import time

from llmjax.data import tokenizer as tok_lib
from llmjax.errors import UserError


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """Examples kept as written; a default shown once, and only when it says something."""

  def _get_help_string(self, action):
    text = action.help or ""
    if (action.default not in (None, argparse.SUPPRESS, False) and "(default" not in text
        and action.option_strings):
      text += " (default: %(default)s)"
    return text


def register(subparsers, name, help_text):
  parser = subparsers.add_parser(name, help=help_text, description=__doc__,
                                 formatter_class=_HelpFormatter)
  commands = parser.add_subparsers(dest="tokenizer_command", metavar="{train,info}",
                                   required=True)
  train = commands.add_parser("train", help="train a SentencePiece model",
                              formatter_class=_HelpFormatter)
  source = train.add_mutually_exclusive_group(required=True)
  source.add_argument("--dataset", help="TFDS dataset name (e.g. shakespeare)")
  source.add_argument("--input", nargs="+", metavar="FILE_OR_DIR",
                      help=".txt/.md files (one text each), .jsonl files (one text per "
                      "line, its --text_key field) or folders of them")
  train.add_argument("--split", default="train", help="dataset split to train on")
  train.add_argument("--eval_split", default="validation",
                     help="dataset split for the chars/token figure")
  train.add_argument("--eval_input", nargs="+", metavar="FILE_OR_DIR",
                     help="held-out text files for the chars/token figure (with --input; "
                     "default: the training files)")
  train.add_argument("--data_dir", help="TFDS data_dir (default: TFDS's own)")
  train.add_argument("--text_key", help="text field of examples and .jsonl lines "
                     "(default: the dataset's own, 'text' for .jsonl)")
  train.add_argument("--output", required=True, metavar="PREFIX",
                     help="writes PREFIX.model and PREFIX.vocab")
  train.add_argument("--model_type", default="bpe", choices=tok_lib.MODEL_TYPES)
  train.add_argument("--vocab_size", type=int,
                     help="4000 for bpe/unigram; every character for char")
  train.add_argument("--character_coverage", type=float, default=1.0)
  train.add_argument("--normalization", choices=tok_lib.NORMALIZATIONS,
                     help="nmt_nfkc, or identity with --whitespace_exact")
  train.add_argument("--byte_fallback", action="store_true",
                     help="spell unknown characters as UTF-8 byte pieces (no <unk>)")
  train.add_argument("--whitespace_exact", action="store_true",
                     help="keep every space, tab and newline: decode(encode(x)) == x")
  train.add_argument("--num_sentinels", type=int,
                     help="<extra_id_i> tokens (100 for bpe/unigram, 0 for char)")
  train.add_argument("--seed", type=int, default=0)
  train.add_argument("--input_sentence_size", type=int, default=2_000_000,
                     help="lines sampled for training")
  train.add_argument("--num_threads", type=int, help="trainer threads (default: all cores)")
  train.set_defaults(func=run_train)

  info = commands.add_parser("info", help="describe a model and encode samples")
  info.add_argument("--model", required=True, help="a .model file")
  info.add_argument("--text", action="append", default=[], help="text to encode (repeatable)")
  info.add_argument("--input", nargs="+", metavar="FILE_OR_DIR",
                    help="text files to measure chars/token on")
  info.add_argument("--text_key", default="text", help="text field of .jsonl lines")
  info.set_defaults(func=run_info)


def _train_texts(args):
  if args.input:
    return tok_lib.iter_text_files(args.input, args.text_key or "text")
  from llmjax.data import datasets  # builds the TFDS dataset on first use
  return datasets.iter_texts(args.dataset, args.split, args.data_dir, args.text_key)


def _eval_texts(args):
  """(label, texts) for the chars/token figure: held out where there is one."""
  if args.input:
    if args.eval_input:
      return "eval_input", list(tok_lib.iter_text_files(args.eval_input,
                                                        args.text_key or "text"))
    return "training input", list(_train_texts(args))
  from llmjax.data import datasets
  try:
    texts = list(datasets.iter_texts(args.dataset, args.eval_split, args.data_dir,
                                     args.text_key))
    return f"{args.dataset}:{args.eval_split}", texts
  except UserError as e:
    print(f"(no {args.eval_split!r} split: {e}; measuring on {args.split!r})")
    return f"{args.dataset}:{args.split}", list(_train_texts(args))


def run_train(args) -> int:
  start = time.perf_counter()
  tokenizer = tok_lib.train_tokenizer(
      _train_texts(args), args.output, model_type=args.model_type,
      vocab_size=args.vocab_size, character_coverage=args.character_coverage,
      normalization=args.normalization, byte_fallback=args.byte_fallback,
      whitespace_exact=args.whitespace_exact, num_sentinels=args.num_sentinels,
      seed=args.seed, input_sentence_size=args.input_sentence_size,
      num_threads=args.num_threads)
  seconds = time.perf_counter() - start
  print(f"wrote {args.output}.model and {args.output}.vocab")
  print(f"training time: {seconds:.1f} s (reading the text included)")
  _print_model(tokenizer)
  label, texts = _eval_texts(args)
  _print_stats(tokenizer, label, texts)
  return 0


def run_info(args) -> int:
  tokenizer = tok_lib.Tokenizer.load(args.model)
  _print_model(tokenizer)
  for text in args.text:
    ids = tokenizer.encode(text)
    print(f"text: {text!r}")
    print(f"  ids ({len(ids)}): {ids}")
    print(f"  pieces: {[tokenizer.id_to_piece(i) for i in ids]}")
    print(f"  decodes exactly: {tokenizer.decode(ids) == text}")
  if args.input:
    _print_stats(tokenizer, "input", tok_lib.iter_text_files(args.input, args.text_key))
  return 0


def _print_model(tokenizer):
  t = tokenizer
  print(f"model type: {t.model_type}")
  print(f"vocab size: {t.vocab_size}")
  print(f"normalization: {t.normalization}  byte_fallback: {t.byte_fallback}  "
        f"whitespace_exact: {t.whitespace_exact}")
  sentinels = (f"  sentinels: {t.num_sentinels} (ids {t.sentinel_id(0)}.."
               f"{t.sentinel_id(t.num_sentinels - 1)})" if t.num_sentinels else
               "  sentinels: 0")
  print(f"special ids: pad {t.pad_id}  eos {t.eos_id}  bos {t.bos_id}  unk {t.unk_id}  "
        f"mask {t.mask_id}{sentinels}")
  sample = [t.id_to_piece(i) for i in range(max(0, t.vocab_size - 10), t.vocab_size)]
  print(f"last pieces: {sample}")


def _print_stats(tokenizer, label, texts):
  s = tok_lib.tokenizer_stats(tokenizer, texts)
  print(f"chars per token ({label}): {s['chars_per_token']:.3f}  "
        f"[{s['texts']} texts, {s['chars']} chars, {s['tokens']} tokens, "
        f"unk rate {s['unk_rate']:.4%}, byte rate {s['byte_rate']:.4%}]")
