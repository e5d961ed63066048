"""The reward model: the Bradley-Terry loss (with and without a margin) against float64
numpy, the reward read at each sequence's last real token (padding and what follows
it change nothing, the last token does; packed pairs score as they do alone, for all
three architectures), gradients reach the head and the network, and a debug run from
a checkpoint learns a preference that `llmjax score` then shows."""

import json
import os
import shutil

import flax
import grain
import jax
import numpy as np
import pytest

from llmjax import cli
from llmjax.checkpoint.workdir import load_workdir
from llmjax.data import datasets, packing
from llmjax.data import tokenizer as tokenizer_lib
from llmjax.errors import UserError
from llmjax.models import presets
from llmjax.models.transformer import Transformer
from llmjax.objectives import reward
from llmjax.train import metrics as metrics_lib

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "data", "fixtures", "a5996b6_tiny_run")
PAIRS = [{"prompt": "Who speaks?\n", "chosen": "the king", "rejected": "king the"},
         {"prompt": "Say it: ", "chosen": "good morrow", "rejected": "bad night, sir"}]
PRESET = {"decoder_only": "tiny", "encoder_decoder": "t5-tiny", "encoder_only": "bert-tiny"}
L = 48


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  texts = [p[k] for p in PAIRS for k in reward.RECORD_FIELDS] * 20
  return tokenizer_lib.train_tokenizer(texts, str(tmp_path_factory.mktemp("tok") / "char"),
                                       model_type="char", vocab_size=None, num_sentinels=0)


def _model(vocab_size, arch):
  cfg = presets.get_preset(PRESET[arch], vocab_size=vocab_size, embed_dim=32, num_heads=2,
                           mlp_dim=64, dropout_rate=0.0)
  return Transformer(cfg)


def _lengths(arch):
  if arch == "encoder_decoder":
    return {"inputs": L, "chosen_response": L, "rejected_response": L}
  return {"chosen": L, "rejected": L}


def _init(model, objective, lengths):
  inputs = objective.init_inputs(lengths)
  variables = jax.jit(lambda rng: model.init(rng, **inputs))(jax.random.PRNGKey(0))
  return flax.linen.meta.unbox(variables["params"])


def _rows(features, lengths, mode="first_fit"):
  """Packs feature dicts with the real pipeline packer into a batch of rows."""
  ds = grain.MapDataset.source(features).to_iter_dataset()
  rows = list(packing.pack(ds, lengths, mode, shuffle_bins=False))
  return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}


def _numpy_bradley_terry(chosen, rejected, weights, margin):
  d = np.asarray(chosen, np.float64) - np.asarray(rejected, np.float64)
  w = np.asarray(weights, np.float64)
  return {"loss": np.sum(np.logaddexp(0.0, -(d - margin)) * w),  # -log sigmoid(d - m)
          "correct": np.sum((d > 0) * w), "reward_margin": np.sum(d * w), "weight": w.sum()}


@pytest.mark.parametrize("margin", [0.0, 0.7])
def test_bradley_terry_loss_is_numpy_float64(margin):
  rng = np.random.default_rng(int(margin * 10))
  chosen, rejected = rng.normal(0, 3, (4, 6)), rng.normal(0, 3, (4, 6))
  weights = rng.random((4, 6)) < 0.7
  got = reward.bradley_terry_sums(jax.numpy.asarray(chosen, np.float32),
                                  jax.numpy.asarray(rejected, np.float32), weights, margin)
  want = _numpy_bradley_terry(chosen, rejected, weights, margin)
  for key, value in want.items():
    np.testing.assert_allclose(float(got[key]), value, rtol=1e-5, atol=1e-5)
  summary = reward.RewardModel(margin=margin).summarize(got)
  np.testing.assert_allclose(float(summary["loss"]), want["loss"] / want["weight"], rtol=1e-5)
  assert float(summary["pairs"]) == weights.sum()
  np.testing.assert_allclose(float(summary["accuracy"]), want["correct"] / want["weight"])
  # Equal rewards: ln 2 without a margin (neither side is preferred), more with one.
  zero = reward.bradley_terry_sums(*(jax.numpy.zeros((1, 1)),) * 2, np.ones((1, 1)), margin)
  np.testing.assert_allclose(float(zero["loss"]), np.logaddexp(0, margin), rtol=1e-6)


def test_segment_last_reads_each_segments_last_token():
  values = np.arange(1, 9, dtype=np.float32)[None] * 10            # [1, 8]
  seg = np.asarray([[1, 1, 1, 2, 2, 3, 0, 0]])
  out, present = reward.segment_last(values, seg)
  np.testing.assert_array_equal(np.asarray(out)[0, :3], [30, 50, 60])
  np.testing.assert_array_equal(np.asarray(present)[0], [1, 1, 1, 0, 0, 0, 0, 0])


def test_features_keep_the_eos_and_cut_the_prompts_start(tok):
  pair = PAIRS[0]
  f = reward.RewardModel().feature_fn(pair, tok)
  enc = lambda text: list(tok.encode(text))
  assert list(f["chosen"]) == [tok.bos_id, *enc(pair["prompt"]), *enc(pair["chosen"]),
                               tok.eos_id]
  assert list(f["rejected"]) == [tok.bos_id, *enc(pair["prompt"]), *enc(pair["rejected"]),
                                 tok.eos_id]
  assert list(f["inputs"]) == [*enc(pair["prompt"]), tok.eos_id]
  assert list(f["chosen_response"]) == [tok.bos_id, *enc(pair["chosen"]), tok.eos_id]
  n = len(enc(pair["chosen"]))
  cut = reward.RewardModel(max_len=n + 4).feature_fn(pair, tok)
  assert len(cut["chosen"]) == n + 4 and cut["chosen"][-1] == tok.eos_id
  assert list(cut["chosen"][-n - 1:-1]) == enc(pair["chosen"])      # the response is whole
  assert list(cut["chosen"][:3]) == [tok.bos_id, *enc(pair["prompt"])[-2:]]  # prompt's end
  short = reward.RewardModel(max_len=4).feature_fn(pair, tok)["chosen"]
  assert list(short) == [tok.bos_id, *enc(pair["chosen"])[:2], tok.eos_id]
  with pytest.raises(UserError, match="shakespeare_preferences, local_preferences"):
    reward.RewardModel().feature_fn({"prompt": "q", "response": "a"}, tok)
  with pytest.raises(UserError, match="feature_lengths"):
    reward.RewardModel().init_inputs({"chosen": 32, "rejected": 16})


@pytest.mark.parametrize("arch", list(PRESET))
def test_reward_is_read_at_the_last_real_token(tok, arch):
  """Changing the padding after a pair, or the tokens after its last real token, leaves
  its rewards as they were; changing the last real token changes them. Two pairs
  packed in one row score as each does alone."""
  objective, lengths = reward.RewardModel(), _lengths(arch)
  model = _model(tok.vocab_size, arch)
  params = _init(model, objective, lengths)
  rewards = jax.jit(lambda p, b: objective.pair_rewards(model, p, b))
  features = [objective.feature_fn(p, tok) for p in PAIRS]
  keys = ("chosen_response", "rejected_response") if arch == "encoder_decoder" else (
      "chosen", "rejected")
  alone = [rewards(params, _rows([f], lengths, "none")) for f in features]
  for got in alone:
    assert np.asarray(got[2])[0].tolist() == [True] + [False] * (lengths[keys[0]] - 1)
  padded = _rows(features[:1], lengths, "none")
  noisy = {k: v.copy() for k, v in padded.items()}
  for k in keys:
    pad = noisy[f"{k}_segment_ids"] == 0
    noisy[k][pad] = np.random.default_rng(0).integers(5, tok.vocab_size, pad.sum())
  last = {k: v.copy() for k, v in padded.items()}
  end = int(last[f"{keys[0]}_segment_ids"][0].sum()) - 1
  last[keys[0]][0, end] = tok.encode("k")[0]  # the chosen side's EOS becomes a letter
  base, after_noise, after_last = (np.asarray(rewards(params, b)[0])[0, 0]
                                   for b in (padded, noisy, last))
  assert base == after_noise and base != after_last
  packed = _rows(features, lengths)
  assert packed[keys[0]].shape[0] == 1  # both pairs in one row
  chosen, rejected, valid = (np.asarray(x)[0] for x in rewards(params, packed))
  assert valid[:3].tolist() == [True, True, False]
  for k, got in enumerate(alone):
    np.testing.assert_allclose([chosen[k], rejected[k]],
                               [np.asarray(got[0])[0, 0], np.asarray(got[1])[0, 0]], rtol=2e-5,
                               atol=1e-6)


def test_gradient_reaches_the_head_and_the_network(tok):
  objective, lengths = reward.RewardModel(margin=0.5), _lengths("decoder_only")
  model = _model(tok.vocab_size, "decoder_only")
  params = _init(model, objective, lengths)
  # The language model's parameters and the head: a warm start from an LM fits.
  plain = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                            np.zeros((1, L), np.int32)))["params"]
  assert set(params) == set(plain) | {"reward_head"}
  batch = _rows([objective.feature_fn(p, tok) for p in PAIRS], lengths)
  grads = jax.jit(jax.grad(lambda p: objective.loss_sums(model, p, batch)["loss"]))(params)
  norms = {k: float(np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(v))))
           for k, v in grads.items()}
  assert norms["reward_head"] > 0 and norms["embed"] > 0 and norms["decoder"] > 0, norms


def _write_pairs(folder, n, seed):
  """Pairs a tiny model can learn in a few dozen steps: the chosen answer is good."""
  rng = np.random.default_rng(seed)
  names = ["romeo", "juliet", "tybalt", "nurse", "friar", "paris", "mercutio", "capulet"]
  rows = []
  for _ in range(n):
    who = names[rng.integers(len(names))]
    rows.append({"prompt": f"how is {who}?\n", "chosen": f"{who} is well", "rejected":
                 f"{who} is dead"} if rng.random() < 0.5 else
                {"prompt": f"what of {who}?\n", "chosen": f"{who} lives", "rejected":
                 f"{who} dies"})
  folder.mkdir(parents=True, exist_ok=True)
  for split, part in (("train", rows[:-16]), ("validation", rows[-16:])):
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
  return rows


def test_debug_run_learns_and_score_prints_rewards(tmp_path, data_dir, capsys):
  source = str(tmp_path / "source")
  shutil.copytree(FIXTURE, source)
  folder = tmp_path / "pairs"
  rows = _write_pairs(folder, 96, seed=0)
  workdir = str(tmp_path / "reward")
  params = [f"DataConfig.data_dir={data_dir!r}", f"TrainConfig.init_from={source!r}",
            "DataConfig.dataset='local_preferences'", f"DataConfig.input_dir='{folder}'",
            "TrainConfig.num_steps=30", "TrainConfig.log_every=5", "TrainConfig.eval_every=30",
            "TrainConfig.checkpoint_every=30", "OptimizerConfig.peak_lr=0.01"]
  argv = ["train", "--gin_file=runs/reward_model_debug.gin", f"--workdir={workdir}"]
  assert cli.main(argv + [f"--gin_param={p}" for p in params]) == 0
  records = metrics_lib.read_metrics(workdir)
  train = [r for r in records if "loss" in r]
  assert train[-1]["step"] == 30 and any("eval_accuracy" in r for r in records)
  assert all(0 < r["pairs"] <= 8 * 2 for r in train)  # pairs, not tokens
  assert train[-1]["loss"] < np.log(2) - 0.2, [r["loss"] for r in train]
  model, trained, tokenizer = load_workdir(workdir)
  pairs = datasets.get_source("local_preferences", "train", data_dir, input_dir=str(folder))
  assert len(pairs) == len(rows) - 16  # the training pairs, rendered by the chat template
  scored = reward.RewardModel(max_len=64).score(
      model, trained, tokenizer, [(pairs[i]["prompt"], pairs[i][k]) for i in range(len(pairs))
                                  for k in ("chosen", "rejected")])
  accuracy = np.mean(scored[0::2] > scored[1::2])
  assert accuracy >= 0.8, accuracy  # chance is 0.5
  capsys.readouterr()
  assert cli.main(["score", f"--workdir={workdir}", "--text=romeo is well",
                   "--prompt=how is romeo?\n", "--response=romeo is well",
                   "--response=romeo is dead", "--sort"]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 3 and all(len(line.split()) >= 2 for line in out)
  values = [float(line.split()[0]) for line in out]
  assert values == sorted(values, reverse=True)
  assert cli.main(["score", f"--workdir={source}", "--text=hello"]) == 2
  assert "is not a reward model" in capsys.readouterr().err
