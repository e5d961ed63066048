"""Prompt tuning (Lester et al. 2021): k trainable soft-prompt vectors before the input.

The network reads `[P_0 ... P_{k-1}, x_0, x_1, ...]`: k free vectors `P` where the
embeddings of k tokens would be, the rest of the model frozen. One parameter, beside
the token table (the checkpoint path is `embed/prompt_<name>`):

  prompt_<name>  [k, D]  the embeddings of `init_text`'s tokens (repeated to k, as
                         Hugging Face PEFT does) or, without a text, drawn like the
                         token table (normal(init_std))

How it runs without an edit of the model. `PeftModel.apply` lengthens the inputs by k
slots holding the marker ids `-1, ..., -k` (segment ids: the row's document; positions
0..k-1, the tokens' shifted by k), and an interceptor on the `embed` lookup
(`llmjax.layers.intercept`) returns `P_j` for marker `-1 - j`. Everything after the
lookup (scaling, position embeddings, norms, attention) treats the slots as tokens,
exactly as PEFT's concatenated `inputs_embeds`. The logits of the k slots are removed,
so the objectives see their usual shapes. Per architecture:

  decoder_only     the prompt starts the decoder's input;
  encoder_only     the prompt starts the encoder's input (`encode` returns the tokens'
                   encodings only; `classify` pools slot 0, the first prompt vector, as
                   PEFT's sequence classification does);
  encoder_decoder  the prompt starts the encoder's input (Lester et al.'s T5 setting);
                   `encode` returns all S + k encodings, the decoder cross-attends to
                   them, and encoder-side ids/masks k short are lengthened to match.

Packed rows are refused: a row holds one document. The prompt slots take the row's
segment id, so in a packed row only one document would see the prompt; a concrete
`segment_ids` with several documents in a row raises, and the training setup refuses
`DataConfig.packing` other than 'none' (under `jit` the ids cannot be inspected).

Cached decoding (`Transformer.decode_cached`, `llmjax.decode`): the prefill call (a
cache without the `prompt_tuning` entry) grows the cache by k slots, writes the prompt
into the k slots just before each row's first real token (after the left padding, so
slot distances stay position distances, as sliding windows and T5's bias assume) and
marks the cache; later steps only shift positions by k.
"""

import dataclasses
import inspect
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llmjax.errors import UserError
from llmjax.sharding.axes import EMBED

CACHE_KEY = "prompt_tuning"                 # in a KV cache: the prompt is already in it
_APPLY_KWARGS = ("rngs", "mutable", "capture_intermediates")


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig:
  """The soft prompt's length and initialisation (gin: `PromptTuningConfig.*`)."""

  length: int = 20               # k, the number of soft-prompt vectors
  init_text: str | None = None   # start from these tokens' embeddings (None: random)
  name: str = "default"

  def __post_init__(self):
    if not isinstance(self.length, int) or self.length <= 0:
      raise UserError(f"PromptTuningConfig.length={self.length!r} must be a positive "
                      "integer.")
    if not re.fullmatch(r"[A-Za-z0-9]+", self.name):
      raise UserError(f"PromptTuningConfig.name={self.name!r}: use letters and digits only.")
    if self.init_text is not None and not self.init_text:
      raise UserError("PromptTuningConfig.init_text is empty; give a text or None (random).")

  @property
  def param_name(self) -> str:
    return f"prompt_{self.name}"

  @property
  def trainable(self) -> str:
    """A regex for `OptimizerConfig.trainable`: the soft prompt only."""
    return rf"(^|/)embed/prompt_{self.name}$"


def _method_name(method) -> str:
  if method is None:
    return "__call__"
  return method if isinstance(method, str) else method.__name__


class PromptTuning:
  """The `embed` lookup interceptor and the input/output bookkeeping of one prompt."""

  def __init__(self, config: PromptTuningConfig):
    self.config = config

  def __call__(self, call):
    """`Embed.__call__`: marker ids `-1 - j` look up `P_j`, the rest the token table."""
    k, layer, tokens = self.config.length, call.module, call.args[0]
    init = nn.with_logical_partitioning(nn.initializers.normal(layer.init_std), (None, EMBED))
    prompt = layer.param(self.config.param_name, init, (k, layer.features), layer.param_dtype)
    x = call.proceed(jnp.maximum(tokens, 0))                              # [B, L, D]
    soft = jnp.take(prompt, jnp.clip(-1 - tokens, 0, k - 1), axis=0)     # [B, L, D]
    return jnp.where((tokens < 0)[..., None], soft.astype(x.dtype), x)

  def apply(self, base, variables, args, kwargs, method):
    """`base.apply(variables, *args, method=method, **kwargs)` with the prompt's k slots."""
    name, cfg = _method_name(method), base.config
    apply_kw = {key: kwargs.pop(key) for key in _APPLY_KWARGS if key in kwargs}
    if apply_kw.get("mutable"):
      raise UserError("prompt tuning does not support apply(mutable=...); call without it.")
    if not callable(getattr(type(base), name, None)):
      return base.apply(variables, *args, method=method, **apply_kw, **kwargs)
    bound = inspect.signature(getattr(type(base), name)).bind(None, *args, **kwargs)
    a = dict(list(bound.arguments.items())[1:])                         # without self
    run = lambda: base.apply(variables, method=name, **apply_kw, **a)
    k = self.config.length
    encoder_side = cfg.arch == "encoder_decoder"
    if name == "decode_cached":
      return self._decode_cached(base, a, run)
    if name == "__call__" and encoder_side:
      self._lengthen(a, cfg, "encoder_tokens", "encoder_segment_ids", "encoder_positions")
      return run()
    if name in ("__call__", "encode", "classify") or (name == "decode" and not encoder_side):
      self._lengthen(a, cfg, "tokens", "segment_ids", "positions", "token_type_ids")
      out = run()
      return out if name == "classify" or (name == "encode" and encoder_side) else out[:, k:]
    if name == "decode" and a.get("encoded") is not None:
      a["encoder_segment_ids"] = self._match(a.get("encoder_segment_ids"), a["encoded"])
    return run()

  def _lengthen(self, a, cfg, tokens_key, segments_key, positions_key, types_key=None):
    """k prompt slots before the inputs, in place: markers, segment ids, positions."""
    k, tokens = self.config.length, a[tokens_key]
    batch, length = tokens.shape
    if cfg.position == "learned" and length + k > cfg.max_len:
      raise UserError(f"{length} tokens + the soft prompt's {k} exceed max_len={cfg.max_len}"
                      " of the learned position table; shorten the rows (DataConfig.seq_len)"
                      " or PromptTuningConfig.length.")
    slots = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (batch, k))
    a[tokens_key] = jnp.concatenate([-1 - slots, tokens.astype(jnp.int32)], axis=1)
    segments = a.get(segments_key)
    if segments is not None:
      _check_one_document(segments, segments_key)
      row = jnp.max(segments, axis=1, keepdims=True).astype(segments.dtype)  # [B, 1]
      a[segments_key] = jnp.concatenate([jnp.broadcast_to(row, (batch, k)), segments], 1)
    if a.get(positions_key) is not None:  # None: arange(k + L), the same numbers
      a[positions_key] = jnp.concatenate([slots, a[positions_key] + k], axis=1)
    if types_key and a.get(types_key) is not None:
      a[types_key] = jnp.concatenate([jnp.zeros_like(slots), a[types_key]], axis=1)

  def _match(self, ids, encoded):
    """Encoder-side ids/mask `[B, S]` of an `encoded [B, S + k, D]`: prompt slots first."""
    k = self.config.length
    if ids is None or ids.shape[1] + k != encoded.shape[1]:
      return ids
    row = jnp.max(ids, axis=1, keepdims=True)
    return jnp.concatenate([jnp.broadcast_to(row, (ids.shape[0], k)), ids], axis=1)

  def _decode_cached(self, base, a, run):
    k, cfg = self.config.length, base.config
    cache = a["cache"]
    if cfg.arch == "encoder_decoder":  # the prompt is the encoder's: match its valid mask
      if a.get("encoded") is not None and "encoder_valid" in cache:
        a["cache"] = dict(cache, encoder_valid=self._match(cache["encoder_valid"],
                                                           a["encoded"]))
      return run()
    if CACHE_KEY in cache:  # a decoding step: the prompt is in the cache already
      a["positions"] = a["positions"] + k
      return run()
    slots = cache["valid"].shape[1] + k
    if cfg.position == "learned" and slots > cfg.max_len:
      raise UserError(f"prompt + new tokens + the soft prompt's {k} slots = {slots} exceed "
                      f"max_len={cfg.max_len}; shorten the prompt or lower max_new_tokens.")
    first = self._insert(a)
    a["cache"] = dict(grow_cache(cache, k), **{CACHE_KEY: jnp.int32(k)})
    logits, new_cache = run()
    if a.get("last_only"):  # the last slot is the last real token's either way
      return logits, new_cache
    slot = jnp.arange(logits.shape[1] - k)[None]                          # [1, L]
    keep = jnp.where(slot < first[:, None], slot, slot + k)               # [B, L]
    return jnp.take_along_axis(logits, keep[..., None], axis=1), new_cache

  def _insert(self, a):
    """The prefill's inputs with the prompt in the k slots before each row's first real
    token (rows are left-padded); returns that slot `[B]`."""
    k, tokens = self.config.length, a["tokens"]
    length = tokens.shape[1]
    valid = a.get("valid")
    valid = jnp.ones(tokens.shape, bool) if valid is None else valid
    first = jnp.argmax(valid, axis=1)                                    # [B]
    slot = jnp.arange(length + k)[None]                                  # [1, L + k]
    rel = slot - first[:, None]                                          # [B, L + k]
    prompt = (rel >= 0) & (rel < k)
    src = jnp.clip(jnp.where(rel < 0, slot, slot - k), 0, length - 1)
    take = lambda x: jnp.take_along_axis(x, src, axis=1)
    a["tokens"] = jnp.where(prompt, -1 - rel, take(tokens.astype(jnp.int32)))
    a["positions"] = jnp.where(prompt, rel, take(a["positions"]) + k)
    a["valid"] = prompt | take(valid)
    return first


def grow_cache(cache: dict, k: int) -> dict:
  """`cache` (layout: `llmjax.decode.cache`) with k more empty self-attention slots."""
  def pad(x, axis):
    return jnp.pad(x, [(0, k if i == axis else 0) for i in range(x.ndim)])

  layers = tuple(dict(layer, self={"key": pad(layer["self"]["key"], 2),       # [B, K, T, H]
                                   "value": pad(layer["self"]["value"], 3)})  # [B, K, H, T]
                 for layer in cache["layers"])
  return dict(cache, valid=pad(cache["valid"], 1), layers=layers)


def _check_one_document(segments, key):
  if isinstance(segments, jax.core.Tracer):
    return  # traced: the training setup checks DataConfig.packing instead
  ids = np.asarray(segments)
  docs = [len(set(row[row > 0].tolist())) for row in ids]
  if max(docs, default=0) > 1:
    raise UserError(f"prompt tuning needs one document per row, but `{key}` packs up to "
                    f"{max(docs)}; set DataConfig.packing='none' (the prompt would "
                    "reach only one of them).")


def init_from_text(params, config: PromptTuningConfig, tokenizer):
  """`params` with `embed/prompt_<name>` set to the embeddings of `config.init_text`'s
  tokens, repeated (or cut) to k; the new array keeps the old one's sharding."""
  ids = tokenizer.encode(config.init_text, add_bos=False)
  if not ids:
    raise UserError(f"PromptTuningConfig.init_text={config.init_text!r} encodes to no "
                    "tokens; give a longer text or None (random init).")
  k = config.length
  ids = np.asarray((list(ids) * math.ceil(k / len(ids)))[:k], np.int32)
  embed = dict(params["embed"])
  old = embed[config.param_name]
  if isinstance(old, jax.Array):
    take = jax.jit(lambda table: jnp.take(table, ids, axis=0).astype(old.dtype),
                   out_shardings=old.sharding)
  else:
    take = lambda table: jnp.take(table, ids, axis=0).astype(old.dtype)
  embed[config.param_name] = take(embed["embedding"])
  return dict(params, embed=embed)
