"""Training under every rule set on 8 simulated devices equals the single-device run, the
state ends with the intended shardings, and checkpoints move between meshes."""

import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llmjax.checkpoint import manager as ckpt_lib
from llmjax.sharding import mesh as mesh_lib
from llmjax.sharding import partition
from llmjax.testing import sharded_run
from llmjax.train import main
from llmjax.train import state as train_state

MESHES = {"dp": (8, 1, 1), "zero1": (8, 1, 1), "fsdp": (1, 8, 1), "fsdp_tp": (2, 2, 2)}
_RUNS = {}


def _run(rule_set):
  """(losses, state, shardings) of five steps; compiled once per module."""
  if rule_set not in _RUNS:
    if rule_set == "single":
      mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
      _RUNS[rule_set] = sharded_run.run(mesh, "dp")
    else:
      _RUNS[rule_set] = sharded_run.run(mesh_lib.make_mesh(*MESHES[rule_set]), rule_set)
  return _RUNS[rule_set]


def test_eight_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize("rule_set", list(MESHES))
def test_losses_match_single_device(rule_set):
  single, _, _ = _run("single")
  losses, state, _ = _run(rule_set)
  assert len(losses) == 5 and losses[-1] < losses[0]  # it trains
  np.testing.assert_allclose(losses, single, rtol=1e-5)
  _, single_state, _ = _run("single")
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(single_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4)  # Adam amplifies noise in tiny grads


# Golden per-parameter mesh specs of the tiny model (scanned: a leading LAYERS axis).
_TP = {
    "embed/embedding": P("tensor", "fsdp"),
    "pos_embed/embedding": P(None, "fsdp"),
    "decoder/layers/attention/query/kernel": P(None, "fsdp", "tensor", None),
    "decoder/layers/attention/query/bias": P(None, "tensor", None),
    "decoder/layers/attention/key/kernel": P(None, "fsdp", "tensor", None),
    "decoder/layers/attention/value/kernel": P(None, "fsdp", "tensor", None),
    "decoder/layers/attention/out/kernel": P(None, "tensor", None, "fsdp"),
    "decoder/layers/attention/out/bias": P(None, "fsdp"),
    "decoder/layers/mlp/wi/kernel": P(None, "fsdp", "tensor"),
    "decoder/layers/mlp/wi/bias": P(None, "tensor"),
    "decoder/layers/mlp/wo/kernel": P(None, "tensor", "fsdp"),
    "decoder/layers/mlp_norm/scale": P(None, None),
    "decoder/final_norm/scale": P(None),
}


def _specs(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(k, simple=True, separator="/"): v.sharding.spec for k, v in flat}


def _expected(golden, replace):
  """The fsdp_tp golden table with mesh axes renamed (None drops them)."""
  def rename(spec):
    return P(*(replace.get(e, e) if isinstance(e, str) else e for e in spec))
  return {k: rename(v) for k, v in golden.items()}


def _check_specs(actual, expected):
  for path, spec in expected.items():
    got = actual[path]
    assert tuple(got) + (None,) * (len(spec) - len(got)) == tuple(spec), path


def test_parameter_and_optimizer_shardings():
  """The arrays the runs end with carry the rule set's shardings (a golden table)."""
  _check_specs(_specs(_run("fsdp_tp")[1].params), _TP)
  fsdp = _specs(_run("fsdp")[1].params)
  _check_specs(fsdp, _expected(_TP, {"tensor": None}))
  for rule_set in ("dp", "zero1"):  # parameters replicated
    assert all(all(e is None for e in s) for s in _specs(_run(rule_set)[1].params).values())
  dp_moments = _specs(_run("dp")[1].opt_state)
  assert all(all(e is None for e in s) for s in dp_moments.values())
  zero1 = _specs(_run("zero1")[1].opt_state)
  # AdamW's moments (chain element 1: mu, nu) split along EMBED over all 8 devices.
  for moment in ("mu", "nu"):
    renamed = {f"1/{moment}/{k}": v for k, v in
               _expected(_TP, {"tensor": None, "fsdp": ("data", "fsdp")}).items()}
    _check_specs(zero1, renamed)
  mu = _run("zero1")[1].opt_state[1].mu["embed"]["embedding"]  # [V, D], D over 8 devices
  assert mu.addressable_shards[0].data.shape == (mu.shape[0], mu.shape[1] // 8)


def test_indivisible_dimensions_are_replicated():
  mesh = {"data": 1, "fsdp": 8, "tensor": 2}
  assert partition.fit_spec(P("tensor", "fsdp"), (65, 64), mesh) == P(None, "fsdp")
  assert partition.fit_spec(P(("data", "fsdp")), (4,), mesh) == P("data")
  assert partition.fit_spec(P(("fsdp", "tensor")), (16,), mesh) == P(("fsdp", "tensor"))


def test_checkpoint_moves_between_meshes(tmp_path):
  """Saved under fsdp on 8 devices; restored on 1 device and under fsdp_tp on 4."""
  _, state, _ = _run("fsdp")
  saved = jax.tree.map(np.asarray, state)
  ckpt = ckpt_lib.CheckpointManager(tmp_path / "ckpt", save_every=1)
  ckpt.save(5, state, {}, {}, force=True)
  ckpt.close()
  model = sharded_run.tiny_model()
  tx, _ = sharded_run.make_tx()
  init = lambda rng: model.init({"params": rng}, np.zeros((1, 16), np.int32))["params"]
  for rule_set, shape, devices in (("dp", (1, 1, 1), 1), ("fsdp_tp", (1, 2, 2), 4)):
    mesh = mesh_lib.make_mesh(*shape, devices=jax.devices()[:devices])
    target = train_state.abstract_train_state(init, tx, mesh, rule_set)
    restored, _, _ = ckpt_lib.CheckpointManager(tmp_path / "ckpt").restore(target)
    for got, want, abstract in zip(jax.tree.leaves(restored), jax.tree.leaves(saved),
                                   jax.tree.leaves(target)):
      np.testing.assert_array_equal(np.asarray(got), want)
      assert got.sharding == abstract.sharding
      assert len(got.sharding.device_set) == devices


@pytest.mark.parametrize("name,mesh", [("dp", (8, 1, 1)), ("zero1", (8, 1, 1)),
                                       ("fsdp", (1, 8, 1)), ("fsdp_tp", (1, 4, 2))])
def test_sharding_gin_files(name, mesh):
  import gin
  main.parse_gin(["runs/debug.gin", os.path.join("sharding", f"{name}.gin")], [])
  cfg = gin.query_parameter("train.config").scoped_configurable_fn()
  assert cfg.rules == name
  assert mesh_lib.resolve_mesh_shape(8, cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_tensor) == mesh
