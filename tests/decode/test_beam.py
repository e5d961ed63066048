"""Beam search: beam size 1 is greedy; n-best equals a naive Python beam search."""

import functools
import math

import jax
import numpy as np

from llmjax.decode import beam, generate
from llmjax.decode.sampling import SamplingConfig
from llmjax.models.presets import get_preset
from llmjax.models.transformer import Transformer
from llmjax.testing import reference

PROMPTS = [[5, 17, 99, 3], [7, 8]]


@functools.cache
def _model():
  model = Transformer(get_preset("tiny", vocab_size=16))
  return model, reference.random_params(model, np.ones((1, 8), np.int32), std=0.5)


def _naive_beam_search(model, params, prompt, beams, steps, eos, alpha):
  """Full forward per hypothesis; the same rules as llmjax.decode.beam, in plain Python."""
  forward = jax.jit(functools.partial(model.apply, {"params": params}))
  lp = lambda n: ((5 + n) / 6) ** alpha
  alive, finished = [((), 0.0)], []                      # (tokens, log-prob)
  for i in range(steps):
    candidates = []
    for seq, score in alive:
      buf = np.zeros((1, 12), np.int32)              # fixed shape: one compile
      buf[0, :len(prompt) + i] = prompt + list(seq)
      logits = np.asarray(forward(buf))[0, len(prompt) + i - 1].astype(np.float64)
      log_probs = logits - logits.max() - math.log(np.exp(logits - logits.max()).sum())
      candidates += [(seq + (t,), score + log_probs[t]) for t in range(len(log_probs))]
    candidates = sorted(candidates, key=lambda c: -c[1])[:2 * beams]
    finished += [(s, v / lp(i + 1)) for s, v in candidates if s[-1] == eos]
    finished = sorted(finished, key=lambda c: -c[1])[:beams]
    alive = [c for c in candidates if c[0][-1] != eos][:beams]
    if len(finished) == beams and finished[-1][1] >= alive[0][1] / lp(steps):
      break
  pool = finished + [(s, v / lp(len(s))) for s, v in alive]
  return sorted(pool, key=lambda c: -c[1])[:beams]


def test_beam_size_one_is_greedy():
  model, params = _model()
  out = beam.beam_search(model, params, PROMPTS, beam_size=1, max_new_tokens=5)
  greedy = generate.generate(model, params, PROMPTS, max_new_tokens=5,
                             sampling=SamplingConfig(temperature=0.0))
  np.testing.assert_array_equal(out.tokens[:, 0], greedy.tokens)


def test_n_best_equals_naive_beam_search():
  model, params = _model()
  eos, beams, steps = 3, 3, 5
  out = beam.beam_search(model, params, PROMPTS, beam_size=beams, max_new_tokens=steps,
                         eos_id=eos, alpha=0.6, num_return=beams)
  for row, prompt in enumerate(PROMPTS):
    want = _naive_beam_search(model, params, prompt, beams, steps, eos, 0.6)
    got = [tuple(int(t) for t in out.tokens[row, j, :out.lengths[row, j]]) for j in range(beams)]
    assert got == [s for s, _ in want]
    np.testing.assert_allclose(out.scores[row], [v for _, v in want], rtol=1e-5)
  ends = np.take_along_axis(out.tokens, out.lengths[..., None] - 1, axis=2)
  assert (ends == eos).any() and (ends != eos).any()  # finished and alive beams both returned
