"""Fuzz: after every sampling filter (llmjax.decode.sampling.process_logits), softmax is a
valid distribution (finite, non-negative, sums to 1) for arbitrary float32 logits,
including -inf (as long as one logit is not -inf) and +inf."""

import jax
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from llmjax.decode import sampling

CONFIGS = [sampling.SamplingConfig(temperature=t, top_k=k, top_p=p, min_p=m)
           for t, k, p, m in [(1.0, 0, 1.0, 0.0), (0.7, 3, 1.0, 0.0), (1.3, 0, 0.9, 0.0),
                              (1.0, 0, 1.0, 0.1), (0.5, 2, 0.5, 0.05), (1e-3, 1, 0.01, 1.0)]]
_probs = jax.jit(lambda x, c: jax.nn.softmax(sampling.process_logits(x, c), -1),
                 static_argnums=1)
BIG = float(np.float32(1e30))  # / temperature (>= 1e-3) stays finite in float32
FINITE = st.floats(-BIG, BIG, width=32) | st.floats(-20.0, 20.0)
LOGIT = FINITE | st.just(-np.inf)


def _check(logits, config):
  if all(x == -np.inf for x in logits):
    logits = [*logits[:-1], 0.0]  # an all -inf row has no distribution at all
  probs = np.asarray(_probs(np.asarray([logits], np.float32), config))
  assert np.isfinite(probs).all(), (logits, probs)
  assert (probs >= 0).all() and abs(probs.sum() - 1.0) < 1e-5, (logits, probs)


@settings(max_examples=1500, deadline=None)
@given(st.lists(LOGIT, min_size=1, max_size=12), st.sampled_from(CONFIGS))
def test_filters_give_a_valid_distribution(logits, config):
  _check(logits, config)


@settings(max_examples=300, deadline=None)
@given(st.lists(LOGIT | st.sampled_from([np.inf, 3e38]), min_size=1, max_size=12),
       st.sampled_from(CONFIGS))
def test_filters_give_a_valid_distribution_with_plus_inf(logits, config):
  _check(logits, config)
