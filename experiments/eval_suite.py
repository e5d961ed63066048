"""The main job's model and its fine-tuned versions on every offline evaluation task.

Command (from the repository root, after `bash scripts/setup_env.sh dev,hf,eval` and the
main job, `bash scripts/main.sh`, which trains workdirs/shakespeare; fine-tuned workdirs
from `experiments/finetune_methods.py --out /tmp/finetune_methods`):
  .venv/bin/python experiments/eval_suite.py --workdir workdirs/shakespeare \
      --finetuned /tmp/finetune_methods --out /tmp/eval_suite

Each model is one `llmjax eval --tasks=shakespeare_speaker,shakespeare_cloze,num2words_en_fr
--decontaminate` run (`llmjax/eval/tasks.py`: who speaks a line, 4-way multiple choice,
zero-shot; a line's last word, LAMBADA-style; English numbers to French words, greedy
generation, BLEU/chrF), plus the perplexity and bits per byte of its own training data's
validation split. `--limit` examples per task (default 200). Results: one JSON per model
in --out and the table printed at the end.

Result (session 2026-12-07; 2-core Intel Xeon CPU, no accelerator, ~5 min for all five
models; the main job's workdir, 500 steps, and the four fine-tuned workdirs of
experiments/finetune_methods.py, 600 SFT steps each on shakespeare_instruct; 200 examples
per task, num2words_en_fr has 42 in its test split; zero-shot):

| model | bits/byte (own val) | speaker acc | speaker acc_norm | cloze acc | cloze ppl | en-fr BLEU | en-fr chrF | contaminated |
|---|---|---|---|---|---|---|---|---|
| pre-trained | 2.220 | 27.0 ± 3.1 | 36.0 ± 3.4 | 0.5 ± 0.5 | 37276 | 0.000 | 0.306 | speaker 0/200, cloze 7/200, en-fr 0/42 |
| adapters | 3.283 | 27.5 ± 3.2 | 37.0 ± 3.4 | 0.5 ± 0.5 | 52380 | 0.000 | 0.000 | speaker 0/200, cloze 2/200, en-fr 0/42 |
| dora | 3.408 | 29.0 ± 3.2 | 37.0 ± 3.4 | 0.0 | 37792 | 0.000 | 5.991 | speaker 0/200, cloze 2/200, en-fr 0/42 |
| full | 3.693 | 28.0 ± 3.2 | 38.5 ± 3.4 | 0.0 | 215459 | 0.000 | 0.000 | speaker 0/200, cloze 2/200, en-fr 0/42 |
| lora | 3.751 | 28.0 ± 3.2 | 36.0 ± 3.4 | 0.5 ± 0.5 | 47142 | 0.000 | 1.235 | speaker 0/200, cloze 2/200, en-fr 0/42 |

(± is lm-eval's standard error, in points. "own val" is each run's own training data's
validation split: `shakespeare` for the pre-trained model, `shakespeare_instruct` (the
chat-formatted records) for the fine-tuned ones, so that column compares models only
within a row group. "contaminated": examples sharing a 13-gram with the run's training
split; the clean-subset metrics are in the JSON files.)

What it says: at 3.7 M parameters and 500 pre-training steps every model is at chance on
who speaks a line by raw log-likelihood (acc 27-29% against 25%), but length-normalised
scoring (acc_norm, 36-38.5%, more than 3 standard errors above chance) picks up a
preference that favours some names per character; fine-tuning on the instruct format
moves neither much. The last-word cloze is near 0% and its word perplexity in the tens of
thousands, and none of these models has seen French (BLEU 0). Full SFT raises the cloze
perplexity five-fold: it forgets plain-text continuation the most. Seven cloze lines of
the plays' test scenes share a 13-gram with the `shakespeare` training split (repeated
lines and stock phrases across plays).
"""

import argparse
import json
import os
import sys

TASKS = ("shakespeare_speaker", "shakespeare_cloze", "num2words_en_fr")
COLUMNS = (("perplexity", "bits_per_byte", "bits/byte (own val)"),
           ("lm_eval/shakespeare_speaker", "acc", "speaker acc"),
           ("lm_eval/shakespeare_speaker", "acc_norm", "speaker acc_norm"),
           ("lm_eval/shakespeare_cloze", "acc", "cloze acc"),
           ("lm_eval/shakespeare_cloze", "perplexity", "cloze ppl"),
           ("lm_eval/num2words_en_fr", "bleu", "en-fr BLEU"),
           ("lm_eval/num2words_en_fr", "chrf", "en-fr chrF"))


def models(args) -> dict:
  """{name: workdir}: the main job's, then each fine-tuned one found under --finetuned."""
  out = {"pre-trained": args.workdir}
  if args.finetuned and os.path.isdir(args.finetuned):
    for name in sorted(os.listdir(args.finetuned)):
      if os.path.isdir(os.path.join(args.finetuned, name, "checkpoints")):
        out[name] = os.path.join(args.finetuned, name)
  return out


def evaluate(name, workdir, args) -> dict:
  from llmjax import cli

  output = os.path.join(args.out, f"{name}.json")
  argv = ["eval", f"--workdir={workdir}", f"--tasks={','.join(TASKS)}",
          f"--limit={args.limit}", f"--max_docs={args.max_docs}", "--decontaminate",
          f"--output={output}"]
  if args.data_dir:
    argv.append(f"--data_dir={args.data_dir}")
  if cli.main(argv) != 0:
    sys.exit(f"llmjax eval failed on {workdir}")
  with open(output, encoding="utf-8") as f:
    return json.load(f)["tasks"]


def cell(tasks, key, metric) -> str:
  if key == "perplexity":
    key = next((k for k in tasks if k.startswith("perplexity/")), None)
  value = (tasks.get(key) or {}).get(metric)
  if value is None:
    return "-"
  stderr = tasks[key].get(f"{metric}_stderr")
  scale = 100 if metric in ("acc", "acc_norm") else 1
  text = f"{scale * value:.1f}" if scale == 100 else f"{value:.3f}"
  return text + (f" ± {scale * stderr:.1f}" if scale == 100 and stderr else "")


def print_table(results):
  print("| model | " + " | ".join(c[2] for c in COLUMNS) + " | contaminated |")
  print("|---" * (len(COLUMNS) + 2) + "|")
  for name, tasks in results.items():
    dirty = ", ".join(f"{k.split('/')[-1]} {m['contaminated']}/{m['examples']}"
                      for k, m in tasks.items() if k.startswith("lm_eval/") and
                      "contaminated" in m)
    print(f"| {name} | " + " | ".join(cell(tasks, k, m) for k, m, _ in COLUMNS) +
          f" | {dirty} |")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  p.add_argument("--workdir", default="workdirs/shakespeare")
  p.add_argument("--finetuned", default=None, help="a folder of fine-tuned workdirs")
  p.add_argument("--out", required=True)
  p.add_argument("--limit", type=int, default=200, help="examples per lm-eval task")
  p.add_argument("--max_docs", type=int, default=200, help="validation documents")
  p.add_argument("--data_dir", default=None)
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  results = {}
  for name, workdir in models(args).items():
    results[name] = evaluate(name, workdir, args)
    print(f"{name}: done", flush=True)
  print_table(results)


if __name__ == "__main__":
  main()
