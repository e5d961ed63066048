"""Rewards for reinforcement learning on generated text (GRPO, llmjax/objectives/grpo.py),
selected by name from gin: `GRPO.reward = 'syllables'`, `GRPO.reward_kwargs = {...}`.

A reward runs on the device, inside the jitted train step, on what the policy sampled:

  score(tokens [B, T] int32, mask [B, T] bool, tables, **kwargs) -> rewards [B] float32

`mask` is True on the completion: the sampled tokens up to and including the first EOS
(what follows it was sampled, but is no part of the answer). `tables` holds per-token-id
arrays `[V]` a reward builds ONCE on the host from the tokenizer's pieces (`tables_fn`),
so that scoring on the device is a gather and a sum, never detokenization.

Registered rewards:

  token_count  how many completion tokens equal `token_id` (a toy with a known optimum,
               used by the tests).
  syllables    iambic-pentameter closeness, −|syllables(line) − target| (target 10):
               `line` is the completion up to its first newline (all of it when it has
               none). A piece's syllables are its vowel groups (`[aeiouy]+`, case-folded,
               SentencePiece's '▁' read as a space); special, sentinel and byte pieces
               count 0. Summing per piece over-counts a vowel group a piece boundary
               splits (a character tokenizer counts 'ea' as two): a verifiable proxy,
               not a dictionary count.

Add one with `@register('name', tables_fn=...)`. A reward may return NaN for a row
(a judge that could not score it): GRPO drops such rows from the loss and reports their
fraction (grpo.py, "NaN rewards").
"""

import dataclasses
import inspect
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.data import tokenizer as tokenizer_lib
from llmjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Reward:
  """A registered reward: `score` on the device, `tables_fn(tokenizer)` on the host."""

  name: str
  score: Callable[..., jax.Array]
  tables_fn: Callable | None = None  # tokenizer -> {name: np.ndarray [V]}, or None

  def check_kwargs(self, kwargs: dict, owner: str = "GRPO") -> None:
    """A UserError when `kwargs` do not fit `score`'s keyword arguments (`owner`: the
    objective whose gin fields name them)."""
    params = list(inspect.signature(self.score).parameters.values())[3:]
    known = {p.name for p in params}
    required = {p.name for p in params if p.default is inspect.Parameter.empty}
    unknown, missing = set(kwargs) - known, required - set(kwargs)
    if unknown or missing:
      raise UserError(f"{owner}.reward={self.name!r} takes reward_kwargs {sorted(known)}"
                      f"{f' (required: {sorted(required)})' if required else ''}, but got "
                      f"{sorted(kwargs)}: set {owner}.reward_kwargs to e.g. "
                      f"{ {k: '...' for k in sorted(required)} }.")


REWARDS: dict[str, Reward] = {}


def register(name: str, tables_fn: Callable | None = None):
  """Decorator: registers `score(tokens, mask, tables, **kwargs)` under `name`."""

  def wrap(score):
    REWARDS[name] = Reward(name, score, tables_fn)
    return score

  return wrap


def get(name: str, owner: str = "GRPO") -> Reward:
  """The reward registered as `name`; a UserError listing the registered names if none
  (`owner`: the objective whose gin field names it)."""
  if name not in REWARDS:
    raise UserError(f"unknown reward {name!r}; registered rewards: {sorted(REWARDS)}. Set "
                    f"{owner}.reward to one of them, or register yours with "
                    "llmjax.objectives.rewards.register.")
  return REWARDS[name]


def padded_tables(tables: dict[str, np.ndarray], vocab_size: int) -> dict[str, jax.Array]:
  """Host tables `[V_tokenizer]` as device constants `[vocab_size]` (a model's vocabulary
  may be padded past the tokenizer's: those ids score 0)."""
  out = {}
  for key, table in tables.items():
    if len(table) > vocab_size:
      raise UserError(f"the reward table {key!r} has {len(table)} entries (the tokenizer's "
                      f"pieces) but the model only {vocab_size} embeddings: use the "
                      "model's own tokenizer.")
    out[key] = jnp.asarray(np.pad(table, (0, vocab_size - len(table))))
  return out


# --- token_count ----------------------------------------------------------------------

@register("token_count")
def token_count(tokens, mask, tables, *, token_id: int):
  """How many completion tokens are `token_id`: `[B]` float32."""
  del tables
  return jnp.sum((tokens == token_id) & mask, axis=1).astype(jnp.float32)


# --- syllables --------------------------------------------------------------------------

_VOWEL_GROUP = re.compile(r"[aeiouy]+")
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def piece_syllables(piece: str) -> int:
  """Vowel groups of a piece's text ('▁' is a space, so '▁the' is ' the': 1)."""
  return len(_VOWEL_GROUP.findall(piece.replace("\u2581", " ").lower()))


def syllable_tables(tokenizer) -> dict[str, np.ndarray]:
  """`{'syllables': float32 [V], 'newline': bool [V]}` from the tokenizer's pieces."""
  vocab = tokenizer.vocab_size
  special = tokenizer_lib.FIRST_SENTINEL_ID + getattr(tokenizer, "num_sentinels", 0)
  syllables, newline = np.zeros(vocab, np.float32), np.zeros(vocab, bool)
  for i in range(special, vocab):
    piece = tokenizer.id_to_piece(i)
    if not _BYTE_PIECE.match(piece):
      syllables[i] = piece_syllables(piece)
      newline[i] = "\n" in piece
  return {"syllables": syllables, "newline": newline}


@register("syllables", tables_fn=syllable_tables)
def syllables(tokens, mask, tables, *, target: float = 10.0, first_line: bool = True):
  """−|syllables of the completion's first line (or all of it) − target|: `[B]` float32."""
  newline = tables["newline"][tokens] & mask                                # [B, T]
  if first_line:  # tokens before the first newline (cumsum counts newlines up to t)
    mask = mask & (jnp.cumsum(newline, axis=1) - newline == 0)
  count = jnp.sum(jnp.where(mask, tables["syllables"][tokens], 0.0), axis=1)  # [B]
  return -jnp.abs(count - target)
