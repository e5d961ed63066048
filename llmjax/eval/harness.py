"""In-context learning: zero-/one-/few-shot prompts and log-likelihood scoring of candidates.

As in GPT-3 (Brown et al. 2020) and EleutherAI's lm-evaluation-harness, a task is posed
as text: an optional instruction, `num_shots` solved examples, then the query; a model
answers a multiple-choice question by the log-likelihood it gives each candidate
continuation, log P(candidate | prompt) = sum of the log-probabilities of its tokens.
E.g. "The sentiment of 'a delight' is:" with candidates " positive" / " negative".

Scoring runs the full (uncached) forward pass on `context + continuation` rows,
right-padded into one batch; causal masking makes the padding irrelevant.
"""

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.errors import UserError
from llmjax.models.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """How examples become text. Fields of an example fill `{...}` (e.g. input, output)."""

  example: str = "{input}\n{output}"   # a solved example (a "shot")
  query: str = "{input}\n"             # the question; the model continues after it
  instruction: str = ""                # task description placed before the shots
  separator: str = "\n\n"              # between instruction, shots and query


def build_prompt(template: PromptTemplate, query: Mapping, examples: Sequence[Mapping] = (),
                 num_shots: int = 0) -> str:
  """Instruction, the first `num_shots` of `examples` and the query, joined by the separator."""
  if num_shots > len(examples):
    raise UserError(f"num_shots={num_shots} but only {len(examples)} examples are available; "
                    "lower num_shots or provide more examples.")
  try:
    parts = [template.example.format(**e) for e in examples[:num_shots]]
    parts.append(template.query.format(**query))
  except KeyError as e:
    raise UserError(f"prompt template field {e} is missing from an example; every example "
                    "needs the fields its template uses (e.g. input, output).") from None
  return template.separator.join(([template.instruction] if template.instruction else []) + parts)


@functools.partial(jax.jit, static_argnames="model")
def _token_log_probs(model, params, inputs, targets, encoder_tokens=None, encoder_valid=None):
  """log P(targets[b, t] | inputs[b, :t+1]) `[B, L]` from one forward pass."""
  if encoder_tokens is None:
    logits = model.apply({"params": params}, inputs)
  else:
    logits = model.apply({"params": params}, inputs, encoder_tokens=encoder_tokens,
                         encoder_segment_ids=encoder_valid.astype(jnp.int32))
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)           # [B, L, V]
  return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]   # [B, L]


def _pad(rows, length=None):
  length = max(len(r) for r in rows) if length is None else length
  out = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


def score_continuations(model: Transformer, params, contexts: Sequence[Sequence[int]],
                        continuations: Sequence[Sequence[int]],
                        decoder_start_id: int = 0) -> np.ndarray:
  """Log-likelihood `[C]` (float64) of each `continuations[c]` after `contexts[c]`.

  decoder_only: the context and continuation are one sequence. encoder_decoder: the
  context is the encoder input and the continuation the decoder output, which starts from
  `decoder_start_id`. Every context and continuation needs at least one token.
  """
  if len(contexts) != len(continuations) or any(not c for c in continuations):
    raise UserError("score_continuations needs one non-empty continuation per context.")
  cfg = model.config
  if cfg.arch == "decoder_only":
    if any(not c for c in contexts):
      raise UserError("a decoder_only context needs at least one token (e.g. BOS).")
    rows = [list(c) + list(x) for c, x in zip(contexts, continuations)]
    if cfg.position == "learned" and max(map(len, rows)) > cfg.max_len:
      raise UserError(f"context + continuation is longer than max_len={cfg.max_len}; "
                      "shorten the prompt or use fewer shots.")
    seqs = _pad(rows)
    first = np.array([len(c) - 1 for c in contexts])  # input index predicting the 1st target
    log_probs = _token_log_probs(model, params, seqs[:, :-1], seqs[:, 1:])
  else:
    inputs = _pad([[decoder_start_id] + list(x[:-1]) for x in continuations])
    enc = _pad(contexts)
    log_probs = _token_log_probs(model, params, inputs, _pad(continuations, inputs.shape[1]),
                                 enc, _pad([[1] * len(c) for c in contexts]) > 0)
    first = np.zeros(len(contexts), int)
  log_probs = np.asarray(log_probs, np.float64)
  return np.array([log_probs[i, f:f + len(x)].sum()
                   for i, (f, x) in enumerate(zip(first, continuations))])


def choose(model: Transformer, params, tokenizer, prompt: str, candidates: Sequence[str],
           normalize: bool = False) -> tuple[int, np.ndarray]:
  """(index of the most likely candidate, log-likelihoods `[C]`) for a text prompt.

  `normalize` divides by each candidate's token count (favours no length).
  """
  bos = model.config.arch == "decoder_only"
  context = tokenizer.encode(prompt, add_bos=bos)
  conts = [tokenizer.encode(c) for c in candidates]
  scores = score_continuations(model, params, [context] * len(conts), conts)
  ranked = scores / np.array([len(c) for c in conts]) if normalize else scores
  return int(np.argmax(ranked)), scores
