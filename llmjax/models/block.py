"""`TransformerBlock`: the one block of every architecture.

Self-attention, optional cross-attention (decoder blocks of an encoder-decoder), MLP;
each branch has a residual connection and dropout on its output. The norm sits either
before the branch (pre-norm: GPT-2, LLaMA, T5) or after the residual sum (post-norm:
Vaswani et al. 2017, BERT):

  pre:  x = x + dropout(branch(norm(x)))
  post: x = norm(x + dropout(branch(x)))

Submodule names (checkpoint API): `attention_norm`, `attention`, `cross_attention_norm`,
`cross_attention`, `mlp_norm`, `mlp`.
"""

import flax.linen as nn
import jax

from llmjax.layers.attention import Attention
from llmjax.layers.mlp import MLP
from llmjax.layers.norms import make_norm
from llmjax.models.config import TransformerConfig
from llmjax.sharding.axes import BATCH, EMBED, LENGTH


class TransformerBlock(nn.Module):
  """One layer: `[B, L, D] -> [B, L, D]`."""

  config: TransformerConfig
  cross_attention: bool = False
  causal: bool = False  # decoder blocks: self-attention adds the causal mask to `mask`

  def _residual(self, x, branch, norm_name: str, deterministic: bool):
    cfg = self.config
    norm = make_norm(cfg, name=norm_name)
    drop = nn.Dropout(rate=cfg.dropout_rate)
    if cfg.norm_position == "pre":
      return x + drop(branch(norm(x)), deterministic=deterministic)
    return norm(x + drop(branch(x), deterministic=deterministic))

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               positions: jax.Array | None = None, encoded: jax.Array | None = None,
               cross_mask: jax.Array | None = None, deterministic: bool = True,
               bias: jax.Array | None = None,
               cache: dict | None = None, cache_index: jax.Array | None = None):
    """Apply the layer (arguments positional-friendly for nn.scan / nn.remat).

    Args:
      x: `[B, L, D]` the residual stream.
      mask: self-attention mask, broadcastable to `[B, 1, L, L]` (`[B, 1, L, T]` cached);
        a `causal` block adds the causal mask itself (except when cached), so None or
        segment/padding masks suffice.
      positions: int `[B, L]` (used by RoPE).
      encoded: `[B, S, D]` encoder output; required iff `cross_attention` (except when
        decoding from a cache that already holds the cross-attention keys/values).
      cross_mask: cross-attention mask, broadcastable to `[B, 1, L, S]`.
      deterministic: False enables dropout ('dropout' rng).
      bias: float `[B, N, L, S]` added to the self-attention scores (T5 relative
        position bias, computed once per stack).
      cache: decoding only: this layer's `{'self': {'key', 'value'}[, 'cross': ...]}`
        (see `Attention._cached`); then the block returns `(x, new cache)`.
      cache_index: int scalar, the self-attention cache slot of x's first token.
    """
    cfg = self.config
    x = nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED))
    new_cache = {}

    def branch(module, name, h, kv, branch_mask, **kw):
      if cache is None:
        return module(h, kv, mask=branch_mask, deterministic=deterministic, **kw)
      y, new_cache[name] = module(h, kv, mask=branch_mask, cache=cache[name], **kw)
      return y

    attn = Attention(cfg, name="attention")
    x = self._residual(
        x, lambda h: branch(attn, "self", h, None, mask, positions=positions,
                            cache_index=cache_index, bias=bias, causal=self.causal),
        "attention_norm", deterministic)
    if self.cross_attention:
      if encoded is None and cache is None:
        raise ValueError("A cross-attention block needs `encoded` (the encoder output).")
      cross = Attention(cfg, name="cross_attention")
      x = self._residual(x, lambda h: branch(cross, "cross", h, encoded, cross_mask),
                         "cross_attention_norm", deterministic)
    mlp = MLP(cfg, name="mlp")
    x = self._residual(x, mlp, "mlp_norm", deterministic)
    x = nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED))
    return x if cache is None else (x, new_cache)
