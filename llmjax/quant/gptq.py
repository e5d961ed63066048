"""GPTQ (Frantar et al. 2023): int4 weights chosen for the layer's outputs, not its weights.

Round-to-nearest (`formats.quantize_int4`, "RTN") rounds every weight on its own. For a
layer `y = W x` (W `[M, K]`, the `to_rows` layout) GPTQ minimises the output error over
calibration inputs X instead, `||W X - Q X||^2`, whose Hessian in each row of W is
H = 2 X X^T (`[K, K]`, the same for every row). It quantizes the K input columns in
order and, after each, moves the column's rounding error onto the columns not yet
quantized, as the inverse Hessian weighs them (Optimal Brain Surgeon's update):

  H   += damp * mean(diag H) * I          (dampening: X X^T is often near-singular)
  U    = the upper Cholesky factor of H^-1 (H^-1 = U^T U)
  for i = 0 .. K-1:
    at a group start (i % g == 0): scale s = absmax(W[:, i:i+g]) / 7, from the weights
                                   as the earlier columns' errors left them
    q_i  = clip(round(W[:, i] / s), -7, 7)
    e    = (W[:, i] - s q_i) / U[i, i]
    W[:, i:] -= e U[i, i:]               (U is upper triangular: only later columns move)

Row i of U is, up to the factor U[i, i], row i of the inverse Hessian of the columns
still free once 0..i-1 are fixed (GPTQ section 4, "Cholesky reformulation"), so this is
OBS's greedy elimination without updating an inverse every step; the paper's "lazy
batch" blocks only regroup the same updates for GPU memory bandwidth and are left out
here (each step is one rank-1 update). The codes and scales are exactly `Int4Tensor`'s
(symmetric, [-7, 7], a scale per group of g inputs), so a GPTQ checkpoint is an ordinary
int4 workdir: `QuantizedModel` runs it unchanged and `dequantize` reads it.

Calibration (`calibration.collect`): H = X X^T / T of every `Einsum`'s inputs on
calibration token windows, collected through the intercept seam from the float model
in one pass (the paper feeds each layer the outputs of the already-quantized layers
before it; one float pass is the simpler variant). Inputs a layer never sees (a zero
diagonal: dead features) get their weights zeroed, as in the reference code.

Why hand-written rather than qwix's `contrib.gptq`: that one emits qwix's own `QArray`
(its scale convention, optional zero points) rather than this package's packed
`Int4Tensor`, and unrolls the column loop in Python (K traced steps per layer); this is
one `fori_loop` of 25 lines in the storage format the rest of `llmjax.quant` reads.
"""

import jax
import jax.numpy as jnp

from llmjax.quant.formats import _safe, check_group_size, pack_nibbles

DAMP = 0.01


def inverse_hessian_factor(hessian: jax.Array, damp: float = DAMP):
  """`(U, dead)`: the upper Cholesky factor of the dampened H^-1 and the inputs never
  seen (zero diagonal), whose diagonal is set to 1 first."""
  k = hessian.shape[0]
  diag = jnp.diag(hessian)
  dead = diag == 0
  h = hessian + jnp.diag(dead.astype(hessian.dtype))
  h = h + damp * jnp.mean(diag) * jnp.eye(k, dtype=hessian.dtype)
  lower = jnp.linalg.cholesky(h)
  h_inv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(k, dtype=hessian.dtype))
  return jnp.linalg.cholesky(h_inv).T, dead


def gptq_rows(w: jax.Array, hessian: jax.Array, group_size: int, damp: float = DAMP):
  """`(codes int8 [M, K] in [-7, 7], scale float32 [M, K / g])` of `w [M, K]` by GPTQ
  (module docstring) for the input Hessian `hessian [K, K]`."""
  m, k = w.shape
  check_group_size(k, group_size)
  u, dead = inverse_hessian_factor(hessian.astype(jnp.float32), damp)
  w = jnp.where(dead[None, :], 0.0, w.astype(jnp.float32))

  def column(i, carry):
    w, codes, scales, s = carry
    group = jax.lax.dynamic_slice_in_dim(w, (i // group_size) * group_size, group_size, 1)
    s = jnp.where(i % group_size == 0, jnp.max(jnp.abs(group), axis=1) / 7.0, s)
    col = w[:, i]
    q = jnp.clip(jnp.round(col / _safe(s)), -7, 7)
    err = (col - q * s) / u[i, i]
    w = w - err[:, None] * u[i][None, :]  # u[i, :i] == 0: columns before i are done
    codes = codes.at[:, i].set(q.astype(jnp.int8))
    scales = scales.at[:, i // group_size].set(s)
    return w, codes, scales, s

  init = (w, jnp.zeros((m, k), jnp.int8), jnp.zeros((m, k // group_size), jnp.float32),
          jnp.zeros((m,), jnp.float32))
  _, codes, scales, _ = jax.lax.fori_loop(0, k, column, init)
  return codes, scales


def gptq_arrays(w_rows: jax.Array, hessian: jax.Array, group_size: int,
                damp: float = DAMP) -> dict:
  """`{'packed', 'scale'}`: the `Int4Tensor` arrays (`ptq.to_arrays`) GPTQ chooses."""
  codes, scales = gptq_rows(w_rows, hessian, group_size, damp)
  return {"packed": pack_nibbles(codes + 8), "scale": scales}


def output_error(w_rows, dequantized_rows, hessian) -> float:
  """The calibration objective: mean over inputs of ||(W - Q) x||^2 = tr(D H D^T)."""
  d = jnp.asarray(w_rows, jnp.float32) - jnp.asarray(dequantized_rows, jnp.float32)
  return float(jnp.sum((d @ jnp.asarray(hessian, jnp.float32)) * d))
