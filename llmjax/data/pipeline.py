"""The grain input pipeline: read → clean → tokenize → chunk → pack → shuffle → batch.

  source      `datasets.get_source` (random access), this host's shard
              `[process_index::process_count]`, shuffled per epoch (seeded), repeated
  prepare     bytes → str, the text under `text_key` as `example['text']`, optional
              stateless cleaning (`cleaning.normalize` + `document_filter_reason`)
  features    a pluggable `feature_fn(example, tokenizer)` → 1-D int32 arrays
  pack        `packing.pack`: long documents cut to row length, then packed
  shuffle     a seeded window shuffle of packed rows (chunks of one document end up
              in neighbouring rows; this spreads them over batches)
  batch       `batch_size // process_count` rows per host: `[B_local, L]` int32

Every stage is a grain dataset with checkpointable iterator state, so
`PipelineIterator.get_state()` (a JSON-serializable dict) restores a fresh pipeline
to exactly the batch where the first one stopped.
"""

import dataclasses
import functools
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from llmjax.data import cleaning, datasets, packing
from llmjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What the pipeline reads and how it packs and batches it.

  batch_size is GLOBAL: each of `process_count` hosts yields `batch_size //
  process_count` rows. feature_lengths maps each packed key to its row length
  (None: `{'tokens': seq_len}`). num_epochs=None repeats forever.
  """
  dataset: str = "shakespeare"
  split: str = "train"
  data_dir: str | None = None
  input_dir: str | None = None  # the corpus folder of `local_text`
  text_key: str | tuple[str, ...] | None = None  # None: the dataset's default
  seq_len: int = 256
  feature_lengths: Mapping[str, int] | None = None
  batch_size: int = 16
  shuffle: bool = True
  seed: int = 0
  num_epochs: int | None = None
  packing: str = "first_fit"  # first_fit | best_fit | concat | none
  num_packing_bins: int = 64
  shuffle_buffer: int = 256  # packed rows per shuffle window; <= 1 turns it off
  clean: bool = False
  cleaning: Any = None  # a cleaning.CleaningConfig for `clean`; None = its defaults
  drop_remainder: bool = True  # False: the last batch is padded with empty rows
  read_threads: int = 2

  def lengths(self) -> dict[str, int]:
    return dict(self.feature_lengths or {"tokens": self.seq_len})


class _Prepare:
  """Record → example with `text`; None when cleaning drops the document."""

  def __init__(self, text_key, cleaning_config):
    self.text_key, self.cleaning_config = text_key, cleaning_config

  def __call__(self, record: Mapping[str, Any]) -> dict | None:
    example = dict(record)
    text = datasets.example_text(example, self.text_key)
    if self.cleaning_config is not None:
      text = cleaning.normalize(text, self.cleaning_config)
      if cleaning.document_filter_reason(text, self.cleaning_config) is not None:
        return None
    example["text"] = text
    return example


class _Features:
  def __init__(self, feature_fn, tokenizer):
    self.feature_fn, self.tokenizer = feature_fn, tokenizer

  def __call__(self, example):
    features = self.feature_fn(example, self.tokenizer)
    if features is None:  # the feature function skips this example (e.g. SFT.overlong)
      return None
    return {k: np.asarray(v, np.int32) for k, v in features.items()}


def _pad_batch(batch: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """Pads a short final batch with all-zero rows (segment id 0: nothing to learn)."""
  return {k: np.pad(v, [(0, rows - len(v))] + [(0, 0)] * (v.ndim - 1))
          for k, v in batch.items()}


def _hosts(config: DataConfig, process_index, process_count) -> tuple[int, int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise UserError(f"process_index={process_index} is not in [0, {process_count})")
  if config.batch_size <= 0 or config.batch_size % process_count:
    raise UserError(f"global batch_size={config.batch_size} does not split over "
                    f"{process_count} processes: make it a positive multiple of "
                    f"{process_count}")
  return process_index, process_count, config.batch_size // process_count


def _check(config: DataConfig) -> None:
  if config.packing not in packing.PACKING_MODES:
    raise UserError(f"unknown packing {config.packing!r}: use one of "
                    f"{', '.join(packing.PACKING_MODES)}")
  if any(not isinstance(n, int) or n <= 0 for n in config.lengths().values()):
    raise UserError(f"row lengths {config.lengths()} must be positive ints: fix seq_len "
                    "/ feature_lengths")
  if config.num_epochs is not None and config.num_epochs <= 0:
    raise UserError(f"num_epochs={config.num_epochs} must be positive, or None to repeat "
                    "forever")


def _documents(config: DataConfig, tokenizer, feature_fn, process_index, process_count):
  """The per-host MapDataset of feature dicts (shard, shuffle, repeat, tokenize)."""
  kwargs = {"input_dir": config.input_dir} if config.input_dir else {}
  source = datasets.get_source(config.dataset, config.split, config.data_dir, **kwargs)
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if not len(ds):
    raise UserError(f"{source.name} has {len(source)} records: too few for "
                    f"{process_count} processes; use a bigger split or fewer processes")
  if config.shuffle:
    ds = ds.shuffle(seed=config.seed)  # reshuffled each epoch (seed + epoch)
  if config.num_epochs != 1:
    ds = ds.repeat(config.num_epochs)
  cleaning_config = None
  if config.clean:
    cleaning_config = config.cleaning or cleaning.CleaningConfig()
  text_key = config.text_key or datasets.default_text_key(config.dataset)
  ds = ds.map(_Prepare(text_key, cleaning_config)).filter(lambda x: x is not None)
  return ds.map(_Features(feature_fn, tokenizer)).filter(lambda x: x is not None)


def fingerprint(config: DataConfig, process_index: int, process_count: int) -> str:
  """A hash of everything that fixes the batch order: states only restore onto it."""
  fields = dataclasses.asdict(config)
  fields.update(read_threads=None, data_dir=None, process=(process_index, process_count))
  return hashlib.sha256(json.dumps(fields, sort_keys=True, default=repr).encode()
                        ).hexdigest()[:16]


class PipelineIterator:
  """An iterator of batches whose position can be saved and restored."""

  def __init__(self, iterator, fingerprint_: str):
    self._iterator, self._fingerprint = iterator, fingerprint_

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict:
    """A JSON-serializable snapshot of the position (save it with the checkpoint)."""
    state = json.loads(json.dumps(self._iterator.get_state(), default=_jsonable))
    return {"fingerprint": self._fingerprint, "grain": state}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if state.get("fingerprint") != self._fingerprint:
      raise UserError("the saved data state comes from a pipeline with a different data "
                      "config (dataset, split, seed, lengths, batch, packing or process "
                      "layout): resume with the config it was saved with")
    self._iterator.set_state(state["grain"])


def _jsonable(value):
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f"data iterator state holds a {type(value).__name__}, not JSON")


def make_pipeline(config: DataConfig, tokenizer, feature_fn=packing.lm_features, *,
                  process_index: int | None = None,
                  process_count: int | None = None) -> PipelineIterator:
  """This host's batches: dicts of int32 `[batch_size // process_count, L]` arrays.

  For every packed key `k`: `k`, `k_segment_ids` (1.. per document, 0 = padding) and
  `k_positions`. `tokenizer` needs `encode`, `bos_id`, `eos_id` (what `feature_fn`
  uses); process_index / process_count default to jax's.
  """
  _check(config)
  process_index, process_count, local_batch = _hosts(config, process_index, process_count)
  ds = _documents(config, tokenizer, feature_fn, process_index, process_count)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                            prefetch_buffer_size=4 * local_batch))
  seed = config.seed + 7919 * process_index  # distinct, reproducible per host
  ds = packing.pack(ds, config.lengths(), config.packing,
                    num_packing_bins=config.num_packing_bins, seed=seed,
                    shuffle_bins=config.shuffle)
  if config.shuffle and config.shuffle_buffer > 1:
    ds = grain.experimental.WindowShuffleIterDataset(
        ds, window_size=config.shuffle_buffer, seed=seed)
  ds = ds.batch(local_batch, drop_remainder=config.drop_remainder)
  if not config.drop_remainder:
    ds = ds.map(functools.partial(_pad_batch, rows=local_batch))
  return PipelineIterator(iter(ds), fingerprint(config, process_index, process_count))


def make_eval_pipeline(config: DataConfig, tokenizer, feature_fn=packing.lm_features, *,
                       process_index: int | None = None,
                       process_count: int | None = None) -> PipelineIterator:
  """One unshuffled pass over the split; the last batch is padded with empty rows."""
  config = dataclasses.replace(config, shuffle=False, num_epochs=1, drop_remainder=False)
  return make_pipeline(config, tokenizer, feature_fn, process_index=process_index,
                       process_count=process_count)
