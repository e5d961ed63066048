"""Rule sets: logical axis name -> mesh axis (or None = replicated).

Each rule set is a short function returning a tuple of (logical, mesh) pairs, in the
style of t5x's `standard_logical_axis_rules`. The batch is always split over every mesh
axis that holds a distinct slice of data ('data' and 'fsdp').
"""

from llmjax.errors import UserError
from llmjax.sharding import axes

_REPLICATED = (axes.LENGTH, axes.EMBED, axes.HEADS, axes.KV_HEADS, axes.HEAD_DIM, axes.MLP,
               axes.VOCAB, axes.LAYERS, axes.NORM)


def dp():
  """Data parallel: parameters and optimizer state replicated, batch split."""
  return ((axes.BATCH, ("data", "fsdp")),) + tuple((name, None) for name in _REPLICATED)


def fsdp():
  """Fully sharded (ZeRO-3): parameters (and so grads and optimizer state) split over 'fsdp'
  along the embedding dimension."""
  rules = dict(dp())
  rules[axes.EMBED] = "fsdp"
  return tuple(rules.items())


def fsdp_tp():
  """FSDP plus Megatron-style tensor parallelism: heads and MLP hidden over 'tensor'."""
  rules = dict(fsdp())
  rules.update({axes.HEADS: "tensor", axes.KV_HEADS: "tensor", axes.MLP: "tensor",
                axes.VOCAB: "tensor"})
  return tuple(rules.items())


RULE_SETS = {"dp": dp, "fsdp": fsdp, "fsdp_tp": fsdp_tp}


def get_rules(name: str):
  if name not in RULE_SETS:
    raise UserError(f"unknown sharding rule set {name!r}; use one of {sorted(RULE_SETS)}.")
  return RULE_SETS[name]()
