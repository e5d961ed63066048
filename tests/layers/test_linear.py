"""`Einsum` helpers: merged contractions compute the same products."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.layers.linear import Einsum, matmul, merge_contraction


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


@pytest.mark.parametrize("equation,x_shape,k_shape", [
    ("BLD,DF->BLF", (2, 3, 4), (4, 5)),                 # YD,DF->YF
    ("BLD,DNH->BLNH", (2, 3, 4), (4, 2, 3)),            # YD,DX->YX
    ("BLNH,NHD->BLD", (2, 3, 4, 5), (4, 5, 6)),         # YZ,ZD->YD
    ("BLD,VD->BLV", (2, 3, 4), (7, 4)),                 # YD,VD->YV
    ("ABLD,DF->ABLF", (2, 3, 2, 4), (4, 5)),
    ("BD,DE->BE", (2, 4), (4, 3)),                      # nothing to merge
    ("BLD,BDF->BLF", (2, 3, 4), (2, 4, 5)),             # B is in the kernel: a batch dim
    ("LBD,DF->BLF", (3, 2, 4), (4, 5)),                 # not the output's leading order
    ("BLD,DNH->BLHN", (2, 3, 4), (4, 2, 3)),            # not the output's trailing order
])
def test_matmul_equals_einsum(equation, x_shape, k_shape):
  x, k = _normal(*x_shape), _normal(*k_shape, seed=1)
  expected = np.einsum(equation, x, k)
  got = matmul(equation, jnp.asarray(x), jnp.asarray(k))
  assert got.shape == expected.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
  low = matmul(equation, jnp.asarray(x, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16))
  assert low.shape == expected.shape and low.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(low), expected, rtol=5e-2, atol=5e-2)

  # gradients too, against jnp.einsum's own
  ct = _normal(*expected.shape, seed=2)
  loss = lambda f: lambda x, k: jnp.sum(f(x, k) * ct)
  got = jax.grad(loss(lambda x, k: matmul(equation, x, k)), argnums=(0, 1))(x, k)
  want = jax.grad(loss(lambda x, k: jnp.einsum(equation, x, k)), argnums=(0, 1))(x, k)
  for g, w in zip(got, want):
    assert g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def _contracted_dims(fn, *args):
  """The number of contracted dims of every dot_general in `fn`'s jaxpr (sub-jaxprs too)."""
  counts = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        counts.append(len(contract))
      for sub in jax.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return counts


@pytest.mark.parametrize("equation,x_shape,shape", [
    ("BLD,DF->BLF", (2, 3, 4), (4, 5)),
    ("BLD,DNH->BLNH", (2, 3, 4), (4, 2, 3)),
    ("BLNH,NHD->BLD", (2, 3, 2, 3), (2, 3, 4)),
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_einsum_layer_gradients_contract_one_dim(equation, x_shape, shape, dtype):
  """In float32 the forward, input gradient and kernel gradient are each a product over
  one merged dim (what keeps XLA:CPU from copying transposed operands for the weight
  gradients); in bfloat16 the kernel gradient keeps contracting batch and length."""
  layer = Einsum(equation, shape, (None,) * len(shape), dtype=dtype)
  x = jnp.asarray(_normal(*x_shape), dtype)
  params = layer.init(jax.random.key(0), x)

  def loss(params, x):
    return jnp.sum(layer.apply(params, x).astype(jnp.float32) ** 2)

  counts = _contracted_dims(jax.grad(loss, argnums=(0, 1)), params, x)
  assert counts == ([1, 1, 1] if dtype == jnp.float32 else [1, 1, 2])
