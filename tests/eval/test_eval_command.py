"""`llmjax eval`: the results file, TensorBoard scalars and the printed table agree with the
library's perplexity; bad input stops with one message and writes nothing."""

import glob
import io
import json
import os
from contextlib import redirect_stdout

import pytest

from llmjax import cli
from llmjax.checkpoint.workdir import load_workdir
from llmjax.data import datasets
from llmjax.eval import perplexity


def _eval(*argv):
  out = io.StringIO()
  with redirect_stdout(out):
    code = cli.main(["eval", *argv])
  return code, out.getvalue()


def test_eval_writes_json_and_tensorboard_matching_the_library(fixture_run, data_dir, tmp_path):
  output = str(tmp_path / "res.json")
  code, text = _eval(f"--workdir={fixture_run}", "--dataset=shakespeare",
                     f"--data_dir={data_dir}", "--max_docs=3", "--context=16", "--stride=8",
                     f"--output={output}", "--gin_param=EvalConfig.batch_size=5")
  assert code == 0
  with open(output) as f:
    result = json.load(f)
  assert result["step"] == 3 and result["config"]["batch_size"] == 5
  metrics = result["tasks"]["perplexity/shakespeare/validation"]
  model, params, tok = load_workdir(fixture_run)
  texts = list(datasets.iter_texts("shakespeare", "validation", data_dir=data_dir))[:3]
  direct = perplexity.text_perplexity(model, params, tok, texts, context=16, stride=8)
  assert metrics["loss"] == pytest.approx(direct["loss"], rel=1e-6)
  assert metrics["tokens"] == sum(len(tok.encode(t)) for t in texts)
  assert f"{metrics['perplexity']:9.3f}" in text
  assert glob.glob(os.path.join(fixture_run, "tensorboard", "events.out.tfevents.*"))
  # The default splits each batch over all 8 (simulated) devices; one device agrees.
  code, _ = _eval(f"--workdir={fixture_run}", "--dataset=shakespeare", "--devices=1",
                  f"--data_dir={data_dir}", "--max_docs=3", "--context=16", "--stride=8",
                  f"--output={output}", "--gin_param=EvalConfig.batch_size=5")
  with open(output) as f:
    single = json.load(f)["tasks"]["perplexity/shakespeare/validation"]
  assert code == 0 and single["tokens"] == metrics["tokens"]
  assert single["loss"] == pytest.approx(metrics["loss"], rel=1e-6)


def test_bad_input_is_one_message(fixture_run, tmp_path, capsys):
  code, _ = _eval(f"--workdir={tmp_path}")
  assert code == 2 and "has no checkpoints/" in capsys.readouterr().err
  code, _ = _eval(f"--workdir={fixture_run}", "--dataset=shakespeare",
                  "--output=/proc/no/such/dir/r.json")
  assert code == 2 and "cannot write the results" in capsys.readouterr().err
  code, _ = _eval(f"--workdir={fixture_run}", "--dataset=shakespeare", "--devices=9")
  assert code == 2 and "only 8 device(s)" in capsys.readouterr().err
  code, _ = _eval(f"--workdir={fixture_run}", "--dataset=nope")
  assert code == 2 and "known datasets are" in capsys.readouterr().err
  code, _ = _eval(f"--workdir={fixture_run}")  # no operative config: which dataset?
  assert code == 2 and "--dataset=NAME" in capsys.readouterr().err
  assert not os.path.exists(os.path.join(fixture_run, "eval")) or not os.listdir(
      os.path.join(fixture_run, "eval"))


@pytest.mark.slow
def test_an_encoder_decoder_run_is_scored_on_its_own_pairs(tmp_path, data_dir):
  from llmjax.testing.runs import debug_train

  workdir = str(tmp_path / "t5")
  assert debug_train(workdir, data_dir, "TrainConfig.num_steps=2",
                     gin_file="runs/translate_num2words_debug.gin") == 0
  code, _ = _eval(f"--workdir={workdir}", "--max_docs=6")  # dataset from the run
  assert code == 0
  files = glob.glob(os.path.join(workdir, "eval", "*.json"))
  with open(files[0]) as f:
    result = json.load(f)
  (task, metrics), = result["tasks"].items()
  assert task == "perplexity/num2words_translate/en-fr-1000/validation"
  assert result["arch"] == "encoder_decoder" and result["step"] == 2
  model, params, tok = load_workdir(workdir)
  source = datasets.get_source("num2words_translate/en-fr-1000", "validation", data_dir)
  pairs = [(source[i]["en"], source[i]["fr"]) for i in range(6)]
  direct = perplexity.pair_perplexity(model, params, tok, pairs, start_id=tok.bos_id)
  assert metrics["loss"] == pytest.approx(direct["loss"], rel=1e-6)
  assert metrics["tokens"] == sum(len(tok.encode(t)) + 1 for _, t in pairs)


def test_decontaminate_flags_training_documents_and_scores_the_rest(tmp_path, data_dir):
  from llmjax.testing.runs import debug_train

  workdir = str(tmp_path / "run")
  assert debug_train(workdir, data_dir, "TrainConfig.num_steps=1") == 0
  results = {}
  for split in ("train", "validation"):
    out = str(tmp_path / f"{split}.json")
    code, text = _eval(f"--workdir={workdir}", f"--split={split}", "--max_docs=4",
                       "--decontaminate", f"--output={out}")
    assert code == 0 and "share a 13-gram with shakespeare's training split" in text
    with open(out) as f:
      (results[split],) = json.load(f)["tasks"].values()
  assert results["train"]["contaminated"] == 4 and "clean_loss" not in results["train"]
  val = results["validation"]
  assert val["contaminated"] < 4 and val["examples"] == 4
  assert (val["clean_loss"] == val["loss"]) == (val["contaminated"] == 0)
