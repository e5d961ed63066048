"""Causal language modelling: next-token prediction over packed rows.

The data pipeline packs documents (each `[bos] + ids + [eos]`) into rows `tokens` with
`tokens_segment_ids` (0 = padding) and `tokens_positions`. The model reads the whole row
with a causal mask restricted to each segment; position t predicts token t+1 when both
belong to the same document, so the loss mask drops padding and document boundaries.
"""

import dataclasses

import jax.numpy as jnp

from llmjax.data import packing
from llmjax.objectives import losses
from llmjax.objectives.protocol import TokenObjective, dropout_rngs


def shift_targets(tokens, segment_ids):
  """Targets and loss weights for next-token prediction within each packed segment.

  tokens, segment_ids: [B, L]. Returns targets [B, L] (tokens shifted left by one) and
  weights [B, L], 1 where position t and t+1 are in the same non-padding segment.
  """
  targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)  # [B, L]
  next_seg = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
  weights = (segment_ids > 0) & (next_seg == segment_ids)
  return targets, weights.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class CausalLM(TokenObjective):
  """Decoder-only pre-training / SFT objective. Owns the batch keys and the loss."""

  z_loss: float = 0.0

  def feature_fn(self, example, tokenizer):
    """Pipeline features for one document: `{'tokens': [bos] + ids + [eos]}`."""
    return packing.lm_features(example, tokenizer)

  def loss_sums(self, model, params, batch, *, rng=None, deterministic=True, frozen=None):
    """Returns the summed loss metrics (see `losses.cross_entropy_sums`) for one batch."""
    tokens = batch["tokens"]
    segment_ids = batch.get("tokens_segment_ids")
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    positions = batch.get("tokens_positions")
    logits = model.apply(
        {"params": params}, tokens, segment_ids=segment_ids, positions=positions,
        deterministic=deterministic, rngs=dropout_rngs(rng, deterministic))
    targets, weights = shift_targets(tokens, segment_ids)
    return losses.cross_entropy_sums(logits, targets, weights, self.z_loss)
