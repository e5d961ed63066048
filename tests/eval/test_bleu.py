"""BLEU / chrF through sacrebleu, and the greedy decoder against a step-by-step loop."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sacrebleu
from sacrebleu.metrics import BLEU, CHRF

from llmjax.errors import UserError
from llmjax.eval import bleu
from llmjax.models import presets
from llmjax.models.transformer import Transformer

HYPS = ["the cat sat on the mat", "quatre-vingt-dix-neuf mille", "a b c d e f"]
REFS = ["the cat sat on a mat", "quatre-vingt-dix-neuf mille", "a b x d e f g"]


def test_scores_equal_sacrebleu_metric_objects():
  scores = bleu.corpus_scores(HYPS, REFS)
  assert scores["bleu"] == pytest.approx(BLEU().corpus_score(HYPS, [REFS]).score)
  assert scores["chrf"] == pytest.approx(CHRF().corpus_score(HYPS, [REFS]).score)
  assert 0 < scores["bleu"] < 100 and 0 < scores["chrf"] < 100
  perfect = bleu.corpus_scores(REFS, REFS)
  assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
  assert sacrebleu.__version__  # the reference implementation is the installed one
  with pytest.raises(UserError):
    bleu.corpus_scores(HYPS, REFS[:2])


def test_greedy_decode_matches_a_step_by_step_loop():
  cfg = presets.get_preset("t5-tiny", scan_layers=False)
  model = Transformer(cfg)
  inputs = [np.asarray([7, 8, 9, 1]), np.asarray([10, 11, 1]), np.asarray([12, 1])]
  params = flax.linen.meta.unbox(model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 6), jnp.int32),
      encoder_tokens=jnp.zeros((1, 5), jnp.int32))["params"])
  # Larger random weights so the argmax varies from step to step.
  params = jax.tree.map(lambda x: x * 8, params)
  eos = 5  # an id the random model emits sometimes, so the cut at eos is exercised
  got = bleu.greedy_decode(model, params, inputs, inputs_length=5, max_len=6, start_id=2,
                           eos_id=eos, batch_size=2)
  for source, out in zip(inputs, got):
    enc = jnp.asarray(source)[None]
    dec = [2]
    want = []
    for _ in range(6):
      logits = model.apply({"params": params}, jnp.asarray(dec)[None], encoder_tokens=enc)
      token = int(jnp.argmax(logits[0, -1]))
      if token == eos:
        break
      want.append(token)
      dec.append(token)
    assert out == want
