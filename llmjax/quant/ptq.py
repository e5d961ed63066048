"""Post-training quantization of a whole parameter tree (`llmjax quantize`).

`quantize_params(model, params, method)` replaces the weight of every dense layer (each
`Einsum` kernel; the `embed` table and the `lm_head` only when asked) by the stored
arrays of its format, beside the layer's bias, in a plain nested dict that Orbax saves
and restores bit for bit. No de-quantized float of a quantized layer is kept:

  int8, w8a8  kernel_q int8 [kernel shape], kernel_scale f32 [kernel shape, contracted
              axes of size 1]: symmetric, per output channel (LLM.int8, Dettmers et al.
              2022). w8a8 stores the same and quantizes activations at run time
              (SmoothQuant's per-token W8A8, Xiao et al. 2023).
  int4        kernel_packed uint8 [M, K/2], kernel_scale f32 [M, K/g]: group-wise along
              the input (GPTQ/AWQ layout). g = group_size, or the layer's whole input
              width K when K is smaller; g must be even and divide K. The codes are
              rounded to nearest, or chosen by GPTQ (algorithm='gptq', `gptq`) from the
              layers' input statistics on calibration data. AWQ (algorithm='awq',
              `awq`) adds kernel_smooth f32 [K], its per-input factor.
  nf4         kernel_packed uint8, kernel_absmax f32 (or kernel_absmax_q int8 +
              kernel_absmax_scale f32 + kernel_absmax_mean f32 with double quantization):
              blocks of block_size along the input of each output channel (QLoRA,
              Dettmers et al. 2023).

The contracted axes of a kernel come from its `Einsum` equation (kernel letters absent
from the output: D of 'BLD,DNH->BLNH', N and H of 'BLNH,NHD->BLD'); an embedding table
`[V, D]` contracts D (its tied logits are 'BLD,VD->BLV'), so a token's row has its own
scales. Scanned layers (a leading layers axis on every leaf) are quantized one layer
slice at a time, so a scanned tree unstacks into exactly the unscanned one's arrays.

`from_arrays` rebuilds the `llmjax.quant` container from a layer's arrays (the formats
are self-describing: a group or block size follows from the array shapes), and
`dequantized_params` is the inverse view: the float tree that quantization stands for.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.errors import UserError
from llmjax.layers.intercept import intercept
from llmjax.layers.linear import Einsum
from llmjax.quant.formats import Int4Tensor, Int8Tensor, quantize_int4, quantize_int8, to_rows
from llmjax.quant.nf4 import NF4Tensor, QuantizedScales, quantize_nf4

METHODS = ("int8", "int4", "nf4", "w8a8")
ALGORITHMS = ("rtn", "gptq", "awq")  # how int4 codes are chosen (round to nearest or not)
SCALE_BLOCK = 256  # NF4 double quantization's second-level block (QLoRA)
FIELDS = ("q", "scale", "packed", "smooth", "absmax", "absmax_q", "absmax_scale",
          "absmax_mean")
MARKERS = ("q", "packed")  # a layer holding `<weight>_q` or `<weight>_packed` is quantized


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """What `quantize_params` does; recorded in the checkpoint (`meta['quantization']`)."""

  method: str = "int8"
  group_size: int = 128       # int4: input elements per scale (or the whole input width)
  block_size: int = 64        # nf4: elements per absmax block
  double_quant: bool = False  # nf4: block scales in int8 (QLoRA's double quantization)
  include_embed: bool = False  # quantize the `embed` table (and so tied logits)
  include_head: bool = False   # quantize the `lm_head` (untied models)
  algorithm: str = "rtn"       # int4: 'rtn' (round to nearest), 'gptq' or 'awq' (calibrated)
  damp: float = 0.01           # gptq: Hessian dampening, a fraction of its mean diagonal

  def __post_init__(self):
    if self.method not in METHODS:
      raise UserError(f"unknown quantization method {self.method!r}; use one of "
                      f"{', '.join(METHODS)}.")
    if self.algorithm not in ALGORITHMS:
      raise UserError(f"unknown quantization algorithm {self.algorithm!r}; use one of "
                      f"{', '.join(ALGORITHMS)}.")
    if self.algorithm != "rtn" and self.method != "int4":
      raise UserError(f"{self.algorithm} chooses int4 codes; pass --method=int4 with "
                      f"--algorithm={self.algorithm} (not {self.method}).")
    if self.group_size <= 0 or self.block_size <= 0:
      raise UserError(f"group_size={self.group_size} and block_size={self.block_size} must "
                      "be positive (defaults: 128 for int4, 64 for nf4).")


@dataclasses.dataclass(frozen=True)
class Layer:
  """A dense layer as tracing the model sees it: its weight's name, per-layer shape and
  contracted axes."""

  path: str
  weight: str                # 'kernel' (Einsum) or 'embedding' (Embed)
  shape: tuple[int, ...]
  axes: tuple[int, ...]      # the contracted (input) axes of the weight
  equation: str


def contracted_axes(equation: str) -> tuple[int, ...]:
  """Kernel axes an `Einsum` equation contracts: its kernel letters absent from the output."""
  _, kernel, out = equation.replace("->", ",").split(",")
  return tuple(i for i, c in enumerate(kernel) if c not in out)


def check_dot_layout(equation: str, path: str) -> None:
  """int8 products use `dot_general` (x's trailing axes with the kernel's contracted axes,
  output = x's others + the kernel's others); refuse an equation that is not laid out so."""
  x, kernel, out = equation.replace("->", ",").split(",")
  contracted = "".join(c for c in kernel if c not in out)
  free_x, free_k = x[:len(x) - len(contracted)], "".join(c for c in kernel if c in out)
  if not x.endswith(contracted) or out != free_x + free_k:
    raise UserError(f"layer {path} computes {equation!r}, which the int8 product cannot run "
                    "(it contracts the input's last axes with the kernel's, in order); use "
                    "--method=int4 or nf4 for it.")


def layer_of(call) -> Layer:
  """The `Layer` of an intercepted `Einsum` or `Embed` call."""
  m = call.module
  if isinstance(m, Einsum):
    return Layer(call.path, "kernel", tuple(m.shape), contracted_axes(m.equation), m.equation)
  return Layer(call.path, "embedding", (m.vocab_size, m.features), (1,), "BLD,VD->BLV")


def recorder(seen: dict):
  """An interceptor that records `{path: Layer}` of every call into `seen`."""
  def record(call):
    seen[call.path] = layer_of(call)
    return call.proceed()
  return record


def dense_layers(model) -> dict[str, Layer]:
  """`{path: Layer}` of every `Einsum` and `Embed` the model calls, found by tracing its
  init (nothing is computed); `classify` too when the model has a classifier."""
  cfg = model.config
  seen = {}
  tokens, key = jax.ShapeDtypeStruct((1, 2), jnp.int32), jax.random.PRNGKey(0)
  with intercept(recorder(seen)):
    if cfg.arch == "encoder_decoder":
      jax.eval_shape(lambda t, e: model.init(key, t, encoder_tokens=e), tokens, tokens)
    else:
      jax.eval_shape(lambda t: model.init(key, t), tokens)
    if cfg.num_classes:  # BERT's pooler and classifier are only called by `classify`
      jax.eval_shape(lambda t: model.init(key, t, method="classify"), tokens)
  return seen


def node_at(params, path: str):
  """The parameter dict of the module at `path` ('decoder/layers/mlp/wi'), or None."""
  node = params
  for key in path.split("/"):
    if not isinstance(node, dict) or key not in node:
      return None
    node = node[key]
  return node if isinstance(node, dict) else None


def is_quantized(node: dict, weight: str) -> bool:
  return any(f"{weight}_{m}" in node for m in MARKERS)


def selected(layer: Layer, cfg: QuantConfig, tied: bool) -> bool:
  """Whether `quantize_params` quantizes `layer`: every Einsum but the `lm_head` (unless
  include_head), and of the tables only `embed` (include_embed)."""
  if layer.weight == "kernel":
    return layer.path != "lm_head" or cfg.include_head
  if layer.path != "embed":
    return False  # token types etc.: tiny tables, lookups only
  if tied and cfg.include_head and not cfg.include_embed:
    raise UserError("this model ties its embeddings: the output head is the `embed` table, "
                    "which its inputs use too; pass --include_embed (with or without "
                    "--include_head) to quantize both, or neither to keep it float.")
  return cfg.include_embed


def group_size(layer: Layer, requested: int) -> int:
  """The int4 group of a layer: `requested`, or the input width K when K is smaller;
  it must be even and divide K (two codes share a byte, groups do not straddle rows)."""
  width = math.prod(layer.shape[a] for a in layer.axes)
  g = min(requested, width)
  if g % 2 or width % g:
    works = [d for d in range(2, width + 1, 2) if width % d == 0]
    raise UserError(f"--group_size={requested} does not split the input width {width} of "
                    f"layer {layer.path} ({layer.equation}) into whole groups of an even "
                    f"size (a width below the group size is used whole); pass a group size "
                    f"that divides every layer's width, for this layer one of {works}.")
  return g


def to_arrays(t) -> dict:
  """A container's stored arrays by field name (`FIELDS`)."""
  if isinstance(t, Int8Tensor):
    return {"q": t.q, "scale": t.scale}
  if isinstance(t, Int4Tensor):
    smooth = {} if t.smooth is None else {"smooth": t.smooth}
    return {"packed": t.packed, "scale": t.scale, **smooth}
  if isinstance(t.absmax, QuantizedScales):
    s = t.absmax
    return {"packed": t.packed, "absmax_q": s.q, "absmax_scale": s.scale, "absmax_mean": s.mean}
  return {"packed": t.packed, "absmax": t.absmax}


def from_arrays(arrays: dict, shape: tuple[int, ...], axes: tuple[int, ...]):
  """The `llmjax.quant` container of one layer's arrays (one layer: no layers axis)."""
  if "q" in arrays:
    return Int8Tensor(q=arrays["q"], scale=arrays["scale"], axes=axes)
  if "scale" in arrays:  # int4: the group follows from the number of scales per row
    width = math.prod(shape[a] for a in axes)
    return Int4Tensor(packed=arrays["packed"], scale=arrays["scale"], shape=shape, axes=axes,
                      group_size=width // arrays["scale"].shape[-1],
                      smooth=arrays.get("smooth"))
  absmax = arrays.get("absmax")
  blocks = (arrays["absmax_q"] if absmax is None else absmax).shape[0]
  if absmax is None:
    absmax = QuantizedScales(q=arrays["absmax_q"], scale=arrays["absmax_scale"],
                             mean=arrays["absmax_mean"], block_size=SCALE_BLOCK)
  return NF4Tensor(packed=arrays["packed"], absmax=absmax, shape=shape, axes=axes,
                   block_size=2 * arrays["packed"].shape[0] // blocks)


def _quantize_one(w, *, method, axes, group, cfg):
  if method in ("int8", "w8a8"):
    t = quantize_int8(w, axes)
  elif method == "int4":
    t = quantize_int4(w, axes, group)
  else:
    t = quantize_nf4(w, cfg.block_size, axes, cfg.double_quant, SCALE_BLOCK)
  return to_arrays(t)


def _stacked(w, layer: Layer) -> bool:
  """Whether `w` has a leading layers axis (scanned layers), checking its shape."""
  if tuple(w.shape) == layer.shape:
    return False
  if tuple(w.shape[1:]) == layer.shape:
    return True
  raise UserError(f"layer {layer.path}'s {layer.weight} has shape {tuple(w.shape)} but the "
                  f"model config makes it {layer.shape}; the checkpoint and its config "
                  "disagree.")


def quantize_weight(w, layer: Layer, cfg: QuantConfig) -> dict:
  """`{field: array}` of one layer's weight, traceable (under `jit`, in an `init`: QAT
  and QLoRA use it); a leading layers axis, if any, is kept on every array: each slice
  is quantized on its own."""
  group = group_size(layer, cfg.group_size) if cfg.method == "int4" else 0
  if cfg.method in ("int8", "w8a8"):
    check_dot_layout(layer.equation, layer.path)
  fn = functools.partial(_quantize_one, method=cfg.method, axes=layer.axes, group=group,
                         cfg=cfg)
  return (jax.vmap(fn) if _stacked(w, layer) else fn)(jnp.asarray(w))


def quantize_layer(w, layer: Layer, cfg: QuantConfig) -> dict:
  """`{'<weight>_<field>': array}` of one layer's weight (`quantize_weight`, as numpy)."""
  arrays = jax.device_get(jax.jit(lambda v: quantize_weight(v, layer, cfg))(jnp.asarray(w)))
  return {f"{layer.weight}_{k}": np.asarray(v) for k, v in arrays.items()}


def calibrated_layer(w, layer: Layer, cfg: QuantConfig, stats) -> dict:
  """`{'<weight>_<field>': array}` of one `Einsum` kernel by GPTQ (`gptq`) or AWQ (`awq`)
  from its input statistics (`calibration.collect`; stacked for a stacked kernel)."""
  from llmjax.quant import awq, gptq
  if stats is None:
    raise UserError(f"{cfg.algorithm} has no calibration statistics for layer {layer.path}; "
                    "pass `calibration.collect(model, params, batches)` (llmjax quantize "
                    "collects them).")
  group = group_size(layer, cfg.group_size)
  if cfg.algorithm == "gptq":
    fn = lambda v, s: gptq.gptq_arrays(to_rows(v, layer.axes), s["hessian"], group, cfg.damp)
  else:
    fn = lambda v, s: awq.awq_arrays(to_rows(v, layer.axes), s["hessian"], s["abs_mean"],
                                     group)
  stacked = _stacked(w, layer)
  arrays = jax.jit(jax.vmap(fn) if stacked else fn)(jnp.asarray(w), stats)
  return {f"{layer.weight}_{k}": np.asarray(v) for k, v in jax.device_get(arrays).items()}


def quantize_params(model, params, method: str = "int8", stats=None, **opts):
  """`(qparams, info)`: `params` of `model` (a `Transformer`) with its dense layers
  quantized (module docstring) and `info`, the JSON-able record of what was done (the
  config, the quantized and float layer paths, element and byte counts).

  `opts`: `QuantConfig` fields (group_size, block_size, double_quant, include_embed,
  include_head, algorithm, damp). algorithm 'gptq' or 'awq' needs `stats`, the
  `calibration.collect` of the model on calibration data (the `embed` table, if
  included, is rounded to nearest: its lookups have no input to calibrate on)."""
  cfg = QuantConfig(method=method, **opts)
  params = jax.tree.map(np.asarray, jax.device_get(params))
  tied = model.config.tie_embeddings
  out = jax.tree.map(lambda v: v, params)  # fresh dicts, arrays shared
  done, kept, count, before, after = [], [], 0, 0, 0
  for path, layer in sorted(dense_layers(model).items()):
    node = node_at(out, path)
    if node is None:
      continue
    if is_quantized(node, layer.weight):
      raise UserError(f"layer {path} is quantized already; quantize the float checkpoint.")
    if layer.weight not in node or not selected(layer, cfg, tied):
      kept.append(path)
      continue
    w = node.pop(layer.weight)
    if cfg.algorithm != "rtn" and layer.weight == "kernel":
      arrays = calibrated_layer(w, layer, cfg, (stats or {}).get(path))
    else:
      arrays = quantize_layer(w, layer, cfg)
    node.update(arrays)
    done.append(path)
    count, before = count + w.size, before + w.nbytes
    after += sum(a.nbytes for a in arrays.values())
  if not done:
    raise UserError("no layer to quantize in these parameters (no Einsum kernel found).")
  info = {**dataclasses.asdict(cfg), "scale_block_size": SCALE_BLOCK, "layers": done,
          "float_layers": kept, "params_quantized": int(count), "bytes_before": int(before),
          "bytes_after": int(after), "bits_per_parameter": 8.0 * after / count,
          "all_bytes_before": _bytes(params), "all_bytes_after": _bytes(out)}
  return out, info


def _bytes(tree) -> int:
  return int(sum(np.asarray(a).nbytes for a in jax.tree.leaves(tree)))


def config_from_info(info: dict) -> QuantConfig:
  """The `QuantConfig` recorded in `meta['quantization']`."""
  names = {f.name for f in dataclasses.fields(QuantConfig)}
  return QuantConfig(**{k: v for k, v in info.items() if k in names})


def layer_arrays(node: dict, weight: str) -> dict:
  """`{field: array}` of a quantized layer's parameter dict (empty if it is float)."""
  return {f: node[f"{weight}_{f}"] for f in FIELDS if f"{weight}_{f}" in node}


def dequantize_layer(arrays: dict, layer: Layer, dtype=jnp.float32):
  """The float weight a layer's arrays stand for (stacked: every slice)."""
  # One layer's codes: int8 the kernel's shape, int4 [M, K/2], nf4 flat.
  ndim = len(layer.shape) if "q" in arrays else (2 if "scale" in arrays else 1)
  stacked = arrays["q" if "q" in arrays else "packed"].ndim > ndim
  fn = lambda a: from_arrays(a, layer.shape, layer.axes).dequantize(dtype)
  return (jax.vmap(fn) if stacked else fn)({k: jnp.asarray(v) for k, v in arrays.items()})


def dequantized_params(model, qparams):
  """The inverse view: `qparams` with every quantized weight replaced by the float it
  stands for (`dequantize(quantize(w))`), for a plain `Transformer` with the same
  config. For checks and comparisons: it is as big as the float model."""
  out = jax.tree.map(lambda v: v, qparams)
  for path, layer in dense_layers(model).items():
    node = node_at(out, path)
    if node is None or not is_quantized(node, layer.weight):
      continue
    arrays = layer_arrays(node, layer.weight)
    for f in arrays:
      node.pop(f"{layer.weight}_{f}")
    node[layer.weight] = dequantize_layer(arrays, layer)
  return out


def require_float(meta: dict, what: str) -> None:
  """Refuses to train from a quantized checkpoint (`meta['quantization']`)."""
  info = meta.get("quantization")
  if info:
    source = meta.get("quantized_from", "the float workdir it was made from")
    raise UserError(f"{what} is quantized ({info.get('method')}); quantized checkpoints are "
                    f"for inference (generate, eval). Fine-tune the float workdir "
                    f"({source}) instead, e.g. with LoRA (--gin_file=peft/lora.gin), or "
                    "with QLoRA (--gin_file=peft/qlora.gin), which quantizes its base itself.")
