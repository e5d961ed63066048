"""Tokenizers and packing on Shakespeare: training time, chars/token, packing efficiency.

Command (from the repository root, after `bash scripts/setup_env.sh`):
  .venv/bin/python experiments/tokenizers_and_packing.py --data_dir /tmp/tfds --out /tmp/tok

Trains bpe / unigram (4000 pieces) and char tokenizers on the `shakespeare` train split,
in whitespace-exact mode (markdown kept byte for byte) and in SentencePiece's default
normalisation, measures chars per token on the validation split, then packs the train
split into [16, 256] rows (first_fit) and reports the fraction of non-pad tokens.

Result (2-core x86 CPU, no accelerator, 2026-11-22; dataset already built, 0.3 s to load):
  dataset: 706 train / 35 validation scenes
  tokenizer             vocab  train_s  chars/tok  packing
  bpe-4000               4000      0.5      3.568   98.25%
  bpe-4000-exact         4000      0.5      2.957   98.35%
  unigram-4000           4000      4.3      3.664   98.38%
  unigram-4000-exact     4000      4.8      3.006   98.58%
  char                     88      0.2      1.051   99.22%
  char-exact               89      0.3      1.000   99.34%
Whitespace-exact mode costs ~17% more tokens: every markdown line break ("  \n") is two
tokens there, while the default normalisation drops them (and cannot round-trip).
"""

import argparse
import os
import time

from llmjax.data import datasets, packing, pipeline
from llmjax.data import tokenizer as tok_lib

SETTINGS = [  # (name, model_type, vocab_size, whitespace_exact)
    ("bpe-4000", "bpe", 4000, False),
    ("bpe-4000-exact", "bpe", 4000, True),
    ("unigram-4000", "unigram", 4000, False),
    ("unigram-4000-exact", "unigram", 4000, True),
    ("char", "char", None, False),
    ("char-exact", "char", None, True),
]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--out", required=True)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--num_batches", type=int, default=50)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)

  start = time.time()
  train_texts = list(datasets.iter_texts("shakespeare", "train", args.data_dir))
  valid_texts = list(datasets.iter_texts("shakespeare", "validation", args.data_dir))
  print(f"dataset: {len(train_texts)} train / {len(valid_texts)} validation scenes "
        f"({time.time() - start:.1f}s incl. build)")
  print(f"{'tokenizer':<20} {'vocab':>6} {'train_s':>8} {'chars/tok':>10} {'packing':>8}")
  for name, model_type, vocab_size, exact in SETTINGS:
    start = time.time()
    tok = tok_lib.train_tokenizer(train_texts, os.path.join(args.out, name),
                                  model_type=model_type, vocab_size=vocab_size,
                                  whitespace_exact=exact, num_sentinels=0)
    seconds = time.time() - start
    stats = tok_lib.tokenizer_stats(tok, valid_texts)
    config = pipeline.DataConfig(dataset="shakespeare", data_dir=args.data_dir,
                                 seq_len=args.seq_len, batch_size=args.batch_size)
    it = pipeline.make_pipeline(config, tok)
    efficiency = packing.packing_efficiency(next(it) for _ in range(args.num_batches))
    print(f"{name:<20} {tok.vocab_size:>6} {seconds:>8.1f} {stats['chars_per_token']:>10.3f} "
          f"{efficiency:>8.2%}")


if __name__ == "__main__":
  main()
