"""Beam search with GNMT length normalization, per-beam EOS and n-best output.

Each step expands the W alive beams of a row by every token, keeps the 2W best
candidates (so that W of them can continue even if up to W end here), moves those that
end in EOS to the row's finished pool (scored with the length penalty) and keeps the W
best others alive. Structure as in T5X's `decoding.beam_search` (alive/finished pools).

Length penalty (Wu et al. 2016, GNMT): score = log P(y) / lp(|y|) with
lp(n) = ((5 + n) / 6) ** alpha; alpha = 0 ranks by plain log-probability, larger alpha
favours longer outputs. |y| counts generated tokens, EOS included.

A row is done when its worst finished score beats the best score an alive beam could
still reach (its log-probability only falls; lp grows to lp(max_new_tokens)). At the
end alive beams join the pool scored at their length, and the n best are returned.
The loop is one `lax.while_loop` over the cached decoding step (`generate.prefill`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.decode import cache as cache_lib
from llmjax.decode.generate import LOOP_COMPILER_OPTIONS, decoding_model, encode_inputs, prefill
from llmjax.errors import UserError
from llmjax.models.transformer import Transformer

NEG = -1e9  # "impossible" score; finite so that sums and divisions stay NaN-free


@dataclasses.dataclass
class BeamOutput:
  """The n best per row, best first: `tokens [B, n, N]` (pad after EOS), `scores [B, n]`
  (length-normalized log-probabilities), `lengths [B, n]` (EOS included)."""

  tokens: np.ndarray
  scores: np.ndarray
  lengths: np.ndarray


def length_penalty(length, alpha: float):
  """GNMT's lp(n) = ((5 + n) / 6) ** alpha."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _top(scores, *arrays, k):
  """The k best along axis 1 of `scores [B, M]`, and `arrays [B, M, ...]` gathered alike."""
  scores, idx = jax.lax.top_k(scores, k)
  return (scores,) + tuple(jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)),
                                               axis=1) for a in arrays)


def _step(state, logits, *, beams, eos_id, alpha):
  """One step on `logits [B*W, V]`: (new state, parent rows `[B*W]`, new tokens `[B*W]`)."""
  i, alive, alive_lp, fin, fin_scores, fin_len = state
  batch, vocab = alive.shape[0], logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, beams, vocab)
  candidates = (alive_lp[:, :, None] + log_probs).reshape(batch, beams * vocab)  # [B, W*V]
  cand_lp, cand_idx = jax.lax.top_k(candidates, 2 * beams)                      # [B, 2W]
  parent, token = cand_idx // vocab, (cand_idx % vocab).astype(jnp.int32)
  seqs = jnp.take_along_axis(alive, parent[:, :, None], axis=1)                 # [B, 2W, N]
  seqs = jax.lax.dynamic_update_slice_in_dim(seqs, token[:, :, None], i, axis=2)
  is_eos = token == eos_id
  # Finished pool: old finished + candidates ending here, best W by normalized score.
  new_scores = jnp.where(is_eos, cand_lp / length_penalty(i + 1, alpha), NEG)
  fin_scores, fin, fin_len = _top(
      jnp.concatenate([fin_scores, new_scores], 1), jnp.concatenate([fin, seqs], 1),
      jnp.concatenate([fin_len, jnp.full_like(token, i + 1)], 1), k=beams)
  alive_lp, alive, parent = _top(jnp.where(is_eos, NEG, cand_lp), seqs, parent, k=beams)
  rows = (jnp.arange(batch)[:, None] * beams + parent).reshape(-1)              # [B*W]
  return (i + 1, alive, alive_lp, fin, fin_scores, fin_len), rows, alive[:, :, i].reshape(-1)


def _row_done(state, alpha, max_new_tokens):
  _, _, alive_lp, _, fin_scores, _ = state
  best_possible = alive_lp[:, 0] / length_penalty(max_new_tokens, alpha)
  return fin_scores[:, -1] >= best_possible


@functools.partial(jax.jit, static_argnames=("model", "beams", "max_new_tokens", "alpha",
                                             "num_return"),
                   compiler_options=LOOP_COMPILER_OPTIONS)
def _beam_search(model, params, tokens, valid, positions, eos_id, pad_id, encoded=None,
                 encoder_valid=None, *, beams, max_new_tokens, alpha, num_return):
  batch, n = tokens.shape[0], max_new_tokens
  model, params = decoding_model(model, params)
  logits, cache = prefill(model, params, tokens, valid, positions, tokens.shape[1] + n,
                          encoded, encoder_valid)
  cache = cache_lib.repeat_rows(cache, beams)                          # rows b*W ... b*W+W-1
  logits = jnp.repeat(logits, beams, axis=0)                           # [B*W, V]
  first = jnp.where(jnp.arange(beams) == 0, 0.0, NEG)                  # beams start identical
  state = (jnp.int32(0), jnp.full((batch, beams, n), pad_id, jnp.int32),
           jnp.broadcast_to(first, (batch, beams)), jnp.full((batch, beams, n), pad_id, jnp.int32),
           jnp.full((batch, beams), NEG), jnp.zeros((batch, beams), jnp.int32))
  step = functools.partial(_step, beams=beams, eos_id=eos_id, alpha=alpha)
  pos = jnp.repeat(positions[:, -1:] + 1, beams, axis=0)               # [B*W, 1]

  def cond(carry):
    state = carry[0]
    return (state[0] < n) & ~jnp.all(_row_done(state, alpha, n))

  def body(carry):
    state, cache, logits = carry
    state, rows, token = step(state, logits)
    cache = cache_lib.reorder(cache, rows)
    logits, cache = model.apply({"params": params}, token[:, None], pos + state[0] - 1, cache,
                                method=Transformer.decode_cached)
    return state, cache, logits[:, 0]

  state, _, _ = jax.lax.while_loop(cond, body, (state, cache, logits))
  i, alive, alive_lp, fin, fin_scores, fin_len = state
  # Alive beams join the pool at their length (they end without EOS).
  alive_scores = jnp.where(alive_lp > NEG / 2, alive_lp / length_penalty(i, alpha), NEG)
  return _top(jnp.concatenate([fin_scores, alive_scores], 1), jnp.concatenate([fin, alive], 1),
              jnp.concatenate([fin_len, jnp.full_like(fin_len, i)], 1), k=num_return)


def beam_search(model: Transformer, params, prompts: list[list[int]], *, beam_size: int,
                max_new_tokens: int, eos_id=None, alpha: float = 0.6, num_return: int = 1,
                pad_id: int = 0, encoder_inputs=None, decoder_start_id: int = 0) -> BeamOutput:
  """The `num_return` best continuations of each prompt by beam search (see module doc).

  `eos_id` None: every beam runs `max_new_tokens`. Other arguments as `generate`.
  """
  if not 1 <= num_return <= beam_size:
    raise UserError(f"num_return={num_return} must be in [1, beam_size={beam_size}].")
  if 2 * beam_size > model.config.vocab_size:
    raise UserError(f"beam_size={beam_size} needs a vocabulary of at least 2 * beam_size.")
  encoded = encoder_valid = None
  if model.config.arch == "encoder_decoder":
    encoded, encoder_valid = encode_inputs(model, params, encoder_inputs, pad_id)
    prompts = prompts or [[decoder_start_id]] * len(encoder_inputs)
  if not prompts or any(len(p) == 0 for p in prompts):
    raise UserError("every prompt must have at least one token (e.g. BOS); got an empty one.")
  total = max(len(p) for p in prompts) + max_new_tokens
  if model.config.position == "learned" and total > model.config.max_len:
    raise UserError(f"prompt length + max_new_tokens = {total} exceeds max_len="
                    f"{model.config.max_len}; shorten the prompt or lower max_new_tokens.")
  tokens, valid, positions = cache_lib.left_pad(prompts, pad_id)
  scores, seqs, lengths = _beam_search(
      model, params, tokens, valid, positions, -1 if eos_id is None else eos_id, pad_id,
      encoded, encoder_valid, beams=beam_size, max_new_tokens=max_new_tokens,
      alpha=float(alpha), num_return=num_return)
  return BeamOutput(np.asarray(seqs), np.asarray(scores), np.asarray(lengths))
