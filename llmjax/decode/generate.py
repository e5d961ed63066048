"""The generation loop: prefill once, then one cached step per token, all inside one jit.

`generate` left-pads a batch of prompts (see `llmjax.decode.cache`), prefills the KV
cache with one call, then runs `lax.while_loop` over decoding steps: one dispatch for the
whole generation, not one per token. Rows stop independently at `eos_id` (later tokens
are `pad_id`); the loop ends when every row has stopped or `max_new_tokens` is reached.

Streaming and stop strings need the host: when `on_tokens` or `stop_strings` is given,
each step calls back (`jax.experimental.io_callback`, ordered) with the new tokens, and
the host answers which rows hit a stop string. The callback target is looked up by an
id passed as data, so the compiled loop is cached across calls. A stop string of one
ASCII character other than a space (lm-eval's "\n") cannot span two tokens, so it is
checked on the device instead, as a mask of the tokens whose text holds it
(`device_stops`), and needs no callback.

encoder_decoder models: pass `encoder_inputs`; they are encoded once, the cross-attention
keys/values cached, and decoding starts from `decoder_start_id` (T5: the pad id 0).

Greedy batches of 8 rows or more narrow as they finish: once at most a quarter of the
rows are still generating, those are gathered into a batch that size
(`_narrowing_loop`).

`share_prefix`: the tokens every prompt begins with (a few-shot prompt, a task's
instruction) are prefilled once, in one row, and that cache is copied to every row
before the rest of each prompt is prefilled after it (left-padded between the two; the
padding is masked and positions run on from the prefix, so the result is the same).
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from llmjax.decode import cache as cache_lib
from llmjax.decode.sampling import SamplingConfig, sample
from llmjax.errors import UserError
from llmjax.models.stack import unstack_layers
from llmjax.models.transformer import Transformer

_LISTENERS = {}          # id -> host function(tokens [B] np) -> stop [B] bool
_NEXT_ID = itertools.count(1)


@dataclasses.dataclass
class GenerateOutput:
  """New tokens `[B, N]` (pad after a row stops), `lengths [B]` (EOS included), and the
  decoded `texts` (cut before the first stop string) when a detokenizer was given."""

  tokens: np.ndarray
  lengths: np.ndarray
  texts: list[str] | None = None

  def rows(self) -> list[list[int]]:
    return [list(map(int, t[:n])) for t, n in zip(self.tokens, self.lengths)]


def _dispatch(listener_id, tokens):
  return np.asarray(_LISTENERS[int(listener_id)](np.asarray(tokens)), bool)


def encode_inputs(model, params, encoder_inputs, pad_id=0):
  """Right-padded `(encoded [B, S, D], valid [B, S])` of a list of token lists."""
  length = max(len(t) for t in encoder_inputs)
  tokens = np.full((len(encoder_inputs), length), pad_id, np.int32)
  for row, t in enumerate(encoder_inputs):
    tokens[row, :len(t)] = t
  valid = tokens != pad_id
  valid[:, 0] = True                     # an empty input still has one (pad) token to read
  encoded = model.apply({"params": params}, tokens, valid.astype(np.int32),
                        method=Transformer.encode)
  return encoded, valid


def decoding_model(model: Transformer, params):
  """`(model, params)` laid out for cached decoding: unscanned layers, no remat.

  Scanned params would be re-sliced from the stacked arrays and the per-layer caches
  stacked and split again on every step; unstacking once per call (inside the jit,
  before the loop) leaves each step plain matmuls on separate, in-place buffers.
  """
  cfg = model.config
  if not cfg.scan_layers and cfg.remat == "none":
    return model, params
  model = model.clone(config=cfg.replace(scan_layers=False, remat="none"))
  return model, unstack_layers(params) if cfg.scan_layers else params


def prefill(model, params, tokens, valid, positions, length, encoded=None, encoder_valid=None,
            prefix=None):
  """A cache of `length` slots holding the left-padded prompt; `(last logits [B, V], cache)`.

  `prefix [1, P]`: tokens every row's prompt starts with (`tokens` being the rest, their
  positions counted from P): prefilled once, in one row, into P more slots ahead.
  """
  if prefix is None:
    cache = cache_lib.init_cache(model.config, tokens.shape[0], length,
                                 None if encoded is None else encoded.shape[1])
  else:
    cache = cache_lib.init_cache(model.config, 1, prefix.shape[1] + length)
    _, cache = model.apply({"params": params}, prefix, jnp.arange(prefix.shape[1])[None],
                           cache, last_only=True, method=Transformer.decode_cached)
    cache = cache_lib.repeat_rows(cache, tokens.shape[0])
  if encoded is not None:
    cache["encoder_valid"] = encoder_valid
  logits, cache = model.apply({"params": params}, tokens, positions, cache, valid, encoded,
                              last_only=True, method=Transformer.decode_cached)
  return logits[:, -1], cache


# XLA:CPU's default copy insertion copies every cache buffer (twice) on each loop step
# when the step both reads it and updates it in place; its region analysis proves the
# reads come first and drops the copies (no effect on other backends).
LOOP_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


@functools.partial(jax.jit, static_argnames=("model", "sampling", "max_new_tokens", "listen"),
                   compiler_options=LOOP_COMPILER_OPTIONS)
def _generate(model, params, tokens, valid, positions, rng, eos_id, pad_id, listener_id,
              encoded=None, encoder_valid=None, stop_mask=None, prefix=None, *, sampling,
              max_new_tokens, listen):
  batch, vocab = tokens.shape[0], model.config.vocab_size
  model, params = decoding_model(model, params)
  logits, cache = prefill(model, params, tokens, valid, positions,
                          tokens.shape[1] + max_new_tokens, encoded, encoder_valid, prefix)
  seen = None
  if sampling.repetition_penalty != 1.0:
    seen = jnp.zeros((batch, vocab), bool).at[jnp.arange(batch)[:, None], tokens].set(valid)
    if prefix is not None:
      seen = seen.at[:, prefix[0]].set(True)

  def pick(i, logits, seen, done):
    token = sample(logits, sampling, jax.random.fold_in(rng, i), seen)
    token = jnp.where(done, pad_id, token)
    if seen is not None:
      seen = seen.at[jnp.arange(token.shape[0]), token].set(True)
    stop = token == eos_id
    if stop_mask is not None:
      stop |= stop_mask[token]
    if listen:
      stop |= io_callback(_dispatch, jax.ShapeDtypeStruct((batch,), bool), listener_id,
                          token, ordered=True)
    return token, seen, done | stop

  done = jnp.zeros((batch,), bool)
  token, seen, new_done = pick(0, logits, seen, done)
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
  state = (jnp.int32(1), cache, token, positions[:, -1:] + 1, new_done, out, seen,
           jnp.ones((batch,), jnp.int32))

  def cond(state):
    i, _, _, _, done, *_ = state
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(state):
    i, cache, token, pos, done, out, seen, lengths = state
    logits, cache = model.apply({"params": params}, token[:, None], pos, cache,
                                method=Transformer.decode_cached)
    token, seen, new_done = pick(i, logits[:, 0], seen, done)
    out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], i, axis=1)
    return (i + 1, cache, token, pos + 1, new_done, out, seen, lengths + ~done)

  if listen or not sampling.greedy or batch < 8:
    state = jax.lax.while_loop(cond, body, state)
  else:
    state = _narrowing_loop(cond, body, state, -(-batch // 4))
  return state[5], state[7]


def _narrowing_loop(cond, body, state, rows: int):
  """`lax.while_loop(cond, body, state)` over the decoding state, narrowed: once no more
  than `rows` rows are still generating, they are gathered (cache included) into a batch
  of `rows` and the loop goes on with those. A step costs about its row count (16 rows
  ~3x 4 rows on CPU), and a batch's last answers are often its few long ones. Greedy
  only: a row's argmax does not depend on its batchmates (a draw's noise would)."""
  wide = jax.lax.while_loop(lambda s: cond(s) & (jnp.sum(~s[4]) > rows), body, state)
  i, cache, token, pos, done, out, seen, lengths = wide
  keep = jnp.argsort(done.astype(jnp.int32), stable=True)[:rows]  # generating rows first
  take = lambda a: None if a is None else jnp.take(a, keep, axis=0)
  narrow = jax.lax.while_loop(cond, body, (i, cache_lib.reorder(cache, keep), take(token),
                                           take(pos), take(done), take(out), take(seen),
                                           take(lengths)))
  put = lambda a, b: a.at[keep].set(b)
  return (narrow[0], None, None, None, put(done, narrow[4]), put(out, narrow[5]), None,
          put(lengths, narrow[7]))


def _listener(on_tokens, stop_strings, detokenize, batch):
  """Host side of the callback: stream new tokens, detect stop strings per row."""
  history = [[] for _ in range(batch)]
  stopped = np.zeros(batch, bool)

  def listen(tokens):
    active = ~stopped
    for row in np.flatnonzero(active):
      history[row].append(int(tokens[row]))
    if on_tokens is not None:
      on_tokens(tokens, active)
    if stop_strings:
      for row in np.flatnonzero(active):
        text = detokenize(history[row])
        stopped[row] = any(s in text for s in stop_strings)
    return stopped.copy()

  return listen


@functools.lru_cache(maxsize=8)
def device_stops(stop_strings: tuple, detokenize, vocab_size: int):
  """`(mask [V] bool or None, the stop strings left to the host)`: each stop string of
  one ASCII character but a space becomes the tokens whose own text holds it (such a
  character never spans two tokens, so a row's text holds it exactly when one of its
  tokens does)."""
  local = [s for s in stop_strings if len(s) == 1 and s.isascii() and s != " "]
  if not local:
    return None, stop_strings
  mask = np.zeros(vocab_size, bool)
  for token in range(vocab_size):
    try:
      text = detokenize([token])
    except (IndexError, ValueError, KeyError):  # an id past the tokenizer's pieces
      text = ""
    mask[token] = any(s in text for s in local)
  return mask, tuple(s for s in stop_strings if s not in local)


def shared_prefix_length(prompts: list[list[int]]) -> int:
  """How many leading tokens all `prompts` have in common, leaving each at least one."""
  limit = min(len(p) for p in prompts) - 1
  n = 0
  while n < limit and all(p[n] == prompts[0][n] for p in prompts):
    n += 1
  return n


def _can_share_prefix(cfg) -> bool:
  """Padding between the prefix and the rest leaves slot distances unequal to position
  distances: fine for absolute positions and RoPE, not for a sliding window or T5's
  relative bias, which read slot distances."""
  return (cfg.arch == "decoder_only" and not cfg.sliding_window
          and cfg.position != "t5_relative")


def _check(cfg, prompts, max_new_tokens, stop_strings, detokenize):
  if not prompts or any(len(p) == 0 for p in prompts):
    raise UserError("every prompt must have at least one token (e.g. BOS); got an empty one.")
  if stop_strings and detokenize is None:
    raise UserError("stop_strings need detokenize (a function from token ids to text).")
  total = max(len(p) for p in prompts) + max_new_tokens
  if max_new_tokens < 1 or (cfg.position == "learned" and total > cfg.max_len):
    raise UserError(f"prompt length + max_new_tokens = {total} must be <= max_len="
                    f"{cfg.max_len} (learned positions) and max_new_tokens >= 1; shorten "
                    "the prompt or lower max_new_tokens.")


def _layout(model, prompts, pad_id, pad_multiple, share_prefix, max_new_tokens):
  """`(prefix [1, P] or None, (tokens, valid, positions))`: the shared prefix split off
  (`share_prefix`), the rest left-padded to a multiple of `pad_multiple` (as long as the
  position table leaves room), positions running on from the prefix."""
  cfg, prefix, shared = model.config, None, 0
  if share_prefix and len(prompts) > 1 and _can_share_prefix(cfg):
    shared = shared_prefix_length(prompts)
    if shared:
      prefix = np.asarray([prompts[0][:shared]], np.int32)
      prompts = [p[shared:] for p in prompts]
  longest = max(len(p) for p in prompts)
  room = cfg.max_len - max_new_tokens - shared - getattr(model, "soft_prompt", 0)
  length = max(longest, min(-(-longest // pad_multiple) * pad_multiple, room))
  tokens, valid, positions = cache_lib.left_pad(prompts, pad_id, length)
  return prefix, (tokens, valid, positions + shared)


def truncate_at_stop(text: str, stop_strings) -> str:
  """`text` up to (excluding) the earliest stop string."""
  cut = min((text.find(s) for s in stop_strings if s in text), default=len(text))
  return text[:cut]


def generate(model: Transformer, params, prompts: list[list[int]], *, max_new_tokens: int,
             sampling: SamplingConfig | None = None, seed: int = 0, eos_id=None,
             pad_id: int = 0, stop_strings=(), detokenize=None, on_tokens=None,
             encoder_inputs: list[list[int]] | None = None,
             decoder_start_id: int = 0, pad_multiple: int = 1,
             share_prefix: bool = False) -> GenerateOutput:
  """Continues each prompt (a list of token ids) by up to `max_new_tokens` tokens.

  Args:
    sampling: greedy / temperature / top-k / top-p / min-p / repetition penalty
      (None: plain sampling at temperature 1).
    seed: the draws are a function of (seed, step): fixed seed, same output.
    eos_id: a row stops after producing it (None: generate the full length).
    stop_strings: a row stops once its decoded output contains one (needs `detokenize`,
      a function token ids -> text); `texts` are cut before it.
    on_tokens: streaming, `on_tokens(tokens [B], active [B])` after every step.
    encoder_inputs: encoder_decoder models: one token list per row; `prompts` may then
      be None (each row starts from `decoder_start_id`).
    pad_multiple: left-pad the prompts to a multiple of this length: callers with prompts
      of many lengths pad to a few buckets, and the loop compiles once per bucket.
    share_prefix: prefill the tokens all prompts start with once (decoder-only models
      without a sliding window or T5 bias; see the module docstring); the bucket is then
      the rest's length.
  """
  cfg, sampling = model.config, sampling or SamplingConfig()
  encoded = encoder_valid = None
  if cfg.arch == "encoder_decoder":
    if encoder_inputs is None:
      raise UserError("an encoder_decoder model needs encoder_inputs (the source tokens).")
    encoded, encoder_valid = encode_inputs(model, params, encoder_inputs, pad_id)
    prompts = prompts or [[decoder_start_id]] * len(encoder_inputs)
  _check(cfg, prompts, max_new_tokens, stop_strings, detokenize)
  prefix, (tokens, valid, positions) = _layout(model, prompts, pad_id, pad_multiple,
                                               share_prefix, max_new_tokens)
  stop_mask, host_stops = (device_stops(tuple(stop_strings), detokenize, cfg.vocab_size)
                           if stop_strings and on_tokens is None  # streaming: the host
                           else (None, tuple(stop_strings)))
  listen = bool(on_tokens is not None or host_stops)
  listener_id = next(_NEXT_ID)
  if listen:
    _LISTENERS[listener_id] = _listener(on_tokens, host_stops, detokenize, len(prompts))
  try:
    out, lengths = _generate(model, params, tokens, valid, positions, jax.random.key(seed),
                             -1 if eos_id is None else eos_id, pad_id, listener_id, encoded,
                             encoder_valid, stop_mask, prefix, sampling=sampling,
                             max_new_tokens=max_new_tokens, listen=listen)
    out, lengths = np.asarray(out), np.asarray(lengths)
  finally:
    _LISTENERS.pop(listener_id, None)
  result = GenerateOutput(out, lengths)
  if detokenize is not None:
    result.texts = [truncate_at_stop(detokenize(r), stop_strings) for r in result.rows()]
  return result
