"""Sinusoidal encodings, RoPE (against a complex-number reference, and relativity)."""

import numpy as np

from llmjax.layers.position import apply_rope, sinusoidal_positions
from llmjax.testing import reference


def test_sinusoidal_matches_paper_formula():
  positions = np.array([[0, 1, 2, 7], [3, 0, 1, 2]])
  got = np.asarray(sinusoidal_positions(positions, 8))
  want = np.zeros((2, 4, 8))
  for b in range(2):
    for l in range(4):
      for i in range(4):
        angle = positions[b, l] / 10_000 ** (2 * i / 8)
        want[b, l, 2 * i], want[b, l, 2 * i + 1] = np.sin(angle), np.cos(angle)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_rope_matches_complex_reference():
  x = np.random.default_rng(0).normal(size=(2, 5, 3, 8)).astype(np.float32)
  positions = np.array([[0, 1, 2, 3, 4], [9, 3, 0, 1, 100]])
  got = apply_rope(x, positions, theta=500.0)
  np.testing.assert_allclose(got, reference.rope(x, positions, theta=500.0),
                             rtol=1e-4, atol=1e-4)


def test_rope_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(1)
  q = rng.normal(size=(1, 1, 2, 16)).astype(np.float32)
  k = rng.normal(size=(1, 1, 2, 16)).astype(np.float32)

  def score(m, n):
    qm = np.asarray(apply_rope(q, np.array([[m]])))
    kn = np.asarray(apply_rope(k, np.array([[n]])))
    return (qm * kn).sum(-1)  # [1, 1, N]

  base = score(3, 1)
  for shift in (1, 5, 40):
    np.testing.assert_allclose(score(3 + shift, 1 + shift), base, rtol=1e-4, atol=1e-4)
  assert np.abs(score(3, 2) - base).max() > 1e-3  # ...and it does depend on m - n
