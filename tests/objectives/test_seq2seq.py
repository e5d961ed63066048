"""Seq2seq features and teacher forcing: shifts within packed documents, packing exactness."""

import flax
import jax
import jax.numpy as jnp
import numpy as np

from llmjax.models import presets
from llmjax.models.transformer import Transformer
from llmjax.objectives import seq2seq


def test_shift_right_restarts_in_each_document():
  targets = jnp.asarray([[5, 6, 7, 8, 9, 0]])
  seg = jnp.asarray([[1, 1, 1, 2, 2, 0]])
  np.testing.assert_array_equal(np.asarray(seq2seq.shift_right(targets, seg, 2)),
                                [[2, 5, 6, 2, 8, 2]])


def test_features_and_missing_key():
  class Tok:
    eos_id = 1

    def encode(self, text):
      return [ord(c) for c in text]

  objective = seq2seq.Seq2Seq(inputs_key="en", targets_key="fr", inputs_prefix="> ")
  f = objective.feature_fn({"en": "ab", "fr": "c"}, Tok())
  np.testing.assert_array_equal(f["inputs"], [ord(">"), ord(" "), 97, 98, 1])
  np.testing.assert_array_equal(f["targets"], [99, 1])
  import pytest

  from llmjax.errors import UserError
  with pytest.raises(UserError, match="inputs_key"):
    objective.feature_fn({"de": "x", "fr": "y"}, Tok())


def test_packed_pairs_score_exactly_like_separate_ones():
  model = Transformer(presets.get_preset("t5-tiny", scan_layers=False))
  rng = np.random.default_rng(0)
  pairs = [(rng.integers(5, 128, 5), rng.integers(5, 128, 4)),
           (rng.integers(5, 128, 3), rng.integers(5, 128, 6))]
  objective = seq2seq.Seq2Seq()
  params = flax.linen.meta.unbox(model.init(
      jax.random.PRNGKey(0), **objective.init_inputs({"inputs": 10, "targets": 12}))["params"])

  def row(parts, length):
    tokens = np.zeros(length, np.int32)
    seg = np.zeros(length, np.int32)
    pos = np.zeros(length, np.int32)
    at = 0
    for i, part in enumerate(parts):
      tokens[at:at + len(part)], seg[at:at + len(part)] = part, i + 1
      pos[at:at + len(part)] = np.arange(len(part))
      at += len(part)
    return tokens[None], seg[None], pos[None]

  def sums(parts_in, parts_out):
    i, iseg, ipos = row(parts_in, 10)
    t, tseg, tpos = row(parts_out, 12)
    batch = {"inputs": i, "inputs_segment_ids": iseg, "inputs_positions": ipos,
             "targets": t, "targets_segment_ids": tseg, "targets_positions": tpos}
    return objective.loss_sums(model, params, {k: jnp.asarray(v) for k, v in batch.items()})

  packed = sums([p[0] for p in pairs], [p[1] for p in pairs])
  alone = [sums([p[0]], [p[1]]) for p in pairs]
  assert float(packed["weight"]) == 10
  np.testing.assert_allclose(float(packed["loss"]), sum(float(a["loss"]) for a in alone),
                             rtol=1e-5)
