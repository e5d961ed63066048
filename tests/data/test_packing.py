"""Packing: every token accounted for, segment ids / positions restart per document."""

import collections

import grain
import numpy as np
import pytest

from llmjax.data import packing
from llmjax.errors import UserError

L = 16
_DOC = 10_000  # token = doc * _DOC + offset + 1: each token names its document and offset


def _docs(n=40, seed=0, max_len=3 * L + 5):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, max_len, size=n)
  lengths[:3] = [L, 2 * L, 1]  # exact multiples and a single token
  return [np.arange(n_, dtype=np.int32) + d * _DOC + 1 for d, n_ in enumerate(lengths)]


def _rows(docs, mode, **kwargs):
  ds = grain.MapDataset.source([{"tokens": d} for d in docs]).to_iter_dataset()
  return list(packing.pack(ds, {"tokens": L}, mode, **kwargs))


def _segments(row, key="tokens"):
  """[(tokens, positions)] per segment id of a row, checking the row's layout."""
  seg, pos, tok = row[f"{key}_segment_ids"], row[f"{key}_positions"], row[key]
  out = []
  for s in range(1, seg.max() + 1):
    where = np.flatnonzero(seg == s)
    assert len(where), f"segment ids skip {s}: {seg}"
    assert np.array_equal(where, np.arange(where[0], where[-1] + 1)), "segment not contiguous"
    out.append((tok[where], pos[where]))
  assert np.all(tok[seg == 0] == 0) and np.all(pos[seg == 0] == 0)
  return out


@pytest.mark.parametrize("mode", ["first_fit", "best_fit", "none"])
def test_every_token_accounted_for_and_segments_restart(mode):
  docs = _docs()
  rows = _rows(docs, mode, num_packing_bins=4, shuffle_bins=False)
  pieces = collections.defaultdict(list)  # doc -> chunks in emission order
  for row in rows:
    assert set(row) == {"tokens", "tokens_segment_ids", "tokens_positions"}
    for value in row.values():
      assert value.dtype == np.int32 and value.shape == (L,)
    for tokens, positions in _segments(row):
      assert np.array_equal(positions, np.arange(len(tokens)))  # restarts per segment
      doc = set((tokens - 1) // _DOC)
      assert len(doc) == 1, "a segment mixes documents"
      pieces[doc.pop()].append(tokens)
  assert sorted(pieces) == list(range(len(docs)))
  for d, doc in enumerate(docs):
    chunks = pieces[d]
    if mode != "none":  # bins are emitted in bin order, not chunk order: sort by offset
      chunks = sorted(chunks, key=lambda c: c[0])
    assert np.array_equal(np.concatenate(chunks), doc)  # chunks in order = the document
    assert [len(c) for c in chunks[:-1]] == [L] * (len(chunks) - 1)  # full rows first


def test_shuffled_bins_keep_the_multiset_of_tokens():
  docs = _docs(seed=1)
  rows = _rows(docs, "first_fit", num_packing_bins=8, seed=3, shuffle_bins=True)
  got = np.sort(np.concatenate([r["tokens"][r["tokens_segment_ids"] > 0] for r in rows]))
  assert np.array_equal(got, np.sort(np.concatenate(docs)))
  # More bins pack tighter than one document per row.
  assert len(rows) < len(_rows(docs, "none"))


def test_concat_preserves_the_token_stream():
  docs = _docs(seed=2)
  rows = _rows(docs, "concat")
  stream = np.concatenate([r["tokens"][r["tokens_segment_ids"] > 0] for r in rows])
  assert np.array_equal(stream, np.concatenate(docs))
  assert all(r["tokens"].shape == (L,) and r["tokens"].dtype == np.int32 for r in rows)
  assert all(np.all(r["tokens_segment_ids"] > 0) for r in rows[:-1])  # no padding inside


def test_multi_feature_packing_keeps_pairs_together():
  rng = np.random.default_rng(0)
  lengths = {"inputs": 12, "targets": 6}
  examples = []
  for d in range(30):
    n_in, n_tg = rng.integers(1, 16), rng.integers(1, 8)  # some exceed: truncated
    examples.append({"inputs": np.full(n_in, d + 1, np.int32),
                     "targets": np.full(n_tg, 1000 + d, np.int32)})
  ds = grain.MapDataset.source(examples).to_iter_dataset()
  rows = list(packing.pack(ds, lengths, "first_fit", num_packing_bins=4, shuffle_bins=False))
  seen = []
  for row in rows:
    assert row["inputs"].shape == (12,) and row["targets"].shape == (6,)
    ins, tgs = _segments(row, "inputs"), _segments(row, "targets")
    assert len(ins) == len(tgs)
    for (i_tok, i_pos), (t_tok, t_pos) in zip(ins, tgs):
      d = int(i_tok[0]) - 1
      assert np.all(i_tok == d + 1) and np.all(t_tok == 1000 + d)  # same pair, same id
      ex = examples[d]
      assert len(i_tok) == min(len(ex["inputs"]), 12) and len(t_tok) == min(
          len(ex["targets"]), 6)
      assert np.array_equal(i_pos, np.arange(len(i_tok)))
      seen.append(d)
  assert sorted(seen) == list(range(30))


def test_split_long_chunks_single_feature_and_truncates_pairs():
  pieces = packing.split_long({"tokens": np.arange(37)}, {"tokens": 16})
  assert [len(p["tokens"]) for p in pieces] == [16, 16, 5]
  assert np.array_equal(np.concatenate([p["tokens"] for p in pieces]), np.arange(37))
  pair = packing.split_long({"inputs": np.arange(20), "targets": np.arange(9)},
                            {"inputs": 8, "targets": 4})
  assert len(pair) == 1 and len(pair[0]["inputs"]) == 8 and len(pair[0]["targets"]) == 4
  with pytest.raises(UserError, match="feature_lengths"):
    packing.split_long({"tokens": np.arange(3)}, {"inputs": 4})


def test_pad_unpacked_layout():
  row = packing.pad_unpacked({"tokens": np.array([7, 8, 9])}, {"tokens": 5})
  assert row["tokens"].tolist() == [7, 8, 9, 0, 0]
  assert row["tokens_segment_ids"].tolist() == [1, 1, 1, 0, 0]
  assert row["tokens_positions"].tolist() == [0, 1, 2, 0, 0]


def test_packing_efficiency_counts_non_pad_positions():
  rng = np.random.default_rng(0)
  batches = [{"tokens_segment_ids": rng.integers(0, 3, (4, 8)), "tokens": np.ones((4, 8))}
             for _ in range(3)]
  naive = sum((b["tokens_segment_ids"] != 0).sum() for b in batches) / (3 * 32)
  assert packing.packing_efficiency(batches) == pytest.approx(naive)
  with pytest.raises(ValueError):
    packing.packing_efficiency([{"tokens": np.ones((2, 2))}])


def test_lm_features_wraps_in_bos_eos():
  class Chars:
    bos_id, eos_id, pad_id = 2, 1, 0

    def encode(self, text):
      return [ord(c) for c in text]

  out = packing.lm_features({"text": "ab"}, Chars())
  assert out["tokens"].dtype == np.int32 and out["tokens"].tolist() == [2, 97, 98, 1]


def test_unknown_mode_is_a_user_error():
  ds = grain.MapDataset.source([{"tokens": np.arange(3)}]).to_iter_dataset()
  with pytest.raises(UserError, match="first_fit"):
    packing.pack(ds, {"tokens": 4}, "greedy")
