"""Each mask function against a mask built by hand with Python loops."""

import numpy as np

from llmjax.layers import masks


def _loops(b, l, s, allowed):
  out = np.zeros((b, 1, l, s), bool)
  for bi in range(b):
    for i in range(l):
      for j in range(s):
        out[bi, 0, i, j] = allowed(bi, i, j)
  return out


def test_causal_mask():
  got = np.asarray(masks.causal_mask(5))
  assert got.shape == (1, 1, 5, 5)
  np.testing.assert_array_equal(got, _loops(1, 5, 5, lambda b, i, j: j <= i))
  got = np.asarray(masks.causal_mask(3, 6))
  np.testing.assert_array_equal(got, _loops(1, 3, 6, lambda b, i, j: j <= i))


def test_padding_and_bidirectional_mask():
  q_valid = np.array([[1, 1, 0], [1, 0, 0]], bool)
  k_valid = np.array([[1, 0, 1, 1], [0, 1, 1, 0]], bool)
  got = np.asarray(masks.padding_mask(q_valid, k_valid))
  np.testing.assert_array_equal(
      got, _loops(2, 3, 4, lambda b, i, j: q_valid[b, i] and k_valid[b, j]))
  got = np.asarray(masks.bidirectional_mask(k_valid))
  np.testing.assert_array_equal(
      got, _loops(2, 4, 4, lambda b, i, j: k_valid[b, i] and k_valid[b, j]))


def test_segment_mask():
  q_seg = np.array([[1, 1, 2, 2, 2, 0], [1, 2, 3, 3, 0, 0]])
  k_seg = np.array([[1, 1, 2, 2, 2, 0, 0], [1, 2, 2, 3, 3, 3, 0]])
  got = np.asarray(masks.segment_mask(q_seg, k_seg))
  np.testing.assert_array_equal(
      got, _loops(2, 6, 7, lambda b, i, j: q_seg[b, i] == k_seg[b, j] and q_seg[b, i] != 0))


def test_prefix_lm_mask():
  is_prefix = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], bool)
  prefix_len = is_prefix.sum(-1)
  got = np.asarray(masks.prefix_lm_mask(is_prefix))
  np.testing.assert_array_equal(
      got, _loops(3, 5, 5, lambda b, i, j: j <= i or (i < prefix_len[b] and j < prefix_len[b])))


def test_combine_masks():
  seg = np.array([[1, 1, 2, 2, 0]])
  got = np.asarray(masks.combine_masks(masks.causal_mask(5), None, masks.segment_mask(seg, seg)))
  np.testing.assert_array_equal(
      got, _loops(1, 5, 5, lambda b, i, j: j <= i and seg[b, i] == seg[b, j] != 0))
  assert masks.combine_masks(None, None) is None
