"""`llmjax data`: build a TFDS dataset, or inspect the packed batches the trainer sees.

  llmjax data build --dataset shakespeare --data_dir DIR
  llmjax data build --dataset local_text --input CORPUS_DIR --data_dir DIR
  llmjax data inspect --dataset shakespeare --data_dir DIR --tokenizer DIR/spm.model \\
      --seq_len 256 --batch_size 16 --num_batches 20
"""

import argparse
import time

import numpy as np

from llmjax.data import datasets, packing
from llmjax.errors import UserError


def register(subparsers, name, help_text):
  parser = subparsers.add_parser(name, help=help_text, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="data_command", metavar="{build,inspect}",
                                   required=True)
  build = commands.add_parser("build", help="build a dataset (array_record files)")
  _source_args(build)
  build.set_defaults(func=run_build)

  inspect = commands.add_parser("inspect", help="packing efficiency and a decoded row",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  _source_args(inspect)
  inspect.add_argument("--split", default="train")
  inspect.add_argument("--tokenizer", required=True, help="a SentencePiece .model file")
  inspect.add_argument("--seq_len", type=int, default=256)
  inspect.add_argument("--batch_size", type=int, default=16, help="global batch")
  inspect.add_argument("--num_batches", type=int, default=20)
  inspect.add_argument("--packing", default="first_fit", choices=packing.PACKING_MODES)
  inspect.add_argument("--text_key", help="record field(s) with the text, comma-separated")
  inspect.add_argument("--seed", type=int, default=0)
  inspect.set_defaults(func=run_inspect)


def _source_args(parser):
  parser.add_argument("--dataset", required=True,
                      help=f"one of {', '.join(datasets.known_datasets())}")
  parser.add_argument("--data_dir", help="TFDS data_dir (default: TFDS's own)")
  parser.add_argument("--input", metavar="DIR",
                      help="the corpus folder (local_text) or JSONL folder (local_instruct)")


def _options(args) -> dict:
  if args.input and args.dataset not in ("local_text", "local_instruct"):
    raise UserError(f"--input is for local_text and local_instruct, not {args.dataset}: "
                    "drop it")
  return {"input_dir": args.input} if args.input else {}


def run_build(args) -> int:
  from llmjax.data import cleaning, tfds_builders  # lazy: imports TFDS
  start = time.perf_counter()
  base = args.dataset.partition("/")[0]
  if base in datasets.OWN:
    builder = datasets.own_builder(base, args.data_dir, build=False, **_options(args))
    was_built = builder.is_prepared()
    tfds_builders.build(builder)  # prints the cleaning report when it builds
    report = tfds_builders.load_report(builder)
    if was_built and report:
      print(f"already built; its cleaning report:\n"
            f"{cleaning.CleaningReport.from_dict(report).format()}")
    splits = {name: info.num_examples for name, info in builder.info.splits.items()}
    location = builder.data_dir
  else:
    _options(args)
    source = datasets.get_source(args.dataset, "train", args.data_dir)
    splits, location = {"train": len(source)}, args.data_dir or "TFDS's data_dir"
  print(f"{args.dataset} at {location} ({time.perf_counter() - start:.1f} s)")
  for name, count in splits.items():
    print(f"  {name:<12} {count:>9,} examples")
  return 0


def _decoded_row(tokenizer, batch, row=0, max_chars=300) -> list[str]:
  """One line per document in a packed row: segment id, length, decoded text."""
  tokens, segments = batch["tokens"][row], batch["tokens_segment_ids"][row]
  lines = []
  for seg in [s for s in np.unique(segments) if s]:
    ids = tokens[segments == seg]
    text = tokenizer.decode(ids.tolist())
    text = text if len(text) <= max_chars else text[:max_chars] + " ..."
    lines.append(f"  segment {seg} ({len(ids)} tokens): {text!r}")
  pad = int(np.sum(segments == 0))
  lines.append(f"  padding: {pad} tokens")
  return lines


def run_inspect(args) -> int:
  from llmjax.data import pipeline  # pylint: disable=import-outside-toplevel
  from llmjax.data import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
  if args.num_batches <= 0:
    raise UserError(f"--num_batches={args.num_batches} must be positive")
  tokenizer = tok_lib.Tokenizer.load(args.tokenizer)
  text_key = tuple(args.text_key.split(",")) if args.text_key else None
  if isinstance(text_key, tuple) and len(text_key) == 1:
    text_key = text_key[0]
  config = pipeline.DataConfig(
      dataset=args.dataset, split=args.split, data_dir=args.data_dir,
      input_dir=args.input, text_key=text_key, seq_len=args.seq_len,
      batch_size=args.batch_size, seed=args.seed, packing=args.packing)
  _options(args)
  start = time.perf_counter()
  it = pipeline.make_pipeline(config, tokenizer, process_index=0, process_count=1)
  batches = [next(it) for _ in range(args.num_batches)]
  seconds = time.perf_counter() - start
  first = batches[0]
  print(f"{args.num_batches} batches in {seconds:.1f} s: "
        + ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in first.items()))
  docs = [len(np.unique(s[s > 0])) for b in batches for s in b["tokens_segment_ids"]]
  print(f"packing efficiency: {packing.packing_efficiency(batches):.2%} non-pad tokens "
        f"({args.packing}, seq_len {args.seq_len}; {np.mean(docs):.2f} documents per row)")
  print("row 0 of batch 0, decoded:")
  print("\n".join(_decoded_row(tokenizer, first)))
  return 0
