"""NF4, 4-bit NormalFloat with block-wise absmax and double quantization (QLoRA,
Dettmers et al. 2023, arXiv:2305.14314, sections 3 and appendix E).

NF4's 16 values are quantiles of N(0, 1) scaled to [-1, 1] with an exact 0 (appendix
E; bitsandbytes' table, float32). A tensor is flattened row-major and cut into blocks of
`block_size` (64); each block is divided by its absmax and every element takes the
nearest of the 16 values. Two 4-bit code indices share a uint8 byte, the first in the
high nibble. The normalisation is `x * (1 / absmax)` and a value exactly between two
codes takes the lower one, as bitsandbytes does, so the bytes agree with its
`quantize_4bit(..., quant_type='nf4')` bit for bit.

With `axis` given (the contracted axes of an `Einsum` kernel), the weight is first laid
out `[out, in]` (`formats.to_rows`), the layout bitsandbytes sees in a torch `Linear`,
so blocks run along the input, as in a QLoRA model; with `axis=None` the array is
flattened as it is.

Double quantization (paper section 3) stores the float32 block absmax values in 8 bits.
The paper (and bitsandbytes) subtract their mean and quantize them in blocks of 256 with
bitsandbytes' 8-bit dynamic float code; this module uses the documented variant the
rest of the package already has, symmetric int8: per block of 256 centred absmax
values, s2 = absmax / 127, q = round(c / s2). It keeps the mean and the s2 values in
float32. Bits per parameter for block 64: 4 + 32/64 = 4.5 plain; 4 + 8/64 +
32/(64 * 256) = 4.127 (plus 32 bits for the mean over the whole tensor) double-quantized.
The codes are chosen with the exact absmax first and only then is the absmax
compressed, as bitsandbytes does, so double quantization leaves the code bytes unchanged.
"""

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from llmjax.errors import UserError
from llmjax.quant.formats import (
  Axis,
  from_rows,
  normalize_axes,
  pack_nibbles,
  to_rows,
  unpack_nibbles,
)

# QLoRA appendix E / bitsandbytes `get_4bit_type('nf4')`, in float32.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
# Decision boundaries: the float32 midpoints between neighbouring codes.
NF4_BOUNDS = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)


@flax.struct.dataclass
class QuantizedScales:
  """Double-quantized block scales: `absmax ~= q * scale[block of 256] + mean`.

  Attributes:
    q: int8 `[n_blocks]`, the centred absmax values' codes.
    scale: float32 `[ceil(n_blocks / block_size)]`, second-level scales.
    mean: float32 scalar subtracted before quantizing.
    block_size: the second-level block (static).
  """
  q: jax.Array
  scale: jax.Array
  mean: jax.Array
  block_size: int = flax.struct.field(pytree_node=False)

  def dequantize(self) -> jax.Array:
    n = self.q.shape[0]
    q = _pad_to(self.q.astype(jnp.float32), self.block_size).reshape(-1, self.block_size)
    return (q * self.scale[:, None]).reshape(-1)[:n] + self.mean


def _pad_to(x: jax.Array, multiple: int) -> jax.Array:
  """A 1-D `x` padded with zeros to a multiple of `multiple` (zeros leave absmax alone)."""
  return jnp.pad(x, (0, -x.shape[0] % multiple))


def quantize_scales(absmax: jax.Array, block_size: int = 256) -> QuantizedScales:
  """Double quantization of float32 block scales: mean-subtracted, symmetric int8 in
  blocks of `block_size` (the variant described in the module docstring)."""
  mean = jnp.mean(absmax)
  centred = _pad_to(absmax - mean, block_size).reshape(-1, block_size)  # [B2, 256]
  scale = jnp.max(jnp.abs(centred), axis=-1) / 127.0
  q = jnp.round(centred / jnp.where(scale == 0, 1.0, scale)[:, None])
  q = jnp.clip(q, -127, 127).astype(jnp.int8).reshape(-1)[:absmax.shape[0]]
  return QuantizedScales(q=q, scale=scale, mean=mean, block_size=block_size)


@flax.struct.dataclass
class NF4Tensor:
  """NF4 weight: codes two per byte and per-block scales (float32 or double-quantized).

  Attributes:
    packed: uint8 `[n_padded / 2]`, n_padded = size rounded up to a whole block.
    absmax: float32 `[n_blocks]`, or `QuantizedScales` with double quantization.
    shape: the weight's shape; axes: contracted axes moved last before flattening, or
      None (flattened as is); block_size (all static).
  """
  packed: jax.Array
  absmax: jax.Array | QuantizedScales
  shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
  axes: tuple[int, ...] | None = flax.struct.field(pytree_node=False)
  block_size: int = flax.struct.field(pytree_node=False)

  def block_absmax(self) -> jax.Array:
    """float32 `[n_blocks]`, de-quantized if double-quantized."""
    if isinstance(self.absmax, QuantizedScales):
      return self.absmax.dequantize()
    return self.absmax

  def codes(self) -> jax.Array:
    """Code indices 0..15 (uint8), flattened, padding included."""
    return unpack_nibbles(self.packed)

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    values = jnp.asarray(NF4_CODE)[self.codes()].reshape(-1, self.block_size)
    flat = (values * self.block_absmax()[:, None]).reshape(-1)[:math.prod(self.shape)]
    if self.axes is None:
      return flat.reshape(self.shape).astype(dtype)
    keep = [self.shape[a] for a in range(len(self.shape)) if a not in self.axes]
    return from_rows(flat.reshape(math.prod(keep), -1), self.shape, self.axes).astype(dtype)


def nearest_code(x: jax.Array) -> jax.Array:
  """Index of the nearest NF4 value to each `x` in [-1, 1]; a tie takes the lower."""
  return jnp.searchsorted(jnp.asarray(NF4_BOUNDS), x, side="left").astype(jnp.uint8)


def quantize_nf4(w: jax.Array, block_size: int = 64, axis: Axis | None = None,
                 double_quant: bool = False, scale_block_size: int = 256) -> NF4Tensor:
  """NF4 with block-wise absmax over the flattened weight (see the module docstring);
  `double_quant` stores the block scales in int8 (`quantize_scales`)."""
  if block_size <= 0 or block_size % 2:
    raise UserError(f"NF4 block_size={block_size} must be a positive even number (two codes "
                    "share a byte); QLoRA uses 64.")
  if scale_block_size <= 0:
    raise UserError(f"NF4 scale_block_size={scale_block_size} must be positive; QLoRA uses 256.")
  w = jnp.asarray(w, jnp.float32)
  axes = None if axis is None else normalize_axes(axis, w.ndim)
  flat = (w if axes is None else to_rows(w, axes)).reshape(-1)
  blocks = _pad_to(flat, block_size).reshape(-1, block_size)  # [n_blocks, block]
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  # x * (1 / absmax) as bitsandbytes; an all-zero block divides by 1 and stays 0.
  inverse = 1.0 / jnp.where(absmax == 0, 1.0, absmax)
  codes = nearest_code(jnp.clip(blocks * inverse[:, None], -1.0, 1.0))
  scales = quantize_scales(absmax, scale_block_size) if double_quant else absmax
  return NF4Tensor(packed=pack_nibbles(codes.reshape(-1)), absmax=scales, shape=tuple(w.shape),
                   axes=axes, block_size=block_size)
