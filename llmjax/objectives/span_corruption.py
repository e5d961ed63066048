"""T5's span-corruption pre-training (Raffel et al. 2020, "Exploring the Limits of
Transfer Learning with a Unified Text-to-Text Transformer", §3.1.4 and §3.3.4).

A chunk of `raw_length` tokens is drawn from each document; `noise_density` (15%) of
its tokens, in spans of mean length `mean_noise_span_length` (3), are dropped. Each
dropped span becomes one sentinel `<extra_id_k>` in the input; the target lists the
sentinels, each followed by the span it replaced:

  original  The quick brown fox jumps over the lazy dog
  inputs    The <extra_id_0> fox jumps <extra_id_1> dog </s>
  targets   <extra_id_0> quick brown <extra_id_1> over the lazy </s>

The span layout follows T5's `random_spans_noise_mask`: the noise and non-noise token
counts are each split into `num_noise_spans` random non-empty runs and interleaved,
non-noise first. `raw_length` is the longest chunk whose corrupted input (with eos)
fits `inputs_length` (T5's `random_spans_helper`); `targets_length()` says how long the
target side must be. The training pair is then teacher-forced exactly like supervised
seq2seq (`seq2seq.encoder_decoder_sums`).

Noise is drawn in the data pipeline with a generator seeded by `seed` and the text of
the document, so the pipeline stays a pure function of its position and resumes
exactly; the price is that a document gets the same chunk and noise every epoch (as
in T5, which rarely repeats C4 documents).
"""

import dataclasses
import hashlib
from typing import ClassVar

import numpy as np

from llmjax.data import tokenizer as tokenizer_lib
from llmjax.errors import UserError
from llmjax.objectives import seq2seq
from llmjax.objectives.protocol import TokenObjective


def _num_noise(length: int, noise_density: float, mean_noise_span_length: float):
  """(noise tokens, noise spans) of a chunk of `length` tokens, as T5 rounds them."""
  num_noise_tokens = min(max(round(length * noise_density), 1), length - 1)
  num_noise_spans = max(round(num_noise_tokens / mean_noise_span_length), 1)
  return num_noise_tokens, min(num_noise_spans, num_noise_tokens, length - num_noise_tokens)


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator):
  """A uniformly random split of `num_items` into `num_segments` non-empty lengths."""
  cuts = np.sort(rng.choice(np.arange(1, num_items), num_segments - 1, replace=False))
  return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
  """bool [length]: True on noise tokens; non-noise first, spans interleaved."""
  if length < 2:
    return np.zeros(length, bool)
  num_noise, num_spans = _num_noise(length, noise_density, mean_noise_span_length)
  noise_lengths = _random_segmentation(num_noise, num_spans, rng)
  keep_lengths = _random_segmentation(length - num_noise, num_spans, rng)
  interleaved = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)  # [2 * spans]
  return np.repeat(np.tile([False, True], num_spans), interleaved)


def corrupt(tokens: np.ndarray, noise_mask: np.ndarray, sentinel_ids, eos_id: int):
  """(inputs, targets): noise spans -> sentinel k in inputs; targets = sentinels + spans.

  Both end with `eos_id`. `sentinel_ids[k]` marks the k-th noise span on both sides.
  """
  tokens = np.asarray(tokens, np.int32)
  span_start = noise_mask & ~np.concatenate([[False], noise_mask[:-1]])
  span_index = np.cumsum(span_start) - 1  # the noise span each position belongs to
  sentinels = np.asarray(sentinel_ids, np.int32)
  if span_start.sum() > len(sentinels):
    raise ValueError(f"{span_start.sum()} noise spans but only {len(sentinels)} sentinels")
  inputs = np.where(span_start, sentinels[np.maximum(span_index, 0)], tokens)
  inputs = inputs[~noise_mask | span_start]
  targets = []
  for k, start in enumerate(np.flatnonzero(span_start)):
    end = start
    while end < len(tokens) and noise_mask[end]:
      end += 1
    targets += [sentinels[k], *tokens[start:end]]
  return (np.asarray([*inputs, eos_id], np.int32), np.asarray([*targets, eos_id], np.int32))


def reconstruct(inputs, targets, sentinel_ids, eos_id: int) -> np.ndarray:
  """The original tokens back from a `corrupt` pair (the inverse, for tests and demos)."""
  sentinel_ids = [int(s) for s in sentinel_ids]
  spans, current = {}, None
  for token in [int(t) for t in targets if int(t) != eos_id]:
    if token in sentinel_ids:
      current = spans.setdefault(token, [])
    else:
      current.append(token)
  out = []
  for token in [int(t) for t in inputs if int(t) != eos_id]:
    out += spans.get(token, [token])
  return np.asarray(out, np.int32)


def raw_length_for(inputs_length: int, noise_density: float, mean_noise_span_length: float):
  """(raw chunk length, targets length) whose corrupted inputs fit `inputs_length`."""

  def lengths(raw):
    num_noise, num_spans = _num_noise(raw, noise_density, mean_noise_span_length)
    return raw - num_noise + num_spans + 1, num_noise + num_spans + 1

  raw = 2
  while lengths(raw + 1)[0] <= inputs_length:
    raw += 1
  if lengths(raw)[0] > inputs_length:
    raise UserError(f"SpanCorruption.inputs_length={inputs_length} is too short for a "
                    "corrupted chunk; raise it to 4 or more.")
  return raw, lengths(raw)[1]


@dataclasses.dataclass(frozen=True)
class SpanCorruption(TokenObjective):
  """Encoder-decoder pre-training objective (see the module docstring)."""

  inputs_length: int = 64
  noise_density: float = 0.15
  mean_noise_span_length: float = 3.0
  seed: int = 0
  decoder_start_id: int = tokenizer_lib.BOS_ID
  z_loss: float = 0.0

  can_sample: ClassVar[bool] = False

  def __post_init__(self):
    if not 0.0 < self.noise_density < 1.0 or self.mean_noise_span_length < 1.0:
      raise UserError(f"SpanCorruption needs 0 < noise_density < 1 (got {self.noise_density})"
                      f" and mean_noise_span_length >= 1 (got {self.mean_noise_span_length}).")

  @property
  def raw_length(self) -> int:
    return raw_length_for(self.inputs_length, self.noise_density,
                          self.mean_noise_span_length)[0]

  def targets_length(self) -> int:
    """The `targets` row length a full chunk needs (set it in feature_lengths)."""
    return raw_length_for(self.inputs_length, self.noise_density,
                          self.mean_noise_span_length)[1]

  def _rng(self, text: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{self.seed}\0{text}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))

  def feature_fn(self, example, tokenizer):
    """One random chunk of the document, corrupted: `{'inputs', 'targets'}`."""
    ids = np.asarray(tokenizer.encode(example["text"]), np.int32)
    rng = self._rng(example["text"])
    raw = self.raw_length
    if len(ids) > raw:  # T5's select_random_chunk
      start = int(rng.integers(0, len(ids) - raw + 1))
      ids = ids[start:start + raw]
    mask = random_spans_noise_mask(len(ids), self.noise_density,
                                   self.mean_noise_span_length, rng)
    num_spans = int(np.sum(mask & ~np.concatenate([[False], mask[:-1]])))
    if num_spans > tokenizer.num_sentinels:
      raise UserError(f"span corruption needs {num_spans} sentinel tokens per chunk but the "
                      f"tokenizer has {tokenizer.num_sentinels}: train it with "
                      "TokenizerSpec.num_sentinels = 100 (and a fresh --workdir).")
    sentinels = [tokenizer.sentinel_id(k) for k in range(num_spans)]
    inputs, targets = corrupt(ids, mask, sentinels, tokenizer.eos_id)
    return {"inputs": inputs, "targets": targets}

  def init_inputs(self, lengths):
    if lengths.get("inputs", 0) < self.inputs_length or (
        lengths.get("targets", 0) < self.targets_length()):
      raise UserError(
          f"SpanCorruption(inputs_length={self.inputs_length}) needs DataConfig."
          f"feature_lengths of at least {{'inputs': {self.inputs_length}, 'targets': "
          f"{self.targets_length()}}}, got {dict(lengths)}; raise them.")
    return seq2seq.encoder_decoder_init_inputs(lengths)

  def loss_sums(self, model, params, batch, *, rng=None, deterministic=True, frozen=None):
    return seq2seq.encoder_decoder_sums(model, params, batch, start_id=self.decoder_start_id,
                                        z_loss=self.z_loss, rng=rng,
                                        deterministic=deterministic)
