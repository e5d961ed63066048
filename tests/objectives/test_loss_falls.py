"""Each objective's loss falls over a short run of a tiny model on a learnable toy task."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from llmjax.models import presets
from llmjax.models.transformer import Transformer
from llmjax.objectives import classification, mlm, seq2seq, span_corruption

STEPS = 30


def _train(model, objective, batch, init_inputs):
  params = flax.linen.meta.unbox(model.init(jax.random.PRNGKey(0), **init_inputs)["params"])
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, rng):
    def loss_fn(p):
      sums = objective.loss_sums(model, p, batch, rng=rng, deterministic=False)
      return sums["loss"] / jnp.maximum(sums["weight"], 1.0)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for i in range(STEPS):
    params, opt_state, loss = step(params, opt_state, jax.random.PRNGKey(i))
    losses.append(float(loss))
  return losses


def _small(name, **kw):
  return Transformer(presets.get_preset(name, embed_dim=32, num_heads=2, mlp_dim=64,
                                        vocab_size=64, **kw))


def _rows(batch, length, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(10, 40, (batch, length)).astype(np.int32)


def test_masked_lm_loss_falls():
  tokens = np.tile(np.arange(10, 26, dtype=np.int32), (8, 2))  # a periodic pattern
  batch = {"tokens": jnp.asarray(tokens), "tokens_segment_ids": jnp.ones_like(tokens)}
  objective = mlm.MaskedLM(mask_rate=0.3)
  losses = _train(_small("bert-tiny"), objective, batch, objective.init_inputs({"tokens": 32}))
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses


def test_seq2seq_loss_falls():
  inputs = _rows(8, 12)
  targets = np.concatenate([inputs, np.ones((8, 1), np.int32)], axis=1)  # copy + eos
  batch = {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets)}
  objective = seq2seq.Seq2Seq()
  losses = _train(_small("t5-tiny"), objective, batch,
                  objective.init_inputs({"inputs": 12, "targets": 13}))
  # Below the unigram entropy ln(30) of the random targets: the decoder reads the encoder.
  assert np.mean(losses[-5:]) < min(0.75 * np.mean(losses[:3]), np.log(30)), losses


class _Tok:
  eos_id, bos_id, pad_id, num_sentinels = 1, 2, 0, 20

  def encode(self, text):
    return [int(w) for w in text.split()]

  def sentinel_id(self, k):
    return 40 + k


def test_span_corruption_loss_falls():
  objective = span_corruption.SpanCorruption(inputs_length=24)
  t_len = objective.targets_length()
  rows = []
  for i in range(8):
    text = " ".join(str(10 + (i + j) % 20) for j in range(objective.raw_length))  # counting
    rows.append(objective.feature_fn({"text": text}, _Tok()))
  batch = {"inputs": jnp.asarray(np.stack([r["inputs"] for r in rows])),
           "targets": jnp.asarray(np.stack([np.pad(r["targets"], (0, t_len - len(r["targets"])))
                                            for r in rows]))}
  batch["targets_segment_ids"] = (batch["targets"] > 0).astype(jnp.int32)
  losses = _train(_small("t5-tiny"), objective, batch,
                  objective.init_inputs({"inputs": 24, "targets": t_len}))
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses


def test_classification_loss_falls():
  tokens = _rows(16, 10)
  labels = (tokens[:, 1] >= 25).astype(np.int32)  # the first real token's range
  tokens[:, 0] = 2  # bos, pooled
  batch = {"tokens": jnp.asarray(tokens), "label": jnp.asarray(labels[:, None])}
  objective = classification.Classification()
  model = _small("bert-tiny", num_classes=2)
  losses = _train(model, objective, batch, objective.init_inputs({"tokens": 10, "label": 1}))
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses
