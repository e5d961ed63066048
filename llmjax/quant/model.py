"""`QuantizedModel`: a `Transformer` that runs from the packed arrays of `llmjax.quant.ptq`.

The network is not edited: every `Einsum` and `Embed` call is intercepted
(`llmjax.layers.intercept`, as `PeftModel` does for LoRA) and a layer whose parameters
hold quantized arrays (`kernel_q`, `kernel_packed`, ...) computes its product from them;
float layers run as before. Per method:

  int8  `int8_weight_matmul`: the int8 codes cast to the compute dtype (exact), float32
        accumulation, the per-channel scale applied to the output.
  w8a8  each token's activations quantized to int8 on the fly (absmax / 127 over the
        contracted features), the int8 x int8 product accumulated in int32
        (`int8_matmul`), both scales applied to the output.
  int4, nf4  the weight is de-quantized inside the jitted function and the product runs
        in the compute dtype: XLA:CPU has no 4-bit (or int4 x float) matmul, so this
        saves memory and checkpoint size, not time. XLA fuses the de-quantization into
        the consumer where it can; the float weight never exists outside the jit.

How the interception works: linen's `Einsum.setup` would create `kernel` with
`self.param`, which fails when the checkpoint has none, so for a quantized layer the
interceptor skips `setup` (the bias is read with `get_variable`), answers `__call__`
(and `Embed.attend`) itself, and answers `weights` with the de-quantized kernel for
fused q/k/v: the fused product that uses it is then dead code (each projection is still
called with its `Joint` part, which the interceptor ignores, recomputing from the
packed arrays) and XLA removes it under `jit`. So apply the model under `jit`, as
`llmjax.decode` and `llmjax.eval` do; eagerly that unused float product is computed.

Both layouts run: scanned layers slice the stacked arrays per layer like any parameter,
and `llmjax.decode`'s unstacking (`decoding_model`) slices them once.

  qparams, info = ptq.quantize_params(model, params, "int8")
  net = QuantizedModel(model, ptq.config_from_info(info))
  logits = jax.jit(net.apply)({"params": qparams}, tokens)
"""

import jax.numpy as jnp

from llmjax.errors import UserError
from llmjax.kernels import dense
from llmjax.layers.embed import Embed
from llmjax.layers.intercept import intercept
from llmjax.layers.linear import Einsum
from llmjax.quant import ptq
from llmjax.quant.matmul import int8_matmul, int8_weight_matmul, quantize_activations

_METHODS = ("setup", "__call__", "attend", "weights")
_TABLE_AXES = (1,)  # an embedding table [V, D] contracts D (tied logits 'BLD,VD->BLV')


def _stored(module, weight: str) -> dict:
  """`{field: array}` of a bound module's quantized weight; empty when it is float."""
  if not any(module.has_variable("params", f"{weight}_{m}") for m in ptq.MARKERS):
    return {}
  return {f: module.get_variable("params", f"{weight}_{f}") for f in ptq.FIELDS
          if module.has_variable("params", f"{weight}_{f}")}


class Interceptor:
  """Computes the quantized layers' products (see the module docstring)."""

  def __init__(self, method: str):
    self.method = method

  def __call__(self, call):
    module = call.module
    weight = "kernel" if isinstance(module, Einsum) else "embedding"
    arrays = _stored(module, weight)
    if not arrays:
      return call.proceed()
    if call.method == "setup":
      return None  # no float weight to create: the arrays are read where they are used
    if isinstance(module, Einsum):
      t = ptq.from_arrays(arrays, tuple(module.shape), ptq.contracted_axes(module.equation))
      bias = module.get_variable("params", "bias") if module.use_bias else None
      if call.method == "weights":  # fused q/k/v: its product goes unused (docstring)
        return t.dequantize(module.dtype), bias
      return self.einsum(module, t, bias, call.args[0])
    t = ptq.from_arrays(arrays, (module.vocab_size, module.features), _TABLE_AXES)
    if call.method == "__call__":
      return self.lookup(module, t, call.args[0])
    pad_to = call.args[1] if len(call.args) > 1 else call.kwargs.get("pad_to", 1)
    return self.attend(module, t, call.args[0], pad_to)

  def product(self, t, x, equation: str, bias=None, pad_to: int = 1, dtype=jnp.float32):
    """`einsum(equation, x, w) + bias` in float32 for the weight `t` (x in the compute
    dtype `dtype`)."""
    if self.method == "int8":
      y = int8_weight_matmul(x, t, dtype=jnp.float32)
    elif self.method == "w8a8":
      n = len(t.axes)
      xq, xs = quantize_activations(x, tuple(range(x.ndim - n, x.ndim)))  # per token
      y = int8_matmul(xq, xs, t.q, t.scale, t.axes)
    else:  # 4-bit: de-quantized in the jit, then the layer's own product
      return dense.product(equation, x, t.dequantize(dtype), bias, pad_to=pad_to)
    return y if bias is None else y + bias.astype(jnp.float32)

  def einsum(self, layer: Einsum, t, bias, x):
    y = self.product(t, x.astype(layer.dtype), layer.equation, bias, layer.pad_last_to,
                     layer.dtype)
    return y.astype(layer.dtype)

  def lookup(self, table: Embed, t, tokens):
    """Rows of the table: int8 rows gathered with their scales, 4-bit formats from the
    de-quantized table."""
    if self.method in ("int8", "w8a8"):
      rows = jnp.take(t.q, tokens, axis=0).astype(jnp.float32)              # [B, L, D]
      return (rows * jnp.take(t.scale, tokens, axis=0)).astype(table.dtype)
    return jnp.take(t.dequantize(jnp.float32), tokens, axis=0).astype(table.dtype)

  def attend(self, table: Embed, t, x, pad_to):
    """Tied logits `x [B, L, D]` -> float32 `[B, L, V]` against the quantized table."""
    return self.product(t, x.astype(table.dtype), "BLD,VD->BLV", None, pad_to, table.dtype)


class QuantizedModel:
  """`base` run from quantized parameters (module docstring). `config` is the base's
  `TransformerConfig`; `quant` the `ptq.QuantConfig` it was quantized with."""

  def __init__(self, base, quant: ptq.QuantConfig):
    self.base = base
    self.quant = quant

  @property
  def config(self):
    return self.base.config

  def apply(self, variables, *args, method=None, **kwargs):
    with intercept(Interceptor(self.quant.method), layers=(Einsum, Embed), methods=_METHODS):
      return self.base.apply(variables, *args, method=method, **kwargs)

  def init(self, *args, **kwargs):
    raise UserError(f"a {self.quant.method} quantized model is for inference; it has no "
                    "initializer and does not train. Fine-tune the float model (e.g. with "
                    "LoRA), then quantize the result.")

  def clone(self, **updates):
    """The same quantization on `base.clone(**updates)` (e.g. the unscanned decoding
    layout, whose parameters `llmjax.models.stack.unstack_layers` slices)."""
    return QuantizedModel(self.base.clone(**updates), self.quant)

  def __eq__(self, other):  # jit takes the model as a static argument
    return (isinstance(other, QuantizedModel) and self.base == other.base
            and self.quant == other.quant)

  def __hash__(self):
    return hash((self.base, self.quant))

  def __getattr__(self, name):  # everything else is the base model's
    if name in ("base", "quant"):
      raise AttributeError(name)
    return getattr(self.base, name)


def check_params(model, params, info: dict) -> None:
  """Raises unless `params` holds quantized arrays at every layer `info` lists (and no
  float weight there): a checkpoint whose arrays and metadata disagree."""
  layers = ptq.dense_layers(model)
  for path in info.get("layers", ()):
    layer = layers.get(path)
    node = ptq.node_at(params, path)
    if layer is None or node is None or not ptq.is_quantized(node, layer.weight) or (
        layer.weight in node):
      raise UserError(f"the checkpoint's metadata says layer {path} is quantized "
                      f"({info.get('method')}) but its parameters are not; the checkpoint "
                      "was not written by `llmjax quantize` (or was edited): quantize the "
                      "float workdir again.")


def from_checkpoint(model, params, meta: dict):
  """`(QuantizedModel, params)` of a quantized checkpoint's `Transformer`, parameters and
  metadata; a UserError for a float checkpoint (load that as a plain `Transformer`)."""
  info = meta.get("quantization")
  if not info:
    raise UserError("this checkpoint is float (its metadata has no 'quantization'); load "
                    "it as a plain Transformer (llmjax.checkpoint.workdir.load_workdir "
                    "does), or write a quantized copy first with `llmjax quantize "
                    "--workdir=W --method=int8 --output=W2`.")
  check_params(model, params, info)
  return QuantizedModel(model, ptq.config_from_info(info)), params


def dequantized_model(model, params):
  """`(Transformer, float params)` that a quantized model stands for (`model` a
  `QuantizedModel` or a `Transformer`; params quantized or not)."""
  base = model.base if isinstance(model, QuantizedModel) else model
  return base, ptq.dequantized_params(base, params)
