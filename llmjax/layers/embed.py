"""Token embedding `embedding [V, D]` and its transpose for tied output logits.

Tied embeddings (Press & Wolf 2017; GPT-2, BERT, T5 v1.0) reuse the input table as the
output projection: logits = x @ embedding.T.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.kernels import dense
from llmjax.sharding.axes import EMBED, VOCAB


class Embed(nn.Module):
  """Token embedding table with `__call__` (lookup) and `attend` (tied logits)."""

  vocab_size: int
  features: int
  init_std: float = 0.02
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std), (VOCAB, EMBED))
    self.embedding = self.param("embedding", init, (self.vocab_size, self.features),
                                self.param_dtype)

  @nn.compact  # creates nothing itself; lets an interceptor add parameters (a soft prompt)
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """int `tokens [B, L]` -> `[B, L, D]` in the compute dtype."""
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array, pad_to: int = 1) -> jax.Array:
    """`x [B, L, D]` -> float32 logits `[B, L, V]` against the same table.

    `pad_to`: the product runs over the table padded with zero rows to a multiple of
    this, and the logits are sliced back to V (GPU tiles divide the padded width)."""
    table = self.embedding.astype(self.dtype)                             # [V, D]
    return dense.product("BLD,VD->BLV", x.astype(self.dtype), table, pad_to=pad_to)
