"""`llmjax lm-eval [any lm-eval arguments]`: lm-evaluation-harness with the `llmjax` model.

  llmjax lm-eval --model llmjax --model_args workdir=W[,batch_size=8,max_length=N,step=S]
                 --tasks TASKS [--include_path DIR] [--num_fewshot K] [--limit N] ...

lm-eval 0.4.13 finds third-party models only when they are registered in its own process,
so this imports `llmjax.eval.lm_eval_backend` (which registers `llmjax`) and hands the rest
of the command line to lm-eval's CLI unchanged. Datasets and the Hub are kept offline
(HF_DATASETS_OFFLINE=1, HF_HUB_OFFLINE=1) unless set otherwise: local tasks read local
files (`--include_path` with `dataset_path: json`).
"""

import os
import sys


def register(subparsers, name, help_text):
  import argparse
  p = subparsers.add_parser(name, help=help_text, description=__doc__, add_help=False,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  p.set_defaults(func=lambda args: passthrough([]))


def passthrough(argv) -> int:
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  try:
    from lm_eval._cli.harness import HarnessCLI
  except ImportError:
    from llmjax.errors import UserError
    raise UserError("`llmjax lm-eval` needs lm-eval: pip install 'llmjax[eval]' (or "
                    "pip install lm-eval==0.4.13).") from None
  import llmjax.eval.lm_eval_backend  # noqa: F401 - registers the `llmjax` model

  saved = sys.argv
  sys.argv = ["lm-eval", *argv]
  try:
    cli = HarnessCLI()
    cli.execute(cli.parse_args())
  except SystemExit as e:  # argparse's --help and usage errors
    return int(e.code or 0)
  finally:
    sys.argv = saved
  return 0
