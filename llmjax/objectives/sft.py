"""Supervised fine-tuning (SFT; Ouyang et al. 2022, "InstructGPT", §3.5; Wei et al.
2022, "FLAN"): next-token cross-entropy on the response only.

Records carry `prompt` and `response` strings, a chat template already applied
(`llmjax.data.chat`; the datasets `shakespeare_instruct` and `local_instruct`). The
feature function encodes the two SEPARATELY and concatenates the ids:

  tokens         [bos]  tok(prompt)   tok(response)  [eos]
  response_mask    0     0 ... 0        1 ... 1        1

Separately, because tok(prompt) + tok(response) is not tok(prompt + response): a
subword model merges across the boundary ('Answer: ' + 'IAGO' encodes as ..., ':',
'▁IAGO' when joined), so cutting the joint encoding at len(tok(prompt)) (the bug class
of TRL's completion-only collators) puts the boundary a token off or inside a token.
The separate encoding is also what inference feeds: the prompt alone, continued.

Packing: `DataConfig.feature_lengths = {'tokens': L, 'response_mask': L}`. Both features
of an example have the same length, so grain's packers give them the same segment ids
and positions; the model reads `tokens` under the segment mask (packed examples never
attend across each other), and position t is trained to predict token t+1 where
`response_mask[t+1]` is 1 and t+1 is in t's segment: each example keeps its own mask
and its loss is the one it has alone. `max_len` (the row length) makes a longer example
lose the start of its prompt instead of its end (TRL's `truncation_mode='keep_end'`);
a response longer than the row is cut at its end. Without it the pipeline cuts the end.

Encoder-decoder (`feature_lengths = {'inputs': S, 'targets': L}`): the prompt goes into
the encoder (`tok(prompt) + [eos]`) and the decoder is trained on `tok(response) +
[eos]` by teacher forcing (`seq2seq.encoder_decoder_sums`). The layout follows the
keys packed; encoder-only models cannot generate a response and are refused.

Metrics: loss, perplexity and accuracy over response tokens, and `tokens`, the number
of response tokens trained on. `answer_accuracy` scores whole answers per task.
"""

import collections
import dataclasses
import logging
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from llmjax.data import tokenizer as tokenizer_lib
from llmjax.errors import UserError
from llmjax.objectives import losses, seq2seq
from llmjax.objectives.lm import shift_targets
from llmjax.objectives.protocol import TokenObjective, dropout_rngs

DECODER_KEYS = ("tokens", "response_mask")
OVERLONG = ("truncate", "drop")  # what happens to an example longer than SFT.max_len
_OVERLONG_SEEN = collections.Counter()
ENCODER_DECODER_KEYS = ("inputs", "targets")


def _check_lengths(lengths) -> bool:
  """True for the encoder-decoder layout, False for decoder-only; else a UserError."""
  keys = set(lengths)
  if keys == set(ENCODER_DECODER_KEYS):
    return True
  if keys == set(DECODER_KEYS) and lengths["tokens"] == lengths["response_mask"]:
    return False
  raise UserError(f"SFT packs {{'tokens': L, 'response_mask': L}} (one length for both; "
                  "decoder-only) or {'inputs': S, 'targets': L} (encoder-decoder), but "
                  f"DataConfig.feature_lengths is {dict(lengths)}: set it to one of these.")


@dataclasses.dataclass(frozen=True)
class SFT(TokenObjective):
  """Loss on response tokens only (see the module docstring)."""

  max_len: int | None = None  # the row length: longer examples lose their prompt's start
  overlong: str = "truncate"  # or 'drop': examples longer than max_len are skipped
  decoder_start_id: int = tokenizer_lib.BOS_ID  # encoder-decoder only
  z_loss: float = 0.0

  # The loop's end-of-run sample continues a bare prompt ('ROMEO'), not a chat turn.
  can_sample: ClassVar[bool] = False

  def __post_init__(self):
    if self.overlong not in OVERLONG:
      raise UserError(f"SFT.overlong={self.overlong!r}: use one of {OVERLONG}.")

  def encode_pair(self, example, tokenizer) -> tuple[list[int], list[int]]:
    """tok(prompt), tok(response): encoded apart, so the boundary is exact."""
    for key in ("prompt", "response"):
      if not isinstance(example.get(key), str):
        raise UserError(f"SFT reads string fields 'prompt' and 'response', but a record has "
                        f"fields {sorted(example)}: use an instruction dataset "
                        "(shakespeare_instruct, local_instruct).")
    if tokenizer.eos_id is None:
      raise UserError("the tokenizer has no EOS token, which SFT appends to every response "
                      "so the model learns to stop: use a tokenizer with one.")
    if not example["response"].strip():
      raise UserError(f"a record has an empty response (prompt: {example['prompt'][:80]!r}): "
                      "SFT would train it to stop at once; remove the record from the data.")
    return tokenizer.encode(example["prompt"]), tokenizer.encode(example["response"])

  def feature_fn(self, example, tokenizer):
    """`tokens` / `response_mask` and `inputs` / `targets`: the pipeline packs the pair
    `DataConfig.feature_lengths` names and drops the other."""
    prompt, response = self.encode_pair(example, tokenizer)
    eos = [tokenizer.eos_id]
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    kept_prompt, kept_response = prompt, response + eos
    if self.max_len and len(bos) + len(prompt) + len(response) + 1 > self.max_len:
      if _count_overlong(self.overlong) == "drop":
        return None  # the pipeline skips it
      kept_response = kept_response[:max(self.max_len - len(bos), 0)]
      room = self.max_len - len(bos) - len(kept_response)
      kept_prompt = prompt[max(len(prompt) - room, 0):] if room > 0 else []
    tokens = bos + kept_prompt + kept_response
    mask = [0] * (len(bos) + len(kept_prompt)) + [1] * len(kept_response)
    as_ids = lambda ids: np.asarray(ids, np.int32)
    return {"tokens": as_ids(tokens), "response_mask": as_ids(mask),
            "inputs": as_ids(prompt + eos), "targets": as_ids(response + eos)}

  def init_inputs(self, lengths):
    if _check_lengths(lengths):
      return seq2seq.encoder_decoder_init_inputs(lengths)
    return {"tokens": jnp.zeros((1, lengths["tokens"]), jnp.int32)}

  def loss_sums(self, model, params, batch, *, rng=None, deterministic=True, frozen=None):
    """Summed cross-entropy over the response tokens of `batch` (module docstring)."""
    if _check_arch(model, batch):
      return seq2seq.encoder_decoder_sums(
          model, params, batch, start_id=self.decoder_start_id, z_loss=self.z_loss, rng=rng,
          deterministic=deterministic)
    logits, targets, weights = response_logits(model, params, batch, rng=rng,
                                               deterministic=deterministic)
    return losses.cross_entropy_sums(logits, targets, weights, self.z_loss)

  def answer_accuracy(self, model, params, records, tokenizer) -> dict[str, float]:
    """Exact-match accuracy per `task` (all records: 'all') of a decoder-only model.

    Teacher forced: a record counts when the argmax at every response position (EOS
    included) is the target, which is exactly when greedy decoding would write the
    response and stop. Records are scored one per row, unpacked.
    """
    if model.config.arch != "decoder_only":
      raise UserError(f"answer_accuracy scores decoder-only models, not {model.config.arch}: "
                      "generate the answers (llmjax generate) and compare them instead.")
    rows = [self.feature_fn(r, tokenizer) for r in records]
    length = max(len(r["tokens"]) for r in rows)
    batch = {k: np.zeros((len(rows), length), np.int32) for k in
             ("tokens", "response_mask", "tokens_segment_ids")}
    for i, row in enumerate(rows):
      n = len(row["tokens"])
      batch["tokens"][i, :n], batch["response_mask"][i, :n] = row["tokens"], row["response_mask"]
      batch["tokens_segment_ids"][i, :n] = 1
    logits, targets, weights = response_logits(model, params, batch)
    wrong = (np.asarray(jnp.argmax(logits, -1)) != np.asarray(targets)) & (
        np.asarray(weights) > 0)
    right = ~wrong.any(axis=1)
    by_task = collections.defaultdict(list)
    for record, ok in zip(records, right):
      by_task["all"].append(ok)
      if record.get("task"):
        by_task[record["task"]].append(ok)
    return {task: float(np.mean(oks)) for task, oks in sorted(by_task.items())}


def _count_overlong(policy: str) -> str:
  """Counts examples longer than the row (per process) and logs the count at 1, 10, 100,
  ... of them; returns `policy`."""
  _OVERLONG_SEEN[policy] += 1
  n = _OVERLONG_SEEN[policy]
  if n == 10 ** int(np.log10(n)):
    done = "dropped" if policy == "drop" else "cut (the prompt's start goes first)"
    logging.getLogger(__name__).warning(
        "SFT: %d example(s) so far were longer than SFT.max_len and were %s; raise the "
        "row length (ROW_LEN in runs/sft.gin) to keep them whole.", n, done)
  return policy


def _check_arch(model, batch) -> bool:
  """True when `batch` is encoder-decoder; a UserError when the model cannot read it."""
  arch, enc_dec = model.config.arch, "inputs" in batch
  if arch == "encoder_only":
    raise UserError("SFT trains a model to write the response, which an encoder-only model "
                    "cannot do: fine-tune a decoder-only or encoder-decoder model (or use "
                    "Classification / MaskedLM for an encoder).")
  if enc_dec != (arch == "encoder_decoder"):
    want = ENCODER_DECODER_KEYS if arch == "encoder_decoder" else DECODER_KEYS
    raise UserError(f"the model is {arch} but the batch has {sorted(batch)}: set "
                    f"DataConfig.feature_lengths to {{{want[0]!r}: L, {want[1]!r}: L}}.")
  return enc_dec


def response_logits(model, params, batch, *, rng=None, deterministic=True):
  """Decoder-only logits [B, L, V], targets [B, L] and weights [B, L]: 1 where position
  t's target t+1 is a response token of t's segment."""
  tokens = batch["tokens"]
  segment_ids = batch.get("tokens_segment_ids")
  if segment_ids is None:
    segment_ids = jnp.ones_like(tokens)
  logits = model.apply(
      {"params": params}, tokens, segment_ids=segment_ids,
      positions=batch.get("tokens_positions"), deterministic=deterministic,
      rngs=dropout_rngs(rng, deterministic))
  targets, same_segment = shift_targets(tokens, segment_ids)
  mask = batch["response_mask"]
  next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)  # [B, L]
  return logits, targets, same_segment * (next_mask > 0)
