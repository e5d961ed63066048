"""AWQ (Lin et al. 2024): scale salient input channels up before rounding to int4.

A few input features carry much larger activations than the rest; the weights that
multiply them matter most to the output, and group-wise rounding treats them like any
other. AWQ multiplies each input column of W by a factor s_j >= its peers' when the
feature is salient, quantizes W diag(s), and divides the de-quantized weights by s again
(the paper folds 1/s into the previous operation; here `Int4Tensor.smooth` stores s and
`dequantize` divides, which costs nothing extra where 4-bit weights are de-quantized
inside the jitted step anyway). Scaling a column up shrinks its relative rounding error
while the group's scale grows only a little, so the product's error falls. The factors
come from the activation statistics alone, with one exponent searched per layer:

  s(alpha) = mean|x|^alpha, normalised by sqrt(max s * min s)
  alpha*   = argmin over alpha in {0, 1/20, ..., 19/20} of  tr(D H D^T),
             D = W - Q(W diag(s)) diag(s)^-1,  H = X^T X / T (`calibration.collect`)

i.e. the layer's mean squared output error over the calibration inputs, which is what the
paper's grid search measures on the cached activations, computed here from their second
moment. alpha = 0 is plain round-to-nearest (s = 1), so the searched result is never
worse than RTN on the calibration data. The paper's second step, a search over clipping
ranges of each group (`auto_clip`), is not done here.
"""

import jax
import jax.numpy as jnp

from llmjax.quant.formats import quantize_int4

GRID = 20


def smooth_factors(abs_mean: jax.Array, alpha) -> jax.Array:
  """AWQ's per-input factors `[K]` for exponent `alpha` (module docstring); a feature
  never active gets the smallest factor the others have, not 0."""
  a = jnp.maximum(abs_mean.astype(jnp.float32), 1e-4 * jnp.max(abs_mean) + 1e-12)
  s = a ** alpha
  return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


def _quantized(w_rows: jax.Array, s: jax.Array, group_size: int):
  """The int4 tensor of `w diag(s)` (rows `[M, K]`; the kernel `[K, M]` contracts 0)."""
  return quantize_int4((w_rows * s[None, :]).T, axis=0, group_size=group_size)


def output_error(w_rows, hessian, abs_mean, group_size: int, alpha):
  """tr(D H D^T) for D = W - Q(W diag(s)) / s with s = `smooth_factors(abs_mean, alpha)`."""
  s = smooth_factors(abs_mean, alpha)
  d = w_rows - _quantized(w_rows, s, group_size).dequantize().T / s[None, :]
  return jnp.sum((d @ hessian) * d)


def awq_arrays(w_rows: jax.Array, hessian: jax.Array, abs_mean: jax.Array, group_size: int,
               grid: int = GRID) -> dict:
  """`{'packed', 'scale', 'smooth'}`: the `Int4Tensor` arrays AWQ chooses for `w_rows
  [M, K]` (module docstring), from the layer's input statistics."""
  w = w_rows.astype(jnp.float32)
  hessian = hessian.astype(jnp.float32)
  alphas = jnp.arange(grid, dtype=jnp.float32) / grid
  errors = jax.lax.map(lambda a: output_error(w, hessian, abs_mean, group_size, a), alphas)
  s = smooth_factors(abs_mean, alphas[jnp.argmin(errors)])
  t = _quantized(w, s, group_size)
  return {"packed": t.packed, "scale": t.scale, "smooth": s}
