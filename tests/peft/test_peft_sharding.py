"""Adapters on a mesh: a DoRA run (adapters on every dense layer, only they train) on 8
simulated devices under dp, fsdp and fsdp+tensor gives the single device's losses and
adapter gradients, and the adapter parameters are sharded by their logical axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from llmjax.objectives.lm import CausalLM
from llmjax.optim.optimizers import OptimizerConfig
from llmjax.peft.lora import LoraConfig
from llmjax.peft.model import PeftModel, trainable_pattern
from llmjax.sharding import mesh as mesh_lib
from llmjax.sharding import partition
from llmjax.sharding import rules as rules_lib
from llmjax.testing import sharded_run
from llmjax.train import state as train_state
from llmjax.train import step as step_lib

MESHES = {"single": (1, 1, 1), "dp": (8, 1, 1), "fsdp": (1, 8, 1), "fsdp_tp": (2, 2, 2)}
LORA = LoraConfig(target="all_linear", rank=4, alpha=8.0, dora=True)
_RUNS = {}


def _run(name):
  """(losses, adapter gradients at the end, params) of three steps on mesh `name`."""
  if name in _RUNS:
    return _RUNS[name]
  devices = jax.devices()[:1] if name == "single" else None
  mesh = mesh_lib.make_mesh(*MESHES[name], devices=devices)
  rule_set = "dp" if name == "single" else name
  rules = rules_lib.get_rules(rule_set)
  net = PeftModel(sharded_run.tiny_model(), [LORA])
  optimizer = OptimizerConfig(peak_lr=1e-2, warmup_steps=1, trainable=trainable_pattern([LORA]))
  tx, schedule = optimizer.make(5)
  tokens = jnp.zeros((1, sharded_run.SEQ_LEN), jnp.int32)
  state, shardings = train_state.init_train_state(
      lambda rng: net.init({"params": rng}, tokens)["params"], tx, mesh, rule_set, 0)
  trainable = optimizer.trainable_mask(state.params)
  batch_sharding = partition.batch_sharding(mesh, rules)
  batches = sharded_run.fake_batches(4, net.config.vocab_size)
  objective = CausalLM()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = jax.jit(step_lib.make_train_step(net, objective, tx, schedule, trainable=trainable),
                   in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None))
    losses = []
    for batch in batches[:1] * 3:  # one batch thrice: the loss must fall
      state, metrics = step(state, partition.global_batch(batch, batch_sharding))
      losses.append(float(metrics["loss"]))
    grad = jax.jit(jax.grad(lambda p, b: objective.loss_sums(net, p, b)["loss"]))(
        state.params, partition.global_batch(batches[3], batch_sharding))
  flat = traverse_util.flatten_dict(jax.device_get(grad), sep="/")
  _RUNS[name] = (losses, {k: np.asarray(v) for k, v in flat.items() if "/lora_" in k},
                 state.params)
  return _RUNS[name]


@pytest.mark.multidevice
@pytest.mark.parametrize("name", ["dp", "fsdp", "fsdp_tp"])
def test_adapters_train_alike_on_every_mesh(name):
  single_losses, single_grads, _ = _run("single")
  losses, grads, _ = _run(name)
  assert losses[-1] < losses[0]
  np.testing.assert_allclose(losses, single_losses, rtol=1e-5)
  assert set(grads) == set(single_grads) and len(grads) == 18  # A, B, m on 6 layer kinds
  for key, value in grads.items():
    assert np.abs(single_grads[key]).max() > 0, key
    scale = np.abs(single_grads[key]).max()  # summation order differs between meshes
    np.testing.assert_allclose(value, single_grads[key], rtol=1e-4, atol=1e-4 * scale,
                               err_msg=key)


@pytest.mark.multidevice
def test_adapter_parameters_follow_the_kernels_axes():
  _, _, params = _run("fsdp_tp")
  flat = traverse_util.flatten_dict(params, sep="/")
  spec = {k: tuple(v.sharding.spec) for k, v in flat.items()}
  # query kernel [layers, embed, heads, head_dim] is P(None, fsdp, tensor, None): its A
  # [layers, embed, r] splits embed over fsdp, its B [layers, r, heads, head_dim] heads
  # over tensor, DoRA's magnitude [layers, heads, head_dim] likewise.
  q = "decoder/layers/attention/query/"
  assert spec[q + "lora_a_default"][:2] == (None, "fsdp")
  assert spec[q + "lora_b_default"][:3] == (None, None, "tensor")
  assert spec[q + "lora_m_default"][:2] == (None, "tensor")
  assert P(*spec["decoder/layers/mlp/wo/lora_b_default"]) == P(None, None, "fsdp")
