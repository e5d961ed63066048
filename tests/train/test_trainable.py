"""The second seam: which parameters train (`OptimizerConfig.trainable`), the objective
protocol, frozen trees in the state, and checkpoints written before these existed."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.checkpoint import manager as ckpt_lib
from llmjax.objectives import classification, lm, mlm, seq2seq, span_corruption
from llmjax.objectives.protocol import Objective
from llmjax.optim.optimizers import OptimizerConfig
from llmjax.sharding import mesh as mesh_lib
from llmjax.testing import sharded_run
from llmjax.testing.runs import debug_train
from llmjax.train import metrics as metrics_lib
from llmjax.train import state as state_lib
from llmjax.train import step as step_lib

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "data", "fixtures", "a5996b6_tiny_run")


def _size(tree):
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


def _run_steps(trainable, num_steps=5, objective=None):
  model = sharded_run.tiny_model(scan_layers=False, dropout_rate=0.1)
  optimizer = OptimizerConfig(peak_lr=1e-2, warmup_steps=1, trainable=trainable)
  tx, schedule = optimizer.make(num_steps)
  tokens = jnp.zeros((1, sharded_run.SEQ_LEN), jnp.int32)
  init = lambda rng: model.init({"params": rng}, tokens)["params"]
  mesh = mesh_lib.make_mesh(-1, 1, 1)
  objective = objective or lm.CausalLM()
  state, _ = state_lib.init_train_state(init, tx, mesh, "dp",
                                        frozen_fn=objective.frozen_trees)
  mask = None if trainable is None else optimizer.trainable_mask(state.params)
  step = jax.jit(step_lib.make_train_step(model, objective, tx, schedule, trainable=mask))
  before = jax.device_get(state.params)
  for batch in sharded_run.fake_batches(num_steps, model.config.vocab_size):
    state, metrics = step(state, batch)
  return before, state, metrics


def test_freezing_all_but_one_layer_leaves_the_rest_bitwise_unchanged():
  before, state, metrics = _run_steps("decoder/layers_1/")
  after = jax.device_get(state.params)
  flat_before = dict(jax.tree_util.tree_flatten_with_path(before)[0])
  trained = 0
  for path, value in jax.tree_util.tree_flatten_with_path(after)[0]:
    name = jax.tree_util.keystr(path)
    if "layers_1" in name:
      trained += value.size
      assert not np.array_equal(value, flat_before[path]), name  # it did train
    else:
      np.testing.assert_array_equal(value, flat_before[path], err_msg=name)
  assert trained == _size(after["decoder"]["layers_1"])
  # AdamW's two moments for the trainable leaves only (+ the step counters)
  moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
  assert sum(x.size for x in moments) == 2 * trained
  assert np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0


def test_trainable_none_is_the_plain_optimizer_and_matches_an_everything_regex():
  """Unset, the optimizer is the chain checkpoints have always held; a regex matching
  every path trains the same parameters to the same values."""
  _, plain, _ = _run_steps(None)
  _, everything, _ = _run_steps(".")
  for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(everything.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  assert _size(plain.opt_state) == _size(everything.opt_state)
  assert "MultiTransformState" not in str(jax.tree.structure(plain.opt_state))


def test_trainable_from_gin_trains_only_the_head(tmp_path, data_dir):
  """`OptimizerConfig.trainable` through the CLI: only the final norm trains; the
  checkpoint's optimizer moments are that size."""
  workdir = str(tmp_path / "run")
  assert debug_train(workdir, data_dir, "TrainConfig.num_steps=3",
                     "OptimizerConfig.trainable='final_norm'") == 0
  state, _, _ = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints")).read()
  head = _size(state["params"]["decoder"]["final_norm"])
  moments = [x for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0]
  assert sum(np.size(x) for x in moments) == 2 * head
  assert all(np.isfinite(r["loss"]) for r in metrics_lib.read_metrics(workdir) if "loss" in r)


@pytest.mark.parametrize("objective", [
    lm.CausalLM(), mlm.MaskedLM(), seq2seq.Seq2Seq(), span_corruption.SpanCorruption(),
    classification.Classification()], ids=lambda o: type(o).__name__)
def test_every_objective_implements_the_protocol(objective):
  assert isinstance(objective, Objective)
  assert objective.frozen_trees({"w": jnp.ones(2)}) == {}
  sums = {"loss": jnp.float32(6.0), "nll": jnp.float32(4.0), "z_loss": jnp.float32(2.0),
          "correct": jnp.float32(1.0), "weight": jnp.float32(2.0)}
  summary = objective.summarize(sums)
  assert float(summary["loss"]) == 3.0 and float(summary["accuracy"]) == 0.5


class _WithReference(lm.CausalLM):
  """An objective that declares a frozen tree (a DPO-style reference copy) and reads it."""

  def frozen_trees(self, params):
    return {"reference": params}

  def loss_sums(self, model, params, batch, *, rng=None, deterministic=True, frozen=None):
    sums = super().loss_sums(model, params, batch, rng=rng, deterministic=deterministic)
    ref = super().loss_sums(model, frozen["reference"], batch, deterministic=True)
    return dict(sums, ref_nll=ref["nll"])


def test_frozen_trees_live_in_the_state_and_never_change():
  before, state, metrics = _run_steps(None, objective=_WithReference())
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.frozen["reference"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert _size(state.frozen) == _size(state.params)
  assert "ref_nll" not in metrics  # summarize reports what the objective summarizes


def test_checkpoint_written_before_the_seams_restores_and_resumes(tmp_path, data_dir):
  """A run checkpointed at commit a5996b6 (step 3 of the tiny debug run) resumes here:
  same parameters restored, and training continues to step 5."""
  workdir = str(tmp_path / "old")
  shutil.copytree(FIXTURE, workdir)
  old = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints")).read(3)[0]
  args = ("TrainConfig.num_steps=5", "TrainConfig.checkpoint_every=5",
          "get_preset.embed_dim=16", "get_preset.num_heads=2", "get_preset.mlp_dim=32",
          "get_preset.dropout_rate=0.1")
  assert debug_train(workdir, data_dir, "TrainConfig.stop_at_step=3", *args) == 0  # restore
  ckpt = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"))
  assert ckpt.all_steps() == [3]
  assert debug_train(workdir, data_dir, *args) == 0
  ckpt = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"))
  assert ckpt.latest_step() == 5
  new = ckpt.read(5)[0]
  assert jax.tree.structure(new) == jax.tree.structure(old)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(old["params"]),
                                                      jax.tree.leaves(new["params"]))]
  assert any(changed)
  steps = [r["step"] for r in metrics_lib.read_metrics(workdir) if "loss" in r]
  assert steps and min(steps) > 3
