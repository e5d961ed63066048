"""Where training numbers go: `metrics.jsonl`, TensorBoard event files (tensorboardX, no
TensorFlow needed) and a loss-curve PNG at the end."""

import json
import math
import os

import numpy as np


def to_python(value):
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class MetricsWriter:
  """Appends one JSON object per record to `workdir/metrics.jsonl` and mirrors scalars to
  TensorBoard under `workdir/tensorboard/` (only on process 0).

  `resume_step`: the step the run (re)starts from; records of later steps, which an
  interrupted attempt wrote, are dropped from the file and purged from TensorBoard.
  """

  def __init__(self, workdir, *, enabled: bool = True, resume_step: int | None = None):
    self.workdir = workdir
    self.enabled = enabled
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # lazy: keeps import time low elsewhere
      purge = None
      if resume_step is not None and _truncate(workdir, resume_step):
        purge = resume_step + 1
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30,
                               purge_step=purge)
      self._jsonl = open(  # noqa: SIM115 - kept open for the run, closed in close()
          os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    record = {"step": int(step)}
    record.update({k: to_python(v) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for k, v in record.items():
      if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(k, v, step)

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _truncate(workdir, last_step: int) -> bool:
  """Drops the records of steps after `last_step` from metrics.jsonl (atomically);
  whether any were there."""
  records = read_metrics(workdir)
  keep = [r for r in records if r["step"] <= last_step]
  if len(keep) == len(records):
    return False
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in keep)
  os.replace(path + ".tmp", path)
  return True


def read_metrics(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(workdir, filename="loss_curve.png"):
  """Plots train `loss` and `eval_loss` against step from metrics.jsonl; returns the path.
  Drawn on its own Agg canvas: pyplot's global backend is left alone, so a notebook
  that trains and then plots still shows its figures."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  records = read_metrics(workdir)
  train = [(r["step"], r["loss"]) for r in records if "loss" in r]
  evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  if not train and not evals:
    return None
  fig = Figure(figsize=(7, 4))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for points, label in ((train, "train loss"), (evals, "validation loss")):
    if points:
      xs, ys = zip(*sorted(dict(points).items()))  # last record per step wins on resume
      ax.plot(xs, ys, label=label, marker="o" if label.startswith("val") else None)
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  path = os.path.join(workdir, filename)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return path
