"""lm-eval tasks on a loaded llmjax model: `llmjax eval --tasks=...` and the training-time
`TrainConfig.eval_tasks` entries 'lm_eval:TASK' share this, so both report what a direct
`lm_eval.simple_evaluate(model=LlmjaxLM(...), ...)` reports.

- `task_manager`: llmjax's offline tasks (`tasks.py`) built into a folder, the user's own
  YAMLs added, and every unknown name refused before any work;
- `evaluate`: one `simple_evaluate` call (its own seeds, so the numbers equal a direct call);
- `flatten`: lm-eval's `{'acc,none': v, 'acc_stderr,none': se}` as `{'acc': v, 'acc_stderr': se}`;
- `decontaminated`: GPT-3's 13-gram test (`decontaminate.py`) per task. An example's text is
  what the model reads and is scored on, taken from lm-eval's logged samples: context +
  gold continuation of a loglikelihood or multiple-choice request (every continuation when
  the gold one cannot be told), the document of a rolling loglikelihood, the prompt + the
  reference of a generation. The clean subset is re-aggregated with the task's own
  aggregation functions (mean, perplexity, BLEU, chrF, ...) over the per-sample values
  lm-eval logged, so with nothing contaminated `clean_<metric>` equals `<metric>` exactly.
"""

import numbers
import os

from llmjax.errors import UserError


def task_manager(tasks, *, folder: str, data_dir: str | None = None,
                 include_path: str | None = None):
  """A `TaskManager` that knows every name in `tasks`, or a UserError listing the offline
  ones. llmjax's offline tasks among them are (re)built into `folder` from `data_dir`."""
  from lm_eval.tasks import TaskManager

  from llmjax.eval import tasks as task_lib

  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local tasks read local files
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  if include_path and not os.path.isdir(include_path):
    raise UserError(f"include_path {include_path} is not a folder; point it at a folder of "
                    "lm-eval task YAMLs (or leave it unset).")
  offline = [t for t in tasks if t in task_lib.TASKS]
  if offline:
    task_lib.prepare(folder, data_dir=data_dir, tasks=offline)
  paths = ([folder] if offline else []) + ([include_path] if include_path else [])
  manager = TaskManager(include_path=paths or None)
  unknown = [t for t in tasks if t not in manager.all_tasks]
  if unknown:
    raise UserError(f"unknown lm-eval task(s) {unknown}; llmjax's offline tasks are "
                    f"{', '.join(task_lib.TASKS)} (`llmjax lm-eval ls tasks` lists every task "
                    "lm-eval knows; --include_path=DIR adds a folder of your own YAMLs).")
  return manager


def evaluate(lm, tasks, manager, *, limit=None, num_fewshot=None, bootstrap_iters=100000,
             log_samples=False) -> dict:
  """`lm_eval.simple_evaluate` of `tasks` on the lm-eval model `lm` (lm-eval's defaults)."""
  import lm_eval

  return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit,
                                 num_fewshot=num_fewshot, task_manager=manager,
                                 bootstrap_iters=bootstrap_iters, log_samples=log_samples,
                                 verbosity="ERROR")


def _name(metric: str, filter_key: str) -> str:
  """'acc' + 'none' -> 'acc'; a real filter stays in the name: 'exact_match/strict-match'
  (its standard error: 'exact_match/strict-match_stderr')."""
  stderr = metric.endswith("_stderr")
  base = metric[:-len("_stderr")] if stderr else metric
  return (base if filter_key == "none" else f"{base}/{filter_key}") + ("_stderr" if stderr else "")


def flatten(metrics: dict) -> dict:
  """One task's lm-eval results as `{metric: value, metric_stderr: se}`: numbers only (a
  standard error lm-eval did not compute is 'N/A' and is left out)."""
  out = {}
  for key, value in metrics.items():
    if "," in key and isinstance(value, numbers.Real) and not isinstance(value, bool):
      out[_name(*key.split(",", 1))] = float(value)
  return out


def run_tasks(model, params, tokenizer, tasks, *, folder: str, data_dir: str | None = None,
              limit: int | None = None, num_fewshot: int | None = None,
              decontaminate_against=None, include_path: str | None = None,
              batch_size: int = 8, devices: int | None = None, manager=None) -> dict:
  """`{task: {metric: value, metric_stderr: se, 'examples': n}}` of each task run through
  `LlmjaxLM` on the given (decoder-only) model. With `decontaminate_against` (the training
  texts) also `contaminated` and `clean_<metric>` (see the module docstring)."""
  from llmjax.eval.lm_eval_backend import LlmjaxLM

  if manager is None:
    manager = task_manager(tasks, folder=folder, data_dir=data_dir, include_path=include_path)
  lm = LlmjaxLM(model=model, params=params, tokenizer=tokenizer, batch_size=batch_size,
                devices=devices)
  result = evaluate(lm, tasks, manager, limit=limit, num_fewshot=num_fewshot,
                    log_samples=decontaminate_against is not None)
  out = {}
  for task, metrics in result["results"].items():
    out[task] = flatten(metrics)
    if task in result.get("n-samples", {}):
      out[task]["examples"] = int(result["n-samples"][task]["effective"])
  if decontaminate_against is not None:
    train = list(decontaminate_against)
    for task, samples in result["samples"].items():
      out[task].update(decontaminated(manager, task, samples, train))
  return out


def decontaminated(manager, task: str, samples, train_texts) -> dict:
  """`contaminated` (examples sharing a 13-gram with `train_texts`), `examples`, and the
  task's metrics over the rest as `clean_<metric>` (none when every example is)."""
  from llmjax.eval import decontaminate

  if not samples:
    return {"contaminated": 0, "examples": 0}
  first = samples[0]["filter"]  # one logged sample per (document, filter)
  texts = {s["doc_id"]: sample_text(s) for s in samples if s["filter"] == first}
  flags = dict(zip(texts, decontaminate.overlaps(list(texts.values()), train_texts)))
  clean = [s for s in samples if not flags[s["doc_id"]]]
  out = {"contaminated": int(sum(flags.values())), "examples": len(texts)}
  if clean:
    out.update({f"clean_{k}": v for k, v in aggregate(manager, task, clean).items()})
  return out


def aggregate(manager, task: str, samples) -> dict:
  """The task's metrics over logged `samples`, each aggregated as lm-eval aggregates it
  (`Task.aggregation()`; lm-eval's fallback, the mean, for a metric without one)."""
  from lm_eval.api.metrics import mean

  functions = manager.load([task])["tasks"][task].aggregation()
  values = {}
  for s in samples:
    for metric in s["metrics"]:
      if metric in s:
        values.setdefault((metric, s["filter"]), []).append(s[metric])
  return {_name(metric, filter_key): float(functions.get(metric, mean)(items))
          for (metric, filter_key), items in values.items()}


def sample_text(sample: dict) -> str:
  """What the model read and was scored on for one logged lm-eval sample."""
  args = [tuple(a) for a in sample["arguments"]]
  if len(args[0]) == 1:  # loglikelihood_rolling: (document,)
    return args[0][0]
  target = sample["target"]
  if isinstance(args[0][1], dict):  # generate_until: (prompt, generation kwargs)
    references = target if isinstance(target, (list, tuple)) else [target]
    return "\n".join(args[0][0] + str(r) for r in references)
  return "\n".join(context + continuation for context, continuation in _gold(target, args))


def _gold(target, args) -> list:
  """The (context, continuation) requests of the gold answer: named by index (or indices)
  or by text; all of them when the target names none."""
  picks = list(target) if isinstance(target, (list, tuple)) else [target]
  if picks and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < len(args)
                   for t in picks):
    return [args[t] for t in picks]
  texts = {str(t).strip() for t in picks}
  return [a for a in args if a[1].strip() in texts] or args
