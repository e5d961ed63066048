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

from llmjax.layers.linear import Einsum, einsum_f32
from llmjax.layers.position import apply_rope
from llmjax.sharding.axes import BATCH, EMBED, HEAD_DIM, HEADS, KV_HEADS, LENGTH


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array | None = None,
                          dropout_fn=None) -> jax.Array:
  """softmax(q k^T / sqrt(H) + mask) v, grouped over K key/value heads.

  Args:
    q: `[B, L, N, H]` queries; k, v: `[B, S, K, H]` with N % K == 0.
    mask: boolean, broadcastable to `[B, 1, L, S]`; True = may attend.
    dropout_fn: applied to the attention probabilities (None = no dropout).
  Returns:
    `[B, L, N, H]` in q's dtype.
  """
  b, l, n, h = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, l, kv_heads, n // kv_heads, h)                       # [B, L, K, G, H]
  q = q * jnp.asarray(1.0 / math.sqrt(h), q.dtype)
  scores = einsum_f32("BLKGH,BSKH->BKGLS", q, k)                        # [B, K, G, L, S]
  if mask is not None:
    mask = jnp.broadcast_to(mask, (mask.shape[0], 1) + scores.shape[-2:])  # [B|1, 1, L, S]
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)                               # float32
  if dropout_fn is not None:
    probs = dropout_fn(probs)
  out = einsum_f32("BKGLS,BSKH->BLKGH", probs.astype(v.dtype), v)       # [B, L, K, G, H]
  return out.reshape(b, l, n, h).astype(q.dtype)                         # [B, L, N, H]


class Attention(nn.Module):
  """Self-attention, or cross-attention when `kv` is given; `[B, L, D] -> [B, L, D]`."""

  config: "TransformerConfig"  # noqa: F821 (llmjax.models.config; avoids an import cycle)

  def setup(self):
    cfg = self.config
    d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dense = {"use_bias": cfg.use_bias, "dtype": cfg.compute_dtype,
             "param_dtype": cfg.params_dtype,
             "kernel_init": nn.initializers.normal(cfg.init_std)}
    self.query = Einsum("BLD,DNH->BLNH", (d, n, h), (EMBED, HEADS, HEAD_DIM), **dense)
    self.key = Einsum("BSD,DKH->BSKH", (d, k, h), (EMBED, KV_HEADS, HEAD_DIM), **dense)
    self.value = Einsum("BSD,DKH->BSKH", (d, k, h), (EMBED, KV_HEADS, HEAD_DIM), **dense)
    # GPT-2: residual output projections start smaller, by 1/sqrt(2 * num_layers).
    dense["kernel_init"] = nn.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.num_layers))
    self.out = Einsum("BLNH,NHD->BLD", (n, h, d), (HEADS, HEAD_DIM, EMBED), **dense)
    self.dropout = nn.Dropout(rate=cfg.attention_dropout_rate)

  def project_qkv(self, x: jax.Array, kv: jax.Array | None = None,
                  positions: jax.Array | None = None):
    """q `[B, L, N, H]`, k and v `[B, S, K, H]`; RoPE at `positions` for self-attention.

    RoPE is not applied in cross-attention: encoder and decoder positions are not on
    one axis.
    """
    self_attention = kv is None
    kv = x if self_attention else kv
    q = nn.with_logical_constraint(self.query(x), (BATCH, LENGTH, HEADS, HEAD_DIM))
    k = nn.with_logical_constraint(self.key(kv), (BATCH, LENGTH, KV_HEADS, HEAD_DIM))
    v = nn.with_logical_constraint(self.value(kv), (BATCH, LENGTH, KV_HEADS, HEAD_DIM))
    if self.config.position == "rope" and self_attention:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
      q = apply_rope(q, positions, self.config.rope_theta)
      k = apply_rope(k, positions, self.config.rope_theta)
    return q, k, v

  def attend(self, q, k, v, mask=None, deterministic: bool = True) -> jax.Array:
    """The attention core on projected heads: `[B, L, N, H]`."""
    dropout_fn = None
    if not deterministic and self.config.attention_dropout_rate > 0:
      dropout_fn = lambda p: self.dropout(p, deterministic=False)
    return dot_product_attention(q, k, v, mask, dropout_fn)

  def __call__(self, x: jax.Array, kv: jax.Array | None = None, *,
               mask: jax.Array | None = None, positions: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    """Attend from `x [B, L, D]` to `kv [B, S, D]` (default: x itself).

    Args:
      mask: boolean, broadcastable to `[B, 1, L, S]` (see `llmjax.layers.masks`).
      positions: int `[B, L]` for RoPE; default arange(L).
      deterministic: False enables attention-probability dropout ('dropout' rng).
    """
    q, k, v = self.project_qkv(x, kv, positions)
    return self.out(self.attend(q, k, v, mask, deterministic))
