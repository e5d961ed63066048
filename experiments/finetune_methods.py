"""Fine-tuning methods side by side: full SFT, LoRA, DoRA, bottleneck adapters and prompt
tuning, each from the same pre-trained model for the same steps on `shakespeare_instruct`,
scored by exact-match accuracy per task before and after.

Command (from the repository root, after `bash scripts/setup_env.sh`):
  .venv/bin/python experiments/finetune_methods.py --pretrained workdirs/shakespeare \
      --out /tmp/finetune_methods --steps 300

`--pretrained` is the main job's workdir (`bash scripts/main.sh`: runs/shakespeare_small.gin,
a 4-layer, 256-wide GPT with a BPE tokenizer, 500 steps); it is trained first if it
has no checkpoint. Each method is an ordinary `llmjax train --gin_file=runs/sft.gin
[--gin_file=peft/<method>.gin]` run with `TrainConfig.init_from` the pre-trained workdir
(batch 16 x 128 tokens, packed; the peak learning rate per method below, as each method's
papers use larger rates for fewer parameters). Accuracy: `SFT.answer_accuracy` on the
first `--per_task` test examples of each task (scenes never seen in pre-training or SFT):
a record counts when the argmax at every response position, EOS included, is the
reference token, which is exactly when greedy decoding writes the answer and stops.

Result (session 2026-12-06; 2-core Intel Xeon CPU, no accelerator; the pre-trained model:
the main job's 500 steps, eval loss 4.16; 600 SFT steps of 16 x 128 tokens per method;
200 test questions per task; `--steps 600`, prompt tuning run on its own with
`--methods prompt_tuning`):

| method | trainable | exact all | exact next_line | exact play | exact speaker | response tokens | train s |
|---|---|---|---|---|---|---|---|
| pre-trained | - | 0.0% | 0.0% | 0.0% | 0.0% | 4.8% | - |
| full SFT | 100% (3.72 M) | 0.8% | 0.0% | 1.0% | 1.5% | 40.3% | 630* |
| LoRA r8 q,v | 0.87% | 0.0% | 0.0% | 0.0% | 0.0% | 21.4% | 321 |
| DoRA r8 q,v | 0.93% | 0.0% | 0.0% | 0.0% | 0.0% | 20.2% | 314 |
| adapters 64 | 6.65% | 0.7% | 0.0% | 1.0% | 1.0% | 30.0% | 325 |
| prompt tuning 20 | 0.14% | 0.0% | 0.0% | 0.0% | 0.0% | 5.4% | 244 |

(* the full run shared the cores with another run for most of its steps.) "response
tokens" is the teacher-forced accuracy over every response token and EOS. What it says:
a 3.7 M-parameter model trained for 500 steps knows too little about who speaks which
line to answer exactly (exact match stays at 0-1.5%: a few common speakers and plays),
but all methods but prompt tuning learn the answer format and part of the content;
at the same steps the ranking follows the trainable share (full > adapters > LoRA ~ DoRA
> prompt tuning), and prompt tuning barely moves a model this small, as Lester et al.
(2021) found below ~1 B parameters. LoRA logged ~4,200 tokens/s.

QLoRA against LoRA on the same layers (session 2026-12-07, same machine; `--steps 300
--per_task 100 --methods lora_all,qlora`; both rank 8, alpha 16, every linear layer, lr
2e-3; run beside other jobs, so the train seconds are only indicative):

| method | exact all | response tokens | eval loss at 300 | frozen base bytes | train s |
|---|---|---|---|---|---|
| pre-trained | 0.0% | 4.4% | - | - | - |
| LoRA (all linear) | 0.0% | 26.3% | 3.6583 | 14,866,432 (float32) | 419 |
| QLoRA (NF4 + double quant base) | 0.0% | 26.4% | 3.6667 | 3,906,400 (4.127 bits per quantized weight) | 413 |

The 4-bit base costs little here (26.4% vs 26.3% of response tokens right; eval loss
3.667 vs 3.658, +0.2%) and holds the frozen base in 26% of the bytes (the float
embedding table and norms included). ("trainable" in the script's own table counts the
packed NF4 arrays' elements, so its share for QLoRA is not comparable.)
"""

import argparse
import json
import os
import re
import time

import numpy as np

METHODS = {  # name: (gin files added to runs/sft.gin, peak learning rate[, bindings])
    "full": ((), 3e-4),
    "lora": (("peft/lora.gin",), 2e-3),
    "dora": (("peft/dora.gin",), 2e-3),
    "adapters": (("peft/adapters.gin",), 2e-3),
    "prompt_tuning": (("peft/prompt_tuning.gin",), 3e-2),
    # QLoRA against LoRA on the same layers (every linear one, as peft/qlora.gin targets):
    "lora_all": (("peft/lora.gin",), 2e-3, ("LoraConfig.target = 'all_linear'",)),
    "qlora": (("peft/qlora.gin",), 2e-3),
}
ROW_LEN = 128
# The soft prompt's 20 slots come on top of the rows, within the model's 128 positions.
ROW_LENS = {"prompt_tuning": 108}


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  p.add_argument("--pretrained", default="workdirs/shakespeare")
  p.add_argument("--out", required=True, help="one workdir per method goes here")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--per_task", type=int, default=200)
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--data_dir", default=None)
  return p.parse_args()


def test_records(data_dir, per_task):
  from llmjax.data import datasets
  source = datasets.get_source("shakespeare_instruct", "test", data_dir)
  picked, counts = [], {}
  for i in range(len(source)):
    record = source[i]
    if counts.get(record["task"], 0) < per_task:
      counts[record["task"]] = counts.get(record["task"], 0) + 1
      picked.append(record)
  return picked


def accuracy(model, params, tokenizer, records, chunk=64, row_len=ROW_LEN):
  """Exact-match accuracy per task, and `tokens`: the teacher-forced accuracy over all
  response tokens (EOS included), scored in chunks of `chunk` records."""
  from llmjax.objectives import sft
  objective = sft.SFT(max_len=row_len)
  right, hit_tokens, n_tokens = {}, 0, 0
  for start in range(0, len(records), chunk):
    part = records[start:start + chunk]
    scores = objective.answer_accuracy(model, params, part, tokenizer)
    for task in {r["task"] for r in part} | {"all"}:
      n = len(part) if task == "all" else sum(r["task"] == task for r in part)
      hits, total = right.get(task, (0, 0))
      right[task] = (hits + scores[task] * n, total + n)
    hit, count = _token_hits(objective, model, params, part, tokenizer)
    hit_tokens, n_tokens = hit_tokens + hit, n_tokens + count
  out = {task: hits / total for task, (hits, total) in sorted(right.items())}
  return {**out, "tokens": hit_tokens / n_tokens}


def _token_hits(objective, model, params, records, tokenizer):
  from llmjax.objectives import sft
  rows = [objective.feature_fn(r, tokenizer) for r in records]
  length = max(len(r["tokens"]) for r in rows)
  batch = {k: np.zeros((len(rows), length), np.int32)
           for k in ("tokens", "response_mask", "tokens_segment_ids")}
  for i, row in enumerate(rows):
    n = len(row["tokens"])
    batch["tokens"][i, :n], batch["response_mask"][i, :n] = row["tokens"], row["response_mask"]
    batch["tokens_segment_ids"][i, :n] = 1
  logits, targets, weights = sft.response_logits(model, params, batch)
  weights = np.asarray(weights) > 0
  hits = (np.asarray(logits).argmax(-1) == np.asarray(targets)) & weights
  return int(hits.sum()), int(weights.sum())


def pretrained(workdir, data_dir):
  """(model, params, tokenizer) of the pre-trained run (trained first if missing)."""
  from llmjax.checkpoint import manager as ckpt_lib
  from llmjax.data import tokenizer as tokenizer_lib
  from llmjax.models.config import TransformerConfig
  from llmjax.models.transformer import Transformer
  from llmjax.train import main
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    extra = [f"DataConfig.data_dir = {data_dir!r}"] if data_dir else []
    main.run(["runs/shakespeare_small.gin"], extra + ["TrainConfig.progress_bar = False"],
             workdir)
  ckpt = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"))
  params, meta = ckpt.restore_params()
  ckpt.close()
  tokenizer = tokenizer_lib.load_any(os.path.join(workdir, "tokenizer.model"))
  return Transformer(TransformerConfig(**meta["model_config"])), params, tokenizer


def trainable_fraction(params, peft_configs):
  import jax

  from llmjax.peft import model as peft_model
  pattern = peft_model.trainable_pattern(peft_configs)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  total = sum(np.size(v) for _, v in leaves)
  if pattern is None:
    return total, total
  regex = re.compile(pattern)
  trained = sum(np.size(v) for p, v in leaves
                if regex.search("/" + "/".join(str(getattr(k, "key", k)) for k in p)))
  return trained, total


def frozen_bytes(params, peft_configs) -> int:
  """Bytes of the parameters that do not train (the base), as stored: float32, or NF4
  codes and scales under QLoRA."""
  import jax

  from llmjax.peft import model as peft_model
  pattern = peft_model.trainable_pattern(peft_configs)
  if pattern is None:  # full fine-tuning: nothing is frozen
    return 0
  regex = re.compile(pattern)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return int(sum(np.asarray(v).nbytes for p, v in leaves
                 if not regex.search("/" + "/".join(str(getattr(k, "key", k)) for k in p))))


def main_(args):
  from llmjax.train import main
  model, params, tokenizer = pretrained(args.pretrained, args.data_dir)
  records = test_records(args.data_dir, args.per_task)
  rows = {"pre-trained": {"trainable": 0, "total": 0, **accuracy(model, params, tokenizer,
                                                                 records)}}
  print("pre-trained:", rows["pre-trained"], flush=True)
  for name in args.methods.split(","):
    files, lr, *extra = METHODS[name]
    bindings = [*(extra[0] if extra else ()), f"TrainConfig.init_from = {os.path.abspath(args.pretrained)!r}",
                f"TrainConfig.num_steps = {args.steps}", f"OptimizerConfig.peak_lr = {lr}",
                f"TrainConfig.checkpoint_every = {args.steps}",
                "TrainConfig.progress_bar = False",
                f"ROW_LEN = {ROW_LENS.get(name, ROW_LEN)}"]
    if args.data_dir:
      bindings.append(f"DataConfig.data_dir = {args.data_dir!r}")
    start = time.time()
    result = main.run(["runs/sft.gin", *files], bindings, os.path.join(args.out, name))
    seconds = time.time() - start
    peft_configs = getattr(result.model, "configs", ())
    trained, total = trainable_fraction(result.state.params, peft_configs)
    scores = accuracy(result.model, result.state.params, result.tokenizer, records,
                      row_len=ROW_LENS.get(name, ROW_LEN))
    rows[name] = {"trainable": trained, "total": total, "train_s": seconds,
                  "base_bytes": frozen_bytes(result.state.params, peft_configs), **scores}
    print(f"{name}: {rows[name]}", flush=True)
  print_table(rows)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(rows, f, indent=1)
  return rows


def print_table(rows):
  skip = ("trainable", "total", "train_s", "base_bytes")
  tasks = [t for t in next(iter(rows.values())) if t not in skip]
  print("| method | trainable | " + " | ".join(f"exact {t}" if t != "tokens" else
                                            "response tokens" for t in tasks)
        + " | frozen base bytes | train s |")
  print("|---" * (len(tasks) + 4) + "|")
  for name, row in rows.items():
    share = f"{100 * row['trainable'] / row['total']:.2f}%" if row["total"] else "-"
    cells = " | ".join(f"{100 * row[t]:.1f}%" for t in tasks)
    base = f"{row['base_bytes']:,}" if row.get("base_bytes") else "-"
    print(f"| {name} | {share} | {cells} | {base} | {row.get('train_s', 0):.0f} |")


if __name__ == "__main__":
  main_(parse_args())
