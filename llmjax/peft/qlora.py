"""Merging LoRA adapters into a quantized QLoRA base (`llmjax peft merge` of a QLoRA run).

A QLoRA run (`llmjax.quant.qlora`; gin_configs/peft/qlora.gin) computes with
`dequantize(base) + s B A`. The 4-bit grid cannot hold that sum exactly, so merging
(Dettmers et al. 2023 leave it to the user; PEFT warns of the rounding, peft#2321) is:

  1. de-quantize the base: the weights the adapter was trained against (not the float
     weights the base was once quantized from, which the run never saw; unsloth-zoo#810),
  2. fold the adapter in (`llmjax.peft.lora.merge`, DoRA included),
  3. re-quantize with the base's own format (`llmjax.quant.ptq.quantize_params`),

and the result is a quantized checkpoint like `llmjax quantize` writes (`QuantizedModel`
runs it). Step 3 adds an error, reported in `info['merge']`: the max and mean absolute
difference between the re-quantized weights and `dequantize(base) + s B A` over every
re-quantized weight, beside the mean |s B A| of the adapted weights, for scale. Where
that error matters, keep the adapter unmerged (`llmjax generate` of the QLoRA workdir
runs it so) or merge into the float base the run started from.
"""

import jax
import numpy as np

from llmjax.errors import UserError
from llmjax.peft import lora as lora_lib
from llmjax.peft import model as peft_model
from llmjax.quant import ptq


def merge(model, params, configs) -> tuple[dict, dict]:
  """`(qparams, info)`: `params` of a QLoRA run of `model` (a `Transformer`) with its LoRA
  `configs` merged into the de-quantized base and re-quantized (module docstring); `info`
  is `ptq.quantize_params`'s record plus `info['merge']`, the error it added."""
  quant = peft_model.qlora_config(configs)
  loras = [c for c in configs if isinstance(c, lora_lib.LoraConfig)]
  if quant is None or not loras:
    raise UserError("no QLoRA base with a LoRA adapter in this checkpoint; merge it with "
                    "`llmjax peft merge` as a plain LoRA run.")
  params = jax.tree.map(np.asarray, jax.device_get(params))
  base = ptq.dequantized_params(model, params)  # dequantize(base) + the adapters
  merged = base
  equations = peft_model.equations(model)
  for cfg in loras:
    merged = lora_lib.merge(merged, cfg, equations)
  q = quant.quant
  qparams, info = ptq.quantize_params(model, merged, q.method, group_size=q.group_size,
                                      block_size=q.block_size, double_quant=q.double_quant,
                                      include_embed=q.include_embed,
                                      include_head=q.include_head)
  info["merge"] = merge_error(model, base, merged, qparams, info["layers"])
  return qparams, info


def merge_error(model, base, merged, qparams, paths) -> dict:
  """The error re-quantizing `merged` (float) into `qparams` added, over the weights of
  `paths`, and the mean size of the adapters' update (`merged - base` where it is not
  0)."""
  layers = ptq.dense_layers(model)
  errors, updates = [], []
  for path in paths:
    layer = layers[path]
    target = np.asarray(ptq.node_at(merged, path)[layer.weight], np.float64)
    arrays = ptq.layer_arrays(ptq.node_at(qparams, path), layer.weight)
    requantized = np.asarray(ptq.dequantize_layer(arrays, layer), np.float64)
    errors.append(np.abs(requantized - target).ravel())
    delta = np.abs(target - np.asarray(ptq.node_at(base, path)[layer.weight], np.float64))
    if delta.any():
      updates.append(delta.ravel())
  errors, adapted = np.concatenate(errors), len(updates)
  updates = np.concatenate(updates) if updates else np.zeros(1)
  return {"max_abs_error": float(errors.max()), "mean_abs_error": float(errors.mean()),
          "mean_abs_update": float(updates.mean()), "adapted_layers": adapted,
          "layers": len(paths)}


def report(info: dict) -> str:
  """The lines `llmjax peft merge` prints for a QLoRA merge."""
  m = info["merge"]
  return (f"merged LoRA into the de-quantized {info['method']} base of {m['adapted_layers']} "
          f"of {m['layers']} layers and re-quantized; added error: max "
          f"{m['max_abs_error']:.3g}, mean {m['mean_abs_error']:.3g} (mean |s B A| of the "
          f"adapted weights: {m['mean_abs_update']:.3g})")
