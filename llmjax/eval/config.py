"""What `llmjax eval` measures: `EvalConfig`, bound by gin (`EvalConfig.*`) or its flags."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Perplexity over a dataset split (llmjax/eval/perplexity.py says how each arch is scored)."""
  dataset: str | None = None      # None: the run's DataConfig.dataset
  split: str = "validation"
  data_dir: str | None = None     # None: the run's DataConfig.data_dir
  context: int | None = None      # tokens a window sees; None: the model's max_len
  stride: int | None = None       # None: context // 2
  batch_size: int = 8
  max_docs: int | None = None     # the first N documents (or pairs) of the split
  add_eos: bool = False           # also score each document's end (as training does)
  decontaminate: bool = False     # also report the examples sharing a 13-gram with the
                                  # run's training split, and the metrics without them
