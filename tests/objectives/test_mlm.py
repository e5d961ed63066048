"""Masked LM: BERT's 15% / 80-10-10 rates and a loss over the chosen positions only."""

import flax
import jax
import jax.numpy as jnp
import numpy as np

from llmjax.models import presets
from llmjax.models.transformer import Transformer
from llmjax.objectives import mlm


def test_masking_rates_over_many_draws():
  vocab, mask_id = 5000, 4
  tokens = jax.random.randint(jax.random.PRNGKey(0), (64, 512), 5, vocab, jnp.int32)
  maskable = jnp.ones_like(tokens, bool).at[:, :10].set(False)
  inputs, weights = jax.jit(lambda r: mlm.mlm_mask(r, tokens, maskable, vocab))(
      jax.random.PRNGKey(1))
  inputs, weights, tokens = map(np.asarray, (inputs, weights, tokens))
  chosen = weights > 0
  assert not chosen[:, :10].any()  # never outside maskable
  np.testing.assert_array_equal(inputs[~chosen], tokens[~chosen])  # untouched elsewhere
  n = chosen.sum()
  assert abs(n / np.asarray(maskable).sum() - 0.15) < 0.005  # ~32k positions
  is_mask = inputs[chosen] == mask_id
  kept = inputs[chosen] == tokens[chosen]
  replaced = ~is_mask & ~kept
  assert abs(is_mask.mean() - 0.8) < 0.01
  assert abs(kept.mean() - 0.1) < 0.01
  assert abs(replaced.mean() - 0.1) < 0.01
  assert inputs[chosen][replaced].min() > mask_id  # random ids after the specials


def test_special_and_padding_positions_are_never_chosen():
  tokens = jnp.asarray([[2, 7, 8, 9, 1, 2, 7, 1, 0, 0]] * 200)
  seg = jnp.asarray([[1, 1, 1, 1, 1, 2, 2, 2, 0, 0]] * 200)
  allowed = np.asarray(mlm.maskable_positions(tokens, seg))
  np.testing.assert_array_equal(allowed[0], [0, 1, 1, 1, 0, 0, 1, 0, 0, 0])
  _, weights = jax.jit(lambda r: mlm.MaskedLM().corrupt(tokens, seg, r, 100))(
      jax.random.PRNGKey(0))
  assert np.asarray(weights)[:, ~allowed[0]].sum() == 0 and np.asarray(weights).sum() > 0


def test_loss_is_cross_entropy_over_the_chosen_positions_only():
  model = Transformer(presets.get_preset("bert-tiny", scan_layers=False))
  tokens = jax.random.randint(jax.random.PRNGKey(0), (4, 32), 5, 128, jnp.int32)
  seg = jnp.ones_like(tokens).at[:, 28:].set(0)
  params = flax.linen.meta.unbox(model.init(jax.random.PRNGKey(1), tokens)["params"])
  objective = mlm.MaskedLM()
  rng = jax.random.PRNGKey(7)
  sums = objective.loss_sums(model, params, {"tokens": tokens, "tokens_segment_ids": seg},
                             rng=rng, deterministic=True)
  mask_rng, _ = jax.random.split(rng)
  inputs, weights = objective.corrupt(tokens, seg, mask_rng, 128)
  logits = model.apply({"params": params}, inputs, segment_ids=seg)
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]
  assert float(sums["weight"]) == float(weights.sum()) > 0
  np.testing.assert_allclose(float(sums["loss"]), float((nll * weights).sum()), rtol=1e-5)
  # Eval (no rng) uses one fixed mask: the same sums twice.
  e1 = objective.loss_sums(model, params, {"tokens": tokens, "tokens_segment_ids": seg})
  e2 = objective.loss_sums(model, params, {"tokens": tokens, "tokens_segment_ids": seg})
  assert float(e1["loss"]) == float(e2["loss"])
