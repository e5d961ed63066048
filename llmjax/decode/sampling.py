"""A simple sampler: temperature and top-k over a full forward pass per token.

This is the reference path (no KV cache): each step re-runs the model over a fixed-size
buffer, so one compiled function serves every step. Causal masking makes the unused tail
of the buffer irrelevant to the logits at the current position.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.errors import UserError


def filter_logits(logits, temperature: float = 1.0, top_k: int = 0):
  """Applies temperature then top-k to logits [..., V]; returns f32 logits (-inf outside)."""
  logits = logits.astype(jnp.float32) / max(temperature, 1e-6)
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return logits


@functools.partial(jax.jit, static_argnames=("model", "temperature", "top_k"))
def _next_token(model, params, buffer, cur, rng, temperature, top_k):
  logits = model.apply({"params": params}, buffer)  # [1, T, V]
  last = jax.lax.dynamic_index_in_dim(logits[0], cur - 1, keepdims=False)  # [V]
  if temperature == 0.0:
    return jnp.argmax(last).astype(jnp.int32)
  return jax.random.categorical(rng, filter_logits(last, temperature, top_k)).astype(jnp.int32)


def generate(model, params, prompt_ids, *, max_new_tokens: int, max_len: int,
             temperature: float = 1.0, top_k: int = 0, seed: int = 0, eos_id=None,
             on_token=None):
  """Samples up to `max_new_tokens` after `prompt_ids`; temperature 0 is greedy.

  Returns the new token ids (without the prompt). `on_token(id)` is called as each token
  is produced (for streaming). Stops early at `eos_id`.
  """
  if max_new_tokens < 1 or max_new_tokens >= max_len:
    raise UserError(f"max_new_tokens must be in [1, {max_len - 1}] for a model with "
                    f"max_len={max_len}, got {max_new_tokens}.")
  if not prompt_ids:
    raise UserError("the prompt encodes to no tokens; pass a non-empty --prompt.")
  keep = max_len - max_new_tokens
  prompt_ids = list(prompt_ids)[-keep:]  # crop from the left to fit the context
  buffer = np.zeros((1, len(prompt_ids) + max_new_tokens), np.int32)
  buffer[0, :len(prompt_ids)] = prompt_ids
  buffer = jnp.asarray(buffer)
  rng = jax.random.PRNGKey(seed)
  out = []
  for i in range(max_new_tokens):
    cur = len(prompt_ids) + i
    token = _next_token(model, params, buffer, cur, jax.random.fold_in(rng, i),
                        float(temperature), int(top_k))
    buffer = buffer.at[0, cur].set(token)
    token = int(token)
    out.append(token)
    if on_token is not None:
      on_token(token)
    if eos_id is not None and token == eos_id:
      break
  return out
