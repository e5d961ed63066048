"""T5 span corruption: exact reconstruction, noise statistics, lengths and features."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmjax.objectives import span_corruption as sc

EOS = 1
SENTINELS = list(range(1000, 1200))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 300), st.integers(0, 2**32 - 1),
       st.sampled_from([0.15, 0.3, 0.5]), st.sampled_from([1.0, 3.0, 5.0]))
def test_inputs_and_targets_reconstruct_the_original(length, seed, density, mean_span):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(5, 900, length).astype(np.int32)
  mask = sc.random_spans_noise_mask(length, density, mean_span, rng)
  inputs, targets = sc.corrupt(tokens, mask, SENTINELS, EOS)
  np.testing.assert_array_equal(sc.reconstruct(inputs, targets, SENTINELS, EOS), tokens)
  num_spans = int(np.sum(mask & ~np.r_[False, mask[:-1]]))
  # Inputs: kept tokens + one sentinel per span + eos; targets: spans + sentinels + eos.
  assert len(inputs) == length - mask.sum() + num_spans + 1 and inputs[-1] == EOS
  assert len(targets) == mask.sum() + num_spans + 1 and targets[-1] == EOS
  assert [t for t in inputs if t >= 1000] == SENTINELS[:num_spans]
  assert [t for t in targets if t >= 1000] == SENTINELS[:num_spans]


def test_noise_density_and_mean_span_length():
  rng = np.random.default_rng(0)
  length, span_lengths, starts = 512, [], []
  for _ in range(300):
    mask = sc.random_spans_noise_mask(length, 0.15, 3.0, rng)
    assert mask.sum() == round(length * 0.15) and not mask[0]  # non-noise first
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(int), 0]))
    runs = edges[1::2] - edges[::2]
    assert len(runs) == round(round(length * 0.15) / 3.0)
    span_lengths += runs.tolist()
    starts += edges[::2].tolist()
  assert np.mean(span_lengths) == pytest.approx(3.0, abs=0.05)
  assert len(set(span_lengths)) > 5  # random lengths, not all 3
  # Span starts spread over the whole sequence (uniform-ish over quarters).
  quarters = np.bincount(np.asarray(starts) * 4 // length, minlength=4) / len(starts)
  np.testing.assert_allclose(quarters, 0.25, atol=0.03)


def test_raw_length_fills_the_inputs_exactly():
  for inputs_length in (16, 64, 128, 512):
    raw, targets_length = sc.raw_length_for(inputs_length, 0.15, 3.0)
    rng = np.random.default_rng(inputs_length)
    mask = sc.random_spans_noise_mask(raw, 0.15, 3.0, rng)
    inputs, targets = sc.corrupt(np.arange(raw) + 5, mask, SENTINELS, EOS)
    assert len(inputs) == inputs_length and len(targets) == targets_length
    longer = sc.random_spans_noise_mask(raw + 1, 0.15, 3.0, rng)
    assert len(sc.corrupt(np.arange(raw + 1) + 5, longer, SENTINELS, EOS)[0]) > inputs_length


class _Tok:
  """Word-level stand-in: one id per word (ids >= 200), 50 sentinels at 5.."""
  eos_id, bos_id, pad_id, num_sentinels = 1, 2, 0, 50

  def encode(self, text):
    return [200 + int(w) for w in text.split()]

  def sentinel_id(self, k):
    return 5 + k


def test_feature_fn_is_deterministic_and_reconstructs_a_chunk():
  objective = sc.SpanCorruption(inputs_length=32)
  words = [str(i) for i in range(100)]
  example = {"text": " ".join(words)}
  first = objective.feature_fn(example, _Tok())
  again = objective.feature_fn(example, _Tok())
  for key in ("inputs", "targets"):
    np.testing.assert_array_equal(first[key], again[key])
  assert len(first["inputs"]) == 32 and len(first["targets"]) == objective.targets_length()
  original = sc.reconstruct(first["inputs"], first["targets"], range(5, 55), 1) - 200
  start = original[0]
  np.testing.assert_array_equal(original, np.arange(start, start + objective.raw_length))
  other = sc.SpanCorruption(inputs_length=32, seed=1).feature_fn(example, _Tok())
  assert not np.array_equal(other["inputs"], first["inputs"])
