"""Prefill + step-by-step decoding with the KV cache equals the full forward pass."""

import functools

import jax
import numpy as np
import pytest

from llmjax.decode import cache as cache_lib
from llmjax.models.stack import unstack_layers
from llmjax.models.transformer import Transformer
from llmjax.testing import reference


def _setup(name, scan_layers=True, attention_impl="einsum"):
  model, params = reference.preset_model(name, std=0.1, num_layers=2)
  cfg = model.config.replace(attention_impl=attention_impl)
  if not scan_layers:
    cfg, params = cfg.replace(scan_layers=False), unstack_layers(params)
  return cfg, params


@functools.partial(jax.jit, static_argnums=0)
def _prefill_and_steps(model, params, tokens, positions, valid, step_tokens):
  """Prefill `tokens [B, P]`, then feed `step_tokens [B, S]` one at a time (lax.scan)."""
  cache = cache_lib.init_cache(model.config, tokens.shape[0],
                               tokens.shape[1] + step_tokens.shape[1])
  decode = functools.partial(model.apply, {"params": params}, method=Transformer.decode_cached)
  prefill_logits, cache = decode(tokens, positions, cache, valid)

  def step(carry, token):
    cache, pos = carry
    logits, cache = decode(token[:, None], pos, cache)
    return (cache, pos + 1), logits[:, 0]

  _, step_logits = jax.lax.scan(step, (cache, positions[:, -1:] + 1), step_tokens.T)
  return prefill_logits, step_logits.transpose(1, 0, 2)                  # [B, S, V]


# One row: each step is a vector times the matrices (`linear.row_vector_product` on CPU).
@pytest.mark.parametrize("lengths", [(5, 3), (6,)], ids=["two_rows", "one_row"])
@pytest.mark.parametrize("name,scan_layers,impl", [
    ("tiny", True, "einsum"), ("tiny", False, "einsum"), ("tiny-llama", True, "einsum"),
    ("tiny-llama", False, "einsum"),
    ("tiny-llama", True, "cpu_flash")])  # the prefill in the C++ kernel (on CPU)
def test_prefill_then_steps_equal_full_forward(name, scan_layers, impl, lengths):
  cfg, params = _setup(name, scan_layers, impl)
  model = Transformer(cfg)
  rng = np.random.default_rng(0)
  steps = 4
  rows = [rng.integers(1, 128, n + steps).astype(np.int32) for n in lengths]
  tokens, valid, positions = cache_lib.left_pad([list(r[:n]) for r, n in zip(rows, lengths)])
  step_tokens = np.stack([r[n:] for r, n in zip(rows, lengths)])
  prefill, stepped = _prefill_and_steps(model, params, tokens, positions, valid, step_tokens)
  # Right-padded full forward: causality makes the padding irrelevant to earlier logits.
  full = np.zeros((len(lengths), max(lengths) + steps), np.int32)
  for b, r in enumerate(rows):
    full[b, :len(r)] = r
  want = np.asarray(jax.jit(model.apply)({"params": params}, full))
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(np.asarray(prefill)[b, -n:], want[b, :n], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(stepped)[b], want[b, n:n + steps],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [2, 1])
def test_encoder_decoder_cross_attention_cache_equals_full_forward(batch):
  cfg, params = _setup("t5-tiny")
  model = Transformer(cfg)
  rng = np.random.default_rng(1)
  enc = rng.integers(1, 128, (2, 6)).astype(np.int32)[:batch]
  enc_valid = np.array([[1] * 6, [1] * 4 + [0] * 2], bool)[:batch]  # row 1 right-padded
  dec = rng.integers(1, 128, (2, 5)).astype(np.int32)[:batch]

  @jax.jit
  def cached(params):
    apply = functools.partial(model.apply, {"params": params})
    encoded = apply(enc, enc_valid.astype(np.int32), method=Transformer.encode)
    cache = cache_lib.init_cache(cfg, batch, 5, encoder_len=6)
    cache["encoder_valid"] = enc_valid
    positions = np.tile(np.arange(5, dtype=np.int32), (batch, 1))
    logits, cache = apply(dec[:, :2], positions[:, :2], cache, None, encoded,
                          method=Transformer.decode_cached)
    out = [logits]
    for i in range(2, 5):   # no `encoded` any more: cross-attention reads the cache
      logits, cache = apply(dec[:, i:i + 1], positions[:, i:i + 1], cache,
                            method=Transformer.decode_cached)
      out.append(logits)
    return jax.numpy.concatenate(out, axis=1)

  want = jax.jit(model.apply)({"params": params}, dec, encoder_tokens=enc,
                              encoder_segment_ids=enc_valid.astype(np.int32))
  np.testing.assert_allclose(cached(params), want, rtol=1e-5, atol=1e-5)
