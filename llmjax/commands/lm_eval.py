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


def _flag(argv, name):
  for i, arg in enumerate(argv):
    if arg == name and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith(name + "="):
      return arg.split("=", 1)[1]
  return None


def _with_offline_tasks(argv):
  """Adds --include_path for llmjax's offline tasks (built once into a cache folder), and
  refuses a task lm-eval does not know with the list of the offline ones."""
  from llmjax.errors import UserError
  from llmjax.eval import tasks as task_lib

  wanted = [t for t in (_flag(argv, "--tasks") or "").split(",") if t]
  include = _flag(argv, "--include_path")
  if any(t in task_lib.TASKS for t in wanted) and include is None:
    include = os.environ.get("LLMJAX_LM_EVAL_TASKS") or os.path.join(
        os.path.expanduser("~"), ".cache", "llmjax", "lm_eval_tasks")
    if not all(os.path.exists(os.path.join(include, f"{t}.yaml")) for t in task_lib.TASKS):
      task_lib.prepare(include)
    argv += ["--include_path", include]
  if wanted:
    from lm_eval.tasks import TaskManager
    known = TaskManager(include_path=include).all_tasks
    unknown = [t for t in wanted if t not in known and not os.path.exists(t)]
    if unknown:
      raise UserError(f"unknown lm-eval task(s) {unknown}; llmjax's offline tasks are "
                      f"{', '.join(task_lib.TASKS)} (`llmjax lm-eval ls tasks` lists every "
                      "task lm-eval knows; --include_path DIR adds your own YAMLs).")
  return argv


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

  argv = _with_offline_tasks(list(argv))
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
