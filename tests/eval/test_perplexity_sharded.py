"""Data-parallel perplexity: a batch split over 8 simulated devices (conftest.py starts jax
with `--xla_force_host_platform_device_count=8`) scores what one device scores, for all
three architectures, with a batch size that is not a multiple of 8."""

import jax
import pytest

from llmjax.data import tokenizer as tokenizer_lib
from llmjax.errors import UserError
from llmjax.eval import perplexity as ppl
from llmjax.testing.reference import preset_model

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices: "
                                "XLA_FLAGS=--xla_force_host_platform_device_count=8")

TEXTS = ["to be or not to be, that is the question: whether tis nobler in the mind",
         "abc def ghi", "ghi def abc def ghi def abc, to be or not"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  corpus = ["abc def ghi " * 20, "to be or not to be, that is the question: whether tis "
            "nobler in the mind " * 10]
  return tokenizer_lib.train_tokenizer(corpus, str(tmp_path_factory.mktemp("spm") / "spm"),
                                       model_type="char", vocab_size=None)


def _assert_same(one: dict, many: dict):
  """Token, document and byte counts exactly; losses up to float32 reduction noise."""
  for key in ("tokens", "documents"):
    assert many[key] == one[key], key
  for key in ("loss", "bits_per_byte", "bits_per_char"):
    assert many[key] == pytest.approx(one[key], rel=1e-6), key
  # exp(loss): the loss's absolute rounding (~1e-6 at a loss of 7) is its relative error
  assert many["perplexity"] == pytest.approx(one["perplexity"], rel=1e-6 * max(1.0, one["loss"]))


def test_sliding_windows_on_8_devices_equal_one_device(tok, monkeypatch):
  model, params = preset_model("tiny", vocab_size=tok.vocab_size, max_len=16)
  assert max(len(tok.encode(t)) for t in TEXTS) > 2 * 16  # several windows per document
  one = ppl.text_perplexity(model, params, tok, TEXTS, context=16, stride=6, batch_size=5)
  seen = []
  scorer = ppl._token_log_probs

  def spy(model, params, tokens, targets, **kw):
    seen.append((tokens.shape, len(tokens.sharding.device_set)))
    return scorer(model, params, tokens, targets, **kw)

  monkeypatch.setattr(ppl, "_token_log_probs", spy)
  many = ppl.text_perplexity(model, params, tok, TEXTS, context=16, stride=6, batch_size=5,
                             devices=8)
  _assert_same(one, many)
  # the batch of 5 became 8 rows, one per device, and several batches ran
  assert len(seen) > 1 and set(seen) == {((8, 16), 8)}


def test_pseudo_perplexity_on_8_devices_equals_one_device(tok):
  model, params = preset_model("bert-tiny", vocab_size=tok.vocab_size, max_len=16)
  texts = TEXTS[1:]
  one = ppl.text_perplexity(model, params, tok, texts, context=16, batch_size=5)
  many = ppl.text_perplexity(model, params, tok, texts, context=16, batch_size=5, devices=8)
  _assert_same(one, many)


def test_target_perplexity_on_8_devices_equals_one_device(tok):
  model, params = preset_model("t5-tiny", vocab_size=tok.vocab_size)
  pairs = [(a, b) for a in TEXTS for b in ("abc def", "to be or not")]  # 6 pairs, 2 batches
  one = ppl.pair_perplexity(model, params, tok, pairs, start_id=tok.pad_id, batch_size=5)
  many = ppl.pair_perplexity(model, params, tok, pairs, start_id=tok.pad_id, batch_size=5,
                             devices=8)
  _assert_same(one, many)


def test_more_devices_than_exist_names_the_count_and_the_cpu_flag():
  model, params = preset_model("tiny", max_len=8)
  n = jax.device_count()
  with pytest.raises(UserError, match=rf"only {n} device.*xla_force_host_platform_device_count"):
    ppl.causal_sums(model, params, [[1, 5, 6, 7]], context=8, stride=4, devices=n + 1)
