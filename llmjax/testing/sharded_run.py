"""A few training steps of the tiny model on any mesh and rule set, with fake batches.

The sharding tests compare these runs across meshes; run as a module it is one process of
a multi-process run (`jax.distributed.initialize` over 127.0.0.1), each process feeding
its own rows of the global batch, and optionally saving a checkpoint at the end:

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m llmjax.testing.sharded_run \
      --coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=I \
      --rules=fsdp --mesh=2,4,1 --out=losses_I.json [--checkpoint_dir=D]
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from llmjax.models.presets import get_preset
from llmjax.models.transformer import Transformer
from llmjax.objectives.lm import CausalLM
from llmjax.optim.optimizers import OptimizerConfig
from llmjax.sharding import partition
from llmjax.sharding import rules as rules_lib
from llmjax.train import state as train_state
from llmjax.train import step as step_lib

BATCH, SEQ_LEN = 8, 16


def tiny_model(seq_len: int = SEQ_LEN, **overrides) -> Transformer:
  return Transformer(get_preset("tiny", max_len=seq_len, **overrides))


def fake_batches(num_steps: int, vocab_size: int, batch: int = BATCH, seq_len: int = SEQ_LEN,
                 seed: int = 0):
  """Global numpy batches: random tokens in two packed documents per row."""
  rng = np.random.default_rng(seed)
  cut = seq_len * 2 // 3
  segments = np.repeat([[1] * cut + [2] * (seq_len - cut)], batch, 0).astype(np.int32)
  positions = np.concatenate([np.arange(cut), np.arange(seq_len - cut)])[None]
  return [{"tokens": rng.integers(3, vocab_size, (batch, seq_len)).astype(np.int32),
           "tokens_segment_ids": segments,
           "tokens_positions": np.repeat(positions, batch, 0).astype(np.int32)}
          for _ in range(num_steps)]


def make_tx(num_steps: int = 5):
  return OptimizerConfig(peak_lr=1e-2, warmup_steps=1).make(num_steps)


def init_state(model, mesh, rule_set: str, seq_len: int = SEQ_LEN, seed: int = 0):
  """(state, shardings, tx, schedule) built directly sharded on `mesh`."""
  tx, schedule = make_tx()
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  init = lambda rng: model.init({"params": rng}, tokens)["params"]
  state, shardings = train_state.init_train_state(init, tx, mesh, rule_set, seed)
  return state, shardings, tx, schedule


def compile_step(model, mesh, rule_set, shardings, tx, schedule):
  """The jitted train step with the loop's shardings and donation."""
  rules = rules_lib.get_rules(rule_set)
  step = step_lib.make_train_step(model, CausalLM(), tx, schedule)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return jax.jit(step, in_shardings=(shardings, partition.batch_sharding(mesh, rules)),
                   out_shardings=(shardings, None), donate_argnums=0)


def run(mesh, rule_set: str, num_steps: int = 5, model=None):
  """Trains `num_steps` on this process's rows of `fake_batches`; returns (losses, state,
  shardings)."""
  model = model or tiny_model()
  state, shardings, tx, schedule = init_state(model, mesh, rule_set)
  train_step = compile_step(model, mesh, rule_set, shardings, tx, schedule)
  sharding = partition.batch_sharding(mesh, rules_lib.get_rules(rule_set))
  rows = BATCH // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  losses = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules_lib.get_rules(rule_set)):
    for batch in fake_batches(num_steps, model.config.vocab_size):
      local = {k: v[mine] for k, v in batch.items()}  # what this host's pipeline yields
      state, metrics = train_step(state, partition.global_batch(local, sharding))
      losses.append(float(metrics["loss"]))
  return losses, state, shardings


def main(argv=None):
  from llmjax.sharding import mesh as mesh_lib
  from llmjax.train import distributed

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  distributed.add_flags(parser)
  parser.add_argument("--rules", default="dp")
  parser.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--out", required=True)
  parser.add_argument("--checkpoint_dir")
  args = parser.parse_args(argv)
  distributed.initialize_from_flags(args)
  mesh = mesh_lib.make_mesh(*(int(s) for s in args.mesh.split(",")))
  losses, state, _ = run(mesh, args.rules, args.steps)
  if args.checkpoint_dir:
    from llmjax.checkpoint import manager as ckpt_lib
    ckpt = ckpt_lib.CheckpointManager(args.checkpoint_dir, save_every=1)
    ckpt.save(args.steps, state, {}, {"rules": args.rules}, force=True)
    ckpt.close()
  with open(args.out, "w") as f:
    json.dump({"losses": losses, "process_index": jax.process_index(),
               "process_count": jax.process_count(),
               "local_devices": jax.local_device_count(), "devices": jax.device_count()}, f)


if __name__ == "__main__":
  main()
