"""Feature functions and sequence packing for the grain pipeline.

A feature function turns one example into the 1-D int32 arrays a training objective
packs (`lm_features` for causal LM: `{'tokens': [bos] + ids + [eos]}`; masked LM,
span corruption and seq2seq bring their own). Packing puts several documents into one
fixed-length row, following grain's convention: for every packed key `k` the row has
`k`, `k_segment_ids` (1, 2, ... per document in the row, 0 on padding) and
`k_positions` (0, 1, ... restarting at each document). Attention masks built from the
segment ids keep documents from attending to each other (Raffel et al., 2020, T5
"packing"; Krell et al., 2021, "Efficient sequence packing without
cross-contamination").

Documents longer than a row are first cut into row-length chunks: a full chunk fills
a row exactly and only the last, shorter piece needs a bin, which keeps first-fit
packing above 95% non-pad tokens. Several features (`inputs`/`targets`) pack
together, each against its own length; such examples are truncated rather than
chunked, because chunking one side of a pair independently would misalign it.
"""

import functools
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grain
import numpy as np

from llmjax.errors import UserError

PACKING_MODES = ("first_fit", "best_fit", "concat", "none")
FeatureFn = Callable[[dict, Any], dict]


def lm_features(example: Mapping[str, Any], tokenizer) -> dict[str, np.ndarray]:
  """Causal LM: `{'tokens': [bos] + ids + [eos]}` for `example['text']`."""
  ids = tokenizer.encode(example["text"])
  return {"tokens": np.asarray([tokenizer.bos_id, *ids, tokenizer.eos_id], np.int32)}


def split_long(features: Mapping[str, np.ndarray],
               lengths: Mapping[str, int]) -> list[dict[str, np.ndarray]]:
  """Cuts a single-feature example into pieces of exactly `L` (the last is shorter).

  Multi-feature examples are truncated to their lengths instead (see module doc).
  """
  missing = set(lengths) - set(features)
  if missing:
    raise UserError(f"the feature function returned {sorted(features)} but the pipeline "
                    f"packs {sorted(lengths)}: make feature_lengths name the keys it returns")
  features = {k: np.asarray(features[k], np.int32) for k in lengths}
  if len(features) > 1:
    return [{k: v[:lengths[k]] for k, v in features.items()}]
  (key, value), = features.items()
  length = lengths[key]
  return [{key: value[i:i + length]} for i in range(0, max(len(value), 1), length)]


class _SplitLong(grain.experimental.FlatMapTransform):
  """`split_long` as a grain flat-map; checkpointable by (parent state, piece index)."""

  max_fan_out = sys.maxsize  # the iterator version never materializes the fan-out

  def __init__(self, lengths: Mapping[str, int]):
    self.lengths = dict(lengths)

  def flat_map(self, element):
    return [piece for piece in split_long(element, self.lengths)
            if all(len(v) for v in piece.values()) or len(piece) > 1]


def pad_unpacked(features: Mapping[str, np.ndarray],
                 lengths: Mapping[str, int]) -> dict[str, np.ndarray]:
  """One document per row (packing='none'), padded, with the packed keys' layout."""
  row = {}
  for key, length in lengths.items():
    value = np.asarray(features[key], np.int32)[:length]
    n = len(value)
    row[key] = np.pad(value, (0, length - n))
    row[f"{key}_segment_ids"] = (np.arange(length) < n).astype(np.int32)
    row[f"{key}_positions"] = np.where(np.arange(length) < n, np.arange(length), 0).astype(
        np.int32)
  return row


def _select(features: Mapping[str, np.ndarray], keys) -> dict[str, np.ndarray]:
  return {k: features[k] for k in keys}


def _as_int32(row: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: np.asarray(v, np.int32) for k, v in row.items()}


def pack(ds: grain.IterDataset, lengths: Mapping[str, int], mode: str = "first_fit", *,
         num_packing_bins: int = 64, seed: int = 0,
         shuffle_bins: bool = True) -> grain.IterDataset:
  """Chunks long documents and packs them into rows of `lengths[k]` tokens per key `k`.

  Args:
    ds: an IterDataset of dicts of 1-D int arrays (a feature function's output).
    lengths: row length per packed key, e.g. `{'tokens': 256}`.
    mode: 'first_fit' / 'best_fit' (grain's bin packers over `num_packing_bins` open
      rows), 'concat' (concatenate then split; documents may straddle rows and their
      positions continue across the cut) or 'none' (one document per row).
    num_packing_bins: rows packed at once; more bins, less padding.
    seed: seeds the order in which a set of packed rows is emitted.
    shuffle_bins: emit each set of packed rows in a seeded random order.

  Returns:
    An IterDataset of rows: `k`, `k_segment_ids`, `k_positions`, int32 `[L]` each.
  """
  if mode not in PACKING_MODES:
    raise UserError(f"unknown packing {mode!r}: use one of {', '.join(PACKING_MODES)}")
  lengths = dict(lengths)
  if mode == "concat":
    ds = ds.map(functools.partial(_select, keys=tuple(lengths)))  # the packer wants only these
    packed = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=lengths)
    return packed.map(_as_int32)
  ds = grain.experimental.FlatMapIterDataset(ds, _SplitLong(lengths))
  if mode == "none":
    return ds.map(functools.partial(pad_unpacked, lengths=lengths))
  packer = (grain.experimental.FirstFitPackIterDataset if mode == "first_fit"
            else grain.experimental.BestFitPackIterDataset)
  packed = packer(ds, length_struct=lengths, num_packing_bins=num_packing_bins, seed=seed,
                  shuffle_bins=shuffle_bins)
  return packed.map(_as_int32)


def packing_efficiency(batches: Iterable[Mapping[str, np.ndarray]]) -> float:
  """Fraction of non-pad positions over every `*_segment_ids` array in `batches`."""
  used = total = 0
  for batch in batches:
    for key, value in batch.items():
      if key.endswith("_segment_ids"):
        value = np.asarray(value)
        used += int(np.count_nonzero(value))
        total += value.size
  if not total:
    raise ValueError("packing_efficiency needs batches with *_segment_ids arrays")
  return used / total
