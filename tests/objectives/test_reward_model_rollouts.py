"""A trained reward model as the reward of GRPO and PPO (`reward='model'`,
`reward_model=WORKDIR`; llmjax/objectives/grpo.py `RolloutObjective.rewards`,
llmjax/train/reward_source.py): its score of prompt + completion equals the reward
head read at the completion's last token of each unpadded sequence; through
`llmjax train` the reward model sits bitwise frozen in the train state; a language
model without a reward head, another tokenizer and half a configuration are
UserErrors."""

import json
import os
import shutil

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
from llmjax.objectives.grpo import GRPO
from llmjax.objectives.ppo import PPO
from llmjax.testing import runs
from llmjax.train import metrics as metrics_lib

V, P, T = 16, 4, 8


def test_model_reward_reads_the_head_at_each_completions_last_token():
  cfg = presets.get_preset("tiny", vocab_size=V, embed_dim=32, num_heads=2, mlp_dim=64,
                           dropout_rate=0.0, max_len=P + T)
  rm = Transformer(cfg)
  rm_params = nn.meta.unbox(rm.init(jax.random.PRNGKey(1), jnp.zeros((1, P + T), jnp.int32),
                                    method="reward")["params"])
  obj = GRPO(prompt_len=P, max_new_tokens=T, reward="model", reward_model="unused", beta=0.0)
  obj.bind_reward_model(cfg)
  assert jax.tree.structure(nn.meta.unbox(obj.frozen_trees({}))["reward_model"]) == \
      jax.tree.structure(rm_params)
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, V, (5, P)).astype(np.int32)
  tokens = rng.integers(3, V, (5, T)).astype(np.int32)
  lengths = np.array([1, 3, 8, 5, 2])
  mask = np.arange(T)[None] < lengths[:, None]
  got = obj.rewards(None, {"reward_model": rm_params}, jnp.asarray(prompts),
                    jnp.asarray(tokens), jnp.asarray(mask))
  for i in range(5):
    sequence = np.concatenate([prompts[i], tokens[i, :lengths[i]]])[None]
    want = rm.apply({"params": rm_params}, jnp.asarray(sequence), method="reward")[0, -1]
    np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)
  with pytest.raises(UserError, match="reward='model'.*reward_model"):
    GRPO(reward="model")
  with pytest.raises(UserError, match="reward='syllables' with PPO.reward_model='x'"):
    PPO(reward="syllables", reward_model="x")
  with pytest.raises(UserError, match="max_len=12.*a prompt \\+ completion has 13"):
    GRPO(prompt_len=P, max_new_tokens=T + 1, reward="model",
         reward_model="x").bind_reward_model(cfg)


def _pairs(folder):
  rng = np.random.default_rng(0)
  words = ["romeo", "juliet", "king", "queen", "sword", "rose", "night", "day", "love",
           "death"]
  rows = []
  for _ in range(40):
    line = " ".join(rng.choice(words, 5))
    rows.append({"prompt": "say: ", "chosen": line, "rejected": line[::-1]})
  folder.mkdir()
  for split in ("train", "validation"):
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.slow
def test_ppo_debug_run_scores_with_a_frozen_reward_model(tmp_path, data_dir, fixture_run):
  pairs = tmp_path / "pairs"
  _pairs(pairs)
  reward_dir = str(tmp_path / "reward")
  common = [f"DataConfig.data_dir={data_dir!r}", f"TrainConfig.init_from={fixture_run!r}",
            "TrainConfig.eval_every=100", "TrainConfig.eval_batches=0"]
  assert cli.main(["train", "--gin_file=runs/reward_model_debug.gin", f"--workdir={reward_dir}"]
                  + [f"--gin_param={p}" for p in common + [
                      "DataConfig.dataset='local_preferences'", f"DataConfig.input_dir='{pairs}'",
                      "TrainConfig.num_steps=2", "TrainConfig.checkpoint_every=2"]]) == 0
  texts = tmp_path / "texts"
  texts.mkdir()
  (texts / "scenes.jsonl").write_text("".join(
      json.dumps({"text": f"Scene {i}. Enter the king, and speak the verse {i}."}) + "\n"
      for i in range(60)))
  rl = common + ["DataConfig.dataset='local_text'", f"DataConfig.input_dir={str(texts)!r}",
                 "PPO.reward='model'", "PPO.reward_kwargs={}", "TrainConfig.log_every=1"]
  argv = ["train", "--gin_file=runs/ppo_debug.gin", "--no_sample"]

  def ppo(workdir, reward_model, steps=2):
    return cli.main(argv + [f"--workdir={workdir}"] + [f"--gin_param={p}" for p in rl + [
        f"PPO.reward_model={reward_model!r}", f"TrainConfig.num_steps={steps}",
        f"TrainConfig.checkpoint_every={steps}"]])

  workdir = str(tmp_path / "ppo")
  assert ppo(workdir, reward_dir) == 0
  train = [r for r in metrics_lib.read_metrics(workdir) if "loss" in r]
  assert [r["step"] for r in train] == [1, 2]
  assert all(np.isfinite(r["reward"]) and r["reward"] != 0 for r in train)
  trained_rm = ckpt_lib.CheckpointManager(os.path.join(reward_dir, "checkpoints")).read()[0]
  state = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints")).read(2)[0]
  held = runs.param_leaves(state["frozen"]["reward_model"])
  want = runs.param_leaves(trained_rm["params"])
  assert held.keys() == want.keys() and any("reward_head" in k for k in held)
  for key, value in want.items():
    np.testing.assert_array_equal(held[key], value, err_msg=key)

  # A language model is not a reward model; another tokenizer reads other ids.
  assert ppo(str(tmp_path / "bad1"), fixture_run, steps=1) == 2
  other = str(tmp_path / "other_tokenizer")
  shutil.copytree(reward_dir, other)
  tokenizer_lib.train_tokenizer(
      [f"an entirely different corpus, line {i} of it" for i in range(200)],
      os.path.join(other, "tokenizer"), model_type="char", vocab_size=30)
  assert ppo(str(tmp_path / "bad2"), other, steps=1) == 2
  assert not os.path.exists(tmp_path / "bad1") and not os.path.exists(tmp_path / "bad2")


def test_reward_source_errors_name_the_problem(tmp_path, fixture_run, capsys):
  from llmjax.train import reward_source
  tok = tokenizer_lib.load_any(os.path.join(fixture_run, "tokenizer.model"))
  obj = GRPO(reward="model", reward_model=str(tmp_path / "nowhere"))
  with pytest.raises(UserError, match="has no checkpoints/.*runs/reward_model.gin"):
    reward_source.bind(obj, tok)
  reward_source.bind(GRPO(reward="token_count", reward_kwargs={"token_id": 3}), tok)  # no-op
