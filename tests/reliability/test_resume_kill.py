"""Exact resume under SIGKILL: a run killed at seeded random points (one of them while an
async checkpoint save is in flight) and restarted each time ends bitwise identical to an
uninterrupted run: parameters, optimizer state, RNG, data position and every step's loss.

The restarts run as subprocesses sharing a persistent XLA compilation cache (in tmp), so
only the first one pays the compile.
"""

import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from llmjax import cli
from llmjax.checkpoint import manager as ckpt_lib
from llmjax.train import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_STEPS = 12
COMMON = [f"TrainConfig.num_steps={NUM_STEPS}", "TrainConfig.log_every=1",
          "TrainConfig.eval_every=1000", "TrainConfig.eval_batches=1",
          "TrainConfig.checkpoint_every=2", "TrainConfig.keep_checkpoints=20",
          "get_preset.dropout_rate=0.1"]  # dropout: the RNG must resume too
TMP_MARK = ".orbax-checkpoint-tmp"


def _argv(workdir, data_dir):
  return (["train", "--gin_file=runs/debug.gin", f"--workdir={workdir}", "--no_sample",
           f"--gin_param=DataConfig.data_dir={data_dir!r}"]
          + [f"--gin_param={p}" for p in COMMON])


def _last_step(workdir):
  return max([r["step"] for r in metrics_lib.read_metrics(workdir) if "loss" in r] or [0])


def _in_flight(workdir):
  folder = os.path.join(workdir, "checkpoints")
  return [n for n in os.listdir(folder) if TMP_MARK in n] if os.path.isdir(folder) else []


def _launch(workdir, data_dir, env, log_path):
  log = open(log_path, "w")  # noqa: SIM115 - the child writes it; closed by the caller
  proc = subprocess.Popen([sys.executable, "-m", "llmjax.cli", *_argv(workdir, data_dir)],
                          cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
  return proc, log


def _kill_when(proc, condition, what, timeout=300):
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, f"the run ended before {what}"
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.002)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_at_random_points_resumes_bitwise(tmp_path):
  data_dir = str(tmp_path / "tfds")
  reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
  assert cli.main(_argv(reference, data_dir)) == 0

  env = dict(os.environ, PYTHONPATH=REPO, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  rng = random.Random(9)
  # Seeded kill points: after a random step of the first third, while a save is in
  # flight (a checkpoint's temporary directory exists), after a random later step.
  plan = [("step", rng.randint(2, 4)), ("save", None), ("step", rng.randint(8, 10))]
  resumed_from = []
  for i, (kind, target) in enumerate([*plan, ("finish", None)]):
    proc, log = _launch(killed, data_dir, env, tmp_path / f"run{i}.log")
    if kind == "step":
      _kill_when(proc, lambda t=target: _last_step(killed) >= t, f"step {target}")
    elif kind == "save":
      start = _last_step(killed)
      _kill_when(proc, lambda s=start: _last_step(killed) > s and _in_flight(killed),
                 "an async save")
      assert _in_flight(killed), "the kill did not land during a save"
    else:
      assert proc.wait(timeout=300) == 0, (tmp_path / f"run{i}.log").read_text()
    log.close()
    out = (tmp_path / f"run{i}.log").read_text()
    if i:
      assert "resumed from step" in out, out
      resumed_from.append(int(out.split("resumed from step ")[1].split()[0]))
  assert not _in_flight(killed)  # the restart cleaned the killed save's temporary folder
  assert len(resumed_from) == len(plan) and all(s > 0 for s in resumed_from)

  # Every loss ever logged (steps re-run after a kill log again) equals the reference.
  want = {r["step"]: r["loss"] for r in metrics_lib.read_metrics(reference) if "loss" in r}
  got = [(r["step"], r["loss"]) for r in metrics_lib.read_metrics(killed) if "loss" in r]
  assert sorted(want) == list(range(1, NUM_STEPS + 1))
  assert {s for s, _ in got} == set(want)
  for step, loss in got:
    assert loss == want[step], step

  ref_ckpt = ckpt_lib.CheckpointManager(os.path.join(reference, "checkpoints"))
  run_ckpt = ckpt_lib.CheckpointManager(os.path.join(killed, "checkpoints"))
  # Each restart took step, RNG and data position from the checkpoint it resumed from.
  for step in [*resumed_from, NUM_STEPS]:
    (s1, d1, _), (s2, d2, _) = ref_ckpt.read(step), run_ckpt.read(step)
    assert d1 == d2 and int(s2["step"]) == step
    np.testing.assert_array_equal(s1["rng"], s2["rng"])
  # The final parameters and optimizer state are bitwise identical.
  (final1, _, _), (final2, _, _) = ref_ckpt.read(NUM_STEPS), run_ckpt.read(NUM_STEPS)
  leaves1 = jax.tree_util.tree_flatten_with_path(final1)[0]
  leaves2 = jax.tree.leaves(final2)
  assert len(leaves1) == len(leaves2) and any("opt_state" in str(p) for p, _ in leaves1)
  for (path, a), b in zip(leaves1, leaves2):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
