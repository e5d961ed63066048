"""Offline lm-eval tasks over data this project builds: task YAMLs + local JSON lines.

  shakespeare_speaker  multiple choice: who speaks this line? (the true speaker and three
                       others of the same play; acc, acc_norm)
  shakespeare_cloze    the last word of a line from the rest of it (LAMBADA-style
                       loglikelihood: acc = greedy match, perplexity)
  num2words_en_fr      generation: an English number to French words (BLEU, chrF)

The lines come from the test split of `shakespeare_instruct` (scenes never trained on by
the `shakespeare` runs), the numbers from `num2words_translate/en-fr-1000`; few-shot
examples from their validation splits. `prepare(DIR)` writes `DIR/<task>.yaml` with
`dataset_path: json` and absolute `data_files`, the documented way to point any lm-eval
task at local files; `llmjax lm-eval --tasks shakespeare_speaker ...` prepares them itself.
"""

import json
import os
import zlib

TASKS = ("shakespeare_speaker", "shakespeare_cloze", "num2words_en_fr")

_YAML = {
    "shakespeare_speaker": (
        "output_type: multiple_choice\n"
        "doc_to_text: \"{{line}}\\nWho speaks this line?\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{gold}}\"\n"
        "target_delimiter: \" \"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"),
    "shakespeare_cloze": (
        "output_type: loglikelihood\n"
        "doc_to_text: \"{{context}}\"\n"
        "doc_to_target: \" {{word}}\"\n"
        "target_delimiter: \"\"\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n"
        "    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"),
    "num2words_en_fr": (
        "output_type: generate_until\n"
        "doc_to_text: \"English: {{en}}\\nFrench:\"\n"
        "doc_to_target: \" {{fr}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 32\n  do_sample: false\n"
        "metric_list:\n  - metric: bleu\n    aggregation: bleu\n    higher_is_better: true\n"
        "  - metric: chrf\n    aggregation: chrf\n    higher_is_better: true\n"),
}


def _stable(text: str) -> int:
  return zlib.crc32(text.encode("utf-8"))


def _speaker_docs(records) -> list[dict]:
  by_play = {}
  for r in records:
    by_play.setdefault(r["play"], set()).add(r["response"])
  docs = []
  for r in records:
    others = sorted(by_play[r["play"]] - {r["response"]}, key=lambda s: _stable(s + r["line"]))
    if len(others) < 3:
      continue
    choices = sorted([r["response"], *others[:3]], key=lambda s: _stable(s + r["play"]))
    docs.append({"line": r["line"], "play": r["play"], "choices": choices,
                 "gold": choices.index(r["response"])})
  return docs


def _cloze_docs(records) -> list[dict]:
  docs = []
  for r in records:
    words = r["line"].rstrip(".,;:!?'\"-").split()
    if len(words) >= 4:
      docs.append({"context": " ".join(words[:-1]), "word": words[-1]})
  return docs


def _records(dataset, split, data_dir, limit, task=None):
  from llmjax.data import datasets

  source = datasets.get_source(dataset, split, data_dir)
  out = []
  for i in range(len(source)):
    r = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in source[i].items()}
    if task is None or r.get("task") == task:
      out.append(r)
  step = max(1, len(out) // limit) if limit else 1
  return out[::step][:limit] if limit else out


def _docs(task, split, data_dir, limit):
  if task == "num2words_en_fr":
    return [{"en": r["en"], "fr": r["fr"]}
            for r in _records("num2words_translate/en-fr-1000", split, data_dir, limit)]
  records = _records("shakespeare_instruct", split, data_dir, None, task="speaker")
  docs = _speaker_docs(records) if task == "shakespeare_speaker" else _cloze_docs(records)
  step = max(1, len(docs) // limit) if limit else 1
  return docs[::step][:limit] if limit else docs


def prepare(out_dir: str, data_dir: str | None = None, limit: int | None = 500,
            tasks=TASKS, docs_from: str = "test") -> str:
  """Writes every task's YAML and JSON lines (test: up to `limit` docs, spread over the
  split; validation: few-shot examples) into `out_dir`; returns it (lm-eval's
  --include_path). `docs_from`: the data split the test docs are drawn from ('train':
  more of them, e.g. for throughput; never for scores of a model trained on it)."""
  os.makedirs(out_dir, exist_ok=True)
  for task in tasks:
    files = {}
    for split in ("test", "validation"):
      docs = (_docs(task, docs_from, data_dir, limit) if split == "test"
              else _docs(task, split, data_dir, 50))
      files[split] = os.path.abspath(os.path.join(out_dir, f"{task}.{split}.jsonl"))
      with open(files[split], "w", encoding="utf-8") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    with open(os.path.join(out_dir, f"{task}.yaml"), "w", encoding="utf-8") as f:
      f.write(f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
              f"    test: {files['test']}\n    validation: {files['validation']}\n"
              f"test_split: test\nfewshot_split: validation\n{_YAML[task]}")
  return out_dir
