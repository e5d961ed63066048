"""GRPO (llmjax/objectives/grpo.py) and its rewards (rewards.py): advantages and the
clipped loss with the k3 KL against float64 numpy, completion-only log-probs, the cached
rollout against the full forward pass, NaN rewards dropped and counted, the syllable
table, a short run on `token_count` raising the reward, the reference bitwise frozen
through `llmjax train` (runs/grpo_debug.gin), and bad inputs as UserErrors."""

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
from llmjax.objectives import grpo, rewards
from llmjax.objectives.grpo import GRPO
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
  return nn.meta.unbox(jax.jit(net.init)(jax.random.PRNGKey(0), tokens)["params"])


def _prompts(rows=4, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(5, V, (rows, P)), jnp.int32)


# --- (a), (b): the math against float64 numpy -------------------------------------------

def _numpy_advantages(rewards_, ok, group, eps):
  r, w = np.asarray(rewards_, np.float64).reshape(-1, group), ok.reshape(-1, group)
  adv, std = np.zeros_like(r), np.zeros_like(r)
  for g in range(len(r)):
    kept = r[g][w[g]]
    if len(kept):
      std[g] = kept.std()
      adv[g][w[g]] = (kept - kept.mean()) / (kept.std() + eps)
  return adv.reshape(-1), std.reshape(-1)


def test_advantages_have_zero_mean_per_group_and_match_numpy():
  rng = np.random.default_rng(0)
  group = 4
  values = rng.normal(3.0, 2.0, 6 * group).astype(np.float32)
  ok = rng.random(6 * group) > 0.2
  ok[:group] = True                       # a full group,
  values[group:2 * group] = 1.5           # a group of equal rewards (A = 0),
  ok[2 * group:3 * group] = False         # and a group with nothing scored
  adv, std = grpo.group_advantages(jnp.asarray(values), jnp.asarray(ok), group, 1e-4)
  want_adv, want_std = _numpy_advantages(values, ok, group, 1e-4)
  np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(std, want_std, rtol=1e-5, atol=1e-6)
  sums = np.asarray(adv, np.float64).reshape(-1, group).sum(1)
  np.testing.assert_allclose(sums, 0.0, atol=1e-5)
  assert np.all(np.asarray(adv)[~ok] == 0) and np.all(np.asarray(adv)[group:2 * group] == 0)


def test_clipped_loss_and_k3_kl_match_numpy_and_give_the_policy_gradient():
  rng = np.random.default_rng(1)
  shape = (5, 7)
  logp, old, ref = (rng.normal(-2.0, 0.5, shape).astype(np.float32) for _ in range(3))
  adv = rng.normal(0.0, 1.0, shape[0]).astype(np.float32)
  clip, beta = 0.2, 0.1
  loss, kl = grpo.token_loss(*map(jnp.asarray, (logp, old, ref, adv)), clip, beta)
  lp, od, rf, a = (np.asarray(x, np.float64) for x in (logp, old, ref, adv))
  ratio = np.exp(lp - od)
  want_kl = np.exp(rf - lp) - (rf - lp) - 1.0
  want = -np.minimum(ratio * a[:, None], np.clip(ratio, 1 - clip, 1 + clip) * a[:, None])
  np.testing.assert_allclose(kl, want_kl, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss, want + beta * want_kl, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(kl) >= 0)
  # One update per rollout: old = stop_gradient(logp), so ρ = 1 and the gradient of
  # the token loss is −A + β (1 − exp(ref − logp)).
  grad = jax.grad(lambda x: jnp.sum(grpo.token_loss(
      x, jax.lax.stop_gradient(x), jnp.asarray(ref), jnp.asarray(adv), clip, beta)[0]))(
          jnp.asarray(logp))
  np.testing.assert_allclose(grad, -a[:, None] + beta * (1 - np.exp(rf - lp)), rtol=1e-5,
                             atol=1e-6)


# --- (c): completion-only log-probs, and the cached rollout ------------------------------

class Bigram(nn.Module):
  """Logits of position t from token t alone: a prompt token other than the last one
  can change no completion log-prob, only its own (excluded) log-prob."""

  @nn.compact
  def __call__(self, tokens):
    return nn.Embed(V, V)(tokens)


def test_completion_logps_ignore_prompt_and_post_eos_tokens(net, params):
  bigram = Bigram()
  bigram_params = bigram.init(jax.random.PRNGKey(1), jnp.zeros((1, 2), jnp.int32))["params"]
  prompts = _prompts()
  completions = jnp.asarray(np.random.default_rng(2).integers(5, V, (4, T)), jnp.int32)
  completions = completions.at[0, 3].set(EOS).at[2, 0].set(EOS)           # rows 0, 2 stop
  mask = grpo.completion_mask(completions, EOS)
  np.testing.assert_array_equal(mask.sum(1), [4, T, 1, T])
  after_eos = completions.at[0, 5].set(9).at[2, 1:].set(7)
  for model, p in ((bigram, bigram_params), (net, params)):
    base = grpo.completion_logps(model, p, prompts, completions, mask).sum(1)
    same = grpo.completion_logps(model, p, prompts, after_eos,
                                 grpo.completion_mask(after_eos, EOS)).sum(1)
    np.testing.assert_allclose(same, base, rtol=1e-6)
  # The bigram's completion log-probs read the prompt's last token only.
  other_prompt = prompts.at[:, :-1].set(6)
  for changed in (other_prompt, prompts):
    got = grpo.completion_logps(bigram, bigram_params, changed, completions, mask).sum(1)
    np.testing.assert_allclose(got, grpo.completion_logps(
        bigram, bigram_params, prompts, completions, mask).sum(1), rtol=1e-6)
  # ... and equal the table's log-softmax summed over completion tokens.
  table = np.asarray(bigram_params["Embed_0"]["embedding"], np.float64)
  logsm = table - np.log(np.exp(table).sum(-1, keepdims=True))
  full = np.concatenate([prompts, completions], 1)
  want = [sum(logsm[full[b, P - 1 + t], full[b, P + t]] for t in range(T) if mask[b, t])
          for b in range(4)]
  got = grpo.completion_logps(bigram, bigram_params, prompts, completions, mask).sum(1)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_rollout_log_probs_equal_the_full_forward_pass(net, params):
  prompts = _prompts(6)
  tokens, mask, logps = jax.jit(lambda p, x: grpo.rollout(
      net, p, x, jax.random.key(3), max_new_tokens=T, temperature=0.7))(params, prompts)
  assert tokens.shape == (6, T) and bool(mask[:, 0].all())
  full = grpo.completion_logps(net, params, prompts, tokens, mask, temperature=0.7)
  np.testing.assert_allclose(logps, full, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(mask), np.asarray(grpo.completion_mask(tokens, EOS)))


# --- NaN rewards, the syllable table ----------------------------------------------------

@rewards.register("test_nan_rows")
def _nan_rows(tokens, mask, tables, *, every: int):
  """NaN on every `every`-th row, else the completion's length."""
  rows = jnp.arange(tokens.shape[0])
  return jnp.where(rows % every == 0, jnp.nan, jnp.sum(mask, 1).astype(jnp.float32))


@pytest.mark.parametrize("every, want", [(2, 0.5), (1, 1.0)])
def test_nan_rewards_are_dropped_and_counted(net, params, every, want):
  obj = GRPO(prompt_len=P, max_new_tokens=T, num_generations=4, beta=0.1,
             reward="test_nan_rows", reward_kwargs={"every": every})
  batch = {"prompt": _prompts(2)}

  def loss(p):
    sums = obj.loss_sums(net, p, batch, rng=jax.random.key(0), frozen={"reference": params})
    return sums["loss"], sums

  fn = jax.jit(jax.grad(loss, has_aux=True))
  grads, sums = fn(params)
  summary = obj.summarize(sums)
  assert float(summary["nan_rewards"]) == want and float(sums["completions"]) == 8
  assert float(sums["weight"]) == 8 * (1 - want)
  # No finite reward at all: the loss is NaN on purpose (the trainer drops the update).
  assert np.isnan(float(summary["loss"])) == (want == 1.0)
  assert all(np.isfinite(float(v)) for k, v in summary.items() if k != "loss")
  norms = [float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and (max(norms) == 0) == (want == 1.0)


@rewards.register("test_raises")
def _raises(tokens, mask, tables):
  raise ZeroDivisionError("the judge divided by zero")


def test_failed_rewards_leave_the_state_alone_or_name_the_reward(net, params):
  """A train step whose every reward is NaN changes neither the parameters nor the
  optimizer state and reports nonfinite; a reward that raises is a UserError naming it."""
  tx, schedule = OptimizerConfig(peak_lr=1e-2, warmup_steps=0).make(10)
  obj = GRPO(prompt_len=P, max_new_tokens=T, num_generations=4, beta=0.1,
             reward="test_nan_rows", reward_kwargs={"every": 1})
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params), frozen=obj.frozen_trees(params),
                               rng=jax.random.key_data(jax.random.PRNGKey(0)))
  step = jax.jit(step_lib.make_train_step(net, obj, tx, schedule))
  new, metrics = step(state, {"prompt": _prompts(2)})
  assert int(metrics["nonfinite"]) == 1 and float(metrics["nan_rewards"]) == 1
  for a, b in zip(jax.tree.leaves((new.params, new.opt_state)),
                  jax.tree.leaves((state.params, state.opt_state))):
    np.testing.assert_array_equal(a, b)
  bad = GRPO(prompt_len=P, max_new_tokens=T, num_generations=4, beta=0.0, reward="test_raises")
  with pytest.raises(UserError, match=r"GRPO.reward='test_raises' raised ZeroDivisionError: "
                     r"the judge divided by zero"):
    jax.jit(step_lib.make_train_step(net, bad, tx, schedule))(
        state.replace(frozen={}), {"prompt": _prompts(2)})


def test_syllable_table_and_reward(tmp_path):
  assert rewards.piece_syllables("\u2581beautiful") == 3
  assert rewards.piece_syllables("\u2581the") == 1 and rewards.piece_syllables("rhythm") == 1
  text = "the cat sat upon the mat\nand more"
  tok = tokenizer_lib.train_tokenizer([text] * 20, str(tmp_path / "char"), model_type="char",
                                      vocab_size=None, whitespace_exact=True)
  tables = rewards.syllable_tables(tok)
  assert tables["syllables"][:5].sum() == 0              # <pad> </s> <s> <unk> <mask>
  assert tables["newline"][tok.piece_to_id("\n")]
  obj = GRPO(reward="syllables", reward_kwargs={"target": 10})
  with pytest.raises(UserError, match="bind_tokenizer"):
    obj.reward_fn(64)
  obj.feature_fn({"text": text}, tok)                     # binds the tokenizer's tables
  ids = jnp.asarray([tok.encode(text), tok.encode(text.replace("\n", " "))])
  score = obj.reward_fn(64)(ids, grpo.completion_mask(ids, EOS))
  # Vowel groups of "the cat sat upon the mat" (7), then of the whole text (10).
  np.testing.assert_array_equal(score, [-3.0, 0.0])


# --- (e): the reward rises ---------------------------------------------------------------

def _mean_reward(net, obj, prompts, seed):
  """The mean reward of 16 completions per prompt, sampled with a fixed seed (jitted)."""
  rows = jnp.repeat(prompts, 16, axis=0)

  def mean(params):
    tokens, mask, _ = grpo.rollout(net, params, rows, jax.random.key(seed), max_new_tokens=T)
    return jnp.mean(obj.reward_fn(V)(tokens, mask))

  return jax.jit(mean)


def test_a_short_run_on_token_count_raises_the_reward(net, params):
  obj = GRPO(prompt_len=P, max_new_tokens=T, num_generations=8, beta=0.01,
             reward="token_count", reward_kwargs={"token_id": 7})
  tx, schedule = OptimizerConfig(peak_lr=1e-2, warmup_steps=0).make(20)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params), frozen=obj.frozen_trees(params),
                               rng=jax.random.key_data(jax.random.PRNGKey(0)))
  step = jax.jit(step_lib.make_train_step(net, obj, tx, schedule))
  prompts = _prompts(4)
  batch = {"prompt": prompts, "prompt_segment_ids": jnp.ones_like(prompts)}
  measure = _mean_reward(net, obj, prompts, seed=7)
  before = float(measure(params))
  history = []
  for _ in range(15):
    state, metrics = step(state, batch)
    history.append(float(metrics["reward"]))
    assert int(metrics["nonfinite"]) == 0
  after = float(measure(state.params))
  assert after > before + 1.5 and after > 2.5, (before, after, history)
  assert float(metrics["kl"]) > 0 and float(metrics["completion_length"]) > 1


# --- (d): the reference stays bitwise frozen through `llmjax train` ----------------------

@pytest.mark.slow
def test_debug_run_keeps_the_reference_bitwise_frozen(tmp_path, data_dir, fixture_run):
  texts = tmp_path / "texts"
  texts.mkdir()
  lines = [json.dumps({"text": f"Scene {i}. Enter the king, and speak the verse {i}."})
           for i in range(60)]
  (texts / "scenes.jsonl").write_text("\n".join(lines) + "\n")
  workdir = str(tmp_path / "grpo")
  argv = ["train", "--gin_file=runs/grpo_debug.gin", f"--workdir={workdir}", "--no_sample"]
  bindings = [f"DataConfig.data_dir={data_dir!r}", f"TrainConfig.init_from={fixture_run!r}",
              "DataConfig.dataset='local_text'", f"DataConfig.input_dir={str(texts)!r}",
              "TrainConfig.num_steps=3", "TrainConfig.checkpoint_every=3",
              "TrainConfig.eval_every=100", "TrainConfig.log_every=1"]
  assert cli.main(argv + [f"--gin_param={p}" for p in bindings]) == 0
  train = [r for r in metrics_lib.read_metrics(workdir) if "loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3]
  assert all(np.isfinite(r["reward"]) and r["nan_rewards"] == 0 and r["completions"] == 32
             for r in train)
  source = ckpt_lib.CheckpointManager(os.path.join(fixture_run, "checkpoints")).read()[0]
  state = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints")).read(3)[0]
  ref, start = runs.param_leaves(state["frozen"]["reference"]), runs.param_leaves(
      source["params"])
  trained = runs.param_leaves(state["params"])
  assert ref.keys() == start.keys()
  for key, value in start.items():
    np.testing.assert_array_equal(ref[key], value, err_msg=key)
  assert any(not np.array_equal(trained[k], start[k]) for k in start)  # the policy moved


# --- (f): bad inputs, and the gin files ------------------------------------------------

def test_bad_inputs_are_user_errors(net, params):
  with pytest.raises(UserError, match=r"unknown reward 'sillables'.*'syllables'"):
    GRPO(reward="sillables")
  with pytest.raises(UserError, match="token_id"):
    GRPO(reward="token_count")
  with pytest.raises(UserError, match="num_generations"):
    GRPO(reward="token_count", reward_kwargs={"token_id": 3}, num_generations=1)
  obj = GRPO(prompt_len=P, max_new_tokens=T + 1, reward="token_count",
             reward_kwargs={"token_id": 3}, beta=0.0)
  with pytest.raises(UserError, match=rf"{P} \+ {T + 1} = {P + T + 1}.*max_len={P + T}"):
    obj.loss_sums(net, params, {"prompt": _prompts()})
  with pytest.raises(UserError, match="feature_lengths"):
    obj.init_inputs({"tokens": 64})
  with pytest.raises(UserError, match="frozen"):
    GRPO(prompt_len=P, max_new_tokens=T, reward="token_count",
         reward_kwargs={"token_id": 3}).loss_sums(net, params, {"prompt": _prompts()})


@pytest.mark.parametrize("name", ["grpo.gin", "grpo_debug.gin"])
def test_gin_files_parse_and_build(name):
  path = os.path.join(main.GIN_ROOT, "runs", name)
  main.parse_gin([path, os.path.join(main.GIN_ROOT, "models", "tiny.gin")],
                 ["TrainConfig.init_from='/some/run'"])
  objective = main.bound("objective")
  data = main.bound("data")
  assert isinstance(objective, GRPO) and objective.reward == "syllables"
  inputs = objective.init_inputs(data.lengths())
  assert inputs["tokens"].shape[1] == objective.prompt_len + objective.max_new_tokens
  if name == "grpo_debug.gin":  # fits the debug model (runs/debug.gin: tiny, max_len 64)
    assert inputs["tokens"].shape[1] <= presets.get_preset("tiny").max_len
