"""Evaluations during training: `TrainConfig.eval_tasks`, run at the eval cadence beside the
eval loss and written with the training metrics (metrics.jsonl, TensorBoard).

  'perplexity'          strided-window perplexity, bits per byte and per character of the
                        first `TrainConfig.eval_task_docs` documents of the validation
                        split (`llmjax/eval/perplexity.py`; masked LMs: pseudo-perplexity)
  'lm_eval:TASK[:N]'    an lm-eval task on its first N examples (default 20) through the
                        `llmjax` backend: llmjax's offline tasks (`llmjax/eval/tasks.py`,
                        built into <workdir>/lm_eval_tasks) or any task lm-eval knows

Keys: `eval_ppl_<metric>` and `lm_eval/<task>/<metric>`. Decoder-only models for lm-eval.
"""

import os

from llmjax.errors import UserError


def parse(specs) -> list[tuple[str, str | None, int | None]]:
  """('perplexity', None, None) | ('lm_eval', task, limit) per spec; bad ones refused."""
  out = []
  for spec in specs or ():
    parts = str(spec).split(":")
    if parts == ["perplexity"]:
      out.append(("perplexity", None, None))
    elif parts[0] == "lm_eval" and len(parts) in (2, 3) and parts[1]:
      if len(parts) == 3 and not parts[2].isdigit():
        raise UserError(f"TrainConfig.eval_tasks entry {spec!r}: the limit must be a number, "
                        "e.g. 'lm_eval:shakespeare_cloze:50'.")
      out.append(("lm_eval", parts[1], int(parts[2]) if len(parts) == 3 else 20))
    else:
      raise UserError(f"TrainConfig.eval_tasks entry {spec!r} is not 'perplexity' or "
                      "'lm_eval:TASK[:N]' (e.g. 'lm_eval:shakespeare_cloze:50').")
  return out


class EvalTasks:
  """Called as `tasks(net, params, tokenizer) -> {metric: value}` at each eval."""

  def __init__(self, specs, data, workdir: str, docs: int = 20):
    self.specs, self.data, self.workdir, self.docs = parse(specs), data, workdir, docs
    self._texts = None
    self._task_manager = None

  def __bool__(self):
    return bool(self.specs)

  def __call__(self, net, params, tokenizer) -> dict:
    out = {}
    for kind, task, limit in self.specs:
      if kind == "perplexity":
        out.update(self._perplexity(net, params, tokenizer))
      else:
        out.update(self._lm_eval(net, params, tokenizer, task, limit))
    return out

  def _perplexity(self, net, params, tokenizer):
    from llmjax.data import datasets
    from llmjax.eval import perplexity

    if self._texts is None:
      d = self.data
      kwargs = {"input_dir": d.input_dir} if d.input_dir else {}
      texts = datasets.iter_texts(d.dataset, "validation", data_dir=d.data_dir,
                                  text_key=d.text_key, **kwargs)
      self._texts = [t for _, t in zip(range(self.docs), texts)]
    m = perplexity.text_perplexity(net, params, tokenizer, self._texts)
    return {f"eval_ppl_{k}": v for k, v in m.items() if k != "documents"}

  def _lm_eval(self, net, params, tokenizer, task, limit):
    try:
      from lm_eval.tasks import TaskManager
    except ImportError:
      raise UserError("TrainConfig.eval_tasks names an lm-eval task but lm-eval is not "
                      "installed: pip install 'llmjax[eval]'.") from None
    from llmjax.eval import lm_eval_run
    from llmjax.eval import tasks as task_lib
    from llmjax.eval.lm_eval_backend import LlmjaxLM

    if self._task_manager is None:
      os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
      os.environ.setdefault("HF_HUB_OFFLINE", "1")
      folder = os.path.join(self.workdir, "lm_eval_tasks")
      wanted = [t for _, t, _ in self.specs if t in task_lib.TASKS]
      if wanted:
        task_lib.prepare(folder, data_dir=self.data.data_dir, tasks=wanted)
      self._task_manager = TaskManager(include_path=folder if wanted else None,
                                       verbosity="ERROR")
    lm = LlmjaxLM(model=net, params=params, tokenizer=tokenizer, batch_size=16)
    result = lm_eval_run.evaluate(lm, [task], self._task_manager, limit=limit,
                                  bootstrap_iters=0)
    metrics = lm_eval_run.flatten(result["results"][task])
    return {f"lm_eval/{task}/{k}": v for k, v in metrics.items() if "stderr" not in k}
