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

Calibration (`hessians`): the inputs of every `Einsum` on calibration token windows,
collected through the intercept seam from the float model in one pass (the paper feeds
each layer the outputs of the already-quantized layers before it; one float pass is the
common simplification, e.g. AutoGPTQ's default is sequential, qwix's contrib also
calibrates on the float model). Inputs a layer never sees (a zero diagonal: dead
features) get their weights zeroed, as in the reference code.

Why hand-written rather than qwix's `contrib.gptq`: that one emits qwix's own `QArray`
(its scale convention, optional zero points) rather than this package's packed
`Int4Tensor`, and unrolls the column loop in Python (K traced steps per layer); this is
one `fori_loop` of 25 lines in the storage format the rest of `llmjax.quant` reads.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.errors import UserError
from llmjax.layers.intercept import intercept
from llmjax.layers.linear import Einsum
from llmjax.quant.formats import _safe, check_group_size, pack_nibbles

DAMP = 0.01


def input_rows(x: jax.Array, equation: str) -> jax.Array:
  """An `Einsum`'s input as `[T, K]`: every index but the contracted ones flattened into
  rows, the contracted ones last, in the kernel's axis order (the `to_rows` columns)."""
  lhs, kernel, out = equation.replace("->", ",").split(",")
  contracted = "".join(c for c in kernel if c not in out)
  free = "".join(c for c in lhs if c not in contracted)
  x = jnp.einsum(f"{lhs}->{free}{contracted}", x)
  return x.reshape(-1, int(np.prod([x.shape[len(free) + i] for i in range(len(contracted))])))


def calibration_model(model):
  """`model` with the layout calibration needs: unscanned, no remat (the interceptor's
  values leave no inner transform) and q, k, v as separate products (fused q/k/v reads
  their weights and never calls them)."""
  from llmjax.models.transformer import Transformer
  cfg = model.config.replace(scan_layers=False, remat="none", fused_qkv=False)
  return Transformer(cfg)


def hessians(model, params, batches) -> dict[str, np.ndarray]:
  """`{layer path: H}`: X X^T / T (float32 `[K, K]`) of every `Einsum`'s inputs over the
  token windows in `batches` (int `[B, L]` arrays). Paths are `model`'s: a scanned
  stack's layers come stacked, `[num_layers, K, K]`, under 'decoder/layers/...'."""
  from llmjax.models import stack
  scanned = model.config.scan_layers
  flat = calibration_model(model)
  flat_params = stack.unstack_layers(params) if scanned else params

  @jax.jit
  def batch_sums(p, tokens):
    sums = {}

    def collect(call):
      x = input_rows(call.args[0], call.module.equation).astype(jnp.float32)
      sums[call.path] = sums.get(call.path, 0.0) + x.T @ x
      return call.proceed()

    kwargs = {"encoder_tokens": tokens} if flat.config.arch == "encoder_decoder" else {}
    with intercept(collect, layers=(Einsum,), methods=("__call__",)):
      flat.apply({"params": p}, tokens, **kwargs)
    return sums, tokens.size

  total, count = {}, 0
  for tokens in batches:
    sums, n = batch_sums(flat_params, jnp.asarray(tokens, jnp.int32))
    total = {k: total.get(k, 0.0) + np.asarray(v, np.float64) for k, v in sums.items()}
    count += int(n)
  if not count:
    raise UserError("GPTQ got no calibration tokens; give it calibration batches (e.g. "
                    "--calibration_samples=128).")
  out = {k: (v / count).astype(np.float32) for k, v in total.items()}
  if not scanned:
    return out
  stacked, single = {}, {}
  for path in sorted(out, key=_layer_index):
    if re.search(r"layers_\d+", path):
      stacked.setdefault(re.sub(r"layers_\d+", "layers", path), []).append(out[path])
    else:
      single[path] = out[path]
  return {**single, **{k: np.stack(v) for k, v in stacked.items()}}


def _layer_index(path: str) -> int:
  m = re.search(r"layers_(\d+)", path)
  return int(m.group(1)) if m else -1


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
