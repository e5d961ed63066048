"""lm-eval throughput: the `llmjax` backend vs lm-eval's `hf` backend on the same model.

The workdir's checkpoint is exported with `llmjax convert --to_hf` (same weights, same
tokenizer), and both backends run llmjax's offline tasks through `lm_eval.simple_evaluate`
at the same batch size: `shakespeare_speaker` (4-way multiple choice: log-likelihood
requests; requests/s) and `num2words_en_fr` (greedy generation until a newline, up to 32
tokens; generated tokens/s). Two clocks per run: the backend's own (the time inside its
`loglikelihood` / `generate_until` calls: the throughput of the model backend, which is
what differs between them) and end to end (`simple_evaluate` whole, including lm-eval's
task loading, request building and metrics, the same work for both). Rounds alternate
which backend goes first, after one untimed warm-up round each (jit compilation, torch's
first calls); this machine's speed drifts, so only per-round ratios mean anything. Prints
the rounds and the median ratios llmjax / hf.

`num2words_en_fr` has 42 test documents, 0.06-0.15 s of backend time, and on this
machine the first calls after lm-eval's single-threaded bookkeeping run slower (an idle
CPU coming back to speed: 26 ms against 17 ms for the same batch, benchmarks/README.md),
a transient that weighs most on the faster backend's few calls. A third case,
`num2words_en_fr (long)`, is the same task over `--long_docs` numbers from the builder's
train split (a throughput measure only: the model never saw these data): a long
evaluation's steady state.

  .venv/bin/python -m benchmarks.lm_eval_vs_hf --workdir workdirs/shakespeare --rounds 3

Target (issue 28): >= 2x on both (backend clock). Not a test; figures in benchmarks/README.md.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's idle threads must not spin
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common


class _Clock:
  """Wraps a backend's request methods to add up the seconds spent inside them."""

  def __init__(self, lm):
    self.seconds = 0.0
    for name in ("loglikelihood", "generate_until"):
      setattr(lm, name, self._timed(getattr(lm, name)))

  def _timed(self, method):
    def call(*args, **kwargs):
      start = time.perf_counter()
      try:
        return method(*args, **kwargs)
      finally:
        self.seconds += time.perf_counter() - start
    return call


def _run(lm, task, limit, task_manager):
  """(backend seconds, end-to-end seconds, requests, samples) of one simple_evaluate."""
  import lm_eval

  clock, before = lm._llmjax_clock, lm._llmjax_clock.seconds
  start = time.perf_counter()
  out = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=limit, log_samples=True,
                                task_manager=task_manager, bootstrap_iters=0,
                                verbosity="ERROR")
  seconds = time.perf_counter() - start
  samples = out["samples"][task]
  requests = sum(len(s["arguments"]) for s in samples)
  return clock.seconds - before, seconds, requests, samples


def _throughput(lm, task, limit, tm, tokenizer):
  """(backend rate, end-to-end rate): requests/s, or generated tokens/s for generation."""
  backend, whole, requests, samples = _run(lm, task, limit, tm)
  if task == "num2words_en_fr":
    amount = sum(len(tokenizer.encode(s["resps"][0][0])) for s in samples)
  else:
    amount = requests
  return amount / backend, amount / whole


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="workdirs/shakespeare")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--mc_docs", type=int, default=200)
  parser.add_argument("--gen_docs", type=int, default=48)
  parser.add_argument("--long_docs", type=int, default=400)
  args = parser.parse_args()

  from lm_eval.models.huggingface import HFLM
  from lm_eval.tasks import TaskManager

  from llmjax import cli
  from llmjax.eval import tasks
  from llmjax.eval.lm_eval_backend import LlmjaxLM

  root = tempfile.mkdtemp()
  hf_dir = os.path.join(root, "hf")
  assert cli.main(["convert", f"--workdir={args.workdir}", f"--to_hf={hf_dir}"]) == 0
  folder = tasks.prepare(os.path.join(root, "tasks"), limit=max(args.mc_docs, args.gen_docs),
                         tasks=["shakespeare_speaker", "num2words_en_fr"])
  tm = TaskManager(include_path=folder, verbosity="ERROR")
  long_tm = TaskManager(verbosity="ERROR", include_path=tasks.prepare(
      os.path.join(root, "long"), limit=args.long_docs, tasks=["num2words_en_fr"],
      docs_from="train"))
  ours = LlmjaxLM(workdir=args.workdir, batch_size=args.batch_size)
  hf = HFLM(pretrained=hf_dir, device="cpu", batch_size=args.batch_size,
            max_length=ours.max_length)
  backends = {"llmjax": ours, "hf": hf}
  for lm in backends.values():
    lm._llmjax_clock = _Clock(lm)
  cases = {"shakespeare_speaker": ("shakespeare_speaker", args.mc_docs, tm),
           "num2words_en_fr": ("num2words_en_fr", args.gen_docs, tm),
           "num2words_en_fr (long)": ("num2words_en_fr", args.long_docs, long_tm)}
  print(common.cpu_info())
  for name, lm in backends.items():  # warm-up: compile, first calls
    for task, limit, manager in cases.values():
      _run(lm, task, limit, manager)
  results = {case: {n: [] for n in backends} for case in cases}
  for r in range(args.rounds):
    for case, (task, limit, manager) in cases.items():
      for name in common.rotate(list(backends), r):
        results[case][name].append(_throughput(backends[name], task, limit, manager,
                                               ours.tok))
      (a, a_all), (b, b_all) = results[case]["llmjax"][-1], results[case]["hf"][-1]
      unit = "tokens/s" if task == "num2words_en_fr" else "requests/s"
      print(f"round {r} {case:22} backend: llmjax {a:8.1f} hf {b:8.1f} {unit} ratio "
            f"{a / b:.2f} | end to end: llmjax {a_all:7.1f} hf {b_all:7.1f} ratio "
            f"{a_all / b_all:.2f}", flush=True)
  for task in cases:
    for clock, label in ((0, "backend"), (1, "end to end")):
      ratios = [a[clock] / b[clock] for a, b in zip(results[task]["llmjax"],
                                                    results[task]["hf"])]
      print(f"{task} ({label}): median ratio llmjax / hf = {statistics.median(ratios):.2f} "
            f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})")


if __name__ == "__main__":
  main()
