"""Decontamination finds planted 13-gram overlaps (and short examples contained whole) and
nothing in disjoint data."""

import numpy as np

from llmjax.eval.decontaminate import overlaps

TRAIN = [("the quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat "
          "in the afternoon sun and dreams of mice"), "a completely different sentence here"]


def test_planted_overlaps_are_found_and_disjoint_text_is_clean():
  planted = ("Preface words. THE QUICK brown fox jumps over the lazy dog while the cat "
             "sleeps on a warm mat, and then something else entirely")
  thirteen = "quick brown fox jumps over the lazy dog while the cat sleeps on"  # 13 words
  short = "lazy dog while the cat"  # 5 words, contained whole
  short_miss = "lazy cat while the dog"
  disjoint = ("to be or not to be that is the question whether tis nobler in the mind to "
              "suffer the slings and arrows")
  flags = overlaps([planted, thirteen, short, short_miss, disjoint, ""], TRAIN)
  np.testing.assert_array_equal(flags, [True, True, True, False, False, False])
  # 13 words spanning two training documents do not count: n-grams stay inside one.
  across = "dreams of mice a completely different sentence here and more words to pad"
  assert not overlaps([across], TRAIN)[0]
  assert not overlaps([disjoint] * 3, TRAIN).any()
