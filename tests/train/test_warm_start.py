"""`TrainConfig.init_from`: a new run starts from another workdir's parameters (a trained
run, or a Hugging Face model imported with `llmjax convert`)."""

import os

import jax
import numpy as np
import pytest

from llmjax import cli
from llmjax.checkpoint import manager as ckpt_lib
from llmjax.models.stack import stack_layers
from llmjax.testing.runs import debug_train as _train
from llmjax.train import metrics as metrics_lib
from llmjax.train import warm_start


def _params(workdir):
  params, meta = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints")).restore_params()
  return jax.tree.map(np.asarray, params), meta


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_init_from_a_trained_run(tmp_path, data_dir):
  source, target = str(tmp_path / "source"), str(tmp_path / "target")
  assert _train(source, data_dir, "TrainConfig.num_steps=2") == 0
  # A zero learning rate makes the fine-tuned params exactly the source's.
  assert _train(target, data_dir, f"TrainConfig.init_from={source!r}",
                "TrainConfig.num_steps=2", "OptimizerConfig.peak_lr=0.0") == 0
  (p_src, meta_src), (p_tgt, meta_tgt) = _params(source), _params(target)
  _assert_trees_equal(p_src, p_tgt)
  assert meta_tgt["tokenizer"] == meta_src["tokenizer"]  # the source's tokenizer was reused
  steps = [r["step"] for r in metrics_lib.read_metrics(target) if "loss" in r]
  assert steps == [2]  # a fresh run from step 0, not a resume of the source


def test_init_from_rejects_a_different_model(tmp_path, data_dir, capsys):
  source, target = str(tmp_path / "source"), str(tmp_path / "target")
  assert _train(source, data_dir, "TrainConfig.num_steps=1") == 0
  capsys.readouterr()
  assert _train(target, data_dir, f"TrainConfig.init_from={source!r}",
                "get_preset.embed_dim=48") == 2
  err = capsys.readouterr().err
  assert "init_from" in err and "train.model" in err
  assert not os.path.exists(os.path.join(target, "checkpoints"))


def test_init_from_missing_workdir(tmp_path, data_dir, capsys):
  missing = str(tmp_path / "nope")
  assert _train(str(tmp_path / "t"), data_dir, f"TrainConfig.init_from={missing!r}") == 2
  assert "no checkpoints/ folder" in capsys.readouterr().err


def test_fine_tune_an_imported_hf_model(tmp_path, data_dir):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  tokenizers = pytest.importorskip("tokenizers")
  torch.manual_seed(0)
  words = ["the", "and", "to", "of", "my", "i", "you", "a"]
  cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(words) + 2,
                                n_positions=32, bos_token_id=0, eos_token_id=0)
  transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "hf")
  vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "hf" / "tokenizer.json"))
  imported = str(tmp_path / "imported")
  assert cli.main(["convert", f"--from_hf={tmp_path / 'hf'}", f"--workdir={imported}",
                   "--no_scan_layers"]) == 0

  tuned = str(tmp_path / "tuned")
  # No `train.model`: the imported config (unscanned layers, its own vocabulary) is used.
  assert _train(tuned, data_dir, f"TrainConfig.init_from={imported!r}", "train.model=None",
                "DataConfig.seq_len=32", "TrainConfig.num_steps=2",
                "OptimizerConfig.peak_lr=0.0") == 0
  (p_hf, _), (p_tuned, meta) = _params(imported), _params(tuned)
  assert meta["model_config"]["vocab_size"] == len(words) + 2
  _assert_trees_equal(p_hf, p_tuned)
  assert os.path.exists(os.path.join(tuned, "tokenizer.json"))


def test_layouts_convert_between_scanned_and_unscanned():
  rng = np.random.default_rng(0)
  unscanned = {"decoder": {f"layers_{i}": {"w": rng.normal(size=(2, 3)).astype(np.float32)} for i in range(3)},
               "embed": {"embedding": rng.normal(size=(5, 2)).astype(np.float32)}}
  scanned = stack_layers(unscanned)
  _assert_trees_equal(warm_start._match_layout(unscanned, scanned), scanned)
  _assert_trees_equal(warm_start._match_layout(scanned, unscanned), unscanned)


def test_finetune_gin_requires_init_from(tmp_path, capsys):
  workdir = tmp_path / "ft"
  assert cli.main(["train", "--gin_file=runs/finetune.gin", "--gin_file=data/shakespeare.gin",
                   f"--workdir={workdir}"]) == 2
  assert "TrainConfig.init_from must be set" in capsys.readouterr().err
  assert not workdir.exists()
