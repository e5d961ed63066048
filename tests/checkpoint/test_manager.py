"""Checkpoint integrity: corrupt, partial and foreign steps are detected at restore, named,
and skipped for the newest good step; bad steps never push good ones out; no pickle."""

import os
import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.checkpoint import manager as ckpt_lib
from llmjax.errors import UserError

SHARDING = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _state(step, extra=False):
  params = {"dense": {"kernel": jnp.full((4, 8), step, jnp.float32),
                      "bias": jnp.arange(8, dtype=jnp.float32) * step}}
  if extra:
    params["dense2"] = {"kernel": jnp.ones((8, 2), jnp.float32)}
  return {"params": params, "step": jnp.asarray(step, jnp.int32),
          "rng": jnp.asarray([step, 7], jnp.uint32)}


def _abstract():
  return ckpt_lib.abstract_like(_state(0), jax.tree.map(lambda _: SHARDING, _state(0)))


def _save_steps(directory, steps, keep=10, meta_for=None, state_for=_state):
  ckpt = ckpt_lib.CheckpointManager(directory, save_every=1, keep=keep)
  for s in steps:
    meta = meta_for(s) if meta_for else {"model_config": {"num_layers": 2}}
    ckpt.save(s, state_for(s), {"position": s}, meta, force=True)
  ckpt.close()


def _check_model(meta):
  if meta["model_config"] != {"num_layers": 2}:
    raise UserError(f"other model config {meta['model_config']}; use a new --workdir")


def _restore(directory, **kwargs):
  ckpt = ckpt_lib.CheckpointManager(directory, save_every=1, keep=10)
  state, data, _ = ckpt.restore(_abstract(), check_meta=_check_model, **kwargs)
  return ckpt, int(state["step"]), data, state


def _truncate(step_dir, data_only=False):
  """Cuts files of the state item in half: every array data file (OCDBT `d/` folders;
  small arrays live inline in the b-tree nodes there), or else the largest file."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state"))
           for f in fs if not data_only or os.path.basename(d) == "d"]
  for path in files if data_only else [max(files, key=os.path.getsize)]:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def _corrupt_meta(step_dir):
  with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
    f.write('{"model_config": {"num_la')


CORRUPTIONS = {
    "truncated_array_data": lambda d: _truncate(d, data_only=True),
    "truncated_metadata": _truncate,
    "missing_state_item": lambda d: shutil.rmtree(os.path.join(d, "state")),
    "missing_step_directory": shutil.rmtree,
    "corrupt_json": _corrupt_meta,
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_newest_step_falls_back_to_newest_good(tmp_path, corruption):
  directory = str(tmp_path / "ckpt")
  _save_steps(directory, [1, 2, 3])
  CORRUPTIONS[corruption](os.path.join(directory, "3"))
  ckpt, step, data, state = _restore(directory)
  assert step == 2 and data == {"position": 2}
  np.testing.assert_array_equal(state["params"]["dense"]["bias"], np.arange(8) * 2.0)
  if corruption != "missing_step_directory":
    assert list(ckpt.bad_steps) == [3]
    # The bad step is kept for inspection, out of orbax's sight, and its number is free.
    assert ckpt.all_steps() == [1, 2] and os.listdir(directory + ".bad")[0].startswith("3-")
  ckpt.save(3, _state(3), {"position": 3}, {"model_config": {"num_layers": 2}}, force=True)
  ckpt.close()
  assert _restore(directory)[1] == 3


def test_wrong_tree_structure_is_a_bad_step(tmp_path):
  directory = str(tmp_path / "ckpt")
  _save_steps(directory, [1])
  _save_steps(directory, [2], state_for=lambda s: _state(s, extra=True))
  ckpt, step, _, _ = _restore(directory)
  assert step == 1 and list(ckpt.bad_steps) == [2]


def test_other_model_config_is_detected_before_reading_arrays(tmp_path):
  directory = str(tmp_path / "ckpt")
  _save_steps(directory, [1, 2])
  _save_steps(directory, [3], meta_for=lambda s: {"model_config": {"num_layers": 3}})
  ckpt, step, _, _ = _restore(directory)
  assert step == 2 and "num_layers': 3" in ckpt.bad_steps[3]


def test_every_step_from_another_config_is_one_clear_error(tmp_path):
  directory = str(tmp_path / "ckpt")
  _save_steps(directory, [1, 2], meta_for=lambda s: {"model_config": {"num_layers": 4}})
  with pytest.raises(UserError, match=r"other model config .*new --workdir.*\[1, 2\]"):
    _restore(directory)
  assert sorted(os.listdir(directory)) == ["1", "2"]  # nothing moved or deleted


def test_every_step_corrupt_names_each_step(tmp_path):
  directory = str(tmp_path / "ckpt")
  _save_steps(directory, [1, 2])
  for s in (1, 2):
    _truncate(os.path.join(directory, str(s)))
  with pytest.raises(UserError, match=r"(?s)step 2: .*step 1: .*broken step directories"):
    _restore(directory)
  assert sorted(os.listdir(directory)) == ["1", "2"]


def test_bad_newest_step_never_pushes_out_the_last_good_one(tmp_path):
  """keep=2 with steps {2 good, 3 bad}: resuming from 2 and saving 3 again keeps 2."""
  directory = str(tmp_path / "ckpt")
  _save_steps(directory, [1, 2, 3], keep=2)
  assert sorted(os.listdir(directory)) == ["2", "3"]
  _truncate(os.path.join(directory, "3"))
  ckpt = ckpt_lib.CheckpointManager(directory, save_every=1, keep=2, cleanup_tmp=True)
  state, _, _ = ckpt.restore(_abstract())
  assert int(state["step"]) == 2 and ckpt.all_steps() == [2]
  ckpt.save(3, _state(3), {"position": 3}, {}, force=True)
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3]
  ckpt.close()


def test_restore_never_unpickles(tmp_path, monkeypatch):
  directory = str(tmp_path / "ckpt")
  _save_steps(directory, [1, 2])

  def forbidden(*args, **kwargs):
    raise AssertionError("checkpoint loading went through pickle")

  for name in ("load", "loads", "Unpickler"):
    monkeypatch.setattr(pickle, name, forbidden)
  _, step, data, _ = _restore(directory)
  assert step == 2 and data == {"position": 2}
  state, data, meta = ckpt_lib.CheckpointManager(directory).read()
  assert int(state["step"]) == 2 and meta == {"model_config": {"num_layers": 2}}
