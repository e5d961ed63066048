"""A pairwise reward model (Stiennon et al. 2020, "Learning to summarize from human
feedback", §3.4; Ouyang et al. 2022, "InstructGPT", §3.5): the transformer with a
scalar head, trained so that the preferred response of a pair scores higher.

Records are preference pairs, `{"prompt", "chosen", "rejected"}` strings in the model's
own format (`shakespeare_preferences`, `local_preferences`; the format is documented in
`llmjax/data/tfds_builders/shakespeare_preferences.py`). Each side is encoded as SFT
encodes a prompt and its response: separately, then concatenated, because tok(prompt)
+ tok(response) is not tok(prompt + response) under a subword tokenizer.

  decoder-only   chosen    [bos] tok(prompt) tok(chosen)   [eos]
                 rejected  [bos] tok(prompt) tok(rejected) [eos]
                 feature_lengths = {'chosen': L, 'rejected': L}
  encoder-decoder inputs   tok(prompt) [eos]                       -> the encoder
                 chosen_response   [start] tok(chosen)   [eos]     -> the decoder
                 rejected_response [start] tok(rejected) [eos]
                 feature_lengths = {'inputs': S, 'chosen_response': L,
                                    'rejected_response': L}

The head (`Transformer.reward`, parameters `reward_head`: kernel [D, 1], bias [1])
maps every position's final hidden state to a scalar, and the reward of a sequence is
the one at its LAST REAL token, the EOS: in a causal decoder the only position that
has seen the prompt and the whole response (not a pad or a token after EOS: trl#3750).
The last real token is where a segment id ends, so no index feature is needed and
packing works: grain's packers give the features of one pair the same segment id in
every packed key, so pair k of a row is segment k of `chosen` and of `rejected`, and
the rewards are read per (row, segment) with one scatter. `packing='none'` (one pair
per row) is the same with segment ids 1 and 0. `max_len` (the row length) makes a long
pair lose the start of its prompt, never the response's EOS where the reward is read;
a response longer than the row is cut at its end (the EOS kept).

Loss: Bradley & Terry (1952), P(chosen > rejected) = sigmoid(r_c - r_r), so the loss
is -log sigmoid(r_c - r_r - margin), summed over pairs with `weight` = the number of
pairs (`margin` > 0 asks for a gap, as Llama 2's §3.2.2 margin does). Metrics:
`accuracy` (the fraction of pairs with r_c > r_r, strictly), `reward_margin` (mean
r_c - r_r), `reward_chosen`, `reward_rejected`, `pairs`.

A warm start from a language model lacks `reward_head`; `new_params` tells the loop
to keep its initialization (and a reward model's checkpoint is a full language model
plus the head: `Transformer.reward` creates the LM head's parameters at init too).
`score` gives rewards of (prompt, response) pairs; `llmjax score` prints them.
"""

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.data import tokenizer as tokenizer_lib
from llmjax.errors import UserError
from llmjax.objectives.protocol import TokenObjective, dropout_rngs

DECODER_KEYS = ("chosen", "rejected")
ENCODER_DECODER_KEYS = ("inputs", "chosen_response", "rejected_response")
RECORD_FIELDS = ("prompt", "chosen", "rejected")


def _check_lengths(lengths) -> bool:
  """True for the encoder-decoder layout, False for the decoder one; else a UserError."""
  keys = set(lengths)
  if keys == set(DECODER_KEYS) and lengths["chosen"] == lengths["rejected"]:
    return False
  if keys == set(ENCODER_DECODER_KEYS) and (
      lengths["chosen_response"] == lengths["rejected_response"]):
    return True
  raise UserError("RewardModel packs {'chosen': L, 'rejected': L} (decoder-only or "
                  "encoder-only) or {'inputs': S, 'chosen_response': L, "
                  "'rejected_response': L} (encoder-decoder), one L for both sides, but "
                  f"DataConfig.feature_lengths is {dict(lengths)}: set it to one of these.")


def segment_last(values: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`values [B, L]` at the last position of each segment: `(out [B, L], present [B, L])`,
  column s - 1 holding segment s (ids 1, 2, ...; 0 is padding, never read)."""
  batch, length = segment_ids.shape
  after = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
  last = (segment_ids > 0) & (segment_ids != after)                     # [B, L]
  column = jnp.where(last, segment_ids - 1, length)  # not a last token: out of range, dropped
  rows = jnp.arange(batch)[:, None]
  out = jnp.zeros((batch, length), values.dtype).at[rows, column].add(
      jnp.where(last, values, 0), mode="drop")
  present = jnp.zeros((batch, length), bool).at[rows, column].set(last, mode="drop")
  return out, present


def bradley_terry_sums(chosen: jax.Array, rejected: jax.Array, weights: jax.Array,
                       margin: float = 0.0) -> dict[str, jax.Array]:
  """Sums over the pairs where `weights` is 1 of -log sigmoid(r_c - r_r - margin) and
  of the metrics (module docstring); `weight` is the number of pairs."""
  chosen, rejected = chosen.astype(jnp.float32), rejected.astype(jnp.float32)
  w = weights.astype(jnp.float32)
  delta = chosen - rejected
  nll = -jax.nn.log_sigmoid(delta - margin)
  return {"loss": jnp.sum(nll * w), "correct": jnp.sum((delta > 0) * w),
          "reward_margin": jnp.sum(delta * w), "reward_chosen": jnp.sum(chosen * w),
          "reward_rejected": jnp.sum(rejected * w), "weight": jnp.sum(w)}


def _ones_if_none(value, like):
  return jnp.ones_like(like) if value is None else value


@dataclasses.dataclass(frozen=True)
class RewardModel(TokenObjective):
  """Bradley-Terry loss on a scalar head (see the module docstring)."""

  max_len: int | None = None  # the row length: longer pairs lose their prompt's start
  margin: float = 0.0         # -log sigmoid(r_c - r_r - margin)
  decoder_start_id: int = tokenizer_lib.BOS_ID  # encoder-decoder only

  can_sample: ClassVar[bool] = False
  # Parameters a warm-start source (a language model) lacks: they keep their init.
  new_params: ClassVar[str] = "reward_head"
  # ... and trains under PEFT beside the adapters (LoRA on a reward model).
  trained_params: ClassVar[str] = "reward_head"

  def encode(self, prompt: str, response: str, tokenizer) -> dict[str, np.ndarray]:
    """One side's rows: `sequence` (decoder-only), `prompt` / `response` (encoder-decoder)."""
    if tokenizer.eos_id is None:
      raise UserError("the tokenizer has no EOS token, which ends every sequence a reward "
                      "model scores (the reward is read there): use a tokenizer with one.")
    prompt_ids, response_ids = tokenizer.encode(prompt), tokenizer.encode(response)
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    eos = [tokenizer.eos_id]
    kept_prompt, kept_response = prompt_ids, response_ids
    if self.max_len:  # keep the EOS, then the response's start, then the prompt's end
      kept_response = response_ids[:max(self.max_len - len(bos) - 1, 0)]
      room = self.max_len - len(bos) - len(kept_response) - 1
      kept_prompt = prompt_ids[max(len(prompt_ids) - room, 0):] if room > 0 else []
      prompt_ids = prompt_ids[max(len(prompt_ids) - self.max_len + 1, 0):]  # + [eos]
      response_ids = response_ids[:max(self.max_len - 2, 0)]  # [start] + ... + [eos]
    as_ids = lambda ids: np.asarray(ids, np.int32)
    return {"sequence": as_ids(bos + kept_prompt + kept_response + eos),
            "prompt": as_ids(prompt_ids + eos),
            "response": as_ids([self.decoder_start_id] + response_ids + eos)}

  def feature_fn(self, example, tokenizer):
    """Both layouts' features; the pipeline packs those `feature_lengths` names."""
    if any(not isinstance(example.get(k), str) for k in RECORD_FIELDS):
      raise UserError(f"RewardModel reads string fields {RECORD_FIELDS}, but a record has "
                      f"fields {sorted(example)}: use a preference dataset "
                      "(shakespeare_preferences, local_preferences).")
    chosen = self.encode(example["prompt"], example["chosen"], tokenizer)
    rejected = self.encode(example["prompt"], example["rejected"], tokenizer)
    return {"chosen": chosen["sequence"], "rejected": rejected["sequence"],
            "inputs": chosen["prompt"], "chosen_response": chosen["response"],
            "rejected_response": rejected["response"]}

  def init_inputs(self, lengths):
    if _check_lengths(lengths):
      return {"tokens": jnp.zeros((1, lengths["chosen_response"]), jnp.int32),
              "encoder_tokens": jnp.zeros((1, lengths["inputs"]), jnp.int32),
              "method": "reward"}
    return {"tokens": jnp.zeros((1, lengths["chosen"]), jnp.int32), "method": "reward"}

  def pair_rewards(self, model, params, batch, *, rng=None, deterministic=True):
    """`(r_chosen [B, P], r_rejected [B, P], valid [B, P])`: the rewards of pair p of
    each row (its segment p + 1), read at each side's last real token; one forward
    pass over the chosen and rejected rows together."""
    enc_dec = _check_arch(model, batch)
    keys = ENCODER_DECODER_KEYS[1:] if enc_dec else DECODER_KEYS
    both = lambda f: jnp.concatenate([f(k) for k in keys], axis=0)  # [2B, L]
    tokens = both(lambda k: batch[k])
    segment_ids = both(lambda k: _ones_if_none(batch.get(f"{k}_segment_ids"), batch[k]))
    positions = None
    if all(f"{k}_positions" in batch for k in keys):
      positions = both(lambda k: batch[f"{k}_positions"])
    kwargs = {}
    if enc_dec:
      twice = lambda x: None if x is None else jnp.concatenate([x, x], axis=0)
      kwargs = {"encoder_tokens": twice(batch["inputs"]),
                "encoder_segment_ids": twice(_ones_if_none(batch.get("inputs_segment_ids"),
                                                           batch["inputs"])),
                "encoder_positions": twice(batch.get("inputs_positions"))}
    rewards = model.apply({"params": params}, tokens, segment_ids, positions,
                          deterministic=deterministic, rngs=dropout_rngs(rng, deterministic),
                          method="reward", **kwargs)  # [2B, L]
    values, present = segment_last(rewards, segment_ids)
    rows = batch[keys[0]].shape[0]
    return values[:rows], values[rows:], present[:rows] & present[rows:]

  def loss_sums(self, model, params, batch, *, rng=None, deterministic=True, frozen=None):
    """Bradley-Terry sums over the pairs of `batch` (module docstring)."""
    chosen, rejected, valid = self.pair_rewards(model, params, batch, rng=rng,
                                                deterministic=deterministic)
    return bradley_terry_sums(chosen, rejected, valid, self.margin)

  def summarize(self, sums):
    """Means per pair: loss, accuracy, reward margin and the rewards; `pairs` counted."""
    weight = jnp.maximum(sums["weight"], 1.0)
    return {"loss": sums["loss"] / weight, "accuracy": sums["correct"] / weight,
            "reward_margin": sums["reward_margin"] / weight,
            "reward_chosen": sums["reward_chosen"] / weight,
            "reward_rejected": sums["reward_rejected"] / weight, "pairs": sums["weight"]}

  def score(self, model, params, tokenizer,
            pairs: Sequence[tuple[str, str]]) -> np.ndarray:
    """The reward of each (prompt, response), f32 `[len(pairs)]`: one per row, padded."""
    enc_dec = model.config.arch == "encoder_decoder"
    sides = [self.encode(prompt, response, tokenizer) for prompt, response in pairs]
    tokens, segment_ids = _pad([s["response" if enc_dec else "sequence"] for s in sides])
    kwargs = {}
    if enc_dec:
      inputs, inputs_seg = _pad([s["prompt"] for s in sides])
      kwargs = {"encoder_tokens": inputs, "encoder_segment_ids": inputs_seg}
    rewards = model.apply({"params": params}, tokens, segment_ids, method="reward", **kwargs)
    return np.asarray(segment_last(rewards, jnp.asarray(segment_ids))[0][:, 0])


def _pad(rows) -> tuple[np.ndarray, np.ndarray]:
  """Rows of ids -> (tokens, segment ids), int32 `[len(rows), longest]`, zero-padded."""
  length = max(len(r) for r in rows)
  tokens = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
  return tokens, (np.arange(length)[None] < np.asarray([len(r) for r in rows])[:, None]
                  ).astype(np.int32)


def _check_arch(model, batch) -> bool:
  """True when `batch` is encoder-decoder; a UserError when the model cannot read it."""
  arch, enc_dec = model.config.arch, "inputs" in batch
  if enc_dec != (arch == "encoder_decoder"):
    want = ENCODER_DECODER_KEYS if arch == "encoder_decoder" else DECODER_KEYS
    raise UserError(f"the model is {arch} but the batch has {sorted(batch)}: set "
                    f"DataConfig.feature_lengths to the keys {want} (RewardModel's "
                    "docstring has both layouts).")
  return enc_dec
