"""Fuzz: cleaning is idempotent: normalizing (or cleaning) its own output changes nothing."""

from hypothesis import given, settings
from hypothesis import strategies as st

from llmjax.data import cleaning

CONFIGS = [cleaning.CleaningConfig(),
           cleaning.CleaningConfig(normalize_whitespace=True),
           cleaning.CleaningConfig(nfkc=False, normalize_whitespace=True)]
TEXT = st.text(st.characters(codec="utf-8"), max_size=60) | st.text(
    st.sampled_from(list(" \t\n\r\u00a0\u2028ﬁ①Ａé\u0301ß\u200b")), max_size=30)


@settings(max_examples=1500, deadline=None)
@given(TEXT, st.sampled_from(CONFIGS))
def test_normalize_is_idempotent(text, config):
  once = cleaning.normalize(text, config)
  assert cleaning.normalize(once, config) == once


@settings(max_examples=150, deadline=None)
@given(st.lists(TEXT, max_size=6), st.sampled_from(CONFIGS))
def test_clean_is_idempotent(docs, config):
  _, texts, _ = cleaning.clean(docs, config)
  kept, again, _ = cleaning.clean(texts, config)
  assert again == texts and kept == list(range(len(texts)))
