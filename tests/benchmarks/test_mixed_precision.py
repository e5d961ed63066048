"""Mixed-precision matmuls (`llmjax.kernels.dense.einsum_f32`) are bf16 in both passes.

The speed of the bf16 train step (benchmarks/README.md) rests on the backward dots
taking bf16 operands, which `jnp.einsum`'s own transpose would upcast to float32. These
tests check that property on the jaxpr, and the gradients against float32 references.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.kernels.dense import einsum_f32

EQUATIONS = [("BLD,DNH->BLNH", (2, 3, 8), (8, 2, 4)),      # projection
             ("BLNH,NHD->BLD", (2, 3, 2, 4), (2, 4, 8)),   # output projection
             ("BLKGH,BSKH->BKGLS", (2, 3, 2, 1, 4), (2, 5, 2, 4)),  # attention scores
             ("BLD,VD->BLV", (2, 3, 8), (7, 8))]           # tied logits


def _operands(a_shape, b_shape, dtype):
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.standard_normal(a_shape), dtype),
          jnp.asarray(rng.standard_normal(b_shape), dtype))


def _loss(equation):
  return lambda x, y: jnp.sum(jnp.sin(einsum_f32(equation, x, y)))


@pytest.mark.parametrize("equation,a_shape,b_shape", EQUATIONS)
def test_bf16_gradients_match_float32_within_bf16_rounding(equation, a_shape, b_shape):
  x, y = _operands(a_shape, b_shape, jnp.bfloat16)
  got = jax.grad(_loss(equation), (0, 1))(x, y)
  want = jax.grad(_loss(equation), (0, 1))(x.astype(jnp.float32), y.astype(jnp.float32))
  assert einsum_f32(equation, x, y).dtype == jnp.float32
  for g, w in zip(got, want):
    assert g.dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)) / jnp.max(jnp.abs(w)))
    assert err < 2e-2, (equation, err)


@pytest.mark.parametrize("equation,a_shape,b_shape", EQUATIONS)
def test_float32_gradients_are_jnp_einsums(equation, a_shape, b_shape):
  x, y = _operands(a_shape, b_shape, jnp.float32)
  got = jax.grad(_loss(equation), (0, 1))(x, y)
  plain = lambda x, y: jnp.sum(jnp.sin(jnp.einsum(equation, x, y)))
  for g, w in zip(got, jax.grad(plain, (0, 1))(x, y)):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def _dot_operand_dtypes(fn, *args) -> set:
  dtypes = set()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        dtypes.update(str(v.aval.dtype) for v in eqn.invars)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return dtypes


def test_backward_dots_take_bf16_operands():
  equation, a_shape, b_shape = EQUATIONS[0]
  x, y = _operands(a_shape, b_shape, jnp.bfloat16)
  assert _dot_operand_dtypes(jax.grad(_loss(equation), (0, 1)), x, y) == {"bfloat16"}
  # The reason for the custom gradient: jnp.einsum's transpose upcasts to float32.
  plain = lambda x, y: jnp.sum(jnp.sin(jnp.einsum(equation, x, y,
                                                  preferred_element_type=jnp.float32)))
  assert "float32" in _dot_operand_dtypes(jax.grad(plain, (0, 1)), x, y)
