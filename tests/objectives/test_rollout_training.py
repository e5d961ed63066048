"""The trainer's experience path for rollout objectives (llmjax/train/step.py with GRPO and
PPO): one update per rollout equals the plain gradient step of `loss_sums`; several
epochs x minibatches equal an update-by-update reference over the same experience (and
PPO's clips then bind); gradient accumulation 1 x 8 equals 8 x 1; PPO's adaptive KL
coefficient follows Ziegler et al.'s rule and is carried in `TrainState.objective`; the
schedule counts train steps; 8 simulated devices (dp, fsdp, fsdp+tensor) match one; under
LoRA only the adapters train and the reward still rises."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from llmjax.errors import UserError
from llmjax.models import presets
from llmjax.models.transformer import Transformer
from llmjax.objectives import ppo
from llmjax.objectives.grpo import GRPO
from llmjax.objectives.ppo import PPO
from llmjax.optim.optimizers import OptimizerConfig
from llmjax.sharding import mesh as mesh_lib
from llmjax.sharding import partition
from llmjax.sharding import rules as rules_lib
from llmjax.train import state as state_lib
from llmjax.train import step as step_lib

V, P, T = 16, 4, 8   # vocabulary, prompt and completion lengths of the tiny model


@pytest.fixture(scope="module")
def net():
  cfg = presets.get_preset("tiny", vocab_size=V, embed_dim=32, num_heads=2, mlp_dim=64,
                           dropout_rate=0.0, max_len=P + T)
  return Transformer(cfg)


def _init(net, method=None):
  tokens = jnp.zeros((1, P + T), jnp.int32)
  init = jax.jit(lambda rng: net.init(rng, tokens, method=method))
  return nn.meta.unbox(init(jax.random.PRNGKey(0))["params"])


@pytest.fixture(scope="module")
def ppo_params(net):
  return _init(net, ppo.policy_and_values)


@pytest.fixture(scope="module")
def grpo_params(net):
  return _init(net)


def _batch(rows=4, seed=0):
  prompts = jnp.asarray(np.random.default_rng(seed).integers(5, V, (rows, P)), jnp.int32)
  return {"prompt": prompts, "prompt_segment_ids": jnp.ones_like(prompts)}


def _tx():
  return OptimizerConfig(peak_lr=1e-2, warmup_steps=0, decay="constant", eps=1e-3).make(10)


def _state(obj, params, tx):
  return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=tx.init(params), frozen=obj.frozen_trees(params),
                              rng=jax.random.key_data(jax.random.PRNGKey(3)),
                              objective=obj.initial_state())


def _ppo(**kw):
  return PPO(**{"prompt_len": P, "max_new_tokens": T, "kl_coef": 0.05,
                "reward": "token_count", "reward_kwargs": {"token_id": 7}, **kw})


def _grpo(**kw):
  return GRPO(**{"prompt_len": P, "max_new_tokens": T, "num_generations": 4, "beta": 0.05,
                 "reward": "token_count", "reward_kwargs": {"token_id": 7}, **kw})


def _close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def _step_rng(state):
  return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


@pytest.mark.parametrize("make, which", [(_ppo, "ppo"), (_grpo, "grpo")])
def test_one_update_equals_the_plain_gradient_step(net, ppo_params, grpo_params, make, which):
  """epochs = minibatches = 1: the update is AdamW on ∇ loss_sums / weight, with the
  same rollouts (the step's rng), computed here without the experience path."""
  obj = make()
  params = ppo_params if which == "ppo" else grpo_params
  tx, schedule = _tx()
  state, batch = _state(obj, params, tx), _batch()
  new, metrics = jax.jit(step_lib.make_train_step(net, obj, tx, schedule))(state, batch)

  def loss(p):
    sums = obj.loss_sums(net, p, batch, rng=_step_rng(state), frozen=state.frozen)
    return sums["loss"], sums

  grads, sums = jax.jit(jax.grad(loss, has_aux=True))(params)
  grads = jax.tree.map(lambda g: g / sums["weight"], grads)
  updates, _ = tx.update(grads, tx.init(params), params)
  _close(new.params, optax.apply_updates(params, updates), 2e-6)
  np.testing.assert_allclose(metrics["loss"], sums["loss"] / sums["weight"], rtol=1e-5)
  assert int(new.step) == 1 and int(metrics["nonfinite"]) == 0


@pytest.mark.parametrize("make, which", [(_ppo, "ppo"), (_grpo, "grpo")])
def test_epochs_and_minibatches_equal_an_update_by_update_reference(
    net, ppo_params, grpo_params, make, which):
  """2 epochs x 2 minibatches over one experience batch: four AdamW updates, each on the
  loss of half the rows (a new permutation per epoch) against the rollout policy's fixed
  log-probs (and PPO's fixed old values and advantages)."""
  obj = make(epochs=2, minibatches=2)
  params = ppo_params if which == "ppo" else grpo_params
  tx, schedule = _tx()
  state, batch = _state(obj, params, tx), _batch()
  new, metrics = jax.jit(step_lib.make_train_step(net, obj, tx, schedule))(state, batch)

  rng = _step_rng(state)
  experience, rollout_sums = jax.jit(lambda p: obj.make_experience(
      net, p, batch, rng=rng, frozen=state.frozen, state=state.objective))(params)
  rows = jax.tree.leaves(experience)[0].shape[0]
  assert rows == 4 * obj.num_generations

  @jax.jit
  def update(p, opt_state, minibatch):
    def loss(p):
      sums = obj.experience_sums(net, p, minibatch, frozen=state.frozen)
      return sums["loss"], sums
    grads, sums = jax.grad(loss, has_aux=True)(p)
    grads = jax.tree.map(lambda g: g / sums["weight"], grads)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, sums

  p, opt_state, losses = params, tx.init(params), []
  for epoch in range(2):
    order = np.asarray(jax.random.permutation(jax.random.fold_in(rng, 2**20 + epoch), rows))
    assert sorted(order.tolist()) == list(range(rows))
    for part in range(2):
      take = order[part * rows // 2:(part + 1) * rows // 2]
      minibatch = {k: v[take] for k, v in experience.items()}
      p, opt_state, sums = update(p, opt_state, minibatch)
      losses.append(sums)
  _close(new.params, p, 2e-6)
  total = lambda key: sum(float(s[key]) for s in losses)
  np.testing.assert_allclose(metrics["loss"], total("loss") / total("weight"), rtol=1e-4)
  np.testing.assert_allclose(metrics["reward"] * rollout_sums.get("scored", 16.0),
                             rollout_sums["reward"], rtol=1e-5)
  if which == "ppo":  # after the first update the ratio leaves 1 and the clip binds
    assert float(metrics["clip_frac"]) > 0


@pytest.mark.parametrize("make, which", [(_ppo, "ppo"), (_grpo, "grpo")])
def test_grad_accumulation_1x8_equals_8x1(net, ppo_params, grpo_params, make, which):
  """8 completions per minibatch as 8 accumulation steps of 1 give the update of 1 step
  of 8: the loss is summed over rows and divided once by the summed weight, and PPO's
  advantages are whitened over the whole experience batch, before any split."""
  obj = make(minibatches=2)
  params = ppo_params if which == "ppo" else grpo_params
  tx, schedule = _tx()
  batch = _batch(16 // obj.num_generations)
  out = []
  for accum in (1, 8):
    step = jax.jit(step_lib.make_train_step(net, obj, tx, schedule, grad_accum_steps=accum))
    out.append(step(_state(obj, params, tx), batch))
  _close(out[0][0].params, out[1][0].params, 2e-6)
  for key in ("loss", "grad_norm", "reward"):
    np.testing.assert_allclose(out[0][1][key], out[1][1][key], rtol=1e-5, err_msg=key)
  with pytest.raises(UserError, match=r"minibatches=2.*multiple of minibatches x grad_accum"):
    jax.jit(step_lib.make_train_step(net, obj, tx, schedule, grad_accum_steps=3))(
        _state(obj, params, tx), batch)


def test_adaptive_kl_coefficient_follows_the_rule_and_is_carried(net, ppo_params):
  """With kl_target, β starts at kl_coef, each step uses the carried β and leaves
  β·(1 + clip(KL/target − 1, ±0.2)·n/horizon) for the next; a fixed β has no state."""
  assert _ppo().initial_state() == {}
  obj = _ppo(kl_target=0.5, kl_horizon=40.0, num_generations=2)
  tx, schedule = _tx()
  state = _state(obj, ppo_params, tx)
  assert float(state.objective["kl_coef"]) == pytest.approx(0.05)
  step = jax.jit(step_lib.make_train_step(net, obj, tx, schedule))
  betas = [0.05]
  for i in range(3):
    state, metrics = step(state, _batch(seed=i))
    assert float(metrics["kl_coef"]) == pytest.approx(betas[-1], rel=1e-6)
    n = float(metrics["completions"]) * (1 - float(metrics["nan_rewards"]))
    want = betas[-1] * (1 + np.clip(float(metrics["kl"]) / 0.5 - 1, -0.2, 0.2) * n / 40.0)
    assert float(state.objective["kl_coef"]) == pytest.approx(want, rel=1e-5)
    betas.append(want)
  assert betas[-1] != betas[0]


def test_schedule_counts_train_steps_not_updates():
  """Four updates per train step read the schedule at update // 4."""
  cfg = OptimizerConfig(peak_lr=1.0, warmup_steps=4, decay="linear", end_lr_ratio=0.0,
                        weight_decay=0.0, clip_norm=None, b1=0.0, b2=0.0, eps=1e-12)
  tx, schedule = cfg.make(10, updates_per_step=4)
  params = {"w": jnp.zeros(())}
  opt_state = tx.init(params)
  for count in range(12):
    updates, opt_state = tx.update({"w": jnp.ones(())}, opt_state, params)
    # Adam with b1 = b2 = 0 moves by -lr·sign(g): the update is the learning rate.
    assert float(-updates["w"]) == pytest.approx(float(schedule(count // 4)), rel=1e-5)
  assert step_lib.updates_per_step(_grpo(epochs=3, minibatches=2)) == 6


def _sharded(net, obj, params, mesh, rule_set, steps=2):
  tx, schedule = _tx()
  kw = {"method": ppo.policy_and_values, "critic": obj.critic} if isinstance(obj, PPO) else {}
  tokens = jnp.zeros((1, P + T), jnp.int32)
  state, shardings = state_lib.init_train_state(
      lambda rng: net.init({"params": rng}, tokens, **kw)["params"], tx, mesh,
      rule_set, 0, obj.frozen_trees, obj.initial_state)
  rules = rules_lib.get_rules(rule_set)
  batch_sharding = partition.batch_sharding(mesh, rules)
  metrics = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = jax.jit(step_lib.make_train_step(net, obj, tx, schedule),
                   in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                   donate_argnums=0)
    for i in range(steps):
      batch = partition.global_batch(jax.device_get(_batch(8, seed=i)), batch_sharding)
      state, m = step(state, batch)
      metrics.append({k: float(v) for k, v in m.items()})
  return metrics, state


def _ppo_separate(**kw):
  return _ppo(critic="separate", **kw)


@pytest.mark.slow
@pytest.mark.parametrize("make", [_ppo, _ppo_separate, _grpo])
def test_eight_devices_match_one(net, make):
  """The same rollouts (the sampler's random bits do not depend on the sharding), losses
  and parameters on one device and on 8 with dp, fsdp and fsdp+tensor (a separate PPO
  critic: on fsdp+tensor, which uses every mesh axis)."""
  obj = make(minibatches=2, **({"kl_target": 0.5} if make is not _grpo else {}))
  one = _sharded(net, obj, None, mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1]), "dp")
  meshes = (("dp", (8, 1, 1)), ("fsdp", (1, 8, 1)), ("fsdp_tp", (2, 2, 2)))
  for rule_set, shape in meshes[2:] if make is _ppo_separate else meshes:  # all three axes
    eight = _sharded(net, obj, None, mesh_lib.make_mesh(*shape), rule_set)
    for a, b in zip(one[0], eight[0]):
      for key in ("loss", "reward", "completion_length"):
        np.testing.assert_allclose(b[key], a[key], rtol=2e-4, err_msg=f"{rule_set} {key}")
    _close(eight[1].params, one[1].params, 2e-4)
    if make is not _grpo:
      np.testing.assert_allclose(eight[1].objective["kl_coef"], one[1].objective["kl_coef"],
                                 rtol=1e-4)


@pytest.mark.parametrize("make", [_ppo, _grpo])
def test_lora_trains_only_the_adapters_and_raises_the_reward(make):
  """Under LoRA (a PeftModel: rollouts, log-probs and PPO's value head all through the
  interceptors) only the adapters (and PPO's new value head) change, the base stays
  bitwise, and the toy reward of fixed-seed samples rises. The model's init_std is 0.3:
  at the usual 0.02 the frozen tied embeddings bound every logit to about ±0.6, so no
  adapter can make one token likely (full fine-tuning grows the embeddings instead)."""
  from llmjax.objectives import rollout
  from llmjax.peft import model as peft_lib
  from llmjax.peft.lora import LoraConfig
  cfg = presets.get_preset("tiny", vocab_size=V, embed_dim=32, num_heads=2, mlp_dim=64,
                           dropout_rate=0.0, max_len=P + T, init_std=0.3)
  configs = [LoraConfig(target="all_linear", rank=4, alpha=8.0)]
  lora = peft_lib.PeftModel(Transformer(cfg), configs)
  trainable = peft_lib.trainable_pattern(configs) + ("|value_head" if make is _ppo else "")
  obj = make(num_generations=8, minibatches=2)
  method = ppo.policy_and_values if make is _ppo else None
  tokens = jnp.zeros((1, P + T), jnp.int32)
  params = nn.meta.unbox(lora.init(jax.random.PRNGKey(0), tokens, method=method)["params"])
  optimizer = OptimizerConfig(peak_lr=3e-2, warmup_steps=0, decay="constant",
                              trainable=trainable)
  tx, schedule = optimizer.make(10)
  mask = optimizer.trainable_mask(params)
  state = _state(obj, params, tx)
  step = jax.jit(step_lib.make_train_step(lora, obj, tx, schedule, trainable=mask))
  rows = jnp.repeat(_batch()["prompt"], 16, axis=0)
  measure = jax.jit(lambda p: jnp.mean(obj.reward_fn(V)(*rollout.rollout(
      lora, p, rows, jax.random.key(7), max_new_tokens=T)[:2])))
  before = float(measure(params))
  for _ in range(10):
    state, metrics = step(state, _batch())
    assert int(metrics["nonfinite"]) == 0
  after = float(measure(state.params))
  assert after > before + 2.0, (before, after)
  flat = lambda tree: dict(jax.tree_util.tree_flatten_with_path(tree)[0])
  start, end, trains = flat(params), flat(state.params), flat(mask)
  assert any(trains.values()) and not all(trains.values())
  for path, value in start.items():
    if not trains[path]:
      np.testing.assert_array_equal(end[path], value, err_msg=jax.tree_util.keystr(path))
  assert all(not np.array_equal(end[p], start[p]) for p in start if trains[p])
