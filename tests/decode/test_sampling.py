"""Logit warpers equal Hugging Face's on the same logits; sampling respects the filters."""

import jax
import numpy as np
import pytest

from llmjax.decode import sampling
from llmjax.errors import UserError

torch = pytest.importorskip("torch")
logits_process = pytest.importorskip("transformers.generation.logits_process")


def _logits(seed=0, shape=(4, 50)):
  return np.random.default_rng(seed).normal(0, 2.0, shape).astype(np.float32)


def _hf(warper, logits, input_ids=None):
  ids = torch.zeros((logits.shape[0], 1), dtype=torch.long) if input_ids is None else input_ids
  return warper(ids, torch.from_numpy(logits.copy())).numpy()


@pytest.mark.parametrize("k", [1, 5, 49])
def test_top_k_equals_hf(k):
  logits = _logits(k)
  np.testing.assert_array_equal(np.asarray(sampling.top_k_filter(logits, k)),
                                _hf(logits_process.TopKLogitsWarper(k), logits))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_equals_hf(p):
  logits = _logits(int(p * 100))
  got = np.asarray(sampling.top_p_filter(logits, p))
  want = _hf(logits_process.TopPLogitsWarper(p), logits)
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  np.testing.assert_array_equal(got[np.isfinite(got)], want[np.isfinite(want)])
  assert 1 < np.isfinite(got).sum() < got.size  # the filter did something


def test_min_p_and_repetition_penalty_equal_hf():
  logits = _logits(7)
  np.testing.assert_array_equal(np.asarray(sampling.min_p_filter(logits, 0.1)),
                                _hf(logits_process.MinPLogitsWarper(0.1), logits))
  ids = np.random.default_rng(8).integers(0, 50, (4, 6))
  seen = np.zeros((4, 50), bool)
  np.put_along_axis(seen, ids, True, axis=1)
  np.testing.assert_allclose(
      np.asarray(sampling.repetition_penalty(logits, seen, 1.3)),
      _hf(logits_process.RepetitionPenaltyLogitsProcessor(1.3), logits, torch.from_numpy(ids)),
      rtol=1e-6)


def test_chain_is_temperature_then_top_k_then_top_p_as_hf():
  logits = _logits(9)
  cfg = sampling.SamplingConfig(temperature=0.7, top_k=10, top_p=0.8)
  want = logits
  for warper in (logits_process.TemperatureLogitsWarper(0.7),
                 logits_process.TopKLogitsWarper(10), logits_process.TopPLogitsWarper(0.8)):
    want = _hf(warper, want)
  np.testing.assert_allclose(np.asarray(sampling.process_logits(logits, cfg)), want, rtol=1e-6)


def test_samples_stay_inside_the_filtered_set_and_follow_the_seed():
  logits = _logits(10, (2, 50))
  cfg = sampling.SamplingConfig(temperature=1.5, top_k=3)
  draw = jax.jit(lambda key: sampling.sample(logits, cfg, key))
  draws = np.stack([np.asarray(draw(jax.random.key(s))) for s in range(20)])   # [20, B]
  top3 = np.argsort(-logits, axis=-1)[:, :3]
  assert all(np.isin(draws[:, b], top3[b]).all() for b in range(2))
  assert len(np.unique(draws[:, 0])) > 1
  np.testing.assert_array_equal(draw(jax.random.key(3)), draws[3])


def test_bad_settings_are_user_errors():
  with pytest.raises(UserError, match="top_p"):
    sampling.SamplingConfig(top_p=0.0)
  with pytest.raises(UserError, match="temperature"):
    sampling.SamplingConfig(temperature=-1.0)
