"""XLA's own memory figure for a train step, to check `llmjax.scaling.memory.estimate`.

It compiles the real step (`train.step`), so it lives here, above `scaling`, which
only counts.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax.models.transformer import Transformer
from llmjax.objectives.lm import CausalLM
from llmjax.optim.optimizers import OptimizerConfig
from llmjax.sharding import partition
from llmjax.sharding import rules as rules_lib
from llmjax.train import state as state_lib
from llmjax.train import step as step_lib


def compiled(model_cfg, rule_set: str, mesh, batch_size: int, seq_len: int) -> dict:
  """XLA's own per-device bytes for the jitted, donated train step (compile only).

  `memory_analysis()` fields: arguments = the state and batch passed in; outputs = the
  new state and metrics; aliased = outputs written into donated argument buffers (the
  whole state); temp = XLA's one scratch allocation, sized by its heap simulation of
  every intermediate's live range (so it is the temporaries' peak, with packing).
  `total` = arguments + outputs - aliased + temp: the bytes the step holds at its peak.
  """
  model = Transformer(model_cfg)
  tx, schedule = OptimizerConfig().make(1)
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  init = lambda rng: model.init({"params": rng}, tokens)["params"]
  state = state_lib.abstract_train_state(init, tx, mesh, rule_set)
  rules = rules_lib.get_rules(rule_set)
  rows = partition.batch_sharding(mesh, rules)
  batch = {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=rows)
           for k in ("tokens", "tokens_segment_ids", "tokens_positions")}
  shardings = jax.tree.map(lambda x: x.sharding, state)
  step = step_lib.make_train_step(model, CausalLM(), tx, schedule)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    analysis = jax.jit(step, in_shardings=(shardings, rows), out_shardings=(shardings, None),
                       donate_argnums=0).lower(state, batch).compile().memory_analysis()
  out = {"arguments": analysis.argument_size_in_bytes,
         "outputs": analysis.output_size_in_bytes,
         "aliased": analysis.alias_size_in_bytes, "temp": analysis.temp_size_in_bytes}
  out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temp"]
  return out
