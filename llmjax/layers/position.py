"""Position information: learned absolute, sinusoidal, rotary (RoPE) and T5 relative.

- Learned (GPT-2, BERT): a `[max_len, D]` table `embedding` added to token embeddings.
- Sinusoidal (Vaswani et al. 2017, sec. 3.5): PE[p, 2i] = sin(p / 10000^(2i/D)),
  PE[p, 2i+1] = cos(p / 10000^(2i/D)), interleaved as in the paper.
- RoPE (Su et al. 2021, "RoFormer"): rotates queries and keys inside attention so that
  q.k depends only on the relative position. Frequencies may be rescaled for longer
  contexts (`RopeScaling`: linear, llama3, YaRN, dynamic NTK). We use the "rotate-half"
  layout of LLaMA and Hugging Face (`rotate_half`): feature i pairs with feature i + H/2, not with its
  neighbour i + 1 as in the paper's interleaved form. The two layouts differ by a fixed
  permutation of the q/k projection columns, so HF LLaMA checkpoints load without one.
- T5 relative bias (Raffel et al. 2020, sec. 2.1; Shaw et al. 2018): a learned scalar per
  head and log-spaced bucket of key - query distance, added to the attention scores.

Positions are int32 `[B, L]` and restart at 0 for each document of a packed row.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.sharding.axes import EMBED, HEADS, LENGTH


def sinusoidal_positions(positions: jax.Array, features: int) -> jax.Array:
  """`[B, L, D]` float32 sinusoidal encodings of int `positions [B, L]` (D even)."""
  i = jnp.arange(features // 2, dtype=jnp.float32)
  inv_freq = 1.0 / (10_000.0 ** (2.0 * i / features))                   # [D/2]
  angles = positions[..., None].astype(jnp.float32) * inv_freq           # [B, L, D/2]
  pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)            # [B, L, D/2, 2]
  return pe.reshape(*positions.shape, features)                          # [B, L, D]


def rotate_half(x: jax.Array) -> jax.Array:
  """[x1, x2] -> [-x2, x1] over the last axis (halves), the HF/LLaMA RoPE layout."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """How RoPE's frequencies are rescaled to run past the pre-training context.

  kind: 'none'; 'linear' (position interpolation, Chen et al. 2023: every frequency
    divided by `factor`); 'llama3' (Llama 3.1: low frequencies divided, high ones kept,
    a linear blend between); 'yarn' (Peng et al. 2023: a per-dimension ramp between
    interpolation and extrapolation from `beta_fast`/`beta_slow` rotations, and cos/sin
    multiplied by `attention_factor`); 'dynamic' (dynamic NTK: theta grows with the
    longest position seen, past `original_max_len`). Each as transformers' `rope_type`.
  """

  kind: str = "none"
  factor: float = 1.0
  original_max_len: int = 8192
  low_freq_factor: float = 1.0    # llama3
  high_freq_factor: float = 4.0   # llama3
  beta_fast: float = 32.0         # yarn
  beta_slow: float = 1.0          # yarn
  truncate: bool = True           # yarn: ramp bounds rounded out to whole dimensions
  attention_factor: float = 1.0   # yarn: multiplies cos and sin


def rope_frequencies(head_dim: int, theta: float = 10_000.0,
                     scaling: RopeScaling = RopeScaling(),
                     seq_len: jax.Array | None = None) -> jax.Array:
  """RoPE's `[H/2]` float32 inverse frequencies theta^(-2i/H), rescaled by `scaling`.

  `seq_len` (int scalar, may be traced): the longest position + 1 of this call; only
  'dynamic' reads it (None = `original_max_len`, i.e. no change).
  """
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim   # [H/2]
  inv_freq = 1.0 / (theta ** exponents)
  factor, original = scaling.factor, scaling.original_max_len
  if scaling.kind == "linear":
    return inv_freq / factor
  if scaling.kind == "llama3":
    return _llama3(inv_freq, scaling)
  if scaling.kind == "yarn":
    low, high = _yarn_bounds(head_dim, theta, scaling)
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp)
  if scaling.kind == "dynamic" and seq_len is not None:
    seq_len = jnp.maximum(jnp.asarray(seq_len, jnp.float32), original)
    base = theta * (factor * seq_len / original - (factor - 1)) ** (head_dim / (head_dim - 2))
    return 1.0 / (base ** exponents)
  return inv_freq


def _llama3(inv_freq: jax.Array, s: RopeScaling) -> jax.Array:
  """Wavelengths longer than original_max_len / low_freq_factor are stretched by
  `factor`, those shorter than original_max_len / high_freq_factor kept, and the band
  between interpolated linearly in original_max_len / wavelength."""
  wavelen = 2 * math.pi / inv_freq
  stretched = jnp.where(wavelen > s.original_max_len / s.low_freq_factor,
                        inv_freq / s.factor, inv_freq)
  smooth = (s.original_max_len / wavelen - s.low_freq_factor) / (s.high_freq_factor
                                                                 - s.low_freq_factor)
  blended = (1 - smooth) * stretched / s.factor + smooth * stretched
  medium = ((wavelen >= s.original_max_len / s.high_freq_factor)
            & (wavelen <= s.original_max_len / s.low_freq_factor))
  return jnp.where(medium, blended, stretched)


def _yarn_bounds(head_dim: int, theta: float, s: RopeScaling) -> tuple[float, float]:
  """YaRN's ramp over frequency index i: the dimensions that turn fewer than beta_slow
  times over the original context are interpolated, more than beta_fast extrapolated."""
  def dim(rotations):  # the index i whose wavelength fits `rotations` times
    return head_dim * math.log(s.original_max_len / (rotations * 2 * math.pi)) / (
        2 * math.log(theta))
  low, high = dim(s.beta_fast), dim(s.beta_slow)
  if s.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  return low, (high + 0.001 if high == low else high)


def yarn_attention_factor(factor: float) -> float:
  """YaRN's default cos/sin multiplier, 0.1 ln(factor) + 1 (1 for factor <= 1)."""
  return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10_000.0,
               inv_freq: jax.Array | None = None, attention_factor: float = 1.0) -> jax.Array:
  """Rotary embedding of `x [B, L, N, H]` at int `positions [B, L]` (float32 inside);
  `inv_freq [H/2]` defaults to `rope_frequencies(H, theta)`; cos and sin are multiplied
  by `attention_factor` (YaRN)."""
  head_dim = x.shape[-1]
  inv_freq = rope_frequencies(head_dim, theta) if inv_freq is None else inv_freq
  angles = positions[..., None].astype(jnp.float32) * inv_freq          # [B, L, H/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]    # [B, L, 1, H]
  x32 = x.astype(jnp.float32)
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  if attention_factor != 1.0:
    cos, sin = cos * attention_factor, sin * attention_factor
  out = x32 * cos + rotate_half(x32) * sin
  return out.astype(x.dtype)


class LearnedPositions(nn.Module):
  """A learned `[max_len, D]` table `embedding`, looked up at `positions [B, L]`.

  The table's rows use the LENGTH logical axis (never sharded by the default rules).
  """

  max_len: int
  features: int
  init_std: float = 0.02
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, positions: jax.Array) -> jax.Array:
    init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std), (LENGTH, EMBED))
    table = self.param("embedding", init, (self.max_len, self.features), self.param_dtype)
    return jnp.take(table, positions, axis=0).astype(self.dtype)        # [B, L, D]


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool,
                             num_buckets: int = 32, max_distance: int = 128) -> jax.Array:
  """T5's bucket of `relative_position = key_pos - query_pos` (int, any shape).

  Half the buckets (all of them if not bidirectional) hold exact distances 0..max_exact-1,
  the rest cover larger distances logarithmically up to `max_distance` (beyond it: the
  last bucket). Bidirectional: keys after the query use the upper half. Unidirectional:
  keys after the query (masked anyway) share bucket 0. Matches HF
  `T5Attention._relative_position_bucket` op for op (float32 log, truncation).
  """
  buckets = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (relative_position > 0).astype(relative_position.dtype) * num_buckets
    distance = jnp.abs(relative_position)
  else:
    distance = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  # The maximum keeps log() finite where the small-distance branch is taken anyway.
  ratio = jnp.maximum(distance, 1).astype(jnp.float32) / max_exact
  large = max_exact + (jnp.log(ratio) / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(relative_position.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
  """T5's learned relative attention bias: a `[num_buckets, N]` table `embedding`.

  Computed once per stack from explicit query and key positions (so a KV-cached decoder
  passes the cache slots' positions as `k_positions`) and added to every layer's
  self-attention scores.
  """

  num_buckets: int
  max_distance: int
  num_heads: int
  bidirectional: bool
  init_std: float = 0.02
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
    """int `q_positions [B, L]`, `k_positions [B, S]` -> float32 bias `[B, N, L, S]`."""
    init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std), (LENGTH, HEADS))
    table = self.param("embedding", init, (self.num_buckets, self.num_heads), self.param_dtype)
    relative = k_positions[:, None, :] - q_positions[:, :, None]         # [B, L, S]
    buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets,
                                       self.max_distance)
    bias = jnp.take(table.astype(jnp.float32), buckets, axis=0)          # [B, L, S, N]
    return jnp.transpose(bias, (0, 3, 1, 2))                             # [B, N, L, S]
