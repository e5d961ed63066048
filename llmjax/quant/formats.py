"""Weight storage formats: int8 per output channel and int4 group-wise, both symmetric.

A quantized weight is a pytree that holds the *stored* integers and their float32
scales, never de-quantized floats, so a checkpoint or a device holds what the format
promises (`packed_bytes`). Everything here is `jax.numpy` and runs under `jax.jit`; the
shape metadata is static (pytree aux data).

Our kernels (`llmjax.layers.linear.Einsum`) are shaped like `[D, F]`, `[D, N, H]` or
`[N, H, D]`: the caller names the contracted (input) axes with `axis`, and the scales
are per every other index, i.e. per output channel (LLM.int8, Dettmers et al. 2022;
"per-row" in torchao).

  int8  q = round(w / s), s = absmax / 127 over the input axes, per output channel.
  int4  groups of `group_size` consecutive input elements (GPTQ/AWQ style, Frantar et
        al. 2023; Lin et al. 2024), s = absmax / 7 per group, q in [-7, 7]. [-7, 7]
        rather than [-8, 7]: with a symmetric scale |w / s| <= 7, so rounding never
        reaches -8; using -8 would need an off-centre scale (a zero point) and would
        make the two signs quantize differently.

Rounding is `jnp.round`: round half to even, as numpy. An all-zero channel (group) gets
scale 0 and codes 0, which de-quantize to exactly 0.

int4 codes are packed two per uint8 byte (first element in the high nibble, stored as
code + 8 so a nibble is 0..15, as `llmjax.quant.nf4` packs its code indices). Not
`jnp.int4`: Orbax 0.12.8 saves and restores `jnp.int4` bit for bit, but XLA:CPU keeps
one byte per int4 element in memory (`on_device_size_in_bytes` of 4M int4 values is
4 MiB), so the 4-bit claim would be false where the tests run; `jnp.uint4`, which NF4
indices would need, does not save at all ("Unsupported data type: uint4").
"""

import math
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from llmjax.errors import UserError

Axis = int | Sequence[int]


def normalize_axes(axis: Axis, ndim: int) -> tuple[int, ...]:
  """`axis` (an int or ints, negative allowed) as sorted non-negative ints."""
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  in_range = all(-ndim <= a < ndim for a in axes)
  if not axes or not in_range or len({a % ndim for a in axes}) != len(axes):
    raise UserError(f"Quantization axis {axis!r} is not a non-empty set of distinct axes of a "
                    f"{ndim}-d weight: name the contracted (input) axes, e.g. axis=0 for a "
                    "[D, F] kernel or axis=(0, 1) for an [N, H, D] one.")
  return tuple(sorted(a % ndim for a in axes))


def to_rows(w: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """`w` as a matrix `[M, K]`: the kept (output) axes flattened into rows, the
  contracted (input) axes into columns: the `[out, in]` layout of a torch `Linear`."""
  keep = tuple(a for a in range(w.ndim) if a not in axes)
  rows = math.prod(w.shape[a] for a in keep)
  return jnp.transpose(w, keep + axes).reshape(rows, -1)  # [M, K]


def from_rows(m: jax.Array, shape: tuple[int, ...], axes: tuple[int, ...]) -> jax.Array:
  """Inverse of `to_rows`: `[M, K]` back to the weight's `shape`."""
  keep = tuple(a for a in range(len(shape)) if a not in axes)
  perm = keep + axes
  m = m.reshape(tuple(shape[a] for a in perm))
  return jnp.transpose(m, np.argsort(perm))


def pack_nibbles(codes: jax.Array) -> jax.Array:
  """Codes 0..15, last axis even, as uint8 bytes: pairs along the last axis, the first
  of a pair in the high nibble (bitsandbytes' order), so `[..., K] -> [..., K/2]`."""
  c = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], -1, 2)
  return (c[..., 0] << 4) | c[..., 1]


def unpack_nibbles(packed: jax.Array) -> jax.Array:
  """Inverse of `pack_nibbles`: uint8 `[..., K/2]` -> codes 0..15 as uint8 `[..., K]`."""
  pairs = jnp.stack([packed >> 4, packed & 0xF], axis=-1)
  return pairs.reshape(*packed.shape[:-1], -1)


def _safe(scale: jax.Array) -> jax.Array:
  """The divisor for a scale: an all-zero channel (scale 0) divides by 1 instead."""
  return jnp.where(scale == 0, 1.0, scale)


@flax.struct.dataclass
class Int8Tensor:
  """int8 weight, symmetric, per output channel: `w ~= q * scale`.

  Attributes:
    q: int8 codes in [-127, 127], the weight's shape.
    scale: float32, the weight's shape with the contracted axes of size 1.
    axes: the contracted (input) axes (static).
  """
  q: jax.Array
  scale: jax.Array
  axes: tuple[int, ...] = flax.struct.field(pytree_node=False)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.q.shape)

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    return (self.q.astype(jnp.float32) * self.scale).astype(dtype)


def quantize_int8(w: jax.Array, axis: Axis = 0) -> Int8Tensor:
  """Per-output-channel int8: scale = absmax / 127 over the contracted `axis`."""
  axes = normalize_axes(axis, w.ndim)
  w = jnp.asarray(w, jnp.float32)
  scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / 127.0
  q = jnp.clip(jnp.round(w / _safe(scale)), -127, 127).astype(jnp.int8)
  return Int8Tensor(q=q, scale=scale, axes=axes)


@flax.struct.dataclass
class Int4Tensor:
  """int4 weight, symmetric, group-wise along the input: `w ~= q * scale` per group.

  Attributes:
    packed: uint8 `[M, K/2]`, two codes (q + 8) a byte; M = the output channels
      flattened, K = the contracted axes flattened (the `to_rows` layout).
    scale: float32 `[M, K / group_size]`.
    shape: the weight's shape; axes: its contracted axes; group_size (all static).
    smooth: None, or float32 `[K]`: AWQ's per-input-channel factor s, with which the
      weights were multiplied before quantizing (`llmjax.quant.awq`): the weight is
      then `q * scale / s` column-wise.
  """
  packed: jax.Array
  scale: jax.Array
  shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
  axes: tuple[int, ...] = flax.struct.field(pytree_node=False)
  group_size: int = flax.struct.field(pytree_node=False)
  smooth: jax.Array | None = None

  def codes(self) -> jax.Array:
    """The int4 codes in [-8, 7] (int8 storage), `[M, K]`."""
    return unpack_nibbles(self.packed).astype(jnp.int8) - 8

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    m, k = self.packed.shape[0], 2 * self.packed.shape[1]
    q = self.codes().astype(jnp.float32).reshape(m, k // self.group_size, self.group_size)
    w = (q * self.scale[..., None]).reshape(m, k)  # [M, K]
    if self.smooth is not None:
      w = w / self.smooth[None, :]
    return from_rows(w, self.shape, self.axes).astype(dtype)


def check_group_size(width: int, group_size: int, what: str = "group_size") -> None:
  """Raise a UserError unless `group_size` is even and divides `width`."""
  if group_size <= 0 or group_size % 2 or width % group_size:
    works = [d for d in range(2, width + 1, 2) if width % d == 0]
    raise UserError(f"int4 {what}={group_size} does not split the input width {width} into "
                    f"whole groups of an even size (two codes share a byte); use one of "
                    f"{works}.")


def quantize_int4(w: jax.Array, axis: Axis = 0, group_size: int = 128) -> Int4Tensor:
  """Group-wise int4: groups of `group_size` consecutive input elements (the contracted
  axes flattened in order), scale = absmax / 7 per group and output channel."""
  axes = normalize_axes(axis, w.ndim)
  check_group_size(math.prod(w.shape[a] for a in axes), group_size)
  rows = to_rows(jnp.asarray(w, jnp.float32), axes)  # [M, K]
  m, k = rows.shape
  groups = rows.reshape(m, k // group_size, group_size)  # [M, G, group]
  scale = jnp.max(jnp.abs(groups), axis=-1) / 7.0  # [M, G]
  q = jnp.clip(jnp.round(groups / _safe(scale)[..., None]), -7, 7).astype(jnp.int8)
  packed = pack_nibbles((q + 8).reshape(m, k))  # [M, K/2]
  return Int4Tensor(packed=packed, scale=scale, shape=tuple(w.shape), axes=axes,
                    group_size=group_size)


def dequantize(qtensor, dtype=jnp.float32) -> jax.Array:
  """The float weight a quantized tensor stands for (any format of `llmjax.quant`)."""
  return qtensor.dequantize(dtype)


def packed_bytes(qtensor) -> int:
  """Bytes the stored arrays occupy (codes, scales, second-level scales): every array
  leaf of the pytree, so a new field is counted without touching this. Works on
  `jax.eval_shape` output too."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(qtensor))


def bits_per_parameter(qtensor) -> float:
  """Stored bits per weight element: 8 for int8 plus 32 / (input width) for its scales,
  4 + 32 / group_size for int4, 4.5 for NF4 with float32 block-64 scales and ~4.127
  with double quantization (QLoRA, Dettmers et al. 2023, section 3)."""
  return 8.0 * packed_bytes(qtensor) / math.prod(qtensor.shape)
