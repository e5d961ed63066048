"""The `llmjax` command line: one subcommand per stage of a model's life.

Each subcommand lives in `llmjax/commands/<name>.py` and exposes
`register(subparsers)`; modules are imported lazily so `llmjax --help` stays fast.
"""

import argparse
import importlib
import sys

from llmjax.errors import NonFiniteError, UserError

# name -> (module, one-line help)
COMMANDS = {
    "tokenizer": ("llmjax.commands.tokenizer", "train or inspect a SentencePiece tokenizer"),
    "data": ("llmjax.commands.data", "build TFDS datasets and inspect the packed pipeline"),
    "train": ("llmjax.commands.train", "train a model from gin configs"),
    "generate": ("llmjax.commands.generate", "sample from a trained checkpoint"),
    "eval": ("llmjax.commands.eval", "perplexity, bits per byte and lm-eval tasks of a checkpoint"),
    "score": ("llmjax.commands.score", "rewards a trained reward model gives texts"),
    "lm-eval": ("llmjax.commands.lm_eval", "lm-evaluation-harness with the llmjax model"),
    "convert": ("llmjax.commands.convert", "import/export Hugging Face checkpoints"),
    "peft": ("llmjax.commands.peft", "merge, export and import fine-tuning adapters"),
    "quantize": ("llmjax.commands.quantize", "int8/int4/nf4/w8a8 copy of a trained workdir"),
    "memory": ("llmjax.commands.memory", "training memory per device for each sharding"),
    "sweep": ("llmjax.commands.sweep", "plan, run and fit a scaling-law sweep"),
    "scaling": ("llmjax.commands.scaling", "compute-optimal model and data size for a budget"),
}


def build_parser(argv):
  parser = argparse.ArgumentParser(prog="llmjax", description=__doc__.splitlines()[0])
  subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
  wanted = argv[0] if argv and argv[0] in COMMANDS else None
  for name, (module, help_text) in COMMANDS.items():
    if wanted is None or wanted == name:
      # Import only the module that runs (or all of them for `--help`).
      if wanted is None:
        subparsers.add_parser(name, help=help_text)
      else:
        importlib.import_module(module).register(subparsers, name, help_text)
  return parser


def _without_gin_context(message: str) -> str:
  """Drops the `In call to configurable 'train' (<function ...>)` lines gin appends to
  an error raised inside a configurable: the message already says what to change."""
  return "\n".join(line for line in message.splitlines()
                   if not line.strip().startswith("In call to configurable"))


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] == "lm-eval":  # lm-eval parses its own command line
    from llmjax.commands import lm_eval
    try:
      return lm_eval.passthrough(argv[1:])
    except UserError as e:
      print(f"llmjax lm-eval: error: {e}", file=sys.stderr)
      return 2
  parser = build_parser(argv)
  args = parser.parse_args(argv)
  if not getattr(args, "func", None):
    parser.print_help()
    return 0 if not argv else 2
  try:
    return args.func(args) or 0
  except UserError as e:
    print(f"llmjax {args.command}: error: {_without_gin_context(str(e))}", file=sys.stderr)
    return 2
  except NonFiniteError as e:
    print(f"llmjax {args.command}: halted: {e}", file=sys.stderr)
    return 3


if __name__ == "__main__":
  sys.exit(main())
