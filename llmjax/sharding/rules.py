"""Rule sets: logical axis name -> mesh axis (or None = replicated).

Each rule set is a short function returning a tuple of (logical, mesh) pairs, in the
style of t5x's `standard_logical_axis_rules`. The batch is always split over every mesh
axis that holds a distinct slice of data ('data' and 'fsdp'). Rules apply in order and a
mesh axis is used at most once per array, so an activation `(BATCH, LENGTH, EMBED)` under
`fsdp` keeps its batch split and leaves EMBED whole (BATCH claimed 'fsdp' first).

The ZeRO stages (Rajbhandari et al. 2020) as rule sets:
  dp       parameters, gradients and optimizer state replicated (DDP).
  zero1    parameters (and so gradients) replicated, optimizer state split over every
           data-parallel device: its own rules, `opt_state_rules('zero1')`.
  fsdp     ZeRO-3: parameters, gradients and optimizer state split over 'fsdp' along the
           embedding dimension; XLA all-gathers a layer's weights where they are used.
  fsdp_tp  fsdp plus Megatron-style tensor parallelism (Shoeybi et al. 2019): heads, MLP
           hidden and vocabulary over 'tensor'.
(ZeRO-2 shards gradients as well; under jit, gradients live only inside the step, where
XLA already reduce-scatters them for zero1's sharded update, so it is not a separate set.)
"""

from llmjax.errors import UserError
from llmjax.sharding import axes

_REPLICATED = (axes.LENGTH, axes.EMBED, axes.HEADS, axes.KV_HEADS, axes.HEAD_DIM, axes.MLP,
               axes.VOCAB, axes.LAYERS, axes.NORM)
DATA_PARALLEL = ("data", "fsdp")  # mesh axes that each hold a distinct slice of the batch


def dp():
  """Data parallel: parameters and optimizer state replicated, batch split."""
  return ((axes.BATCH, DATA_PARALLEL),) + tuple((name, None) for name in _REPLICATED)


def zero1():
  """ZeRO-1: parameters replicated as in dp; see `opt_state_rules` for the state."""
  return dp()


def _zero1_opt_state():
  """The optimizer state of zero1: split along EMBED over all data-parallel devices."""
  rules = dict(dp())
  rules[axes.EMBED] = DATA_PARALLEL
  return tuple(rules.items())


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


RULE_SETS = {"dp": dp, "zero1": zero1, "fsdp": fsdp, "fsdp_tp": fsdp_tp}
_OPT_STATE_RULES = {"zero1": _zero1_opt_state}


def _check(name: str):
  if name not in RULE_SETS:
    raise UserError(f"unknown sharding rule set {name!r}; use one of {sorted(RULE_SETS)}.")


def get_rules(name: str):
  """Rules for parameters, gradients and activations of rule set `name`."""
  _check(name)
  return RULE_SETS[name]()


def opt_state_rules(name: str):
  """Rules for the optimizer state: the parameters' rules except under zero1."""
  _check(name)
  return _OPT_STATE_RULES.get(name, RULE_SETS[name])()
