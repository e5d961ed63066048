"""Corpus cleaning: normalisation, quality filters, exact + near deduplication, splits.

`clean(docs, config)` runs the stages in this order and reports, per stage, how many
documents and characters (Python code points) went in, came out and were removed:

  1. normalize       NFKC (optional) then whitespace normalisation (optional).
  2. filters         one stage per enabled filter, cheapest first (`FILTERS`); a document
                     is charged to the first filter that rejects it.
  3. exact_dedup     sha256 of the normalised text; the first occurrence is kept.
  4. near_dedup      MinHash + LSH over word shingles (`llmjax.data.dedup`); the first
                     document of each near-duplicate cluster is kept.

The quality filters are the cheap heuristics of Rae et al. 2021, "Scaling Language
Models: Methods, Analysis & Insights from Training Gopher" (MassiveText rules, App. A):
  min_chars / max_chars       length in characters. Very short documents carry no
                              context; very long ones are usually dumps (logs, tables).
  max_non_printable_frac      fraction of characters that are not printable: Python's
                              `not str.isprintable()` (categories Cc, Cf, Cs, Co, Cn)
                              excluding whitespace, plus U+FFFD. A high fraction means
                              binary junk or a mis-decoded file.
  min_letter_frac             letters (`str.isalpha`) / non-whitespace characters.
                              Low values mean tables of numbers, markup or symbols
                              (Gopher: 80% of words must contain a letter).
  max_repeated_line_frac      non-empty lines (stripped) equal to an earlier line of the
                              same document / non-empty lines. High values mean
                              boilerplate or scraped menus (Gopher drops > 0.3). Off by
                              default: plays repeat speaker headings on purpose.
None disables a filter; a minimum of 0 is a no-op; a maximum fraction of 0 is strict
(no non-printable character / no repeated line allowed).

`split_for_key` assigns a stable train/validation/test split from a hash of a document
key, so the split survives re-runs, re-orderings and machines.
"""

import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
import unicodedata
from collections.abc import Mapping, Sequence

from llmjax.data import dedup
from llmjax.errors import UserError

FILTERS = ("min_chars", "max_chars", "non_printable", "letter_frac", "repeated_lines")
_HSPACE_RE = re.compile(r"[ \t]+")
_TRAILING_RE = re.compile(r" +$", re.MULTILINE)
_BLANKS_RE = re.compile(r"\n{3,}")


@dataclasses.dataclass(frozen=True)
class CleaningConfig:
  """What `clean` does; see the module docstring for each filter's heuristic."""
  nfkc: bool = True
  normalize_whitespace: bool = False
  min_chars: int | None = 1
  max_chars: int | None = None
  max_non_printable_frac: float | None = 0.1
  min_letter_frac: float | None = None
  max_repeated_line_frac: float | None = None
  exact_dedup: bool = True
  near_dedup: bool = True
  jaccard_threshold: float = 0.8
  shingle_size: int = 5  # words
  num_perm: int = 128
  seed: int = 0
  lsh_bands: int | None = None  # None: derived from jaccard_threshold and num_perm

  def __post_init__(self):
    for name in ("nfkc", "normalize_whitespace", "exact_dedup", "near_dedup"):
      if not isinstance(getattr(self, name), bool):
        raise UserError(f"CleaningConfig.{name}={getattr(self, name)!r} is invalid: "
                        "it must be True or False.")
    for name in ("min_chars", "max_chars"):
      value = getattr(self, name)
      if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                or value < 0):
        raise UserError(f"CleaningConfig.{name}={value!r} is invalid: it must be an int "
                        ">= 0, or None to disable the filter.")
    if self.min_chars is not None and self.max_chars is not None and (
        self.max_chars < self.min_chars):
      raise UserError(f"CleaningConfig.max_chars={self.max_chars} is below min_chars="
                      f"{self.min_chars}: raise max_chars or set it to None.")
    for name in ("max_non_printable_frac", "min_letter_frac", "max_repeated_line_frac"):
      value = getattr(self, name)
      if value is not None and (isinstance(value, bool) or not isinstance(
          value, (int, float)) or not 0 <= value <= 1):
        raise UserError(f"CleaningConfig.{name}={value!r} is invalid: it must be a "
                        "fraction in [0, 1], or None to disable the filter.")
    if isinstance(self.seed, bool) or not isinstance(self.seed, int):
      raise UserError(f"CleaningConfig.seed={self.seed!r} is invalid: it must be an int.")
    try:
      dedup.check_params(self.jaccard_threshold, self.shingle_size, self.num_perm,
                         self.lsh_bands)
    except UserError as e:
      raise UserError(f"CleaningConfig.{e}") from None


def normalize(text: str, config: CleaningConfig) -> str:
  """NFKC (if `config.nfkc`), then whitespace normalisation (if `normalize_whitespace`).

  NFKC folds compatibility characters: ligatures ('ﬁ' -> 'fi'), full-width forms
  ('１２' -> '12'), no-break and ideographic spaces -> ' '. Whitespace normalisation is
  exactly, in order: '\\r\\n' and '\\r' -> '\\n'; every run of spaces/tabs -> one space;
  spaces at the end of a line removed; three or more consecutive newlines (two or more
  blank lines) -> two newlines (one blank line); leading/trailing whitespace of the
  document removed.
  """
  if config.nfkc:
    text = unicodedata.normalize("NFKC", text)
  if config.normalize_whitespace:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _HSPACE_RE.sub(" ", text)
    text = _TRAILING_RE.sub("", text)
    text = _BLANKS_RE.sub("\n\n", text)
    text = text.strip()
  return text


def non_printable_frac(text: str) -> float:
  """Fraction of characters that are neither printable nor whitespace, or are U+FFFD."""
  if not text:
    return 0.0
  visible = "".join(text.split())  # whitespace is fine; removing it keeps the fast path
  if visible.isprintable():  # C speed for the common case
    count = visible.count("\ufffd")
  else:
    count = sum(1 for c in visible if c == "\ufffd" or not c.isprintable())
  return count / len(text)


def letter_frac(text: str) -> float:
  """Letters / non-whitespace characters (0 for a document of only whitespace)."""
  visible = "".join(text.split())
  return sum(map(str.isalpha, visible)) / len(visible) if visible else 0.0


def repeated_line_frac(text: str) -> float:
  """Fraction of non-empty (stripped) lines that repeat an earlier line of `text`."""
  lines = [line for line in (raw.strip() for raw in text.splitlines()) if line]
  return (len(lines) - len(set(lines))) / len(lines) if lines else 0.0


def document_filter_reason(text: str, config: CleaningConfig) -> str | None:
  """The first filter (a name in `FILTERS`) that rejects `text`, or None if it passes.

  Stateless and applied to already-normalised text; cheap filters run first.
  """
  c = config
  if c.min_chars is not None and len(text) < c.min_chars:
    return "min_chars"
  if c.max_chars is not None and len(text) > c.max_chars:
    return "max_chars"
  if c.max_non_printable_frac is not None and (
      non_printable_frac(text) > c.max_non_printable_frac):
    return "non_printable"
  if c.min_letter_frac is not None and letter_frac(text) < c.min_letter_frac:
    return "letter_frac"
  if c.max_repeated_line_frac is not None and (
      repeated_line_frac(text) > c.max_repeated_line_frac):
    return "repeated_lines"
  return None


def _enabled_filters(c: CleaningConfig) -> list[str]:
  values = (c.min_chars, c.max_chars, c.max_non_printable_frac, c.min_letter_frac,
            c.max_repeated_line_frac)
  return [name for name, value in zip(FILTERS, values) if value is not None]


@dataclasses.dataclass
class StageReport:
  """Documents and characters that went into and came out of one cleaning stage."""
  name: str
  docs_in: int
  docs_out: int
  chars_in: int
  chars_out: int

  @property
  def docs_removed(self) -> int:
    return self.docs_in - self.docs_out

  @property
  def chars_removed(self) -> int:
    """Characters removed; negative for `normalize` when NFKC expands (e.g. 'ﬁ')."""
    return self.chars_in - self.chars_out


@dataclasses.dataclass
class CleaningReport:
  """The per-stage accounting of one `clean` call: a table to print, JSON to keep."""
  stages: list[StageReport] = dataclasses.field(default_factory=list)

  @property
  def docs_in(self) -> int:
    return self.stages[0].docs_in if self.stages else 0

  @property
  def docs_out(self) -> int:
    return self.stages[-1].docs_out if self.stages else 0

  def to_dict(self) -> dict:
    return {"stages": [dict(dataclasses.asdict(s), docs_removed=s.docs_removed,
                            chars_removed=s.chars_removed) for s in self.stages]}

  @classmethod
  def from_dict(cls, d: Mapping) -> "CleaningReport":
    fields = ("name", "docs_in", "docs_out", "chars_in", "chars_out")
    return cls([StageReport(**{k: s[k] for k in fields}) for s in d["stages"]])

  def format(self) -> str:
    """A fixed-width table, one row per stage, and a summary line."""
    head = ("stage", "docs_in", "docs_out", "removed", "chars_in", "chars_out", "removed")
    rows = [[s.name] + [f"{v:,}" for v in (s.docs_in, s.docs_out, s.docs_removed,
                                           s.chars_in, s.chars_out, s.chars_removed)]
            for s in self.stages]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def fmt(row):  # the stage name left-aligned, numbers right-aligned
      return "  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                       for i, (v, w) in enumerate(zip(row, widths)))

    lines = [fmt(head), "  ".join("-" * w for w in widths), *map(fmt, rows)]
    if self.stages:
      kept = self.docs_out / self.docs_in if self.docs_in else 0.0
      lines.append(f"kept {self.docs_out:,} of {self.docs_in:,} documents ({kept:.1%}), "
                   f"{self.stages[-1].chars_out:,} of {self.stages[0].chars_in:,} chars")
    if self.docs_in and not self.docs_out:
      lines.append("WARNING: no documents survived cleaning; loosen the filters.")
    return "\n".join(lines)

  def save(self, path: str | os.PathLike) -> None:
    """Writes the report as JSON atomically (temp file in the same folder, then rename)."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
      with os.fdopen(fd, "w") as f:
        json.dump(self.to_dict(), f, indent=2)
      os.replace(tmp, path)
    except BaseException:
      os.unlink(tmp)
      raise

  @classmethod
  def load(cls, path: str | os.PathLike) -> "CleaningReport":
    with open(path) as f:
      return cls.from_dict(json.load(f))


def _check_docs(docs: Sequence[str]) -> None:
  if isinstance(docs, (str, bytes)):
    raise UserError("clean() got a single string: pass a sequence of documents, "
                    "e.g. clean([text], config).")
  for i, doc in enumerate(docs):
    if not isinstance(doc, str):
      raise UserError(f"document {i} is a {type(doc).__name__}, not a str: decode "
                      "bytes (doc.decode('utf-8')) and drop non-text records first.")


def clean(docs: Sequence[str], config: CleaningConfig
          ) -> tuple[list[int], list[str], CleaningReport]:
  """Runs every stage; returns (kept indices into `docs`, their cleaned texts, report).

  An empty result is not an error here (the caller decides); `report.format()` warns.
  """
  _check_docs(docs)
  report = CleaningReport()
  texts = [normalize(d, config) for d in docs]
  report.stages.append(StageReport("normalize", len(docs), len(docs),
                                   sum(map(len, docs)), sum(map(len, texts))))
  keep = list(range(len(docs)))

  def stage(name: str, survivors: list[int]) -> None:
    nonlocal keep
    report.stages.append(StageReport(name, len(keep), len(survivors),
                                     sum(len(texts[i]) for i in keep),
                                     sum(len(texts[i]) for i in survivors)))
    keep = survivors

  reasons = [document_filter_reason(t, config) for t in texts]
  enabled = _enabled_filters(config)
  for name in enabled:
    stage(name, [i for i in keep if reasons[i] != name])
  if config.exact_dedup:
    firsts = dedup.exact_duplicates([texts[i] for i in keep])
    stage("exact_dedup", [i for i, f in zip(keep, firsts) if f is None])
  if config.near_dedup:
    clusters = dedup.near_duplicate_clusters(
        [texts[i] for i in keep], config.jaccard_threshold, config.shingle_size,
        config.num_perm, config.seed, config.lsh_bands)
    dropped = {keep[j] for cluster in clusters for j in cluster[1:]}
    stage("near_dedup", [i for i in keep if i not in dropped])
  return keep, [texts[i] for i in keep], report


def split_for_key(key: str, fractions: Mapping[str, float], salt: str = "") -> str:
  """The split ('train', 'validation', ...) of the document with this stable `key`.

  u = the first 8 bytes of sha256(salt + '\\0' + key) / 2^64 is uniform in [0, 1); the
  splits, sorted by name (so the mapping's order does not matter), take consecutive
  intervals of [0, 1) of their fractions' lengths. Same key, salt and fractions -> same
  split on every run and machine. Change `salt` to draw an independent split.
  """
  if not isinstance(key, str) or not isinstance(salt, str):
    raise UserError(f"split_for_key needs str key and salt, got {type(key).__name__} and "
                    f"{type(salt).__name__}: pass a stable id such as 'play/act/scene'.")
  if not isinstance(fractions, Mapping) or not fractions:
    raise UserError(f"split fractions {fractions!r} must be a non-empty mapping of split "
                    "name to fraction, e.g. {'train': 0.9, 'validation': 0.1}.")
  for name, frac in fractions.items():
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not (
        math.isfinite(frac) and frac >= 0):
      raise UserError(f"split fraction {name}={frac!r} is invalid: each fraction must be "
                      "a number >= 0 and together they must sum to 1.")
  total = sum(fractions.values())
  if abs(total - 1.0) > 1e-6:
    raise UserError(f"split fractions {dict(fractions)} sum to {total:g}, not 1: rescale "
                    "them, e.g. {'train': 0.8, 'validation': 0.1, 'test': 0.1}.")
  digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
  u = int.from_bytes(digest[:8], "big") / 2.0**64
  cumulative, chosen = 0.0, None
  for name in sorted(fractions):
    if fractions[name] > 0:
      cumulative += fractions[name]
      chosen = name
      if u < cumulative:
        break
  return chosen  # the last positive split also absorbs floating-point round-off
