"""Products with int8 weights: weight-only (float activations) and W8A8 (int8 both).

  weight-only  y = (x . q) * s_w: the int8 codes are cast to the activation dtype (exact:
               |q| <= 127 is representable even in bfloat16), the product accumulates in
               float32 and the per-output-channel scale is applied to the output, which
               equals x . (q * s_w) because s_w is constant along the contraction.
  W8A8         LLM.int8-style vector-wise quantization without the outlier split
               (Dettmers et al. 2022, section 3.1; SmoothQuant's "per-token" W8A8, Xiao
               et al. 2023): activations get a dynamic symmetric int8 scale per token
               (absmax / 127 over the contracted axes), the product of int8 codes
               accumulates exactly in int32, and y = acc * s_x * s_w.

int32 accumulation is exact while K * 127 * 127 < 2**31, i.e. for contractions up to
~133k elements; the float32 conversion of the sum rounds once (relative 6e-8).

Shapes follow `jax.lax.dot_general`: `x`'s last n axes contract with the weight's
contracted axes (in order), and the output is x's other axes followed by the weight's
other axes, which is what `'BLD,DNH->BLNH'` and `'BLNH,NHD->BLD'` need.
"""

import jax
import jax.numpy as jnp

from llmjax.errors import UserError
from llmjax.quant.formats import Axis, Int8Tensor, normalize_axes


def quantize_activations(x: jax.Array, axis: Axis = -1) -> tuple[jax.Array, jax.Array]:
  """Dynamic per-token symmetric int8: `(q int8, scale float32)`, scale = absmax / 127
  over `axis` (the features), kept as size-1 axes (`[..., 1]`)."""
  axes = normalize_axes(axis, x.ndim)
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=axes, keepdims=True) / 127.0
  q = jnp.round(x / jnp.where(scale == 0, 1.0, scale))
  return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def _dimension_numbers(x_ndim: int, w_axes: tuple[int, ...]):
  """dot_general numbers contracting x's last len(w_axes) axes with `w_axes`."""
  n = len(w_axes)
  return ((tuple(range(x_ndim - n, x_ndim)), w_axes), ((), ()))


def _check_shapes(x_shape, w_shape, w_axes):
  contracted = tuple(w_shape[a] for a in w_axes)
  if tuple(x_shape[len(x_shape) - len(w_axes):]) != contracted:
    raise UserError(f"Activations {tuple(x_shape)} do not end with the weight's contracted "
                    f"dims {contracted} (weight {tuple(w_shape)}, axes {w_axes}); reshape "
                    "the activations or quantize the weight with the matching axis.")


def _output_scale(w_scale: jax.Array, w_axes: tuple[int, ...]) -> jax.Array:
  """A keepdims per-channel scale as the weight's free dims, which end the output."""
  return jnp.squeeze(w_scale, axis=w_axes)


def int8_weight_matmul(x: jax.Array, w: Int8Tensor, dtype=None) -> jax.Array:
  """`x . dequantize(w)` for float `x`, accumulated in float32; `dtype` defaults to x's."""
  _check_shapes(x.shape, w.shape, w.axes)
  acc = jax.lax.dot_general(x, w.q.astype(x.dtype), _dimension_numbers(x.ndim, w.axes),
                            preferred_element_type=jnp.float32)
  return (acc * _output_scale(w.scale, w.axes)).astype(dtype or x.dtype)


def int8_dot(xq: jax.Array, wq: jax.Array, axis: Axis = 0) -> jax.Array:
  """The exact int32 product of int8 codes: x's last axes with the weight's `axis`."""
  w_axes = normalize_axes(axis, wq.ndim)
  _check_shapes(xq.shape, wq.shape, w_axes)
  if xq.dtype != jnp.int8 or wq.dtype != jnp.int8:
    raise UserError(f"int8 products take int8 codes, got {xq.dtype} and {wq.dtype}: quantize "
                    "with quantize_activations / quantize_int8 first.")
  return jax.lax.dot_general(xq, wq, _dimension_numbers(xq.ndim, w_axes),
                             preferred_element_type=jnp.int32)  # [..., *free]


def int8_matmul(xq: jax.Array, xs: jax.Array, wq: jax.Array, ws: jax.Array, axis: Axis = 0,
                dtype=jnp.float32) -> jax.Array:
  """W8A8: `(xq * xs) . (wq * ws)`, the int8 product accumulated in int32 (`int8_dot`).

  Args:
    xq, xs: `quantize_activations` output (xs has size-1 contracted axes).
    wq, ws: int8 weight codes and their keepdims per-channel scale (`Int8Tensor.q`,
      `.scale`); `axis` its contracted axes, matching x's last axes in order.
  """
  w_axes = normalize_axes(axis, wq.ndim)
  acc = int8_dot(xq, wq, w_axes)
  n_free = wq.ndim - len(w_axes)
  x_scale = xs.reshape(xs.shape[:xs.ndim - len(w_axes)] + (1,) * n_free)  # per token
  y = acc.astype(jnp.float32) * x_scale * _output_scale(ws, w_axes)
  return y.astype(dtype)
