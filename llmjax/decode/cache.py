"""The KV cache: an explicit pytree passed into and returned from `Transformer.decode_cached`.

Keys and values of past tokens are kept so that each decoding step runs the model on one
new token instead of the whole sequence (the standard "incremental decoding" of
Transformer LMs; Vaswani et al. 2017 decode autoregressively, Pope et al. 2022 analyse
the memory traffic). The cache is preallocated to its full length T (prompt + new
tokens), so every step has the same shapes and one compiled step serves them all.

Layout (a plain dict, so `jax.tree` functions, `jit` and `lax.while_loop` see arrays):

  index          int32 scalar: the next slot to write (the same for every row).
  valid          bool `[B, T]`: slot holds a real token (False: padding, not yet written).
  layers         a tuple, one entry per layer, each:
    self         self-attention keys `key [B, K, T, H]` and values `value [B, K, H, T]`
                 (transposed).
    cross        the same over the S encoder tokens, `[B, K, S, H]` and `[B, K, H, S]`
                 (encoder_decoder only; filled once, at prefill).
  encoder_valid  bool `[B, S]`: real encoder tokens (encoder_decoder only).

K is `num_kv_heads`, so grouped-query models cache K < N heads. Why this layout (it is
what makes a decoding step cheap on CPU): one buffer per layer lets each step update
it in place inside `lax.while_loop` (a stacked `[layers, ...]` array is copied whole
every step); heads-major keys `[B, K, T, H]` and transposed values `[B, K, H, T]` are
the layouts XLA:CPU's batched matrix-vector products read directly (see
`Attention._cached`), so no step transposes the cache.

Prompts of different lengths are LEFT-padded: the last prompt token of every row sits
in the same slot, so each step writes one slot for the whole batch. Positions (RoPE,
learned) stay per row and start at 0 at a row's first real token.
"""

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.models.config import TransformerConfig


def init_cache(config: TransformerConfig, batch: int, length: int,
               encoder_len: int | None = None, dtype=None) -> dict:
  """An empty cache for `batch` rows of `length` slots (and `encoder_len` encoder tokens)."""
  dtype = config.compute_dtype if dtype is None else dtype
  k, h = config.num_kv_heads, config.head_dim

  def kv(slots):
    return {"key": jnp.zeros((batch, k, slots, h), dtype),              # [B, K, T, H]
            "value": jnp.zeros((batch, k, h, slots), dtype)}            # [B, K, H, T]

  cross = config.arch == "encoder_decoder"
  if cross and encoder_len is None:
    raise ValueError("an encoder_decoder cache needs encoder_len (the encoder length).")
  layers = tuple({"self": kv(length), **({"cross": kv(encoder_len)} if cross else {})}
                 for _ in range(config.num_layers))
  cache = {"index": jnp.zeros((), jnp.int32), "valid": jnp.zeros((batch, length), bool),
           "layers": layers}
  if cross:
    cache["encoder_valid"] = jnp.zeros((batch, encoder_len), bool)
  return cache


def left_pad(prompts: list[list[int]], pad_id: int = 0, length: int | None = None):
  """Left-pads token lists: (`tokens [B, P]` int32, `valid [B, P]` bool, `positions`).

  positions count real tokens from 0 per row (padding gets position 0).
  """
  length = max(len(p) for p in prompts) if length is None else length
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  valid = np.zeros((len(prompts), length), bool)
  for row, prompt in enumerate(prompts):
    if prompt:
      tokens[row, length - len(prompt):] = prompt
      valid[row, length - len(prompt):] = True
  positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
  return tokens, valid, positions


def reorder(cache: dict, rows: jax.Array) -> dict:
  """The cache of rows `rows [B']` (beam search: follow each surviving beam's parent)."""
  layers = jax.tree.map(lambda a: jnp.take(a, rows, axis=0), cache["layers"])
  out = dict(cache, layers=layers, valid=jnp.take(cache["valid"], rows, axis=0))
  if "encoder_valid" in cache:
    out["encoder_valid"] = jnp.take(cache["encoder_valid"], rows, axis=0)
  return out


def repeat_rows(cache: dict, times: int) -> dict:
  """Each row repeated `times` times (row b -> rows b*times ... b*times + times - 1)."""
  batch = cache["valid"].shape[0]
  return reorder(cache, jnp.repeat(jnp.arange(batch), times))
