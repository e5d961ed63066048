"""Calibration statistics of every dense layer's inputs, for GPTQ and AWQ.

`collect(model, params, batches)` runs the float model on calibration token windows and,
through the intercept seam, accumulates for every `Einsum` its input rows x (`[T, K]`,
`input_rows`):

  hessian   X^T X / T  `[K, K]`: GPTQ's (half) Hessian of the output error, and the
            weighting of the output error `tr(D H D^T)` both methods minimise;
  abs_mean  mean |x| per input feature `[K]`: AWQ's activation salience.

One float pass: each layer sees the float outputs of the layers before it, not their
quantized ones (GPTQ's "sequential" variant feeds the quantized ones; the difference is
small at 4 bits and the float pass calibrates every layer at once). The model runs
unscanned, without remat and with q, k, v as separate products, so that every product is
called and its input reaches the interceptor outside any inner transform; statistics of
a scanned model are stacked back under its 'layers' paths (`[num_layers, ...]`).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.errors import UserError
from llmjax.layers.intercept import intercept
from llmjax.layers.linear import Einsum

STATS = ("hessian", "abs_mean")


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


def collect(model, params, batches) -> dict[str, dict[str, np.ndarray]]:
  """`{layer path: {'hessian': [K, K], 'abs_mean': [K]}}` (float32) of every `Einsum`'s
  inputs over the token windows in `batches` (int `[B, L]` arrays; module docstring).
  Paths are `model`'s: a scanned stack's layers come stacked, `[num_layers, ...]`,
  under 'decoder/layers/...'."""
  from llmjax.models import stack
  scanned = model.config.scan_layers
  flat = calibration_model(model)
  flat_params = stack.unstack_layers(params) if scanned else params

  @jax.jit
  def batch_sums(p, tokens):
    sums = {}

    def accumulate(call):
      x = input_rows(call.args[0], call.module.equation).astype(jnp.float32)
      old = sums.get(call.path, {"hessian": 0.0, "abs_mean": 0.0, "rows": 0})
      sums[call.path] = {"hessian": old["hessian"] + x.T @ x,
                         "abs_mean": old["abs_mean"] + jnp.abs(x).sum(0),
                         "rows": old["rows"] + x.shape[0]}
      return call.proceed()

    kwargs = {"encoder_tokens": tokens} if flat.config.arch == "encoder_decoder" else {}
    with intercept(accumulate, layers=(Einsum,), methods=("__call__",)):
      flat.apply({"params": p}, tokens, **kwargs)
    return sums

  total = {}
  for tokens in batches:
    sums = jax.device_get(batch_sums(flat_params, jnp.asarray(tokens, jnp.int32)))
    for path, new in sums.items():
      old = total.setdefault(path, {"hessian": 0.0, "abs_mean": 0.0, "rows": 0})
      for key in old:
        old[key] = old[key] + np.asarray(new[key], np.float64)
  if not total:
    raise UserError("calibration got no token windows; give it some (e.g. "
                    "--calibration_samples=128).")
  out = {path: {k: (t[k] / t["rows"]).astype(np.float32) for k in STATS}
         for path, t in total.items()}
  if not scanned:
    return out
  stacked, single = {}, {}
  for path in sorted(out, key=_layer_index):
    if re.search(r"layers_\d+", path):
      stacked.setdefault(re.sub(r"layers_\d+", "layers", path), []).append(out[path])
    else:
      single[path] = out[path]
  return {**single, **{k: {s: np.stack([v[s] for v in vs]) for s in STATS}
                       for k, vs in stacked.items()}}


def _layer_index(path: str) -> int:
  m = re.search(r"layers_(\d+)", path)
  return int(m.group(1)) if m else -1


