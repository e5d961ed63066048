"""Quantized weight storage and the products with it (post-training, weight-only and W8A8).

  formats  int8 per output channel and int4 group-wise (symmetric), `dequantize`,
           `packed_bytes`, `bits_per_parameter`.
  nf4      NF4 with block-wise absmax and double quantization (QLoRA, Dettmers et al.
           2023).
  matmul   int8-weight x float products (float32 accumulation) and W8A8 with dynamic
           per-token activation scales (int32 accumulation; LLM.int8, SmoothQuant).
  ptq      post-training quantization of a model's whole parameter tree into those
           arrays (`quantize_params`) and its inverse view (`dequantized_params`).
  gptq     GPTQ: int4 codes chosen for each layer's outputs on calibration data
           (`llmjax quantize --method=int4 --algorithm=gptq`), stored as int4's.
  model    `QuantizedModel`: the network run from the packed arrays through the
           intercept seam (`llmjax quantize` writes them, `load_workdir` reads them).
  qat      quantization-aware training: the same quantize-dequantize in the forward
           pass, a straight-through gradient (gin_configs/quant/qat_*.gin).
  qlora    QLoRA's frozen base stored quantized (NF4 + double quantization): its init,
           and the warm start that quantizes a float checkpoint once (peft/qlora.gin).

Every container is a pytree of packed integers and float32 scales, never de-quantized
floats, and everything runs under `jax.jit`.
"""

from llmjax.quant.formats import (
  Int4Tensor,
  Int8Tensor,
  bits_per_parameter,
  dequantize,
  packed_bytes,
  quantize_int4,
  quantize_int8,
)
from llmjax.quant.matmul import int8_dot, int8_matmul, int8_weight_matmul, quantize_activations
from llmjax.quant.nf4 import NF4_CODE, NF4Tensor, QuantizedScales, quantize_nf4, quantize_scales

__all__ = [
  "NF4_CODE", "Int4Tensor", "Int8Tensor", "NF4Tensor", "QuantizedScales", "bits_per_parameter",
  "dequantize", "int8_dot", "int8_matmul", "int8_weight_matmul", "packed_bytes",
  "quantize_activations", "quantize_int4", "quantize_int8", "quantize_nf4", "quantize_scales",
]
