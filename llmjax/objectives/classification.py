"""Sentence classification with BERT's pooled head (Devlin et al. 2019, §4.1: the first
token's final hidden state -> dense + tanh -> linear over the labels; cross-entropy).

Each example is one row: `tokens = [bos] + ids + [eos]` (bos plays BERT's [CLS]) and a
one-token `label` feature. Packing `label` with row length 1 (`DataConfig.
feature_lengths = {'tokens': L, 'label': 1}`) keeps one document per row, which the
pooled head needs; longer texts are truncated to L. Rows of padding (label segment
id 0) carry no loss. The network is `Transformer.classify` with
`TransformerConfig.num_classes` set.
"""

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from llmjax.errors import UserError
from llmjax.objectives import losses
from llmjax.objectives.protocol import TokenObjective, dropout_rngs


@dataclasses.dataclass(frozen=True)
class Classification(TokenObjective):
  """Cross-entropy over `Transformer.classify` logits (see the module docstring)."""

  label_key: str = "label"
  z_loss: float = 0.0

  can_sample: ClassVar[bool] = False

  def feature_fn(self, example, tokenizer):
    if self.label_key not in example:
      raise UserError(f"records have no field {self.label_key!r} (fields: {sorted(example)})"
                      ": set Classification.label_key to the label field.")
    ids = tokenizer.encode(example["text"])
    return {"tokens": np.asarray([tokenizer.bos_id, *ids, tokenizer.eos_id], np.int32),
            "label": np.asarray([int(example[self.label_key])], np.int32)}

  def init_inputs(self, lengths):
    if lengths.get("label") != 1:
      raise UserError(f"Classification packs a one-token 'label' feature; set DataConfig."
                      f"feature_lengths = {{'tokens': L, 'label': 1}} (got {dict(lengths)}).")
    return {"tokens": jnp.zeros((1, lengths["tokens"]), jnp.int32), "method": "classify"}

  def loss_sums(self, model, params, batch, *, rng=None, deterministic=True, frozen=None):
    tokens = batch["tokens"]
    segment_ids = batch.get("tokens_segment_ids")
    logits = model.apply(
        {"params": params}, tokens, segment_ids=segment_ids,
        positions=batch.get("tokens_positions"), deterministic=deterministic,
        rngs=dropout_rngs(rng, deterministic),
        method="classify")  # [B, C]
    labels = batch["label"][:, :1]  # [B, 1]
    label_seg = batch.get("label_segment_ids")
    weights = jnp.ones_like(labels) if label_seg is None else label_seg[:, :1] > 0
    return losses.cross_entropy_sums(logits[:, None, :], labels, weights, self.z_loss)
