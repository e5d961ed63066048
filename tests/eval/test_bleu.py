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


def _teacher_forced_argmax(model, params, sources, outputs, max_len, start_id):
  """argmax of one full forward over [start] + output per row: greedy must reproduce its
  own tokens (causal attention: position t sees only the tokens before it)."""
  enc = np.zeros((len(sources), max(map(len, sources))), np.int32)
  dec = np.zeros((len(sources), max_len), np.int32)
  for row, (source, out) in enumerate(zip(sources, outputs)):
    enc[row, :len(source)] = source
    dec[row, :len(out) + 1] = [start_id, *out][:max_len]
  logits = model.apply({"params": params}, jnp.asarray(dec), encoder_tokens=jnp.asarray(enc),
                       encoder_segment_ids=jnp.asarray((enc > 0).astype(np.int32)))  # [B, T, V]
  return np.argmax(np.asarray(logits), axis=-1)  # [B, T]


def test_greedy_decoders_agree_with_a_teacher_forced_pass():
  # Scanned (generate unstacks it); sinusoidal positions, for which eos=90 below is an id
  # this random model emits mid-row.
  model = Transformer(presets.get_preset("t5-tiny", position="sinusoidal"))
  rng = np.random.default_rng(0)
  # Ragged sources (encoder padding is exercised), no pad id 0 inside them.
  inputs = [rng.integers(3, 128, size=n).tolist() + [1] for n in (6, 2, 4, 1, 5)]
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32),
                                        encoder_tokens=jnp.zeros((1, 8), jnp.int32)))
  params = flax.linen.meta.unbox(init(jax.random.PRNGKey(1))["params"])
  params = jax.tree.map(lambda x: x * 8, params)  # so the argmax varies between steps
  eos, max_len = 90, 8  # eos: an id this random model emits mid-row (the cut is exercised)
  kwargs = {"max_len": max_len, "start_id": 2, "eos_id": eos}
  full = bleu.greedy_decode(model, params, inputs, inputs_length=8, batch_size=4, **kwargs)
  want = _teacher_forced_argmax(model, params, inputs, full, max_len, 2)
  for row, out in zip(want.tolist(), full):
    assert row[:len(out)] == out
    if len(out) < max_len:  # stopped early: the next greedy token is eos
      assert row[len(out)] == eos
  assert len({tuple(row) for row in full}) > 1  # the sources change the outputs
  assert any(len(row) < max_len for row in full)  # some rows stopped at eos
  assert bleu.greedy_decode_cached(model, params, inputs, batch_size=3, **kwargs) == full
