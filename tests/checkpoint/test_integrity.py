"""Checksummed checkpoints: a byte changed in any file of a step is caught before it is
restored; steps that do not exist are named; and a resumed run logs each step once."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.checkpoint import manager as ckpt_lib
from llmjax.errors import UserError
from llmjax.testing.runs import debug_train
from llmjax.train import metrics as metrics_lib

SHARDING = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _state(step):
  return {"params": {"kernel": jnp.full((64, 64), step, jnp.float32),
                     "bias": jnp.arange(8, dtype=jnp.float32) * step},
          "step": jnp.asarray(step, jnp.int32)}


def _saved(directory, steps=(1, 2)):
  ckpt = ckpt_lib.CheckpointManager(directory, save_every=1, keep=10)
  for s in steps:
    ckpt.save(s, _state(s), {"position": s}, {"model_config": {}}, force=True)
  ckpt.close()
  return directory


def _files(step_dir):
  return sorted(os.path.relpath(os.path.join(d, f), step_dir)
                for d, _, fs in os.walk(step_dir) for f in fs if f != ckpt_lib.CHECKSUMS)


def _flip(path, offset_frac=0.5):
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    i = min(int(len(data) * offset_frac), len(data) - 1)
    data[i] ^= 0x5A
    f.seek(0)
    f.write(data)


def test_every_file_of_a_step_is_checksummed(tmp_path):
  directory = _saved(str(tmp_path / "ckpt"))
  sums = ckpt_lib._file_checksums(os.path.join(directory, "2"))
  assert set(sums) == set(_files(os.path.join(directory, "2")))
  kinds = {os.path.basename(f) for f in sums}
  assert {"_METADATA", "manifest.ocdbt", "metadata"} <= kinds  # state, data and meta items
  assert any(f.startswith(os.path.join("state", "d")) for f in sums)  # array data chunks


@pytest.mark.parametrize("index", range(12))
def test_a_flipped_byte_in_any_file_falls_back_to_the_previous_step(tmp_path, index):
  """Each kind of file in turn (array chunks, OCDBT manifests, JSON items, orbax's
  metadata): restore names the step as bad, quarantines it and restores step 1."""
  pristine = _saved(str(tmp_path / "pristine"))
  files = _files(os.path.join(pristine, "2"))
  if index >= len(files):
    pytest.skip(f"the step has {len(files)} files")
  directory = str(tmp_path / "ckpt")
  shutil.copytree(pristine, directory)
  _flip(os.path.join(directory, "2", files[index]))
  ckpt = ckpt_lib.CheckpointManager(directory, save_every=1, keep=10)
  abstract = ckpt_lib.abstract_like(_state(0), jax.tree.map(lambda _: SHARDING, _state(0)))
  state, data, _ = ckpt.restore(abstract)
  assert int(state["step"]) == 1 and data == {"position": 1}, files[index]
  assert list(ckpt.bad_steps) == [2] and files[index] in ckpt.bad_steps[2]
  assert ckpt.all_steps() == [1] and os.listdir(directory + ".bad")[0].startswith("2-")
  with pytest.raises(UserError, match="no checkpoint step 2 .* it has steps 1"):
    ckpt.restore_params(2)


def test_reading_a_damaged_or_missing_step_is_a_clear_error(tmp_path):
  directory = _saved(str(tmp_path / "ckpt"), steps=(3, 6))
  ckpt = ckpt_lib.CheckpointManager(directory, save_every=1, keep=10)
  with pytest.raises(UserError, match=r"no checkpoint step 4 in .*it has steps 3, 6: pass one"):
    ckpt.restore_params(4)
  with pytest.raises(UserError, match=r"no checkpoint step 5 .*steps 3, 6"):
    ckpt.read(5)
  _flip(os.path.join(directory, "6", "meta", "metadata"))
  with pytest.raises(UserError, match=r"step 6 .* is damaged: meta/metadata does not match"):
    ckpt.restore_params(6)
  params, _ = ckpt.restore_params(3)
  np.testing.assert_array_equal(params["bias"], np.arange(8) * 3.0)


def test_generate_with_a_step_that_does_not_exist_names_the_steps(tmp_path, data_dir, capsys):
  from llmjax import cli
  workdir = str(tmp_path / "run")
  assert debug_train(workdir, data_dir, "TrainConfig.num_steps=3") == 0
  assert cli.main(["generate", f"--workdir={workdir}", "--step=4", "--prompt=A"]) != 0
  err = capsys.readouterr().err
  steps = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints")).all_steps()
  assert steps and 4 not in steps
  assert "no checkpoint step 4" in err and "Traceback" not in err
  assert f"it has steps {', '.join(map(str, sorted(steps)))}" in err


def test_an_interrupted_run_logs_each_step_once(tmp_path, data_dir, capsys):
  """Killed after logging step 5 with its newest checkpoint at 3, then resumed: the
  log equals an uninterrupted run's in its steps and losses (the window 3-4 included),
  and a damaged newest step is reported in one line with the details in a log."""
  common = ("TrainConfig.num_steps=6", "TrainConfig.log_every=2", "TrainConfig.eval_every=100",
            "TrainConfig.checkpoint_every=3", "get_preset.dropout_rate=0.1")
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  assert debug_train(straight, data_dir, *common) == 0
  assert debug_train(resumed, data_dir, *common, "TrainConfig.stop_at_step=5") == 0
  _flip(os.path.join(resumed, "checkpoints", "5", "meta", "metadata"))  # as if cut short
  assert len([r for r in metrics_lib.read_metrics(resumed) if "loss" in r]) == 2  # 2, 4
  capsys.readouterr()
  assert debug_train(resumed, data_dir, *common) == 0
  out = capsys.readouterr().out
  skipped = [line for line in out.splitlines() if "is bad and was skipped" in line]
  assert len(skipped) == 1 and "checkpoint step 5" in skipped[0]
  assert os.path.exists(os.path.join(resumed, "checkpoints.bad", "skipped.log"))

  def log(workdir):
    return [(r["step"], r["loss"]) for r in metrics_lib.read_metrics(workdir) if "loss" in r]

  assert log(resumed) == log(straight) and [s for s, _ in log(straight)] == [2, 4, 6]
