"""LayerNorm and RMSNorm against numpy; statistics in float32 under bfloat16 compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llmjax.layers.norms import LayerNorm, RMSNorm
from llmjax.testing import reference


def _input(seed=0, shape=(2, 3, 16)):
  return (np.random.default_rng(seed).normal(size=shape) * 3 + 1).astype(np.float32)


@pytest.mark.parametrize("use_bias", [True, False])
def test_layer_norm_matches_numpy(use_bias):
  x = _input()
  layer = LayerNorm(eps=1e-5, use_bias=use_bias)
  p = reference.random_params(layer, x)
  got = layer.apply({"params": p}, x)
  want = reference.layer_norm(x, p["scale"], p.get("bias"), eps=1e-5)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert set(p) == ({"scale", "bias"} if use_bias else {"scale"})


def test_rms_norm_matches_numpy():
  x = _input()
  layer = RMSNorm(eps=1e-6)
  p = reference.random_params(layer, x)
  got = layer.apply({"params": p}, x)
  np.testing.assert_allclose(got, reference.rms_norm(x, p["scale"], 1e-6),
                             rtol=1e-5, atol=1e-5)


def test_bf16_compute_keeps_f32_params_and_stats():
  # A large mean with a small spread: a bfloat16 variance would be mostly rounding error.
  x = jnp.asarray(_input(shape=(4, 256)) / 6 + 2.8, jnp.bfloat16)
  layer = LayerNorm(dtype=jnp.bfloat16)
  variables = layer.init(jax.random.key(0), x)
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(nn.unbox(variables)))
  got = layer.apply(variables, x)
  assert got.dtype == jnp.bfloat16
  want = reference.layer_norm(np.asarray(x, np.float32), 1.0, 0.0)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.05)
