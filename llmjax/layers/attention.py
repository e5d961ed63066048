"""Multi-head dot-product attention (Vaswani et al. 2017) with grouped-query heads.

`num_kv_heads` K selects the variant: K == N is multi-head attention, 1 < K < N is
grouped-query attention (Ainslie et al. 2023, GQA), K == 1 is multi-query attention
(Shazeer 2019). Query head n uses key/value head n // (N / K), the order of Hugging
Face's `repeat_kv`; queries are reshaped to `[B, L, K, N/K, H]` so K/V are never
repeated in memory.

The layer is split so a KV cache can slot in between the two halves later:
`project_qkv` (projections + RoPE) and `attend` (the softmax core), then `out`.
Softmax is always float32; masked scores get the float32 minimum, so a fully masked
row (a padding query) yields finite values instead of NaN.

Parameters (`Einsum` submodules, each with `kernel` and optional `bias`):
  query (EMBED, HEADS, HEAD_DIM)   key, value (EMBED, KV_HEADS, HEAD_DIM)
  out (HEADS, HEAD_DIM, EMBED)
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.kernels import attention_impls, dense
from llmjax.kernels.attention_impls import AttentionDropout
from llmjax.kernels.dense import einsum_f32
from llmjax.layers import masks
from llmjax.layers.linear import Einsum, Joint
from llmjax.layers.position import apply_rope, rope_frequencies
from llmjax.sharding.axes import BATCH, EMBED, HEAD_DIM, HEADS, KV_HEADS, LENGTH


def _grouped_queries(q: jax.Array, kv_heads: int, scale: float) -> jax.Array:
  """`[B, L, N, H]` -> scaled `[B, L, K, G, H]` (G = N / K query heads per kv head)."""
  b, l, n, h = q.shape
  q = q.reshape(b, l, kv_heads, n // kv_heads, h)                       # [B, L, K, G, H]
  return q * jnp.asarray(scale, q.dtype) if scale != 1.0 else q


def _scores(equation: str, q: jax.Array, k: jax.Array, mask, bias) -> jax.Array:
  """float32 scores `[B, K, G, L, S]` of grouped queries against `k`, + bias, masked."""
  scores = einsum_f32(equation, q, k)                                   # [B, K, G, L, S]
  kv_heads, group = scores.shape[1:3]
  if bias is not None:
    bias = jnp.broadcast_to(bias, (bias.shape[0], kv_heads * group) + scores.shape[-2:])
    scores = scores + bias.reshape(bias.shape[0], kv_heads, group,
                                   *scores.shape[-2:]).astype(jnp.float32)  # [B, K, G, L, S]
  if mask is not None:
    mask = jnp.broadcast_to(mask, (mask.shape[0], 1) + scores.shape[-2:])  # [B|1, 1, L, S]
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  return scores


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                        mask: jax.Array | None = None, bias: jax.Array | None = None,
                        dropout_fn=None, scale: float | None = None) -> jax.Array:
  """The einsum reference: softmax(scale * q k^T + bias, masked) v, softmax in float32.

  q `[B, L, N, H]`, k and v `[B, S, K, H]`; mask (bool, True = may attend) and bias
  broadcastable to `[B, 1, L, S]` / `[B, N, L, S]`; `dropout_fn` takes the probabilities.
  Every other implementation computes this (`dot_product_attention`).
  """
  b, l, n, h = q.shape
  scale = 1.0 / math.sqrt(h) if scale is None else scale
  q = _grouped_queries(q, k.shape[2], scale)                            # [B, L, K, G, H]
  scores = _scores("BLKGH,BSKH->BKGLS", q, k, mask, bias)              # [B, K, G, L, S]
  probs = jax.nn.softmax(scores, axis=-1)
  if dropout_fn is not None:
    probs = dropout_fn(probs)
  out = einsum_f32("BKGLS,BSKH->BLKGH", probs.astype(v.dtype), v)      # [B, L, K, G, H]
  return out.reshape(b, l, n, h).astype(q.dtype)                        # [B, L, N, H]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array | None = None,
                          dropout_fn=None, bias: jax.Array | None = None,
                          scale: float | None = None, impl: str = "einsum",
                          causal_chunks: int = 1, causal: bool = False) -> jax.Array:
  """`reference_attention`, computed by the implementation `impl` names.

  Args:
    q, k, v, mask, bias, scale: as `reference_attention`.
    dropout_fn: applied to the attention probabilities (None = no dropout); an
      `AttentionDropout` also lets 'cpu_flash' draw the dropout in its kernel.
    impl: 'einsum', 'jax', 'cudnn' or 'cpu_flash' (`llmjax.kernels.attention_impls`
      says what each is and where it falls back to 'einsum').
    causal_chunks: only for causal self-attention: the queries are split into this many
      chunks and chunk i is scored against keys up to its own end only, skipping the
      masked upper triangle ((n + 1) / 2n of the work). Same result (dropout draws
      differ). 'cudnn' and 'cpu_flash' skip hidden blocks themselves and ignore it.
    causal: causal self-attention (L == S): query l never sees a key after it, on top
      of whatever `mask` hides (`mask` then holds only padding/segments, or is None).
  Returns:
    `[B, L, N, H]` in q's dtype.
  """
  l = q.shape[1]
  if (causal or causal_chunks > 1) and k.shape[1] != l and l > 1:
    raise ValueError(f"causal attention needs self-attention (L == S), got {l} vs {k.shape[1]}")
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  full_mask = masks.combine_masks(masks.causal_mask(l), mask) if causal else mask
  out = attention_impls.attention(impl, q, k, v, mask, full_mask, dropout_fn, bias, scale,
                                  causal, causal_chunks)
  return reference_attention(q, k, v, full_mask, bias, dropout_fn, scale) if out is None else out


class Attention(nn.Module):
  """Self-attention, or cross-attention when `kv` is given; `[B, L, D] -> [B, L, D]`."""

  config: "TransformerConfig"  # noqa: F821 (llmjax.models.config; avoids an import cycle)

  def setup(self):
    cfg = self.config
    d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = {"use_bias": cfg.qkv_bias, "dtype": cfg.compute_dtype,
          "param_dtype": cfg.params_dtype, "kernel_init": nn.initializers.normal(cfg.init_std)}
    self.query = Einsum("BLD,DNH->BLNH", (d, n, h), (EMBED, HEADS, HEAD_DIM), **kw)
    self.key = Einsum("BSD,DKH->BSKH", (d, k, h), (EMBED, KV_HEADS, HEAD_DIM), **kw)
    self.value = Einsum("BSD,DKH->BSKH", (d, k, h), (EMBED, KV_HEADS, HEAD_DIM), **kw)
    # GPT-2: residual output projections start smaller, by 1/sqrt(2 * num_layers).
    kw["kernel_init"] = nn.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.num_layers))
    kw["use_bias"] = cfg.use_bias
    self.out = Einsum("BLNH,NHD->BLD", (n, h, d), (HEADS, HEAD_DIM, EMBED), **kw)
    self.dropout = nn.Dropout(rate=cfg.attention_dropout_rate)

  def project_qkv(self, x: jax.Array, kv: jax.Array | None = None,
                  positions: jax.Array | None = None, fused: bool = False):
    """q `[B, L, N, H]`, k and v `[B, S, K, H]`; RoPE at `positions` for self-attention.

    RoPE is not applied in cross-attention: encoder and decoder positions are not on
    one axis. Self-attention computes the three projections as one product
    (`_fused_qkv`) when `config.fused_qkv` or `fused` (decoding steps always do).
    """
    self_attention = kv is None
    kv = x if self_attention else kv
    if (fused or self.config.fused_qkv) and self_attention:
      q, k, v = self._fused_qkv(x)
    else:
      q, k, v = self.query(x), self.key(kv), self.value(kv)
    q = nn.with_logical_constraint(q, (BATCH, LENGTH, HEADS, HEAD_DIM))
    k = nn.with_logical_constraint(k, (BATCH, LENGTH, KV_HEADS, HEAD_DIM))
    v = nn.with_logical_constraint(v, (BATCH, LENGTH, KV_HEADS, HEAD_DIM))
    if self.config.position == "rope" and self_attention:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
      cfg = self.config
      seq_len = positions.max() + 1 if cfg.rope_scaling == "dynamic" else None
      inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope, seq_len)
      q, k = (apply_rope(a, positions, inv_freq=inv_freq,
                         attention_factor=cfg.rope_attention_factor) for a in (q, k))
    return q, k, v

  def _fused_qkv(self, x: jax.Array):
    """`query(x), key(x), value(x)` from one product of their `weights`
    (`dense.fused_heads_product`, about twice as fast on CPU). Each layer is then still
    called, with its part as a `Joint`, so an interceptor sees every projection."""
    layers = (self.query, self.key, self.value)
    x = x.astype(self.config.compute_dtype)
    parts = dense.fused_heads_product(x, [layer.weights() for layer in layers],
                                      self.config.num_kv_heads)
    return tuple(layer(x, Joint(x, y)) for layer, y in zip(layers, parts))

  def attend(self, q, k, v, mask=None, deterministic: bool = True,
             bias: jax.Array | None = None, causal: bool = False) -> jax.Array:
    """The attention core on projected heads: `[B, L, N, H]` (`bias`: `[B, N, L, S]`).

    `causal`: causal self-attention; the causal mask is applied here, on top of `mask`
    (`config.causal_chunks` may then skip the masked upper triangle)."""
    dropout_fn = None
    if not deterministic and self.config.attention_dropout_rate > 0:
      if self.config.attention_impl == "cpu_flash":  # drawn in the kernel
        dropout_fn = AttentionDropout(self.config.attention_dropout_rate,
                                      self.make_rng("dropout"))
      else:
        dropout_fn = lambda p: self.dropout(p, deterministic=False)
    return dot_product_attention(q, k, v, mask, dropout_fn, bias=bias,
                                 scale=self.config.query_scale,
                                 impl=self.config.attention_impl,
                                 causal_chunks=self.config.causal_chunks if causal else 1,
                                 causal=causal)

  def __call__(self, x: jax.Array, kv: jax.Array | None = None, *,
               mask: jax.Array | None = None, positions: jax.Array | None = None,
               deterministic: bool = True, cache: dict | None = None,
               cache_index: jax.Array | None = None, bias: jax.Array | None = None,
               causal: bool = False):
    """Attend from `x [B, L, D]` to `kv [B, S, D]` (default: x itself).

    Args:
      mask: boolean, broadcastable to `[B, 1, L, S]` (see `llmjax.layers.masks`).
      positions: int `[B, L]` for RoPE; default arange(L).
      bias: float, broadcastable to `[B, N, L, S]`, added to the scores (T5 relative
        position bias, computed once per stack by `RelativePositionBias`).
      deterministic: False enables attention-probability dropout ('dropout' rng).
      cache: decoding only: `{'key', 'value'}` (layouts: see `_cached`).
      cache_index: int scalar, the cache slot of x's first token (self-attention).
      causal: causal self-attention: the causal mask is applied on top of `mask`
        (see `attend`); ignored with `cache` (the cache's mask is complete).
    Returns:
      `[B, L, D]`, or `([B, L, D], new cache)` when `cache` is given.
    """
    if cache is not None:
      return self._cached(x, kv, mask, positions, cache, cache_index, bias)
    q, k, v = self.project_qkv(x, kv, positions)
    return self.out(self.attend(q, k, v, mask, deterministic, bias, causal))

  def _cached(self, x, kv, mask, positions, cache, cache_index, bias=None):
    """Attention over a KV cache (llmjax.decode): returns (`[B, L, D]`, new cache).

    Layout: keys `[B, K, T, H]` and values `[B, K, H, T]` (transposed): XLA:CPU runs a
    one-token step as batched matrix-vector products with the cache as the matrix,
    contracted over its minor dimension; these layouts are that, with no per-step
    transpose of the cache.

    Self-attention (`cache_index` given) attends over the old cache and this call's L
    keys/values (`mask [B, 1, L, T]` is over the slots after the write: it hides
    padding, unwritten and future slots), then writes them into slots `cache_index
    ... cache_index + L - 1`. Attending to old and new separately, instead of reading
    the updated cache, keeps the reads off the written buffer, so XLA can write it in
    place instead of copying the cache every step (on CPU this also needs
    `llmjax.decode.generate.LOOP_COMPILER_OPTIONS`). Cross-attention
    (`cache_index` None) projects `kv` into the cache when given (once, at prefill)
    and otherwise reuses the cached encoder keys/values.
    """
    dtype, scale = cache["key"].dtype, self.config.query_scale
    if cache_index is None:
      if kv is None:
        q = nn.with_logical_constraint(self.query(x), (BATCH, LENGTH, HEADS, HEAD_DIM))
        k, vt = cache["key"], cache["value"]
      else:
        q, k, v = self.project_qkv(x, kv, positions)
        k, vt = k.swapaxes(1, 2).astype(dtype), v.transpose(0, 2, 3, 1).astype(dtype)
      y = cached_attention(q, [(k, vt, mask, bias)], scale)
      return self.out(y), {"key": k, "value": vt}
    q, k, v = self.project_qkv(x, None, positions, fused=True)
    k_new = k.swapaxes(1, 2).astype(dtype)                              # [B, K, L, H]
    vt_new = v.transpose(0, 2, 3, 1).astype(dtype)                      # [B, K, H, L]
    length = x.shape[1]
    slots = jnp.arange(cache["key"].shape[2])                           # [T]
    new_part = lambda a: None if a is None else jax.lax.dynamic_slice_in_dim(
        a, cache_index, length, axis=a.ndim - 1)                        # [..., L, L]
    old_mask = slots < cache_index if mask is None else mask & (slots < cache_index)
    y = cached_attention(q, [(cache["key"], cache["value"], old_mask, bias),
                             (k_new, vt_new, new_part(mask), new_part(bias))], scale)
    new_cache = {"key": jax.lax.dynamic_update_slice_in_dim(cache["key"], k_new, cache_index,
                                                            axis=2),
                 "value": jax.lax.dynamic_update_slice_in_dim(cache["value"], vt_new,
                                                              cache_index, axis=3)}
    return self.out(y), new_cache


def cached_attention(q: jax.Array, parts, scale: float | None = None) -> jax.Array:
  """`dot_product_attention` over key/value segments with one softmax across them all.

  Args:
    q: `[B, L, N, H]` queries.
    parts: `(k [B, K, S, H], vt [B, K, H, S], mask, bias)` per segment; mask (bool) and
      bias (float) broadcastable to `[B, 1, L, S]` / `[B, N, L, S]`, or None.
    scale: multiplies the queries; None = 1/sqrt(H).
  Returns:
    `[B, L, N, H]` in q's dtype.
  """
  b, l, n, h = q.shape
  scale = 1.0 / math.sqrt(h) if scale is None else scale
  q = _grouped_queries(q, parts[0][0].shape[1], scale)                  # [B, L, K, G, H]
  scores = [_scores("BLKGH,BKSH->BKGLS", q, k, mask, bias) for k, _, mask, bias in parts]
  probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)     # float32
  out, start = 0.0, 0
  for _, vt, _, _ in parts:
    p = jax.lax.slice_in_dim(probs, start, start + vt.shape[3], axis=-1)  # [B, K, G, L, S]
    out = out + einsum_f32("BKGLS,BKHS->BLKGH", p.astype(vt.dtype), vt)  # [B, L, K, G, H]
    start += vt.shape[3]
  return out.reshape(b, l, n, h).astype(q.dtype)                         # [B, L, N, H]
