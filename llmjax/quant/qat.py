"""Quantization-aware training (QAT): fake quantization with a straight-through gradient.

Training sees the quantized network while it still updates float weights: every dense
layer's forward pass uses `dequantize(quantize(w))`, computed with the very functions
post-training quantization stores (`ptq.quantize_weight`, `ptq.from_arrays`), so
`llmjax quantize` of the trained workdir with the same method and sizes packs exactly the
weights the QAT forward pass used. The backward pass is the straight-through estimator
(STE; Bengio et al. 2013, as in Jacob et al. 2018 and gemma's `SimulateQuantizedDense`):

  w_q = w - stop_gradient(w) + stop_gradient(fq(w))

is `fq(w)` bit for bit in the forward pass (`w - w` is exactly 0) and has the identity's
gradient, so dL/dw equals dL/dw_q: the float layer's gradient evaluated at the
fake-quantized weights. The common "clipped" STE zeroes the gradient where `w` falls
outside the quantization range; with symmetric absmax scaling (int8, int4 per group,
NF4 per block) the range is the absmax itself, nothing is clipped by construction, and
the clipped and plain STE agree everywhere. The scales are not learned (LSQ, Esser et
al. 2020, would learn them): they follow the weights' absmax at every step.

`QatConfig.activations` also fake-quantizes each layer's input per token to int8 (absmax
/ 127 over the contracted features, `matmul.quantize_activations`), the W8A8 scheme
of `ptq` method 'w8a8', with the same straight-through gradient. An int4/NF4 QAT run
with activations has no packed counterpart (the packed 4-bit formats are weight-only).

It is an interceptor (`llmjax.layers.intercept`) on `Einsum.weights` (the kernel the
product, fused q/k/v included, uses), on `Einsum.__call__` (the input, when
`activations`) and on the `embed` table (`include_embed`); the model is not edited.
`PeftModel(model, [QatConfig(...)])` runs it (gin: `train.peft = [@QatConfig()]`,
gin_configs/quant/qat_*.gin); every parameter trains, unless LoRA configs beside it
say otherwise. The layers selected are `ptq`'s: every `Einsum` but the untied `lm_head`
(`include_head`), and the `embed` table only with `include_embed`.
"""

import dataclasses

import jax
import jax.numpy as jnp

from llmjax.errors import UserError
from llmjax.kernels import dense
from llmjax.layers.embed import Embed
from llmjax.layers.linear import Einsum
from llmjax.quant import ptq
from llmjax.quant.matmul import quantize_activations

QAT_METHODS = ("int8", "int4", "nf4")


@dataclasses.dataclass(frozen=True)
class QatConfig:
  """What QAT simulates (gin: `QatConfig.*`); recorded in `meta['peft']` as 'qat'."""

  method: str = "int8"         # int8 | int4 | nf4 (the weights)
  group_size: int = 128        # int4: input elements per scale
  block_size: int = 64         # nf4: elements per absmax block
  double_quant: bool = False   # nf4: block scales in int8 (as `llmjax quantize --double_quant`)
  activations: bool = False    # also per-token int8 fake quant of each layer's input
  include_embed: bool = False  # the `embed` table too (and so a tied head)
  include_head: bool = False   # the untied `lm_head` too

  def __post_init__(self):
    if self.method not in QAT_METHODS:
      hint = " (W8A8 is method='int8' with activations=True)" if self.method == "w8a8" else ""
      raise UserError(f"QatConfig.method={self.method!r}; use one of "
                      f"{', '.join(QAT_METHODS)}{hint}.")
    _ = self.quant  # validates the sizes

  @property
  def quant(self) -> ptq.QuantConfig:
    """The weights' `ptq.QuantConfig` (what `fake_quantize` and `llmjax quantize` use)."""
    return ptq.QuantConfig(method=self.method, group_size=self.group_size,
                           block_size=self.block_size, double_quant=self.double_quant,
                           include_embed=self.include_embed, include_head=self.include_head)

  @property
  def ptq_method(self) -> str:
    """The `llmjax quantize --method` whose packed model computes what QAT simulated."""
    return "w8a8" if self.activations and self.method == "int8" else self.method

  trainable = None  # QAT trains the weights themselves: no trainable pattern of its own


def fake_quantize(w: jax.Array, layer: ptq.Layer, cfg: ptq.QuantConfig) -> jax.Array:
  """`dequantize(quantize(w))` in float32, with PTQ's own functions and sizes (one layer's
  weight, no layers axis)."""
  arrays = ptq.quantize_weight(w, layer, cfg)
  return ptq.from_arrays(arrays, layer.shape, layer.axes).dequantize(jnp.float32)


def straight_through(x: jax.Array, fq: jax.Array) -> jax.Array:
  """`fq` in the forward pass (exactly), the identity's gradient w.r.t. `x` (module
  docstring)."""
  return x - jax.lax.stop_gradient(x) + jax.lax.stop_gradient(fq)


def fake_quantize_weight(w: jax.Array, layer: ptq.Layer, cfg: ptq.QuantConfig) -> jax.Array:
  """The STE'd fake-quantized weight (float32); nothing is differentiated through the
  quantizer itself."""
  return straight_through(w, fake_quantize(jax.lax.stop_gradient(w), layer, cfg))


def fake_quantize_input(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """Per-token symmetric int8 fake quant of `x` over its contracted `axes` (W8A8's
  `quantize_activations`), straight-through, float32."""
  q, scale = quantize_activations(jax.lax.stop_gradient(x), axes)
  return straight_through(x.astype(jnp.float32), q.astype(jnp.float32) * scale)


def _input_axes(equation: str) -> tuple[int, ...]:
  """The axes of an `Einsum`'s input that its equation contracts."""
  x, kernel, out = equation.replace("->", ",").split(",")
  return tuple(i for i, c in enumerate(x) if c in kernel and c not in out)


class FakeQuant:
  """The QAT interceptor (module docstring): `intercept(FakeQuant(cfg), **selection)`."""

  def __init__(self, config: QatConfig):
    self.config = config
    self.quant = config.quant

  @property
  def selection(self) -> dict:
    """`intercept`'s keyword arguments: the calls QAT changes."""
    return {"layers": (Einsum, Embed), "methods": ("weights", "__call__", "attend")}

  def __call__(self, call):
    if isinstance(call.module, Einsum):
      return self._einsum(call)
    if call.path != "embed" or not self.config.include_embed:
      return call.proceed()
    return self._table(call)

  def _einsum(self, call):
    m = call.module
    layer = ptq.layer_of(call)
    if not ptq.selected(layer, self.quant, tied=False):
      return call.proceed()
    if call.method == "weights":
      _, bias = call.proceed()
      return fake_quantize_weight(m.kernel, layer, self.quant).astype(m.dtype), bias
    if not self.config.activations:
      return call.proceed()
    x = fake_quantize_input(call.args[0], _input_axes(m.equation)).astype(m.dtype)
    return call.proceed(x, *call.args[1:], **call.kwargs)  # a fused `Joint` is recomputed

  def _table(self, call):
    """The `embed` lookup and tied logits from the fake-quantized table."""
    m = call.module
    table = fake_quantize_weight(m.embedding, ptq.layer_of(call), self.quant).astype(m.dtype)
    if call.method == "__call__":
      return jnp.take(table, call.args[0], axis=0)                          # [B, L, D]
    x = call.args[0]
    pad_to = call.args[1] if len(call.args) > 1 else call.kwargs.get("pad_to", 1)
    if self.config.activations:
      x = fake_quantize_input(x, (x.ndim - 1,))
    return dense.product("BLD,VD->BLV", x.astype(m.dtype), table, pad_to=pad_to)
