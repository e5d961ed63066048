"""`llmjax eval --tasks`: lm-eval tasks on the checkpoint equal a direct `simple_evaluate`
with the llmjax backend; `--decontaminate` counts planted training text per task and
re-aggregates the rest (mean, perplexity, BLEU, chrF) as an independent computation does;
unknown tasks and non-causal models stop with one message."""

import glob
import io
import json
import math
import os
import struct
from contextlib import redirect_stdout

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager

from llmjax import cli
from llmjax.data import datasets
from llmjax.eval import tasks as task_lib
from llmjax.eval.lm_eval_backend import LlmjaxLM
from llmjax.testing.runs import debug_train

# Modern sentences: every run of 13 words holds a word no play has.
CLEAN = [
    ("the quantum router recompiled seventeen kubernetes clusters while the espresso "
     "machine downloaded its firmware update overnight"),
    ("my smartphone uploaded forty gigabytes of holiday selfies to the cloud backup service "
     "before the laptop battery died"),
    ("our startup pivoted from blockchain sneakers to machine learning podcasts after the "
     "venture capital email arrived"),
    ("the javascript bundler minified every stylesheet and the browser cache invalidated "
     "itself during the livestream"),
    ("a drone delivered pizza to the datacenter where engineers debugged the microservice "
     "latency dashboard all weekend"),
]
PLANTED = (1, 4, 6)  # positions of the training passages among the 8 documents


def _eval(*argv):
  out = io.StringIO()
  with redirect_stdout(out):
    code = cli.main(["eval", *argv])
  return code, out.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
  """A 1-step debug run (decoder-only, trained on shakespeare's train split)."""
  workdir = str(tmp_path_factory.mktemp("eval_tasks") / "run")
  assert debug_train(workdir, data_dir, "TrainConfig.num_steps=1") == 0
  return workdir


def _scalars(workdir) -> dict:
  """{tag: value} of every scalar in the workdir's TensorBoard event files."""
  from tensorboardX.proto import event_pb2

  out = {}
  for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):  # TFRecords: length, its crc, the event, its crc
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      out.update({v.tag: v.simple_value for v in event.summary.value})
  return out


def test_tasks_equal_simple_evaluate_with_the_backend(run, data_dir, tmp_path):
  names = ["shakespeare_cloze", "shakespeare_speaker"]
  output = str(tmp_path / "r.json")
  code, text = _eval(f"--workdir={run}", f"--tasks={','.join(names)}", "--limit=6",
                     "--no_perplexity", f"--output={output}")
  assert code == 0
  with open(output) as f:
    result = json.load(f)
  assert sorted(result["tasks"]) == sorted(f"lm_eval/{t}" for t in names)
  assert result["config"]["tasks"] == names and result["config"]["limit"] == 6
  folder = task_lib.prepare(str(tmp_path / "tasks"), data_dir=data_dir, tasks=names)
  direct = lm_eval.simple_evaluate(model=LlmjaxLM(workdir=run), tasks=names, limit=6,
                                   task_manager=TaskManager(include_path=folder))
  scalars = _scalars(run)
  for task in names:
    expected = {k.replace(",none", ""): v for k, v in direct["results"][task].items()
                if "," in k}
    ours = result["tasks"][f"lm_eval/{task}"]
    assert set(expected) >= {"acc", "acc_stderr"}
    assert ours == expected | {"examples": 6}
    assert scalars[f"eval/lm_eval/{task}/acc"] == pytest.approx(ours["acc"])
    assert f"lm_eval/{task}" in text
  assert f"{result['tasks']['lm_eval/shakespeare_cloze']['perplexity']:12.6g}" in text
  assert "perplexity/" not in text


def _write_task(folder, name, docs, body):
  data = os.path.join(folder, f"{name}.jsonl")
  with open(data, "w") as f:
    f.writelines(json.dumps(d) + "\n" for d in docs)
  with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
    f.write(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data}\ntest_split: test\n{body}")


def _planted_tasks(folder, data_dir):
  """Three tasks (multiple choice, loglikelihood, generation) over the same 8 documents,
  3 of them passages of the training split."""
  words = next(iter(datasets.iter_texts("shakespeare", "train", data_dir=data_dir))).split()
  planted = [" ".join(words[k:k + 16]) for k in (0, 200, 400)]
  texts = list(CLEAN)
  for i, passage in zip(PLANTED, planted):
    texts.insert(i, passage)
  docs = [{"text": t, "choices": ["apple", "river", "castle", "moon"], "gold": i % 4,
           "word": "moon", "planted": i in PLANTED} for i, t in enumerate(texts)]
  _write_task(folder, "planted_choice", docs,
              "output_type: multiple_choice\ndoc_to_text: \"{{text}}\\nAnswer:\"\n"
              "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{gold}}\"\n"
              "metric_list:\n  - metric: acc\n    aggregation: mean\n")
  _write_task(folder, "planted_cloze", docs,
              "output_type: loglikelihood\ndoc_to_text: \"{{text}}\"\n"
              "doc_to_target: \" {{word}}\"\nmetric_list:\n  - metric: perplexity\n"
              "    aggregation: perplexity\n")
  _write_task(folder, "planted_gen", docs,
              "output_type: generate_until\ndoc_to_text: \"{{text}}\\nSay:\"\n"
              "doc_to_target: \" {{word}} and {{choices[0]}}\"\n"
              "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n"
              "metric_list:\n  - metric: bleu\n    aggregation: bleu\n"
              "  - metric: chrf\n    aggregation: chrf\n")
  return ["planted_choice", "planted_cloze", "planted_gen"]


def test_decontaminate_counts_planted_examples_and_reaggregates_the_rest(run, data_dir,
                                                                        tmp_path):
  import sacrebleu

  folder = str(tmp_path / "mine")
  os.makedirs(folder)
  names = _planted_tasks(folder, data_dir)
  output = str(tmp_path / "r.json")
  code, text = _eval(f"--workdir={run}", f"--tasks={','.join(names)}", "--limit=8",
                     f"--include_path={folder}", "--decontaminate", "--max_docs=1",
                     f"--output={output}")
  assert code == 0
  with open(output) as f:
    tasks = json.load(f)["tasks"]
  assert "perplexity/shakespeare/validation" in tasks  # both kinds of rows, one table each
  assert text.count("share a 13-gram with shakespeare's training split") == 4
  for name in names:
    assert tasks[f"lm_eval/{name}"]["contaminated"] == len(PLANTED)
    assert tasks[f"lm_eval/{name}"]["examples"] == 8
  direct = lm_eval.simple_evaluate(model=LlmjaxLM(workdir=run), tasks=names, limit=8,
                                   task_manager=TaskManager(include_path=folder),
                                   bootstrap_iters=0)  # per-sample values only
  clean = {n: [s for s in direct["samples"][n] if not s["doc"]["planted"]] for n in names}
  assert [len(v) for v in clean.values()] == [8 - len(PLANTED)] * 3
  choice, cloze, gen = (tasks[f"lm_eval/{n}"] for n in names)
  assert choice["acc"] == direct["results"]["planted_choice"]["acc,none"]
  assert choice["clean_acc"] == pytest.approx(np.mean([s["acc"] for s in clean[names[0]]]),
                                              abs=1e-12)
  assert cloze["clean_perplexity"] == pytest.approx(
      math.exp(-np.mean([s["perplexity"] for s in clean[names[1]]])), rel=1e-9)
  refs, preds = zip(*(s["bleu"] for s in clean[names[2]]))
  assert gen["clean_bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
  assert gen["clean_chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)


def test_unknown_tasks_and_nothing_to_do_are_one_message(run, tmp_path, capsys):
  code, _ = _eval(f"--workdir={run}", "--tasks=shakespeare_cloze,no_such_task",
                  "--no_perplexity", f"--output={tmp_path / 'r.json'}")
  err = capsys.readouterr().err
  assert code == 2 and "unknown lm-eval task(s) ['no_such_task']" in err
  assert "shakespeare_speaker, shakespeare_cloze, num2words_en_fr" in err
  code, _ = _eval(f"--workdir={run}", "--no_perplexity", f"--output={tmp_path / 'r.json'}")
  assert code == 2 and "--tasks=T1,T2" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "r.json")


@pytest.mark.slow
def test_an_encoder_only_run_is_refused_before_any_work(tmp_path, data_dir, capsys):
  workdir = str(tmp_path / "mlm")
  assert debug_train(workdir, data_dir, "TrainConfig.num_steps=1",
                     gin_file="runs/mlm_pretrain_debug.gin") == 0
  code, _ = _eval(f"--workdir={workdir}", "--tasks=shakespeare_cloze",
                  f"--output={tmp_path / 'r.json'}")
  err = capsys.readouterr().err
  assert code == 2 and "decoder-only" in err and "encoder_only" in err
  assert "Drop --tasks" in err and not os.path.exists(tmp_path / "r.json")


def test_prepare_draws_test_docs_from_another_split_on_request(data_dir, tmp_path):
  """docs_from='train' (benchmarks: more documents) writes train-split numbers as the test
  file, none of them the test split's; few-shot examples stay validation's."""
  def read(folder, split):
    with open(os.path.join(folder, f"num2words_en_fr.{split}.jsonl")) as f:
      return [json.loads(line) for line in f]
  test = task_lib.prepare(str(tmp_path / "test"), data_dir=data_dir, limit=None,
                          tasks=["num2words_en_fr"])
  train = task_lib.prepare(str(tmp_path / "train"), data_dir=data_dir, limit=100,
                           tasks=["num2words_en_fr"], docs_from="train")
  held_out = {d["en"] for d in read(test, "test")}
  drawn = [d["en"] for d in read(train, "test")]
  assert len(drawn) == 100 > len(held_out) and not held_out & set(drawn)
  assert read(train, "validation") == read(test, "validation")
