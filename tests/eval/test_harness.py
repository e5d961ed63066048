"""Few-shot prompt building and log-likelihood scoring against a naive full-forward sum."""

import functools

import jax
import numpy as np
import pytest

from llmjax.errors import UserError
from llmjax.eval import harness
from llmjax.testing import reference


@functools.cache
def _model(name):
  return reference.preset_model(name, std=0.3)


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1,
                                                                                        keepdims=True))


def test_build_prompt_zero_one_few_shot():
  t = harness.PromptTemplate(example="Q: {input}\nA: {output}", query="Q: {input}\nA:",
                             instruction="Answer.", separator="\n\n")
  shots = [{"input": "1+1", "output": "2"}, {"input": "2+2", "output": "4"}]
  q = {"input": "3+3"}
  assert harness.build_prompt(t, q) == "Answer.\n\nQ: 3+3\nA:"
  assert harness.build_prompt(t, q, shots, 1) == "Answer.\n\nQ: 1+1\nA: 2\n\nQ: 3+3\nA:"
  assert harness.build_prompt(t, q, shots, 2).count("Q:") == 3
  with pytest.raises(UserError, match="num_shots"):
    harness.build_prompt(t, q, shots, 3)
  with pytest.raises(UserError, match="output"):
    harness.build_prompt(t, q, [{"input": "x"}], 1)


def test_decoder_scores_equal_naive_sum_of_log_softmax():
  model, params = _model("tiny")
  contexts = [[1, 5, 9, 2], [1, 5, 9, 2], [1, 7]]
  conts = [[3], [40, 41, 42], [8, 8]]
  got = harness.score_continuations(model, params, contexts, conts)
  forward = jax.jit(functools.partial(model.apply, {"params": params}))
  for c, x, g in zip(contexts, conts, got):
    seq = np.array([c + x], np.int32)
    lp = _log_softmax(forward(seq))[0]
    want = sum(lp[len(c) - 1 + j, t] for j, t in enumerate(x))
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)


def test_encoder_decoder_scores_equal_naive_sum():
  model, params = _model("t5-tiny")
  contexts, conts = [[4, 5, 6], [7, 8, 9, 10, 11]], [[20, 21], [30]]
  got = harness.score_continuations(model, params, contexts, conts, decoder_start_id=0)
  for c, x, g in zip(contexts, conts, got):
    logits = model.apply({"params": params}, np.array([[0] + x[:-1]], np.int32),
                         encoder_tokens=np.array([c], np.int32))
    lp = _log_softmax(logits)[0]
    np.testing.assert_allclose(g, sum(lp[j, t] for j, t in enumerate(x)), rtol=1e-5, atol=1e-5)
