"""What `llmjax eval` measures: `EvalConfig`, bound by gin (`EvalConfig.*`) or its flags."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Perplexity over a dataset split (llmjax/eval/perplexity.py says how each arch is
  scored) and lm-eval tasks through the llmjax backend (llmjax/eval/lm_eval_run.py)."""
  perplexity: bool = True         # False (--no_perplexity): only the lm-eval tasks
  dataset: str | None = None      # None: the run's DataConfig.dataset
  split: str = "validation"
  data_dir: str | None = None     # None: the run's DataConfig.data_dir (also where the
                                  # offline lm-eval tasks are built from)
  context: int | None = None      # tokens a window sees; None: the model's max_len
  stride: int | None = None       # None: context // 2
  batch_size: int = 8             # perplexity windows / lm-eval requests per batch
  devices: int | None = None      # split each batch over N devices (a 'data' mesh);
                                  # None: all of jax.devices()
  max_docs: int | None = None     # the first N documents (or pairs) of the split
  add_eos: bool = False           # also score each document's end (as training does)
  tasks: tuple[str, ...] = ()     # lm-eval tasks (decoder-only models): llmjax's offline
                                  # ones (llmjax/eval/tasks.py), any lm-eval knows, or
                                  # those in include_path
  limit: int | None = None        # examples per lm-eval task; None: all
  num_fewshot: int | None = None  # few-shot examples per prompt; None: the task's default
  include_path: str | None = None  # a folder of your own lm-eval task YAMLs
  decontaminate: bool = False     # also report the examples sharing a 13-gram with the
                                  # run's training split, and the metrics without them
                                  # (per perplexity split and per lm-eval task)
