"""Fuzz: packing keeps every token, in order within each packed segment, and nothing else.

Token values encode (document, position), so any loss, duplication or reordering shows."""

import grain
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from llmjax.data import packing


def _rows(doc_lengths, mode, row_len):
  docs = [{"tokens": np.arange(n, dtype=np.int32) + 1000 * (d + 1)}
          for d, n in enumerate(doc_lengths)]
  ds = grain.MapDataset.source(docs).to_iter_dataset()
  return list(packing.pack(ds, {"tokens": row_len}, mode, num_packing_bins=3, seed=0))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=8), st.integers(1, 16),
       st.sampled_from(packing.PACKING_MODES))
def test_packing_preserves_every_token_in_order(doc_lengths, row_len, mode):
  rows = _rows(doc_lengths, mode, row_len)
  got = []
  for row in rows:
    tokens, segments = row["tokens"], row["tokens_segment_ids"]
    assert tokens.shape == segments.shape == row["tokens_positions"].shape == (row_len,)
    assert not tokens[segments == 0].any()  # padding is zeros
    for seg in np.unique(segments[segments > 0]):
      piece = tokens[segments == seg]
      if mode != "concat":  # a segment is one contiguous piece of one document
        assert (np.diff(piece) == 1).all() and len(set(piece // 1000)) == 1, piece
      got.extend(piece.tolist())
  want = [1000 * (d + 1) + i for d, n in enumerate(doc_lengths) for i in range(n)]
  if mode == "concat":  # one stream cut into rows: the global order survives too
    assert got == want[:len(got)] and len(want) - len(got) < row_len
  else:
    assert sorted(got) == want
