"""DPO through `llmjax train` (runs/dpo_debug.gin from a checkpoint): the implicit reward
accuracy rises on the training pairs, the reference in the checkpoint is bitwise the
init_from parameters, a reference precomputed in one pass from a workdir gives the same
steps, and a reference workdir with another tokenizer or vocabulary is refused. The
encoder-decoder debug run (runs/dpo_encdec_debug.gin, t5-tiny from its init) starts at
log 2 and finishes with finite metrics, and its workdir precomputes a reference table."""

import json
import os
import shutil

import numpy as np
import pytest

from llmjax import cli
from llmjax.checkpoint import manager as ckpt_lib
from llmjax.checkpoint import workdir as workdir_lib
from llmjax.data import tokenizer as tokenizer_lib
from llmjax.errors import UserError
from llmjax.objectives import preference
from llmjax.objectives.dpo import DPO, KEYS
from llmjax.testing import runs
from llmjax.train import dpo_reference
from llmjax.train import metrics as metrics_lib

GOOD = ["good morrow", "a good day", "good night", "so good"]
BAD = ["ill met", "a bad day", "foul night", "so ill"]


def _preference_files(folder):
  """A systematic preference (answers with 'good' over 'ill'/'bad'), train + validation."""
  folder.mkdir()
  for split, prompts in (("train", ["Say: ", "Reply: ", "Answer: ", "Speak: "]),
                         ("validation", ["Tell: "])):
    lines = [json.dumps({"prompt": p, "chosen": g, "rejected": b})
             for p in prompts for g, b in zip(GOOD, BAD)]
    (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
  return str(folder)


def _dpo_run(workdir, data_dir, source, prefs, *params):
  argv = ["train", "--gin_file=runs/dpo_debug.gin", f"--workdir={workdir}"]
  bindings = [f"DataConfig.data_dir={data_dir!r}", f"TrainConfig.init_from={source!r}",
              "DataConfig.dataset='local_preferences'", f"DataConfig.input_dir={prefs!r}",
              "TrainConfig.num_steps=30", "TrainConfig.log_every=5", "TrainConfig.eval_every=30",
              "TrainConfig.checkpoint_every=30", "OptimizerConfig.peak_lr=0.01", "DPO.beta=0.5",
              *params]
  assert cli.main(argv + [f"--gin_param={p}" for p in bindings]) == 0
  return [r for r in metrics_lib.read_metrics(workdir) if "loss" in r]


@pytest.mark.slow
def test_debug_run_raises_reward_accuracy_and_keeps_the_reference(tmp_path, data_dir,
                                                                    fixture_run):
  prefs = _preference_files(tmp_path / "prefs")
  train = _dpo_run(str(tmp_path / "dpo"), data_dir, fixture_run, prefs)
  assert [r["step"] for r in train][-1] == 30 and all(r["pairs"] > 0 for r in train)
  assert train[-1]["loss"] < np.log(2.0) - 0.2, [r["loss"] for r in train]
  assert train[-1]["reward_accuracy"] > max(0.9, train[0]["reward_accuracy"])
  assert train[-1]["reward_margin"] > 0
  source = ckpt_lib.CheckpointManager(os.path.join(fixture_run, "checkpoints")).read()[0]
  state = ckpt_lib.CheckpointManager(str(tmp_path / "dpo" / "checkpoints")).read(30)[0]
  ref, start = runs.param_leaves(state["frozen"]["reference"]), runs.param_leaves(
      source["params"])
  assert ref.keys() == start.keys()
  for key, value in start.items():  # bitwise the init_from parameters after 30 steps
    np.testing.assert_array_equal(ref[key], value, err_msg=key)

  # The reference in one pass over the data: the run reading it takes the same steps.
  table = dpo_reference.precompute(fixture_run, str(tmp_path / "ref.json"),
                                   objective=DPO(max_len=64), dataset="local_preferences",
                                   data_dir=data_dir, input_dir=prefs, policy=fixture_run)
  lengths = ", ".join(f"'{k}': 64" for k in KEYS + ("chosen_ref", "rejected_ref"))
  cached = _dpo_run(str(tmp_path / "cached"), data_dir, fixture_run, prefs,
                    f"DPO.precomputed_reference={table!r}", "TrainConfig.stop_at_step=10",
                    f"DataConfig.feature_lengths={{{lengths}}}")
  for want, got in zip(train[:2], cached):
    for key in ("loss", "reward_margin", "grad_norm"):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-6, err_msg=key)
    # Near policy = reference every margin is ~0, so a pair whose margin is at rounding
    # level may land on either side: the accuracies agree up to one pair.
    assert abs(got["reward_accuracy"] - want["reward_accuracy"]) <= 1.0 / want["pairs"] + 1e-6


def test_a_reference_with_another_tokenizer_or_vocabulary_is_refused(fixture_run, tmp_path):
  tok = tokenizer_lib.train_tokenizer(GOOD + BAD, str(tmp_path / "char"), model_type="char",
                                      vocab_size=None)
  policy = str(tmp_path / "policy")
  shutil.copytree(fixture_run, policy)
  model, _, ref_tok = workdir_lib.load_workdir(fixture_run)
  dpo_reference.check_same_vocabulary(fixture_run, model, ref_tok, policy)  # the same: fine
  with open(os.path.join(policy, "tokenizer.model"), "wb") as f:
    f.write(tok.serialized())
  with pytest.raises(UserError, match="another tokenizer"):
    dpo_reference.check_same_vocabulary(fixture_run, model, ref_tok, policy)
  bigger = model.clone(config=model.config.replace(vocab_size=model.config.vocab_size + 8))
  with pytest.raises(UserError, match="vocabulary"):
    dpo_reference.check_same_vocabulary(fixture_run, bigger, ref_tok, fixture_run)


@pytest.mark.slow
def test_encdec_debug_run_starts_at_log_2_and_finishes(tmp_path, data_dir):
  workdir = str(tmp_path / "encdec")
  argv = ["train", "--gin_file=runs/dpo_encdec_debug.gin", f"--workdir={workdir}",
          f"--gin_param=DataConfig.data_dir={data_dir!r}", "--gin_param=TrainConfig.log_every=1"]
  assert cli.main(argv) == 0
  records = metrics_lib.read_metrics(workdir)
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == list(range(1, 7))
  np.testing.assert_allclose(train[0]["loss"], np.log(2.0), rtol=1e-6)  # policy = reference
  assert train[0]["reward_margin"] == 0 and all(r["pairs"] > 0 for r in train)
  assert any("eval_loss" in r for r in records)
  for record in records:
    values = [v for v in record.values() if isinstance(v, float)]
    assert values and np.all(np.isfinite(values)), record

  # The reference in one pass from this (encoder-decoder) workdir.
  prefs = _preference_files(tmp_path / "prefs")
  path = dpo_reference.precompute(workdir, str(tmp_path / "ref.json"), objective=DPO(
      max_len=64), dataset="local_preferences", data_dir=data_dir, input_dir=prefs,
      policy=workdir, log=lambda _: None)
  meta, table = preference.load_table(path)
  assert meta["arch"] == "encoder_decoder" and len(table) == 20  # 16 train + 4 validation
  assert all(np.isfinite(v).all() and max(v) < 0 for v in table.values())
