"""Logit processing and sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty.

The order is Hugging Face's (`generate`): repetition penalty first (a logits processor),
then the warpers temperature -> top-k -> top-p -> min-p. Removed tokens get -inf.

- Top-k (Fan et al. 2018): keep the k largest logits (ties with the k-th are kept).
- Top-p / nucleus (Holtzman et al. 2020): keep the smallest set of most likely tokens
  whose probability mass reaches p. Implemented as HF's `TopPLogitsWarper`: sort
  ascending, remove tokens whose cumulative mass is <= 1 - p, always keep the top one.
- Min-p (Nguyen et al. 2024): remove tokens with probability < min_p * max probability.
- Repetition penalty (Keskar et al. 2019, CTRL): a logit of a token already in the
  prompt or the output is divided by the penalty if positive, multiplied if negative.

Everything is float32 and jit-friendly (static settings, no data-dependent shapes).
"""

import dataclasses

import jax
import jax.numpy as jnp

from llmjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick the next token (hashable: a static argument of the jitted loop)."""

  temperature: float = 1.0        # 0 = greedy (argmax); the other fields are then unused
  top_k: int = 0                  # 0 = off
  top_p: float = 1.0              # 1 = off
  min_p: float = 0.0              # 0 = off
  repetition_penalty: float = 1.0  # 1 = off

  def __post_init__(self):
    checks = [("temperature", self.temperature >= 0, ">= 0 (0 = greedy)"),
              ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an int >= 0"),
              ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
              ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
              ("repetition_penalty", self.repetition_penalty > 0, "> 0 (1 = off)")]
    for name, ok, want in checks:
      if not ok:
        raise UserError(f"{name}={getattr(self, name)!r} is invalid; set {name} {want}.")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
  """CTRL's penalty on `logits [B, V]` for tokens with `seen [B, V]` True."""
  penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
  return jnp.where(seen, penalized, logits)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
  """Keeps the `k` largest logits of `[..., V]` (HF `TopKLogitsWarper`)."""
  k = min(k, logits.shape[-1])
  kth = jax.lax.top_k(logits, k)[0][..., -1:]                           # [..., 1]
  return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
  """Nucleus filtering of `[..., V]` exactly as HF's `TopPLogitsWarper` computes it."""
  ascending = jnp.sort(logits, axis=-1)                                  # [..., V]
  cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
  removed = cumulative <= 1.0 - p
  removed = removed.at[..., -1].set(False)                               # keep the top token
  # Removed tokens form a prefix of the ascending order: keep logits >= the first kept.
  cutoff = jnp.take_along_axis(ascending, jnp.sum(removed, -1, keepdims=True), axis=-1)
  return jnp.where(logits < cutoff, -jnp.inf, logits)


def min_p_filter(logits: jax.Array, min_p: float) -> jax.Array:
  """Removes tokens less likely than `min_p` times the most likely one (HF `MinPLogitsWarper`)."""
  probs = jax.nn.softmax(logits, axis=-1)
  keep = probs >= min_p * jnp.max(probs, axis=-1, keepdims=True)
  return jnp.where(keep, logits, -jnp.inf)


def _saturate(logits: jax.Array) -> jax.Array:
  """Rows with +inf logits (given, or overflowed by temperature < 1) put all probability
  on those tokens, the limit of ever larger logits; softmax alone would give NaN there
  (inf - inf)."""
  top = jnp.isposinf(logits)
  return jnp.where(top.any(axis=-1, keepdims=True), jnp.where(top, 0.0, -jnp.inf), logits)


def process_logits(logits: jax.Array, config: SamplingConfig,
                   seen: jax.Array | None = None) -> jax.Array:
  """Float32 logits `[B, V]` after the penalty and warpers of `config`, in HF's order."""
  logits = logits.astype(jnp.float32)
  if config.repetition_penalty != 1.0 and seen is not None:
    logits = repetition_penalty(logits, seen, config.repetition_penalty)
  if config.greedy:
    return logits
  if config.temperature != 1.0:
    logits = logits / config.temperature
  logits = _saturate(logits)
  if config.top_k:
    logits = top_k_filter(logits, config.top_k)
  if config.top_p < 1.0:
    logits = top_p_filter(logits, config.top_p)
  if config.min_p > 0.0:
    logits = min_p_filter(logits, config.min_p)
  return logits


def sample(logits: jax.Array, config: SamplingConfig, rng: jax.Array,
           seen: jax.Array | None = None) -> jax.Array:
  """Next tokens int32 `[B]` from logits `[B, V]`: argmax if greedy, else a draw."""
  logits = process_logits(logits, config, seen)
  if config.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
