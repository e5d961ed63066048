"""PPO (llmjax/objectives/ppo.py): GAE, whitening, the clipped policy and value losses and
the adaptive KL update against float64 numpy, the KL-penalized token rewards, the value
head beside unchanged logits, a short run on `token_count` raising the reward, the value
head created by a warm start and the reference bitwise frozen through `llmjax train`
(runs/ppo_debug.gin), and bad inputs as UserErrors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llmjax import cli
from llmjax.checkpoint import manager as ckpt_lib
from llmjax.data import tokenizer as tokenizer_lib
from llmjax.errors import UserError
from llmjax.models import presets
from llmjax.models.transformer import Transformer
from llmjax.objectives import grpo, ppo, rewards
from llmjax.objectives.ppo import PPO
from llmjax.optim.optimizers import OptimizerConfig
from llmjax.testing import runs
from llmjax.train import main
from llmjax.train import metrics as metrics_lib
from llmjax.train import state as state_lib
from llmjax.train import step as step_lib

V, P, T = 16, 4, 8   # vocabulary, prompt and completion lengths of the tiny model
EOS = tokenizer_lib.EOS_ID


@pytest.fixture(scope="module")
def net():
  cfg = presets.get_preset("tiny", vocab_size=V, embed_dim=32, num_heads=2, mlp_dim=64,
                           dropout_rate=0.0, max_len=P + T)
  return Transformer(cfg)


@pytest.fixture(scope="module")
def params(net):
  tokens = jnp.zeros((1, P + T), jnp.int32)
  init = jax.jit(lambda rng: net.init(rng, tokens, method=ppo.policy_and_values))
  return nn.meta.unbox(init(jax.random.PRNGKey(0))["params"])


def _prompts(rows=4, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(5, V, (rows, P)), jnp.int32)


def _random_episodes(seed, rows=6, steps=9):
  """Rewards, values and prefix masks of lengths 1..steps (one full, one of length 1)."""
  rng = np.random.default_rng(seed)
  rewards = rng.normal(0.0, 1.0, (rows, steps)).astype(np.float32)
  values = rng.normal(0.5, 1.0, (rows, steps)).astype(np.float32)
  lengths = rng.integers(1, steps + 1, rows)
  lengths[0], lengths[1] = steps, 1
  mask = np.arange(steps)[None] < lengths[:, None]
  return rewards, values, mask


def _numpy_gae(rewards, values, mask, gamma, lam):
  r, v = np.asarray(rewards, np.float64), np.asarray(values, np.float64)
  adv = np.zeros_like(r)
  for b in range(len(r)):
    n, running = int(mask[b].sum()), 0.0
    for t in reversed(range(n)):
      next_v = v[b, t + 1] if t + 1 < n else 0.0
      running = r[b, t] + gamma * next_v - v[b, t] + gamma * lam * running
      adv[b, t] = running
  return adv, np.where(mask, adv + v, 0.0)


# --- (a), (b): GAE and whitening against float64 numpy -------------------------------------

@pytest.mark.parametrize("gamma, lam", [(0.99, 0.95), (1.0, 0.9), (0.9, 0.0)])
def test_gae_matches_numpy_with_masks(gamma, lam):
  rewards, values, mask = _random_episodes(seed=int(gamma * 100 + lam * 10))
  adv, ret = jax.jit(ppo.gae, static_argnums=(3, 4))(
      jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
  want_adv, want_ret = _numpy_gae(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(adv)[~mask] == 0) and np.all(np.asarray(ret)[~mask] == 0)
  # The values are stop-gradient: GAE passes no gradient to the critic.
  grad = jax.grad(lambda v: jnp.sum(ppo.gae(jnp.asarray(rewards), v, jnp.asarray(mask),
                                            gamma, lam)[0]))(jnp.asarray(values))
  assert not np.any(np.asarray(grad))


def test_gae_with_unit_gamma_and_lambda_is_reward_to_go_minus_value():
  rewards, values, mask = _random_episodes(seed=5)
  adv, ret = ppo.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), 1.0, 1.0)
  r = np.where(mask, rewards.astype(np.float64), 0.0)
  to_go = np.cumsum(r[:, ::-1], axis=1)[:, ::-1]
  np.testing.assert_allclose(adv, np.where(mask, to_go - values, 0.0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, np.where(mask, to_go, 0.0), rtol=1e-5, atol=1e-5)


def test_whitening_over_valid_tokens_matches_numpy():
  x, _, mask = _random_episodes(seed=3)
  got = ppo.whiten(jnp.asarray(3.0 * x + 2.0), jnp.asarray(mask))
  kept = (3.0 * x + 2.0).astype(np.float64)[mask]
  want = np.zeros(mask.shape)
  want[mask] = (kept - kept.mean()) / np.sqrt(kept.var() + 1e-8)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert abs(float(np.asarray(got)[mask].mean())) < 1e-5


def test_token_rewards_put_the_score_on_the_last_token():
  logp_old = jnp.asarray([[-1.0, -2.0, -0.5], [-1.5, -1.0, -3.0]])
  ref = jnp.asarray([[-1.5, -1.0, -0.5], [-1.0, -1.0, -1.0]])
  mask = jnp.asarray([[True, True, False], [True, True, True]])
  got = ppo.token_rewards(logp_old, ref, jnp.asarray([2.0, -1.0]), mask, 0.1)
  want = [[-0.1 * 0.5, -0.1 * -1.0 + 2.0, 0.0], [-0.1 * -0.5, 0.0, -0.1 * -2.0 - 1.0]]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


# --- (c), (d): the clipped losses and the KL controller against float64 numpy ------------

def test_clipped_policy_loss_matches_numpy_and_gives_the_policy_gradient():
  rng = np.random.default_rng(1)
  shape = (5, 7)
  logp, old = (rng.normal(-2.0, 0.3, shape).astype(np.float32) for _ in range(2))
  adv = rng.normal(0.0, 1.0, shape).astype(np.float32)
  loss, clipped = ppo.policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), 0.2)
  ratio = np.exp(np.float64(logp) - old)
  a = np.float64(adv)
  want = -np.minimum(ratio * a, np.clip(ratio, 0.8, 1.2) * a)
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(clipped, np.clip(ratio, 0.8, 1.2) * a < ratio * a)
  assert 0 < np.mean(clipped) < 1                 # both branches are exercised
  # The gradient: −ρA where the unclipped term is taken, 0 where the clip binds.
  grad = jax.grad(lambda x: jnp.sum(ppo.policy_loss(x, jnp.asarray(old), jnp.asarray(adv),
                                                    0.2)[0]))(jnp.asarray(logp))
  np.testing.assert_allclose(grad, np.where(np.asarray(clipped), 0.0, -ratio * a), rtol=1e-4,
                             atol=1e-6)


def test_clipped_value_loss_matches_numpy():
  rng = np.random.default_rng(2)
  values, old, returns = (rng.normal(0.0, 0.5, (6, 5)).astype(np.float32) for _ in range(3))
  loss = ppo.value_loss(*map(jnp.asarray, (values, old, returns)), 0.2)
  v, o, r = (np.asarray(x, np.float64) for x in (values, old, returns))
  want = 0.5 * np.maximum((v - r) ** 2, (np.clip(v, o - 0.2, o + 0.2) - r) ** 2)
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
  assert np.any((v - r) ** 2 < (np.clip(v, o - 0.2, o + 0.2) - r) ** 2)  # the clip binds


def test_adaptive_kl_update_matches_numpy():
  rng = np.random.default_rng(4)
  beta, kl = rng.uniform(0.01, 0.5, 20), rng.uniform(0.0, 15.0, 20)
  got = ppo.adaptive_kl_update(jnp.asarray(beta), jnp.asarray(kl), 6.0, 10000.0, 256)
  want = beta * (1 + np.clip(kl / 6.0 - 1, -0.2, 0.2) * 256 / 10000.0)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert float(ppo.adaptive_kl_update(0.1, 12.0, 6.0, 100.0, 100)) == pytest.approx(0.12)
  with pytest.raises(UserError, match=r"PPO.kl_target=6.0.*kl_coef > 0.*kl_target=None"):
    PPO(reward="token_count", reward_kwargs={"token_id": 3}, kl_target=6.0, kl_coef=0.0)


# --- the value head, the sums --------------------------------------------------------------

@rewards.register("test_ppo_nan_rows")
def _nan_rows(tokens, mask, tables, *, every: int):
  """NaN on every `every`-th row, else the completion's length."""
  rows = jnp.arange(tokens.shape[0])
  return jnp.where(rows % every == 0, jnp.nan, jnp.sum(mask, 1).astype(jnp.float32))


def test_value_head_leaves_the_log_probs_unchanged(net, params):
  assert params["value_head"]["kernel"].shape == (32, 1)
  prompts = _prompts()
  completions = jnp.asarray(np.random.default_rng(2).integers(5, V, (4, T)), jnp.int32)
  completions = completions.at[0, 3].set(EOS)
  mask = grpo.completion_mask(completions, EOS)
  logp, values = ppo.completion_logps_and_values(net, params, prompts, completions, mask)
  policy = {k: v for k, v in params.items() if k != "value_head"}
  np.testing.assert_allclose(logp, grpo.completion_logps(net, policy, prompts, completions,
                                                         mask), rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(values)[~np.asarray(mask)] == 0)
  assert np.all(np.asarray(values)[np.asarray(mask)] != 0)


def test_loss_sums_weight_tokens_and_drop_nan_rewards(net, params):
  obj = PPO(prompt_len=P, max_new_tokens=T, num_generations=4, reward="test_ppo_nan_rows",
            reward_kwargs={"every": 2})
  frozen = obj.frozen_trees(params)
  assert "value_head" not in frozen["reference"]
  batch = {"prompt": _prompts(2)}

  def loss(p):
    sums = obj.loss_sums(net, p, batch, rng=jax.random.key(0), frozen=frozen)
    return sums["loss"], sums

  grads, sums = jax.jit(jax.grad(loss, has_aux=True))(params)
  summary = obj.summarize(sums)
  assert float(summary["nan_rewards"]) == 0.5 and float(sums["scored"]) == 4
  assert float(sums["weight"]) == float(summary["completion_length"]) * 4
  assert all(np.isfinite(float(v)) for v in summary.values())
  assert float(summary["clip_frac"]) == 0           # one update per rollout: ρ ≈ 1
  assert float(jnp.max(jnp.abs(grads["value_head"]["kernel"]))) > 0


# --- the separate critic ------------------------------------------------------------------

def test_a_separate_critic_has_its_own_trunk_and_starts_as_the_policy(net, params):
  init = jax.jit(lambda rng: net.init(rng, jnp.zeros((1, P + T), jnp.int32), critic="separate",
                                      method=ppo.policy_and_values))
  fresh = nn.meta.unbox(init(jax.random.PRNGKey(1))["params"])
  policy = {k: v for k, v in fresh.items() if k not in ("value_head", "critic")}
  assert jax.tree.structure(fresh["critic"]) == jax.tree.structure(policy)
  separate = ppo.critic_from_policy(fresh)
  for a, b in zip(jax.tree.leaves(separate["critic"]), jax.tree.leaves(policy)):
    np.testing.assert_array_equal(a, b)
  prompts = _prompts()
  completions = jnp.asarray(np.random.default_rng(3).integers(5, V, (4, T)), jnp.int32)
  mask = grpo.completion_mask(completions.at[1, 2].set(EOS), EOS)
  run = lambda p, critic: ppo.completion_logps_and_values(net, p, prompts, completions, mask,
                                                          critic=critic)
  # Copied from the policy, the critic's values are the shared trunk's; a fresh critic's
  # are not, and the policy's log-probs never depend on it.
  shared = run({k: v for k, v in separate.items() if k != "critic"}, "shared")
  for got, want in zip(run(separate, "separate"), shared):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  logp, values = run(fresh, "separate")
  np.testing.assert_allclose(logp, shared[0], rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(values - shared[1]))) > 1e-3


def test_with_a_separate_critic_each_loss_trains_only_its_own_model(net):
  obj = PPO(prompt_len=P, max_new_tokens=T, num_generations=4, reward="token_count",
            reward_kwargs={"token_id": 7}, kl_coef=0.1, critic="separate")
  tokens = jnp.zeros((1, P + T), jnp.int32)
  variables = net.init(jax.random.PRNGKey(2), **{**obj.init_inputs({"prompt": P}),
                                                 "tokens": tokens})
  params = obj.warm_params(nn.meta.unbox(variables["params"]))
  frozen = obj.frozen_trees(params)
  assert set(frozen["reference"]) == set(params) - {"value_head", "critic"}
  experience, _ = jax.jit(lambda p: obj.make_experience(
      net, p, {"prompt": _prompts(2)}, rng=jax.random.key(0), frozen=frozen))(params)
  def grad_of(name):
    return jax.jit(jax.grad(lambda q: obj.experience_sums(net, q, experience)[name]))(params)
  grads = {name: grad_of(name) for name in ("policy_loss", "value_loss")}
  norm = lambda tree: float(optax_norm(tree))
  policy_part = lambda g: {k: v for k, v in g.items() if k not in ("value_head", "critic")}
  assert norm(grads["policy_loss"]["critic"]) == 0 == norm(grads["policy_loss"]["value_head"])
  assert norm(grads["value_loss"]["critic"]) > 0 and norm(grads["value_loss"]["value_head"]) > 0
  assert norm(policy_part(grads["value_loss"])) == 0 < norm(policy_part(grads["policy_loss"]))


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


# --- (f): the reward rises ---------------------------------------------------------------

def test_a_short_run_on_token_count_raises_the_reward(net, params):
  obj = PPO(prompt_len=P, max_new_tokens=T, num_generations=8, kl_coef=0.01,
            reward="token_count", reward_kwargs={"token_id": 7})
  tx, schedule = OptimizerConfig(peak_lr=1e-2, warmup_steps=0).make(20)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params), frozen=obj.frozen_trees(params),
                               rng=jax.random.key_data(jax.random.PRNGKey(0)))
  step = jax.jit(step_lib.make_train_step(net, obj, tx, schedule))
  prompts = _prompts(4)
  batch = {"prompt": prompts, "prompt_segment_ids": jnp.ones_like(prompts)}
  rows = jnp.repeat(prompts, 16, axis=0)
  measure = jax.jit(lambda p: jnp.mean(obj.reward_fn(V)(*grpo.rollout(
      net, p, rows, jax.random.key(7), max_new_tokens=T)[:2])))
  before = float(measure(params))
  history = []
  for _ in range(15):
    state, metrics = step(state, batch)
    history.append(float(metrics["reward"]))
    assert int(metrics["nonfinite"]) == 0
  after = float(measure(state.params))
  assert after > before + 1.5 and after > 2.5, (before, after, history)
  assert float(metrics["kl"]) > 0 and np.isfinite(float(metrics["value_loss"]))


# --- (e): the value head by warm start, the reference bitwise frozen --------------------

@pytest.mark.slow
def test_debug_run_creates_the_value_head_and_keeps_the_reference_frozen(
    tmp_path, data_dir, fixture_run):
  texts = tmp_path / "texts"
  texts.mkdir()
  lines = [json.dumps({"text": f"Scene {i}. Enter the king, and speak the verse {i}."})
           for i in range(60)]
  (texts / "scenes.jsonl").write_text("\n".join(lines) + "\n")
  workdir = str(tmp_path / "ppo")
  argv = ["train", "--gin_file=runs/ppo_debug.gin", f"--workdir={workdir}", "--no_sample"]
  bindings = [f"DataConfig.data_dir={data_dir!r}", f"TrainConfig.init_from={fixture_run!r}",
              "DataConfig.dataset='local_text'", f"DataConfig.input_dir={str(texts)!r}",
              "TrainConfig.num_steps=2", "TrainConfig.checkpoint_every=2",
              "TrainConfig.eval_every=100", "TrainConfig.eval_batches=0",
              "TrainConfig.log_every=1", "PPO.kl_target=1.0", "PPO.kl_horizon=100"]
  assert cli.main(argv + [f"--gin_param={p}" for p in bindings]) == 0
  train = [r for r in metrics_lib.read_metrics(workdir) if "loss" in r]
  assert [r["step"] for r in train] == [1, 2]
  assert all(np.isfinite(r["reward"]) and np.isfinite(r["value_loss"])
             and r["nan_rewards"] == 0 and r["completions"] == 16 for r in train)
  source = ckpt_lib.CheckpointManager(os.path.join(fixture_run, "checkpoints")).read()[0]
  state = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints")).read(2)[0]
  # The adaptive β is logged and checkpointed: step 2's β after step 2's KL (16 scored).
  beta = lambda r: r["kl_coef"] * (1 + np.clip(r["kl"] / 1.0 - 1, -0.2, 0.2) * 16 / 100)
  assert train[1]["kl_coef"] == pytest.approx(beta(train[0]), rel=1e-4)
  assert float(state["objective"]["kl_coef"]) == pytest.approx(beta(train[1]), rel=1e-4)
  start = runs.param_leaves(source["params"])
  trained = runs.param_leaves(state["params"])
  ref = runs.param_leaves(state["frozen"]["reference"])
  heads = {k for k in trained if "value_head" in k}
  assert heads and not any("value_head" in k for k in start)   # made by the warm start
  assert trained.keys() == start.keys() | heads
  assert all(np.all(np.isfinite(trained[k])) for k in heads)
  assert ref.keys() == start.keys()
  for key, value in start.items():
    np.testing.assert_array_equal(ref[key], value, err_msg=key)
  assert any(not np.array_equal(trained[k], start[k]) for k in start)  # the policy moved


@pytest.mark.slow
def test_debug_run_with_lora_and_a_separate_critic(tmp_path, data_dir, fixture_run):
  """`llmjax train` with peft/lora.gin and PPO.critic='separate': the critic starts as the
  source checkpoint (its base is frozen under LoRA, so it still equals the source after
  training), the policy's and the critic's adapters and the value head train, and the
  reference holds neither critic nor head."""
  workdir = str(tmp_path / "ppo_critic")
  bindings = [f"DataConfig.data_dir={data_dir!r}", f"TrainConfig.init_from={fixture_run!r}",
              "TrainConfig.num_steps=2", "TrainConfig.checkpoint_every=1",
              "TrainConfig.eval_every=100", "TrainConfig.eval_batches=0",
              "PPO.critic='separate'", "LoraConfig.dropout=0.0"]
  argv = ["train", "--gin_file=runs/ppo_debug.gin", "--gin_file=peft/lora.gin",
          f"--workdir={workdir}"]   # the end-of-run sample: the language model alone
  assert cli.main(argv + [f"--gin_param={p}" for p in bindings]) == 0
  source = runs.param_leaves(
      ckpt_lib.CheckpointManager(os.path.join(fixture_run, "checkpoints")).read()[0]["params"])
  ckpt = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"))
  state, first = ckpt.read(2)[0], runs.param_leaves(ckpt.read(1)[0]["params"])
  trained, ref = runs.param_leaves(state["params"]), runs.param_leaves(state["frozen"]["reference"])
  head = [k for k in trained if k.startswith("['value_head']")]
  assert head and all(not np.array_equal(trained[k], first[k]) for k in head)  # it trains
  critic = {k[len("['critic']"):]: v for k, v in trained.items() if k.startswith("['critic']")}
  policy = {k: v for k, v in trained.items()
            if not k.startswith(("['critic']", "['value_head']"))}
  adapters = {k for k in policy if "lora_" in k}
  assert adapters and {k for k in critic if "lora_" in k} == adapters
  assert ref.keys() == policy.keys() and set(critic) <= set(policy)
  for key, value in source.items():          # both bases: the source, bitwise
    np.testing.assert_array_equal(policy[key], value, err_msg=key)
    if key in critic:
      np.testing.assert_array_equal(critic[key], value, err_msg=f"critic {key}")
  assert {k for k in critic if "lora_" not in k} and all(
      k in source for k in critic if "lora_" not in k)
  lora_b = [k for k in adapters if "lora_b" in k]  # zero at init: moved iff trained
  assert all(np.any(policy[k] != 0) and np.any(critic[k] != 0) for k in lora_b)
  assert not np.array_equal(critic[lora_b[0]], policy[lora_b[0]])   # trained apart
  train = [r for r in metrics_lib.read_metrics(workdir) if "loss" in r]
  assert train and all(np.isfinite(r["value_loss"]) for r in train)
  # The export holds the language model alone (LoRA folded in), as the source's does.
  from safetensors.numpy import load_file
  for run in (workdir, fixture_run):
    assert cli.main(["convert", f"--workdir={run}", f"--to_hf={run}_hf"]) == 0
  ours, theirs = (load_file(f"{run}_hf/model.safetensors") for run in (workdir, fixture_run))
  assert ours.keys() == theirs.keys()
  changed = [k for k in ours if not np.array_equal(ours[k], theirs[k])]
  assert changed and all("attn" in k for k in changed), changed   # LoRA: q, v only


# --- (g): bad inputs, and the gin files ------------------------------------------------

def test_bad_inputs_are_user_errors(net, params):
  with pytest.raises(UserError, match=r"unknown reward 'sillables'.*Set PPO.reward"):
    PPO(reward="sillables")
  with pytest.raises(UserError, match=r"PPO.reward='token_count'.*token_id"):
    PPO(reward="token_count")
  with pytest.raises(UserError, match="PPO.critic.*'shared' or 'separate'"):
    PPO(reward="token_count", reward_kwargs={"token_id": 3}, critic="own")
  with pytest.raises(UserError, match="PPO.lam"):
    PPO(reward="token_count", reward_kwargs={"token_id": 3}, lam=1.5)
  obj = PPO(prompt_len=P, max_new_tokens=T + 1, reward="token_count",
            reward_kwargs={"token_id": 3}, kl_coef=0.0)
  with pytest.raises(UserError, match=rf"PPO.prompt_len \+ PPO.max_new_tokens = {P} \+ "
                     rf"{T + 1} = {P + T + 1}.*max_len={P + T}"):
    obj.loss_sums(net, params, {"prompt": _prompts()})
  with pytest.raises(UserError, match="PPO packs.*feature_lengths"):
    obj.init_inputs({"tokens": 64})
  with pytest.raises(UserError, match="frozen"):
    PPO(prompt_len=P, max_new_tokens=T, reward="token_count",
        reward_kwargs={"token_id": 3}).loss_sums(net, params, {"prompt": _prompts()})


@pytest.mark.parametrize("name", ["ppo.gin", "ppo_debug.gin"])
def test_gin_files_parse_and_build(name):
  path = os.path.join(main.GIN_ROOT, "runs", name)
  main.parse_gin([path, os.path.join(main.GIN_ROOT, "models", "tiny.gin")],
                 ["TrainConfig.init_from='/some/run'"])
  objective = main.bound("objective")
  data = main.bound("data")
  assert isinstance(objective, PPO) and objective.reward == "syllables"
  inputs = objective.init_inputs(data.lengths())
  assert inputs["tokens"].shape[1] == objective.prompt_len + objective.max_new_tokens
  if name == "ppo_debug.gin":  # fits the debug model (runs/debug.gin: tiny, max_len 64)
    assert inputs["tokens"].shape[1] <= presets.get_preset("tiny").max_len
