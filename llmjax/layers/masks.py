"""Attention masks as pure functions.

A mask is a boolean array `[B, 1, L, S]` (or broadcastable to it, e.g. `[1, 1, L, S]`)
where True means "query l may attend to key s"; the 1 broadcasts over heads. Masks are
explicit arguments of `Attention`, so one network serves causal LMs, BERT (bidirectional),
T5 (encoder, decoder, cross-attention) and prefix-LMs.

Segment ids describe packed rows (several documents in one row): int32 `[B, L]`,
1, 2, ... for the documents and 0 for padding. Tokens never attend across documents or
to padding. Combine masks with `combine_masks` (logical AND).
"""

import jax
import jax.numpy as jnp


def causal_mask(length: int, kv_length: int | None = None) -> jax.Array:
  """`[1, 1, L, S]`: query l attends key s iff s <= l (S defaults to L)."""
  kv_length = length if kv_length is None else kv_length
  q = jnp.arange(length)[:, None]      # [L, 1]
  k = jnp.arange(kv_length)[None, :]   # [1, S]
  return (k <= q)[None, None]           # [1, 1, L, S]


def sliding_window_mask(length: int, window: int) -> jax.Array:
  """`[1, 1, L, L]`: query l attends key s iff l - s < window (itself and the window - 1
  positions before it; combine with the causal mask). Mistral's sliding window."""
  q = jnp.arange(length)[:, None]
  k = jnp.arange(length)[None, :]
  return (q - k < window)[None, None]


def padding_mask(q_valid: jax.Array, k_valid: jax.Array) -> jax.Array:
  """`[B, 1, L, S]` from `q_valid [B, L]` and `k_valid [B, S]` (True = real token)."""
  return jnp.logical_and(q_valid[:, None, :, None], k_valid[:, None, None, :])


def bidirectional_mask(valid: jax.Array) -> jax.Array:
  """`[B, 1, L, L]`: every real token attends every real token (BERT, T5 encoder)."""
  return padding_mask(valid, valid)


def segment_mask(q_segment_ids: jax.Array, k_segment_ids: jax.Array) -> jax.Array:
  """`[B, 1, L, S]`: same document and neither side padding (segment 0)."""
  same = q_segment_ids[:, None, :, None] == k_segment_ids[:, None, None, :]
  return jnp.logical_and(same, padding_mask(q_segment_ids != 0, k_segment_ids != 0))


def prefix_lm_mask(is_prefix: jax.Array) -> jax.Array:
  """`[B, 1, L, L]`: causal, plus bidirectional attention inside the prefix.

  `is_prefix [B, L]` marks the prefix (input) tokens of each row (Raffel et al. 2020,
  "prefix LM"). A prefix key is visible to every query: queries after it could see it
  causally anyway, and prefix queries see the whole prefix. Combine with `segment_mask`
  for packed rows. It is a complete mask: apply it through non-causal attention (a
  causal block would AND the plain causal mask back in).
  """
  causal = causal_mask(is_prefix.shape[-1])              # [1, 1, L, L]
  return jnp.logical_or(causal, is_prefix[:, None, None, :])


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
  """Logical AND of the masks that are not None (broadcasting); None if all are."""
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  out = masks[0]
  for m in masks[1:]:
    out = jnp.logical_and(out, m)
  return out
