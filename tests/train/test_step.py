"""Train-step math: losses against a naive reference, gradient accumulation equals one big
batch, the NaN guard drops the update, weight-decay mask and schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from llmjax.models.presets import get_preset
from llmjax.models.transformer import Transformer
from llmjax.objectives import losses
from llmjax.objectives.lm import CausalLM, shift_targets
from llmjax.optim import optimizers, schedules
from llmjax.train import step as step_lib
from llmjax.train.state import TrainState


def _naive_ce(logits, targets, weights):
  logits = np.asarray(logits, np.float64)
  out = 0.0
  for b in range(logits.shape[0]):
    for t in range(logits.shape[1]):
      row = logits[b, t]
      lse = np.log(np.sum(np.exp(row - row.max()))) + row.max()
      out += weights[b, t] * (lse - row[targets[b, t]])
  return out


def test_cross_entropy_matches_naive_and_z_loss():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, size=(2, 5))
  weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
  sums = losses.cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets), weights, 1e-2)
  np.testing.assert_allclose(sums["nll"], _naive_ce(logits, targets, weights), rtol=1e-5)
  log_z = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(sums["z_loss"], 1e-2 * np.sum(weights * log_z**2), rtol=1e-5)
  assert float(sums["weight"]) == weights.sum()


def test_shift_targets_respects_segments():
  tokens = jnp.array([[5, 6, 7, 8, 9, 0]])
  seg = jnp.array([[1, 1, 1, 2, 2, 0]])
  targets, weights = shift_targets(tokens, seg)
  np.testing.assert_array_equal(targets, [[6, 7, 8, 9, 0, 0]])
  # 7 -> 8 crosses documents, 9 -> pad and the pad itself are not scored.
  np.testing.assert_array_equal(weights, [[1, 1, 0, 1, 0, 0]])


def _setup(grad_accum_steps=1, batch=4, seq=16):
  cfg = get_preset("tiny", max_len=seq)
  model = Transformer(cfg)
  rng = np.random.default_rng(1)
  data = {
      "tokens": jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, seq)), jnp.int32),
      "tokens_segment_ids": jnp.asarray(np.repeat([[1] * 10 + [2] * 4 + [0] * 2], batch, 0),
                                        jnp.int32),
      "tokens_positions": jnp.asarray(
          np.repeat([list(range(10)) + list(range(4)) + [0, 0]], batch, 0), jnp.int32),
  }
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), data["tokens"])["params"])
  # eps=1e-3: Adam's first update g / (|g| + eps) is then linear in small gradients, so
  # f32 round-off in a near-zero gradient cannot flip an update between -lr and +lr.
  tx, schedule = optimizers.OptimizerConfig(peak_lr=1e-2, warmup_steps=0, eps=1e-3).make(10)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.key_data(jax.random.PRNGKey(2)))
  fn = jax.jit(step_lib.make_train_step(model, CausalLM(), tx, schedule,
                                        grad_accum_steps=grad_accum_steps))
  return fn, state, data


def test_grad_accumulation_equals_one_big_batch():
  one, state, batch = _setup(1)
  four, _, _ = _setup(4)
  s1, m1 = one(state, batch)
  s4, m4 = four(state, batch)
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_loss_decreases_and_step_counts():
  fn, state, batch = _setup()
  first = None
  for _ in range(8):
    state, metrics = fn(state, batch)
    first = float(metrics["loss"]) if first is None else first
  assert int(state.step) == 8
  assert float(metrics["loss"]) < first - 0.5
  assert int(metrics["nonfinite"]) == 0


def test_nonfinite_update_is_dropped():
  fn, state, batch = _setup()
  bad = state.replace(params=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan)
                                          if x.ndim == 2 else x, state.params))
  new, metrics = fn(bad, batch)
  assert int(metrics["nonfinite"]) == 1
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(bad.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # NaNs compare equal here
  assert int(new.step) == 1


def test_decay_mask_skips_norms_biases_embeddings():
  params = {"embed": {"embedding": 0}, "block": {"mlp": {"wi": {"kernel": 0, "bias": 0}},
                                                 "ln": {"scale": 0, "bias": 0}},
            "out": {"kernel": 0}}
  mask = optimizers.decay_mask(params)
  assert mask == {"embed": {"embedding": False},
                  "block": {"mlp": {"wi": {"kernel": True, "bias": False}},
                            "ln": {"scale": False, "bias": False}},
                  "out": {"kernel": True}}


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_schedule_shape(decay):
  s = schedules.make_schedule(1.0, total_steps=110, warmup_steps=10, decay=decay,
                              end_lr_ratio=0.1)
  np.testing.assert_allclose(s(0), 0.0)
  np.testing.assert_allclose(s(5), 0.5, rtol=1e-6)
  np.testing.assert_allclose(s(10), 1.0, rtol=1e-6)
  end = {"cosine": 0.1, "linear": 0.1, "constant": 1.0}[decay]
  np.testing.assert_allclose(s(110), end, rtol=1e-5)
  if decay == "cosine":  # halfway through the decay: (1 + cos(pi/2)) / 2 scaled into [0.1, 1]
    np.testing.assert_allclose(s(60), 0.1 + 0.9 * 0.5, rtol=1e-5)


def test_adamw_matches_optax_adamw_on_matrices():
  params = {"dense": {"kernel": jnp.ones((3, 3))}}
  grads = {"dense": {"kernel": jnp.full((3, 3), 0.5)}}
  ours = optimizers.adamw(1e-2, b1=0.9, b2=0.99, weight_decay=0.1, clip_norm=None)
  ref = optax.adamw(1e-2, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1)
  u1, _ = ours.update(grads, ours.init(params), params)
  u2, _ = ref.update(grads, ref.init(params), params)
  np.testing.assert_allclose(u1["dense"]["kernel"], u2["dense"]["kernel"], rtol=1e-6)
