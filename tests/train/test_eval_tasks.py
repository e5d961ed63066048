"""TrainConfig.eval_tasks: perplexity and an lm-eval task at the eval cadence, logged with
the training metrics and equal to evaluating the checkpoint afterwards; bad entries stop
the run before it starts."""

import json
import os

import pytest

from llmjax.checkpoint.workdir import load_workdir
from llmjax.data import datasets
from llmjax.errors import UserError
from llmjax.eval import perplexity
from llmjax.testing.runs import debug_train
from llmjax.train import eval_tasks


def test_bad_entries_are_refused_with_the_form():
  assert eval_tasks.parse(["perplexity", "lm_eval:x", "lm_eval:y:5"]) == [
      ("perplexity", None, None), ("lm_eval", "x", 20), ("lm_eval", "y", 5)]
  for bad in ("ppl", "lm_eval", "lm_eval:x:many"):
    with pytest.raises(UserError, match="lm_eval:"):
      eval_tasks.parse([bad])


def test_a_bad_entry_stops_the_run_before_any_work(tmp_path, data_dir, capsys):
  workdir = str(tmp_path / "run")
  assert debug_train(workdir, data_dir, "TrainConfig.eval_tasks=['bleu']") == 2
  assert "'bleu' is not 'perplexity'" in capsys.readouterr().err
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


@pytest.mark.slow
def test_logged_with_the_metrics_and_equal_to_evaluating_the_checkpoint(tmp_path, data_dir):
  pytest.importorskip("lm_eval")
  workdir = str(tmp_path / "run")
  assert debug_train(workdir, data_dir, "TrainConfig.eval_task_docs=3",
                     "TrainConfig.eval_tasks=['perplexity', 'lm_eval:shakespeare_cloze:3']") == 0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  logged = {r["step"]: r for r in records if "eval_ppl_loss" in r}
  assert sorted(logged) == [3, 6]
  assert all("lm_eval/shakespeare_cloze/acc" in r for r in logged.values())
  model, params, tok = load_workdir(workdir)  # the step-6 checkpoint
  texts = list(datasets.iter_texts("shakespeare", "validation", data_dir=data_dir))[:3]
  direct = perplexity.text_perplexity(model, params, tok, texts)
  assert logged[6]["eval_ppl_loss"] == pytest.approx(direct["loss"], rel=1e-5)
  assert logged[6]["eval_ppl_bits_per_byte"] == pytest.approx(direct["bits_per_byte"], rel=1e-5)
