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

Result: (not run yet)
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
