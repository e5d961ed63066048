"""The train state, everything a resumed run needs that lives on devices, and how it is
built directly sharded on a mesh.

`params` is the model's whole parameter tree. Which leaves train is the optimizer's
trainable mask (`optim.optimizers.trainable_mask`): frozen leaves get no update and
carry no optimizer state. `frozen` holds the named trees an objective declares beside
the model (`Objective.frozen_trees`: a DPO reference); `objective` the small state an
objective carries from step to step (`Objective.initial_state`: PPO's adaptive KL
coefficient), replicated. Both are empty for pre-training, and an empty field is not
written to checkpoints (they read as before it existed).

The sharded init is the linen recipe (flax examples/lm1b `setup_initial_state`):
`jax.eval_shape` of the init gives parameters boxed with their logical axes -> logical
PartitionSpecs -> mesh PartitionSpecs through a rule set -> `NamedSharding`s ->
`jax.jit(init, out_shardings=...)`, so every device computes only its own shard.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from llmjax.sharding import partition
from llmjax.sharding import rules as rules_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array      # int32 scalar: number of updates applied
  params: Any          # unboxed parameter pytree (trainable and frozen leaves)
  opt_state: Any       # optax state: moments for the trainable leaves only
  rng: jax.Array       # uint32 raw key data; each step folds in `step`, so resume is exact
  frozen: Any = flax.struct.field(default_factory=dict)  # {name: tree} an objective reads
  objective: Any = flax.struct.field(default_factory=dict)  # an objective's own state


def _no_state() -> dict:
  return {}


def _no_frozen(boxed_params) -> dict:
  return {}


def state_shardings(boxed_params, tx, mesh, rule_set: str, frozen_fn=_no_frozen,
                    objective_fn=_no_state) -> TrainState:
  """Shardings of the whole TrainState: parameters (and frozen trees) by the rule set's
  rules, optimizer state by its optimizer-state rules (different only for zero1), the
  objective's state replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  rules = rules_lib.get_rules(rule_set)
  opt_state = jax.eval_shape(tx.init, boxed_params)  # boxes carry over from the params
  return TrainState(
      step=replicated, params=partition.logical_to_shardings(boxed_params, mesh, rules),
      opt_state=partition.logical_to_shardings(opt_state, mesh,
                                               rules_lib.opt_state_rules(rule_set)),
      rng=replicated,
      frozen=partition.logical_to_shardings(frozen_fn(boxed_params), mesh, rules),
      objective=jax.tree.map(lambda _: replicated, jax.eval_shape(objective_fn)))


def _state_init(init_params, tx, frozen_fn, objective_fn=_no_state):
  def init(rng):
    params_rng, state_rng = jax.random.split(rng)
    boxed = init_params(params_rng)
    params = nn.meta.unbox(boxed)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=jax.random.key_data(state_rng),
                      frozen=nn.meta.unbox(frozen_fn(boxed)), objective=objective_fn())
  return init


def init_train_state(init_params, tx, mesh, rule_set: str, seed: int = 0,
                     frozen_fn=_no_frozen, objective_fn=_no_state):
  """Builds the TrainState directly sharded on `mesh`; returns (state, shardings).

  `init_params(rng)` returns the model's boxed (logically partitioned) parameters, e.g.
  `lambda rng: model.init({'params': rng}, tokens)['params']`; `frozen_fn(boxed params)`
  the objective's frozen trees (boxed too, so they shard like the parameters);
  `objective_fn()` the objective's initial state.
  """
  rng = jax.random.PRNGKey(seed)
  shardings = state_shardings(jax.eval_shape(init_params, rng), tx, mesh, rule_set, frozen_fn,
                              objective_fn)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules_lib.get_rules(rule_set)):
    state = jax.jit(_state_init(init_params, tx, frozen_fn, objective_fn),
                    out_shardings=shardings)(rng)
  return state, shardings


def abstract_train_state(init_params, tx, mesh, rule_set: str, frozen_fn=_no_frozen,
                         objective_fn=_no_state):
  """The TrainState as ShapeDtypeStructs carrying their shardings (nothing computed): for
  `jit(...).lower`, and as the restore target of a checkpoint on this mesh."""
  rng = jax.random.PRNGKey(0)
  shardings = state_shardings(jax.eval_shape(init_params, rng), tx, mesh, rule_set, frozen_fn,
                              objective_fn)
  shapes = jax.eval_shape(_state_init(init_params, tx, frozen_fn, objective_fn), rng)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, shardings)
