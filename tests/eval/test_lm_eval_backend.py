"""The lm-eval backend against lm-eval's own `hf` backend on the same models (exported with
`llmjax convert --to_hf`), its batching and sharding, the analytic uniform byte model, and
the `llmjax lm-eval` passthrough on a local task."""

import json
import math
import os

import jax
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's hf backend needs it

from lm_eval.api.instance import Instance

from llmjax import cli
from llmjax.decode import generate as gen_lib
from llmjax.eval.lm_eval_backend import LlmjaxLM
from llmjax.testing.runs import debug_train

PRESETS = ("tiny", "tiny-llama")
LOGLIKELIHOOD = [("ROMEO: But soft", " what light"), ("To be", ", or not to be"),
                 ("", "Hello there"), ("O " * 40, "and the rest"), ("What", "?")]
# Multiple-choice style: contexts repeated with several continuations (one token, several,
# and one whose request is long enough to be truncated).
CHOICES = [(c, k) for c in ("Who speaks this line?\nAnswer:", "O " * 70, "x")
           for k in (" Romeo", " the Nurse of Verona", "!", " JULIET and ROMEO")] + [
               ("Q:", " a"), ("Q:", " b")]
ROLLING = ["Now is the winter of our discontent, made glorious summer " * 3, "short", "x"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """{preset: (workdir, hf_dir)}: a 2-step debug run of each, and its --to_hf export."""
  root = tmp_path_factory.mktemp("lm_eval")
  out = {}
  for preset in PRESETS:
    wd, hf = str(root / preset), str(root / f"{preset}_hf")
    assert debug_train(wd, str(root / "tfds"), "TrainConfig.num_steps=2",
                       f"get_preset.name={preset!r}") == 0
    assert cli.main(["convert", f"--workdir={wd}", f"--to_hf={hf}"]) == 0
    out[preset] = (wd, hf)
  return out


def _requests(kind, args):
  return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_request_equals_the_hf_backend(exported, preset):
  from lm_eval.models.huggingface import HFLM

  wd, hf_dir = exported[preset]
  ours = LlmjaxLM(workdir=wd, batch_size=3)
  hf = HFLM(pretrained=hf_dir, device="cpu", batch_size=3, max_length=ours.max_length)
  mine = ours.loglikelihood(_requests("loglikelihood", LOGLIKELIHOOD))
  theirs = hf.loglikelihood(_requests("loglikelihood", LOGLIKELIHOOD))
  for (a, greedy_a), (b, greedy_b) in zip(mine, theirs):
    assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
  rolling = [(t,) for t in ROLLING]
  np.testing.assert_allclose(ours.loglikelihood_rolling(_requests("loglikelihood_rolling",
                                                                  rolling)),
                             hf.loglikelihood_rolling(_requests("loglikelihood_rolling",
                                                                rolling)), atol=1e-4)
  gen = [(c, {"until": ["\n", "e"], "max_gen_toks": 8}) for c in ("ROMEO:", "To be", "O")]
  assert ours.generate_until(_requests("generate_until", gen)) == hf.generate_until(
      _requests("generate_until", gen))


def test_results_do_not_depend_on_batch_order_or_devices(exported):
  wd, _ = exported["tiny"]
  reqs = _requests("loglikelihood", LOGLIKELIHOOD)
  base = LlmjaxLM(workdir=wd, batch_size=1, devices=1).loglikelihood(reqs)
  sharded = LlmjaxLM(workdir=wd, batch_size=5, devices=8)
  assert jax.device_count() == 8 and sharded._mesh is not None
  for a, b in zip(base, sharded.loglikelihood(reqs[::-1])[::-1]):
    assert a[0] == pytest.approx(b[0], abs=1e-5) and a[1] == b[1]


@pytest.mark.parametrize("preset", PRESETS)
def test_shared_contexts_score_as_the_hf_backend_and_the_unshared_path(exported, preset):
  """Repeated contexts run once with their continuations in one row, several questions
  per row (and a question longer than the context split in two), give what a whole
  forward pass per request gives (the `hf` backend's, and this backend's own with
  share_contexts=false), on 1 and 8 devices."""
  from lm_eval.models.huggingface import HFLM

  wd, hf_dir = exported[preset]
  reqs = _requests("loglikelihood", CHOICES)
  shared = LlmjaxLM(workdir=wd, batch_size=2, devices=1, share_contexts="true")
  layout = []   # questions per row, as `_tree_chunk` receives them
  chunk = shared._tree_chunk
  shared._tree_chunk = lambda rows, rows_of, *a: (layout.extend(rows_of), chunk(rows, rows_of, *a))
  shared.loglikelihood(reqs)
  contexts = [context for row in layout for context, _ in row]
  assert max(map(len, layout)) >= 2                     # packed
  assert len(contexts) > len(set(contexts))             # the 70-token question: split
  assert sorted(i for row in layout for _, members in row for i in members) == list(
      range(len(reqs)))
  shared.truncated = 0
  whole = LlmjaxLM(workdir=wd, batch_size=2, devices=1, share_contexts="false")
  sharded = LlmjaxLM(workdir=wd, batch_size=3, devices=8, share_contexts="true")
  hf = HFLM(pretrained=hf_dir, device="cpu", batch_size=4, max_length=shared.max_length)
  ours, theirs = shared.loglikelihood(reqs), hf.loglikelihood(reqs)
  assert shared.truncated == 4 and len({r.args[0] for r in reqs}) == 4
  for a, b, c, d in zip(ours, theirs, whole.loglikelihood(reqs),
                        sharded.loglikelihood(reqs[::-1])[::-1]):
    assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]
    assert a[0] == pytest.approx(c[0], abs=2e-5) and a[1] == c[1]
    assert a[0] == pytest.approx(d[0], abs=2e-5) and a[1] == d[1]


def test_a_soft_prompt_model_scores_whole_rows(exported):
  """A prompt-tuned model's soft prompt goes before each row, so its requests are never
  packed: share_contexts=true gives what one whole row per request gives."""
  from flax import linen as nn
  from flax import traverse_util

  from llmjax.checkpoint.workdir import load_workdir
  from llmjax.peft.model import PeftModel
  from llmjax.peft.prompt_tuning import PromptTuningConfig
  base, params, tok = load_workdir(exported["tiny"][0])
  model = PeftModel(base, [PromptTuningConfig(length=3)])
  full = nn.meta.unbox(model.init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))["params"])
  flat = traverse_util.flatten_dict
  full = traverse_util.unflatten_dict({**flat(full), **flat(params)})  # trained base, new prompt
  run = lambda share: LlmjaxLM(model=model, params=full, tokenizer=tok, batch_size=2,
                               devices=1, share_contexts=share).loglikelihood(
                                   _requests("loglikelihood", CHOICES[:8]))
  for a, b in zip(run("true"), run("false")):
    assert a[0] == pytest.approx(b[0], abs=2e-5) and a[1] == b[1]
  # generation: the soft prompt goes before the shared prefix, prefilled once per batch
  gen = [(f"Who speaks this line? {c}", {"until": ["\n"], "max_gen_toks": 6})
         for c in ("ROMEO:", "To be", "O", "Now is the")]
  sharing = LlmjaxLM(model=model, params=full, tokenizer=tok, batch_size=4, devices=1)
  prefilled = []
  prefill = gen_lib.prefill
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(gen_lib, "prefill", lambda *a: prefilled.append(a[-1]) or prefill(*a))
    texts = sharing.generate_until(_requests("generate_until", gen))
  assert prefilled[0].shape[1] >= 5        # BOS and the question's tokens
  assert texts == LlmjaxLM(model=model, params=full, tokenizer=tok, batch_size=4, devices=1,
                           share_contexts="false").generate_until(
                               _requests("generate_until", gen))


def test_packing_fills_rows_largest_first_then_smallest():
  from llmjax.eval.lm_eval_backend import _pack
  sizes = [60, 30, 20, 10, 5]
  assert _pack(sizes, 64) == [[0], [1, 4, 3], [2]]
  rng = np.random.default_rng(0)
  sizes = sorted(rng.integers(1, 65, 200).tolist(), reverse=True)
  rows = _pack(sizes, 64)
  assert sorted(i for row in rows for i in row) == list(range(200))
  assert all(sum(sizes[i] for i in row) <= 64 for row in rows)


class _Bytes:
  """A byte-level tokenizer (token = byte value), for the analytic check."""
  eos_id = bos_id = 0
  vocab_size = 256

  def encode(self, text):
    return list(text.encode("utf-8"))

  def decode(self, ids):
    return bytes(ids).decode("utf-8", errors="replace")


def _write_task(folder, name, records, yaml_body):
  data = os.path.join(folder, f"{name}.jsonl")
  with open(data, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
    f.write(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data}\ntest_split: test\n{yaml_body}")


def test_a_uniform_byte_model_gives_8_bits_per_byte_exactly(tmp_path):
  from lm_eval.tasks import TaskManager

  from llmjax.testing.reference import preset_model

  model, params = preset_model("tiny", vocab_size=256, max_len=32)
  zeros = jax.tree.map(np.zeros_like, params)
  lm = LlmjaxLM(model=model, params=zeros, tokenizer=_Bytes(), add_bos_token=False,
                batch_size=4)
  texts = ["The quick brown fox jumps over the lazy dog. " * 3, "short one", "é ü ñ — ok"]
  _write_task(str(tmp_path), "bytes_ppl", [{"text": t} for t in texts],
              "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
              "metric_list:\n  - metric: bits_per_byte\n  - metric: byte_perplexity\n")
  out = lm_eval.simple_evaluate(model=lm, tasks=["bytes_ppl"],
                                task_manager=TaskManager(include_path=str(tmp_path)))
  metrics = out["results"]["bytes_ppl"]
  assert metrics["bits_per_byte,none"] == pytest.approx(8.0, abs=1e-6)
  assert metrics["byte_perplexity,none"] == pytest.approx(256.0, rel=1e-6)
  assert math.isfinite(metrics["bits_per_byte,none"])


@pytest.mark.slow
def test_offline_tasks_through_the_passthrough_match_the_hf_backend(exported, tmp_path,
                                                                    monkeypatch, capsys):
  from llmjax.eval import tasks

  wd, hf_dir = exported["tiny"]
  folder = tasks.prepare(str(tmp_path / "tasks"), data_dir=_tfds(wd), limit=6)
  monkeypatch.setenv("LLMJAX_LM_EVAL_TASKS", folder)
  results = {}
  for name, args in (("llmjax", f"workdir={wd}"), ("hf", f"pretrained={hf_dir}")):
    out = str(tmp_path / name)
    assert cli.main(["lm-eval", "--model", name, "--model_args", args, "--tasks",
                     ",".join(tasks.TASKS), "--output_path", out, "--device", "cpu",
                     "--batch_size", "4"]) == 0
    (path,) = [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs
               if f.startswith("results")]
    with open(path) as f:
      results[name] = json.load(f)["results"]
  for task in tasks.TASKS:
    mine = {k: v for k, v in results["llmjax"][task].items() if "," in k}
    theirs = {k: v for k, v in results["hf"][task].items() if "," in k}
    assert mine.keys() == theirs.keys() and mine
    for key, value in mine.items():
      assert value == pytest.approx(theirs[key], rel=1e-4, abs=1e-9), (task, key)
  assert "shakespeare_speaker" in capsys.readouterr().out
  assert cli.main(["lm-eval", "--model", "llmjax", "--model_args", f"workdir={wd}",
                   "--tasks", "no_such_task"]) == 2
  assert "shakespeare_speaker, shakespeare_cloze" in capsys.readouterr().err


def _tfds(workdir):
  """The TFDS folder the `exported` fixture's runs used (beside their workdirs)."""
  return os.path.join(os.path.dirname(workdir), "tfds")


def test_overlong_requests_are_truncated_with_a_warning_or_refused(exported, caplog, tmp_path):
  from llmjax.data import tokenizer as tokenizer_lib
  from llmjax.errors import UserError

  wd, _ = exported["tiny"]
  long = _requests("loglikelihood", [("O " * 60, "and the rest"), ("short", " one")])
  lm = LlmjaxLM(workdir=wd, devices=1)
  with caplog.at_level("WARNING", logger="llmjax"):
    lm.loglikelihood(long)
  assert "1 request(s) exceeded the context of 64 tokens" in caplog.text
  assert lm.truncated == 1
  with pytest.raises(UserError, match="exceeds the model's context"):
    LlmjaxLM(workdir=wd, devices=1, truncation="error").loglikelihood(long)
  tokenizer_lib.train_tokenizer(["".join(chr(0x4E00 + i) for i in range(400))],
                                str(tmp_path / "big"), model_type="char", vocab_size=None)
  with pytest.raises(UserError, match="tokenizer mismatch"):
    LlmjaxLM(workdir=wd, tokenizer_path=str(tmp_path / "big.model"))
