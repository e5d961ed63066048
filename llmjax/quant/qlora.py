"""The frozen base of a QLoRA run, stored quantized (Dettmers et al. 2023, arXiv:2305.14314).

QLoRA fine-tunes LoRA adapters (`llmjax.peft.lora`) on a base whose weights are kept in
4-bit NormalFloat with double-quantized block scales: the base never trains, so it
needs no float copy, and the gradients reach the adapters through `dequantize(base)`.
This module holds the base's side; `llmjax.peft.model.PeftModel` puts the adapters on
top (gin: `train.peft = [@LoraConfig(), @QloraConfig()]`, gin_configs/peft/qlora.gin)
and `llmjax.peft.qlora` merges them back.

  QloraConfig     how the base is stored: `ptq`'s methods int8 / int4 / nf4 (the default:
                  NF4, block 64, double quantization, as the paper), which layers.
  QuantizedBase   a `QuantizedModel` (the network computed from the packed arrays through
                  the intercept seam) that can `init`: the float init, then the selected
                  weights quantized in the same traced function, so the train state is
                  created (and sharded, and checkpointed) holding only codes and scales.
  quantize_like   a float checkpoint's weights quantized the way a QLoRA run's state
                  stores them: a warm start (`TrainConfig.init_from`) quantizes the float
                  source once, at load (`llmjax.train.warm_start`).

The packed arrays are integer leaves of the parameter tree: the optimizer's trainable
mask (the adapters' names) leaves them out, so they have no optimizer state and stay
bit for bit what was loaded, and the train step gives integer leaves no gradient. They
have no logical axes, so they are replicated over the mesh.
"""

import dataclasses
import math
import re

import flax.linen as nn
import jax
import numpy as np

from llmjax.errors import UserError
from llmjax.layers.intercept import intercept
from llmjax.quant import ptq
from llmjax.quant.model import QuantizedModel

BASE_METHODS = ("int8", "int4", "nf4")


@dataclasses.dataclass(frozen=True)
class QloraConfig:
  """The quantized frozen base of a LoRA run (gin: `QloraConfig.*`); recorded in
  `meta['peft']` as 'qlora'."""

  method: str = "nf4"          # int8 | int4 | nf4
  block_size: int = 64         # nf4: elements per absmax block
  double_quant: bool = True    # nf4: block scales in int8 (QLoRA section 3)
  group_size: int = 128        # int4: input elements per scale
  include_embed: bool = False  # also the `embed` table (and so a tied head)
  include_head: bool = False   # also the untied `lm_head`

  def __post_init__(self):
    if self.method not in BASE_METHODS:
      raise UserError(f"QloraConfig.method={self.method!r}; use one of "
                      f"{', '.join(BASE_METHODS)} (the base is weight-only: its input "
                      "must stay float for the adapters' gradients).")
    _ = self.quant  # validates the sizes

  @property
  def quant(self) -> ptq.QuantConfig:
    return ptq.QuantConfig(**dataclasses.asdict(self))

  trainable = None  # the base is frozen; the adapters beside it say what trains


def quantize_tree(params, layers: dict, cfg: ptq.QuantConfig, tied: bool):
  """`params` (boxed or not) with the selected weights of `layers` ({path: Layer}, in
  this tree's layout) replaced by their quantized arrays; traceable."""
  out = jax.tree.map(lambda v: v, params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for path, layer in sorted(layers.items()):
    node = ptq.node_at(out, path)
    if node is None or layer.weight not in node or not ptq.selected(layer, cfg, tied):
      continue
    w = nn.meta.unbox(node.pop(layer.weight))
    arrays = ptq.quantize_weight(w, layer, cfg)
    node.update({f"{layer.weight}_{k}": v for k, v in arrays.items()})
  return out


class QuantizedBase(QuantizedModel):
  """`base` computed from quantized arrays, with an `init` that makes them (module
  docstring). `PeftModel` enters its adapters' interceptors around both."""

  def init(self, *args, **kwargs):
    seen = {}
    with intercept(ptq.recorder(seen)):  # the layers this very init creates, in its layout
      variables = self.base.init(*args, **kwargs)
    params = quantize_tree(variables["params"], seen, self.quant,
                           self.base.config.tie_embeddings)
    return {**variables, "params": params}

  def clone(self, **updates):
    return QuantizedBase(self.base.clone(**updates), self.quant)


def layer_key(path: str) -> str:
  """A module path with unscanned layer names folded ('layers_3' -> 'layers')."""
  return re.sub(r"/layers_\d+(?=/|$)", "/layers", path)


def _nodes(tree, prefix=""):
  """`(path, dict)` of every dict in a nested-dict tree."""
  if isinstance(tree, dict):
    yield prefix, tree
    for key, value in tree.items():
      yield from _nodes(value, f"{prefix}/{key}" if prefix else str(key))


def config_of(arrays: dict, layer: ptq.Layer) -> ptq.QuantConfig:
  """The `QuantConfig` whose `quantize_weight` made a layer's stored `arrays` (a layers
  axis allowed): the formats describe themselves."""
  if "q" in arrays:
    return ptq.QuantConfig(method="int8")
  if "scale" in arrays:
    width = math.prod(layer.shape[a] for a in layer.axes)
    return ptq.QuantConfig(method="int4", group_size=width // arrays["scale"].shape[-1])
  blocks = arrays["absmax" if "absmax" in arrays else "absmax_q"].shape[-1]
  return ptq.QuantConfig(method="nf4", block_size=2 * arrays["packed"].shape[-1] // blocks,
                         double_quant="absmax_q" in arrays)


def quantize_like(model, params, like):
  """Float `params` of `model` (its own layout) with every weight that `like` (the same
  network's tree, either layout: a QLoRA run's fresh state) stores quantized quantized the
  same way; `params` itself when `like` stores nothing quantized."""
  stored = {}
  for path, node in _nodes(like):
    for weight in ("kernel", "embedding"):
      if ptq.is_quantized(node, weight):
        stored[(layer_key(path), weight)] = ptq.layer_arrays(node, weight)
  if not stored:
    return params
  out = jax.tree.map(lambda v: v, params)
  for path, layer in sorted(ptq.dense_layers(model).items()):
    arrays = stored.get((layer_key(path), layer.weight))
    node = ptq.node_at(out, path)
    if arrays is None or node is None or layer.weight not in node:
      continue  # float in the run, or quantized in the source already (a QLoRA source)
    node.update(ptq.quantize_layer(node.pop(layer.weight), layer, config_of(arrays, layer)))
  return out


def storage(params) -> dict:
  """Bytes and parameter counts of a QLoRA tree's base: the quantized weights (codes and
  scales) and every other non-adapter array, for the run's log."""
  quantized, stored, other, count = 0, 0, 0, 0
  for path, node in _nodes(params):
    for weight in ("kernel", "embedding"):
      if ptq.is_quantized(node, weight):
        arrays = ptq.layer_arrays(node, weight)
        n = arrays["q"].size if "q" in arrays else 2 * arrays["packed"].size
        quantized, stored = quantized + n, stored + sum(_nbytes(a) for a in arrays.values())
    for key, value in node.items():
      if not isinstance(value, dict) and not key.startswith(("lora_", "kernel_",
                                                             "embedding_")):
        other, count = other + _nbytes(value), count + int(np.size(value))
  return {"quantized_params": quantized, "quantized_bytes": stored,
          "float_params": count, "float_bytes": other}


def _nbytes(a) -> int:
  return int(np.size(a)) * np.dtype(a.dtype).itemsize


def storage_line(params, config: QloraConfig) -> str:
  """The one-line report `llmjax train` logs at a QLoRA run's step 0."""
  s = storage(params)
  n, b = s["quantized_params"], s["quantized_bytes"]
  total_n, total_b = n + s["float_params"], b + s["float_bytes"]
  double = ", double quant" if config.double_quant and config.method == "nf4" else ""
  return (f"QLoRA base: {n:,} weights in {config.method}{double}: {b / max(n, 1):.4f} "
          f"bytes/param ({8 * b / max(n, 1):.3f} bits); the whole base {total_n:,} params in "
          f"{total_b:,} bytes ({total_b / max(total_n, 1):.4f} bytes/param)")
