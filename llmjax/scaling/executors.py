"""Where a sweep's runs execute: local subprocesses, a Ray cluster, or a SLURM job array.

Every executor launches the same thing, a row's `llmjax train` command
(`sweep.train_command`), skips runs that finished (`sweep_result.json` in their workdir),
and lets a run that was killed resume from its own checkpoints: `llmjax train` on a
workdir with checkpoints continues where it stopped. So re-running a sweep after a crash,
a pre-emption or Ctrl-C only does what is left.

- `local`: subprocesses on this machine, `parallel` at a time (the default).
- `ray`: one Ray task per run (`ray.init(address=...)`; Levanter and Marin launch their
  TPU jobs this way). The runs must see the same filesystem (the sweep directory).
- `slurm`: writes `sweep.sbatch`, a job array with one task per run, each calling
  `llmjax sweep run --index=$SLURM_ARRAY_TASK_ID`; submit it with sbatch.
"""

import concurrent.futures
import os
import shlex
import subprocess
import sys
import time

from llmjax.errors import UserError
from llmjax.scaling import sweep as sweep_lib

EXECUTORS = ("local", "ray", "slurm")


def run_one(sweep_dir: str, manifest: dict, row: dict, env: dict | None = None,
            python: str = sys.executable) -> dict:
  """Trains one row to its end (resuming if it has checkpoints); its output goes to
  `<workdir>/train.log`. Returns {'id', 'status', 'eval_loss', 'seconds', 'log'}."""
  wd = sweep_lib.workdir(sweep_dir, row)
  if sweep_lib.status(sweep_dir, row) == "done":
    return {"id": row["id"], "status": "skipped", "eval_loss": None, "seconds": 0.0, "log": ""}
  os.makedirs(wd, exist_ok=True)
  log_path = os.path.join(wd, "train.log")
  start = time.time()
  with open(log_path, "a", encoding="utf-8") as log:
    code = subprocess.call(sweep_lib.train_command(sweep_dir, manifest, row, python),
                           stdout=log, stderr=subprocess.STDOUT, env=env)
  seconds = time.time() - start
  result = sweep_lib.finish(sweep_dir, row, seconds) if code == 0 else None
  return {"id": row["id"], "status": "done" if result else f"failed (exit {code})",
          "eval_loss": result and result["eval_loss"], "seconds": seconds, "log": log_path}


def run_local(sweep_dir: str, manifest: dict, rows: list[dict], parallel: int = 1,
              env: dict | None = None, progress: bool = True) -> list[dict]:
  """Runs `rows` as subprocesses, `parallel` at a time, with a progress bar over runs."""
  from tqdm.auto import tqdm

  results = []
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool, \
       tqdm(total=len(rows), desc="sweep", unit="run", disable=not progress) as bar:
    futures = [pool.submit(run_one, sweep_dir, manifest, row, env) for row in rows]
    for future in concurrent.futures.as_completed(futures):
      results.append(future.result())
      bar.set_postfix_str(f"{results[-1]['id']}: {results[-1]['status']}")
      bar.update()
  order = {row["id"]: i for i, row in enumerate(rows)}
  return sorted(results, key=lambda r: order[r["id"]])


def import_ray():
  try:
    import ray
  except ImportError:
    raise UserError("the Ray executor needs the `ray` package: pip install 'llmjax[ray]' "
                    "(or pip install ray), or use --executor=local.") from None
  return ray


def run_ray(sweep_dir: str, manifest: dict, rows: list[dict], address: str | None = None,
            cpus_per_run: float = 1.0, env: dict | None = None) -> list[dict]:
  """One Ray task per run on the cluster at `address` (None: a Ray started here, or the
  one this process already joined). Results come back in row order."""
  ray = import_ray()
  if not ray.is_initialized():
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
  task = ray.remote(num_cpus=cpus_per_run)(run_one)
  refs = [task.remote(sweep_dir, manifest, row, env, sys.executable) for row in rows]
  return ray.get(refs)


def write_slurm(sweep_dir: str, rows: list[dict], *, partition: str | None = None,
                time_limit: str = "04:00:00", cpus_per_task: int = 4,
                python: str = sys.executable) -> str:
  """`<sweep_dir>/sweep.sbatch`: a job array with one task per manifest row."""
  lines = ["#!/bin/bash", "# llmjax sweep: one array task per run of manifest.json.",
           "# Submit with: sbatch " + shlex.quote(os.path.join(sweep_dir, "sweep.sbatch")),
           "#SBATCH --job-name=llmjax-sweep",
           f"#SBATCH --array=0-{len(rows) - 1}",
           f"#SBATCH --cpus-per-task={cpus_per_task}",
           f"#SBATCH --time={time_limit}",
           f"#SBATCH --output={os.path.join(sweep_dir, 'slurm-%A_%a.out')}"]
  if partition:
    lines.append(f"#SBATCH --partition={partition}")
  run = (f"exec {shlex.quote(python)} -m llmjax.cli sweep run --executor=local "
         f"--sweep_dir={shlex.quote(sweep_dir)} --index=\"$SLURM_ARRAY_TASK_ID\"")
  lines += ["set -euo pipefail", run]
  path = os.path.join(sweep_dir, "sweep.sbatch")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  os.chmod(path, 0o755)
  return path
