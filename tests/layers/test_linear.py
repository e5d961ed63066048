"""`Einsum` and the products behind it (`llmjax.kernels.dense`): merged contractions
and one-row products compute the same products."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.kernels.dense import matmul, merge_contraction, one_row_layout, row_vector_product
from llmjax.layers.linear import Einsum


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


def test_row_vector_product_with_and_without_bias():
  x, kernel_t, bias = _normal(1, 6), _normal(4, 6, seed=1), _normal(4, seed=2)
  got = row_vector_product(jnp.asarray(x), jnp.asarray(kernel_t), jnp.asarray(bias))
  assert got.shape == (1, 4) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), x @ kernel_t.T + bias, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(row_vector_product(x, kernel_t)), x @ kernel_t.T,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("equation,x_shape,shape,want", [
    ("BLD,DNH->BLNH", (1, 1, 6), (6, 2, 3), (6, 1)),    # query, key, value
    ("BLNH,NHD->BLD", (1, 1, 2, 3), (2, 3, 5), (6, 2)),  # attention output
    ("BLD,DF->BLF", (1, 1, 6), (6, 5), (6, 1)),          # MLP
    ("BD,DC->BC", (1, 6), (6, 3), (6, 1)),               # pooler / classifier
    ("BLD,DF->BLF", (2, 1, 6), (6, 5), None),            # two rows: a matrix product
    ("BLD,DF->BLF", (1, 2, 6), (6, 5), None),
    ("BLD,VD->BLV", (1, 1, 6), (5, 6), None),            # kernel not [contracted | out]
    ("BLNH,HND->BLD", (1, 1, 2, 3), (3, 2, 5), None),    # contracted in another order
])
def test_one_row_layout(equation, x_shape, shape, want):
  assert one_row_layout(equation, np.zeros(x_shape, np.float32)) == want


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("equation,x_shape,shape", [
    ("BLD,DNH->BLNH", (1, 1, 6), (6, 2, 3)),
    ("BLNH,NHD->BLD", (1, 1, 2, 3), (2, 3, 5)),
    ("BLD,DF->BLF", (1, 1, 6), (6, 5)),
    ("BD,DC->BC", (1, 6), (6, 3)),
])
def test_one_row_einsum_equals_numpy(equation, x_shape, shape, use_bias):
  """A one-row `Einsum` (a batch-1 decoding step) runs as `row_vector_product` over the
  output-major kernel (a transpose, and the bias or zeros as an extra column) and
  computes the same product; a bfloat16 layer keeps the general product."""
  layer = Einsum(equation, shape, (None,) * len(shape), use_bias=use_bias)
  x = _normal(*x_shape)
  params = jax.tree.map(lambda a: jnp.asarray(_normal(*a.shape, seed=3)),
                        nn.meta.unbox(layer.init(jax.random.key(0), jnp.asarray(x))))
  p = params["params"]
  want = np.einsum(equation, x, np.asarray(p["kernel"]))
  if use_bias:
    want = want + np.asarray(p["bias"])
  got = layer.apply(params, jnp.asarray(x))
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  prims = {e.primitive.name for e in jax.make_jaxpr(layer.apply)(params, x).jaxpr.eqns}
  assert {"transpose", "concatenate", "dot_general"} <= prims        # the one-row path ran
  low = Einsum(equation, shape, (None,) * len(shape), use_bias=use_bias, dtype=jnp.bfloat16)
  np.testing.assert_allclose(np.asarray(low.apply(params, jnp.asarray(x)), np.float32), want,
                             rtol=5e-2, atol=1e-1)
