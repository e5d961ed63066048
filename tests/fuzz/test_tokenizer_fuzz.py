"""Fuzz: a whitespace-exact tokenizer with byte fallback round-trips arbitrary Unicode
(spaces, tabs, newlines, unseen scripts and emoji included) exactly."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmjax.data import tokenizer as tokenizer_lib

CORPUS = ["def f(x):\n    return x  # two  spaces\n\tTabbed line.\n\n",
          "To be, or not to be: that is the question.\n", "naïve café — 東京 🙂\n"] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tokenizer_lib.train_tokenizer(
      CORPUS, str(tmp_path_factory.mktemp("tok") / "fuzz"), model_type="bpe",
      vocab_size=400, byte_fallback=True, num_sentinels=0, whitespace_exact=True)


@settings(max_examples=1500, deadline=None)
@given(text=st.text(st.characters(codec="utf-8"), max_size=50)
       | st.text(st.sampled_from(list(" \t\n\r ab東🙂\u00a0")), max_size=30))
def test_round_trip_is_exact(tok, text):
  assert tok.decode(tok.encode(text)) == text
