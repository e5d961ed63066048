"""`Einsum` helpers: merged contractions and fused projections compute the same products."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.layers.linear import Einsum, fused_dense, merge_contraction
from llmjax.testing import reference


def _normal(*shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("equation,x_shape,y_shape,merged", [
    ("BLNH,NHD->BLD", (2, 3, 4, 5), (4, 5, 6), "BLZ,ZD->BLD"),
    ("BLD,DNH->BLNH", (2, 3, 6), (6, 4, 5), None),           # one contracted dim
    ("BLNH,HND->BLD", (2, 3, 4, 5), (5, 4, 6), None),        # different order
    ("BNLH,NHD->BLD", (2, 4, 3, 5), (4, 5, 6), None),        # not side by side in x
])
def test_merge_contraction(equation, x_shape, y_shape, merged):
  x, y = _normal(*x_shape), _normal(*y_shape, seed=1)
  eq, mx, my = merge_contraction(equation, x, y)
  assert eq == (merged or equation)
  if merged:
    assert mx.ndim == x.ndim - 1 and my.ndim == y.ndim - 1
  np.testing.assert_allclose(np.einsum(eq, mx, my), np.einsum(equation, x, y), rtol=1e-5)


class _Projections(nn.Module):
  """Three projections of one input, called one by one or through `fused_dense`."""

  use_bias: bool
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    dense = {"use_bias": self.use_bias, "dtype": self.dtype}
    self.q = Einsum("BLD,DNH->BLNH", (6, 4, 3), ("embed", "heads", "head_dim"), **dense)
    self.k = Einsum("BLD,DKH->BLKH", (6, 2, 3), ("embed", "kv_heads", "head_dim"), **dense)
    self.v = Einsum("BLD,DKH->BLKH", (6, 2, 3), ("embed", "kv_heads", "head_dim"), **dense)

  def __call__(self, x, fused=False):
    layers = [self.q, self.k, self.v]
    return fused_dense(layers, x) if fused else [layer(x) for layer in layers]


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_dense_equals_separate_projections(use_bias, dtype):
  x = _normal(2, 5, 6)
  module = _Projections(use_bias, dtype)
  params = reference.random_params(module, x, std=0.5)
  separate = module.apply({"params": params}, x)
  fused = module.apply({"params": params}, x, fused=True)
  for a, b in zip(separate, fused):
    assert a.shape == b.shape and a.dtype == b.dtype == dtype
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=tol, atol=tol)
  # and against numpy, so the fused split cannot silently swap outputs
  q = np.einsum("bld,dnh->blnh", x, params["q"]["kernel"].astype(np.float32))
  if use_bias:
    q = q + params["q"]["bias"].astype(np.float32)
  np.testing.assert_allclose(np.asarray(fused[0], np.float32), q, rtol=2e-2, atol=2e-2)


def test_fused_dense_rejects_other_equations():
  class Bad(nn.Module):
    def setup(self):
      self.a = Einsum("BLNH,NHD->BLD", (2, 3, 4), (None, None, None))

    def __call__(self, x):
      self.a(x)
      return fused_dense([self.a], x)

  x = _normal(1, 2, 2, 3)
  with pytest.raises(ValueError, match="BLD,D"):
    Bad().init(jax.random.key(0), x)
