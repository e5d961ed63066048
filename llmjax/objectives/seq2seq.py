"""Supervised sequence-to-sequence training with teacher forcing (Sutskever et al. 2014;
the encoder-decoder Transformer of Vaswani et al. 2017; T5's text-to-text framing,
Raffel et al. 2020): translation, summarization, question answering.

Each example gives two features, packed side by side (`DataConfig.feature_lengths =
{'inputs': S, 'targets': L}`); packing gives a document the same segment id on both
sides, which is what the decoder's cross-attention mask relies on:

  inputs   encode(prefix + example[inputs_key]) + [eos]     -> the encoder
  targets  encode(example[targets_key]) + [eos]             -> what the decoder predicts

The decoder reads the targets shifted right by one within each document, starting
from `decoder_start_id` (bos), and the loss covers every real target token (eos too,
so the model learns where to stop).
"""

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from llmjax.data import tokenizer as tokenizer_lib
from llmjax.errors import UserError
from llmjax.objectives import losses
from llmjax.objectives.protocol import TokenObjective, dropout_rngs


def shift_right(targets, segment_ids, start_id: int):
  """Decoder inputs: `targets [B, L]` shifted right by one inside each packed segment,
  with `start_id` at every document's first position."""
  prev = jnp.concatenate([jnp.full_like(targets[:, :1], start_id), targets[:, :-1]], axis=1)
  prev_seg = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1]), segment_ids[:, :-1]], axis=1)
  return jnp.where(prev_seg == segment_ids, prev, start_id)  # [B, L]


def _ones_if_none(value, like):
  return jnp.ones_like(like) if value is None else value


def encoder_decoder_sums(model, params, batch, *, start_id: int, z_loss: float = 0.0,
                         rng=None, deterministic=True):
  """Teacher-forced cross-entropy sums for a batch of packed `inputs` / `targets`."""
  inputs, targets = batch["inputs"], batch["targets"]
  inputs_seg = _ones_if_none(batch.get("inputs_segment_ids"), inputs)
  targets_seg = _ones_if_none(batch.get("targets_segment_ids"), targets)
  decoder_inputs = shift_right(targets, targets_seg, start_id)
  logits = model.apply(
      {"params": params}, decoder_inputs, segment_ids=targets_seg,
      positions=batch.get("targets_positions"), encoder_tokens=inputs,
      encoder_segment_ids=inputs_seg, encoder_positions=batch.get("inputs_positions"),
      deterministic=deterministic,
      rngs=dropout_rngs(rng, deterministic))
  return losses.cross_entropy_sums(logits, targets, targets_seg > 0, z_loss)


def encoder_decoder_init_inputs(lengths):
  """`model.init` keyword arguments for rows of `lengths['inputs']` / `['targets']`."""
  missing = {"inputs", "targets"} - set(lengths)
  if missing:
    raise UserError(f"an encoder-decoder objective packs 'inputs' and 'targets', but "
                    f"DataConfig.feature_lengths is {dict(lengths)}: set it to e.g. "
                    "{'inputs': 64, 'targets': 32}.")
  return {"tokens": jnp.zeros((1, lengths["targets"]), jnp.int32),
          "encoder_tokens": jnp.zeros((1, lengths["inputs"]), jnp.int32)}


@dataclasses.dataclass(frozen=True)
class Seq2Seq(TokenObjective):
  """Supervised inputs -> targets (see the module docstring)."""

  inputs_key: str = "en"
  targets_key: str = "de"
  inputs_prefix: str = ""    # e.g. 'translate English to German: ' (T5's task prefix)
  decoder_start_id: int = tokenizer_lib.BOS_ID
  z_loss: float = 0.0

  can_sample: ClassVar[bool] = False  # the loop's end-of-run sample is a causal-LM prompt

  def encode_inputs(self, text: str, tokenizer) -> np.ndarray:
    """The encoder ids for one source text (also what greedy decoding feeds)."""
    ids = tokenizer.encode(self.inputs_prefix + text)
    return np.asarray([*ids, tokenizer.eos_id], np.int32)

  def feature_fn(self, example, tokenizer):
    for key in (self.inputs_key, self.targets_key):
      if key not in example:
        raise UserError(f"records have no field {key!r} (fields: {sorted(example)}): set "
                        "Seq2Seq.inputs_key / targets_key to the dataset's language codes.")
    targets = tokenizer.encode(example[self.targets_key])
    return {"inputs": self.encode_inputs(example[self.inputs_key], tokenizer),
            "targets": np.asarray([*targets, tokenizer.eos_id], np.int32)}

  def init_inputs(self, lengths):
    return encoder_decoder_init_inputs(lengths)

  def loss_sums(self, model, params, batch, *, rng=None, deterministic=True, frozen=None):
    return encoder_decoder_sums(model, params, batch, start_id=self.decoder_start_id,
                                z_loss=self.z_loss, rng=rng, deterministic=deterministic)
