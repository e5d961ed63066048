"""Exact and near-duplicate detection: content hashes, MinHash signatures and LSH banding.

Near-duplicates follow Broder, "On the resemblance and containment of documents" (1997):
the resemblance of two documents is the Jaccard similarity of their sets of word
n-grams ("shingles"), estimated by MinHash, and candidate pairs come from locality
sensitive hashing over bands of the signature (Leskovec, Rajaraman & Ullman, "Mining of
Massive Datasets", ch. 3). This is the recipe of GPT-3 / The Pile / text-dedup.

Pipeline, all vectorised over the whole corpus with numpy:
  1. words = lowercased `\\w+` runs; each distinct word gets a 64-bit blake2b hash.
  2. shingle hash = 64-bit polynomial hash of `shingle_size` consecutive word hashes,
     finished with the splitmix64 mixer. A document with fewer words than
     `shingle_size` has exactly one shingle (all its words); one with no words has none
     and is never a near-duplicate of anything.
  3. MinHash: `num_perm` universal hashes h(x) = (a*x + b) mod p with p = 2^31 - 1 over
     the shingle hashes reduced mod p. Each h is a bijection of Z_p (a != 0), so distinct
     reduced shingles never tie; a, b, x < 2^31 so a*x + b fits in uint64 exactly.
  4. LSH: the signature is cut into `bands` bands of `rows` rows; documents that agree
     on a whole band share a bucket (a dict keyed by a 64-bit hash of the band) and
     become candidates. bands/rows minimise a weighted false positive + false negative
     area around the threshold (as datasketch's `_optimal_param`) unless given.
  5. Verification: a candidate is a duplicate only if the exact Jaccard of the two
     shingle-hash sets with an earlier *kept* document is >= the threshold (so an LSH
     or MinHash accident never removes a document). Documents are visited in order, so
     the first document of each cluster is kept and no two kept documents are verified
     near-duplicates of each other.
"""

import functools
import hashlib
import re
from collections.abc import Sequence

import numpy as np

from llmjax.errors import UserError

MERSENNE_31 = (1 << 31) - 1
_WORD_RE = re.compile(r"\w+")
_NGRAM_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant: multiply wraps mod 2^64
_CHUNK_ROWS = 4096  # shingles hashed per step: the [4096, num_perm] buffer stays in cache


def content_hash(text: str) -> str:
  """sha256 hex digest of the UTF-8 text: the key of exact deduplication."""
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def exact_duplicates(docs: Sequence[str]) -> list[int | None]:
  """For each document, the index of the first earlier identical document, or None."""
  first: dict[str, int] = {}
  out: list[int | None] = []
  for i, doc in enumerate(docs):
    j = first.setdefault(content_hash(doc), i)
    out.append(j if j != i else None)
  return out


def check_params(threshold: float, shingle_size: int, num_perm: int,
                 bands: int | None) -> None:
  """Raises UserError for near-dedup parameters that cannot work."""
  if not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
    raise UserError(
        f"jaccard_threshold={threshold!r} is invalid: it must be a number in (0, 1]; "
        "0.8 is the usual choice (set near_dedup=False to disable near-dedup).")
  for name, value in (("shingle_size", shingle_size), ("num_perm", num_perm)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise UserError(f"{name}={value!r} is invalid: it must be a positive int "
                      "(defaults: shingle_size=5, num_perm=128).")
  if bands is not None and (isinstance(bands, bool) or not isinstance(bands, int)
                            or not 1 <= bands <= num_perm):
    raise UserError(f"lsh_bands={bands!r} is invalid: it must be an int in [1, num_perm="
                    f"{num_perm}], or None to derive it from the Jaccard threshold.")


def shingle_hashes(docs: Sequence[str], shingle_size: int) -> tuple[np.ndarray, np.ndarray]:
  """64-bit hashes of every document's word shingles, flattened.

  Returns (hashes, doc_ids): uint64 hashes and the int64 index of the document each
  came from, sorted by document. Repeated shingles within a document are kept (MinHash
  takes a minimum, so repeats do not matter).
  """
  n = shingle_size
  words, lengths = [], []
  for doc in docs:
    ws = _WORD_RE.findall(doc.lower())
    if 0 < len(ws) < n:
      ws += [""] * (n - len(ws))  # pad short docs ("" is never a word) to one shingle
    words += ws
    lengths.append(len(ws))
  # dict.fromkeys / map run at C speed: one hash per distinct word, not per occurrence.
  vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
  word_hash = np.fromiter(
      (int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little")
       for w in vocab), dtype=np.uint64, count=len(vocab))
  ids = np.fromiter(map(vocab.__getitem__, words), dtype=np.int64, count=len(words))
  word_hashes = word_hash[ids]  # [T]
  lengths = np.asarray(lengths, dtype=np.int64)
  num_starts = max(len(words) - n + 1, 0)
  h = word_hashes[:num_starts].copy()
  for j in range(1, n):
    h = h * _NGRAM_MULT + word_hashes[j:j + num_starts]  # wraps mod 2^64 by design
  h = _splitmix64(h)
  # Keep only n-grams that lie inside one document.
  doc_of_word = np.repeat(np.arange(len(lengths)), lengths)
  ends = np.cumsum(lengths)
  start_doc = doc_of_word[:num_starts]
  valid = np.arange(num_starts) + n <= ends[start_doc]
  return h[valid], start_doc[valid]


def _splitmix64(z: np.ndarray) -> np.ndarray:
  """The splitmix64 finaliser: spreads every input bit over all 64 output bits."""
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def minhash_params(num_perm: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(a, b) of the `num_perm` hashes (a*x + b) mod p, p = 2^31 - 1: a in [1, p), b in [0, p)."""
  rng = np.random.default_rng(seed)
  a = rng.integers(1, MERSENNE_31, size=num_perm, dtype=np.uint64)
  b = rng.integers(0, MERSENNE_31, size=num_perm, dtype=np.uint64)
  return a, b


def minhash_signatures(hashes: np.ndarray, doc_ids: np.ndarray, num_docs: int,
                       num_perm: int, seed: int = 0) -> np.ndarray:
  """MinHash signatures [num_docs, num_perm] (uint32) from flattened shingle hashes.

  `doc_ids` must be sorted. A document without shingles gets the sentinel p = 2^31 - 1
  in every slot (larger than any hash value).
  """
  a, b = minhash_params(num_perm, seed)
  p = np.uint64(MERSENNE_31)
  x = np.asarray(hashes, dtype=np.uint64) % p
  doc_ids = np.asarray(doc_ids, dtype=np.int64)
  sig = np.full((num_docs, num_perm), MERSENNE_31, dtype=np.uint64)
  buf = np.empty((_CHUNK_ROWS, num_perm), dtype=np.uint64)
  for lo in range(0, len(x), _CHUNK_ROWS):
    xs, ids = x[lo:lo + _CHUNK_ROWS], doc_ids[lo:lo + _CHUNK_ROWS]
    out = buf[:len(xs)]
    np.multiply(xs[:, None], a, out=out)  # [S, P]; < 2^62, no overflow
    out += b
    np.remainder(out, p, out=out)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    mins = np.minimum.reduceat(out, starts, axis=0)  # [docs in chunk, P]
    rows = ids[starts]
    sig[rows] = np.minimum(sig[rows], mins)  # a document may span two chunks
  return sig.astype(np.uint32)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
  """The MinHash estimate of Jaccard similarity: the fraction of equal slots."""
  return float(np.mean(sig_a == sig_b))


@functools.lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
  """(bands, rows) with bands * rows <= num_perm minimising weighted FP + FN area.

  A pair of similarity s becomes a candidate with probability 1 - (1 - s^r)^b; the
  false positive area is its integral over [0, t], the false negative area that of its
  complement over [t, 1] (datasketch's `_optimal_param`). Every candidate is verified
  afterwards, so a false positive costs a little time while a false negative is a
  duplicate left in: weight them 0.1 / 0.9 (t=0.8, 128 perms: 14 bands x 9 rows, a pair
  at s=0.8 is a candidate with p=0.87, at s=0.85 with p=0.975).
  """
  best, best_err = (1, num_perm), float("inf")
  s = np.linspace(0.0, 1.0, 513)
  for rows in range(1, num_perm + 1):
    bands = np.arange(1, num_perm // rows + 1)[:, None]  # [nb, 1]
    prob = 1.0 - (1.0 - s[None, :] ** rows) ** bands  # [nb, grid]
    fp = np.trapezoid(np.where(s <= threshold, prob, 0.0), s, axis=1)
    fn = np.trapezoid(np.where(s >= threshold, 1.0 - prob, 0.0), s, axis=1)
    err = 0.1 * fp + 0.9 * fn
    i = int(np.argmin(err))
    if err[i] < best_err - 1e-12:
      best, best_err = (int(bands[i, 0]), rows), float(err[i])
  return best


def _band_buckets(sig: np.ndarray, bands: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
  """LSH buckets: ([bands, D] uint64 band hashes, [bands, D] bool 'bucket shared').

  A band hash is a 64-bit polynomial hash of the band's `rows` signature values; a
  collision between different bands only adds a candidate, which verification rejects.
  """
  keys = np.zeros((bands, len(sig)), dtype=np.uint64)
  for j in range(rows):
    keys = keys * _NGRAM_MULT + sig[:, j:bands * rows:rows].T  # [bands, D], column k*rows+j
  keys = _splitmix64(keys)
  shared = np.zeros(keys.shape, dtype=bool)
  for k in range(bands):  # a document alone in its bucket in every band has no candidate
    _, inverse, counts = np.unique(keys[k], return_inverse=True, return_counts=True)
    shared[k] = counts[inverse] > 1
  return keys, shared


class _ShingleSets:
  """Each document's distinct shingle hashes, sorted, built on first use."""

  def __init__(self, hashes: np.ndarray, doc_ids: np.ndarray, num_docs: int):
    self._hashes = hashes
    self._bounds = np.searchsorted(doc_ids, np.arange(num_docs + 1))
    self._cache: dict[int, np.ndarray] = {}

  def __getitem__(self, i: int) -> np.ndarray:
    if i not in self._cache:
      self._cache[i] = np.unique(self._hashes[self._bounds[i]:self._bounds[i + 1]])
    return self._cache[i]

  def jaccard(self, i: int, j: int) -> float:
    a, b = self[i], self[j]
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def near_duplicate_clusters(docs: Sequence[str], threshold: float = 0.8,
                            shingle_size: int = 5, num_perm: int = 128, seed: int = 0,
                            bands: int | None = None) -> list[list[int]]:
  """Groups of near-duplicate documents; the first index of each group is the one to keep.

  Only groups with at least two members are returned, ordered by their first member,
  each sorted ascending. LSH proposes candidates; a candidate pair counts only if the
  exact Jaccard of the two shingle sets (64-bit hashes) is >= `threshold`. Documents
  are visited in order and each is compared with earlier *kept* documents only, so every
  later member is a verified near-duplicate of the first member and no two first
  members are. `bands` overrides the LSH band count (rows = num_perm // bands).
  """
  check_params(threshold, shingle_size, num_perm, bands)
  hashes, doc_ids = shingle_hashes(docs, shingle_size)
  sig = minhash_signatures(hashes, doc_ids, len(docs), num_perm, seed)
  bands, rows = lsh_params(float(threshold), num_perm) if bands is None else (
      bands, num_perm // bands)
  keys, shared = _band_buckets(sig, bands, rows)
  has_shingles = np.zeros(len(docs), dtype=bool)
  has_shingles[doc_ids] = True  # documents without shingles never match
  sets = _ShingleSets(hashes, doc_ids, len(docs))
  tables: list[dict[int, list[int]]] = [{} for _ in range(bands)]
  clusters: dict[int, list[int]] = {}
  for i in np.flatnonzero(has_shingles & shared.any(axis=0)).tolist():
    in_bands = np.flatnonzero(shared[:, i]).tolist()
    i_keys = keys[in_bands, i].tolist()
    candidates = set()
    for k, key in zip(in_bands, i_keys):
      candidates.update(tables[k].get(key, ()))
    # Most similar earlier kept document wins; ties go to the earliest.
    scored = sorted((-sets.jaccard(i, j), j) for j in candidates)
    if scored and -scored[0][0] >= threshold:
      first = scored[0][1]
      clusters.setdefault(first, [first]).append(i)
      continue
    for k, key in zip(in_bands, i_keys):  # i is kept: later docs may match it
      tables[k].setdefault(key, []).append(i)
  return [clusters[k] for k in sorted(clusters)]
