"""NaN/Inf handling: a huge learning rate blows the parameters up; the first non-finite
loss is caught in the step that produced it, and by config the run halts (naming that
step and the last good checkpoint) or skips the update and counts it in the metrics."""

import os
import re

import jax
import numpy as np
import pytest

from llmjax.checkpoint import manager as ckpt_lib
from llmjax.testing.runs import debug_train
from llmjax.train import metrics as metrics_lib

COMMON = ["TrainConfig.num_steps=6", "TrainConfig.log_every=1", "TrainConfig.eval_every=1000",
          "TrainConfig.checkpoint_every=1", "TrainConfig.keep_checkpoints=10",
          "OptimizerConfig.peak_lr=1e38", "OptimizerConfig.clip_norm=None"]


def _train(workdir, data_dir, mode):
  return debug_train(workdir, data_dir, f"TrainConfig.on_nonfinite={mode!r}", *COMMON)


def _finite(tree):
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def skip_run(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("skip"))
  assert _train(workdir, data_dir, "skip") == 0
  return workdir


def test_skip_drops_the_update_and_counts_it(skip_run):
  records = [r for r in metrics_lib.read_metrics(skip_run) if "loss" in r]
  bad = [r["step"] for r in records if r["nonfinite"]]
  assert bad and bad == list(range(bad[0], 7)) and bad[0] > 1  # blown up after a good step
  assert all(not np.isfinite(r["loss"]) for r in records if r["nonfinite"])
  assert [r["nonfinite_total"] for r in records] == [max(0, r["step"] - bad[0] + 1)
                                                    for r in records]
  ckpt = ckpt_lib.CheckpointManager(os.path.join(skip_run, "checkpoints"))
  last_good, _, _ = ckpt.read(bad[0] - 1)
  final, _, _ = ckpt.read(6)
  assert _finite(final["params"]) and _finite(final["opt_state"])
  # Every non-finite update was dropped: the state is the last good one, step counted on.
  assert int(final["step"]) == 6
  for a, b in zip(jax.tree.leaves(last_good["params"]), jax.tree.leaves(final["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_halt_names_the_step_and_the_last_good_checkpoint(tmp_path, data_dir, skip_run,
                                                         capsys):
  first_bad = min(r["step"] for r in metrics_lib.read_metrics(skip_run)
                  if r.get("nonfinite"))
  workdir = str(tmp_path / "halt")
  capsys.readouterr()
  assert _train(workdir, data_dir, "halt") == 3  # the CLI: one line, no traceback
  err = capsys.readouterr().err
  assert "Traceback" not in err
  lines = [line for line in err.splitlines() if line.startswith("llmjax train: halted: ")]
  assert len(lines) == 1, err
  message = lines[0]
  match = re.search(r"at step (\d+) .*Last good checkpoint: step (\d+) in (\S+)\.", message)
  assert match, message
  assert int(match.group(1)) == first_bad and int(match.group(2)) == first_bad - 1
  assert "on_nonfinite='skip'" in message
  ckpt = ckpt_lib.CheckpointManager(match.group(3))
  assert ckpt.latest_step() == first_bad - 1  # nothing after the bad step was saved
  assert _finite(ckpt.read()[0]["params"])
