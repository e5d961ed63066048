"""`local_text`: a folder of `.txt` / `.md` / `.jsonl` files as a cleaned, split dataset.

Each `.txt` / `.md` file is one document; each line of a `.jsonl` file is one document
(its "text" field). The documents are cleaned (`llmjax.data.cleaning`), split by a
hash of their key (the file's relative path, plus `:line` for jsonl) and written as
array_record files. Features: `text` and `source` (the document's key).

The folder comes from the builder config (`local_text_config(input_dir)`, what
`llmjax data build --dataset local_text --input DIR` uses) or, without one, from
TFDS's manual_dir (`DownloadConfig(manual_dir=DIR)`). The config's name carries a
hash of the folder's path and file listing (names, sizes, mtimes), so editing the
corpus gives a new dataset instead of silently reusing a stale one.
"""

import dataclasses
import hashlib
import json
import pathlib
import re
from typing import ClassVar

import tensorflow_datasets as tfds

from llmjax.data import cleaning, text_files
from llmjax.data.tfds_builders.base import OwnBuilder
from llmjax.errors import UserError

SUFFIXES = (".txt", ".md", ".jsonl")
DEFAULT_FRACTIONS = (("train", 0.9), ("validation", 0.05), ("test", 0.05))


@dataclasses.dataclass(eq=False)
class LocalTextConfig(tfds.core.BuilderConfig):
  """Where the corpus is and how to clean and split it."""
  input_dir: str = ""
  text_key: str = "text"  # the field read from .jsonl lines
  split_fractions: tuple[tuple[str, float], ...] = DEFAULT_FRACTIONS
  cleaning: object = None  # a cleaning.CleaningConfig; None = its defaults


def _files(input_dir: pathlib.Path) -> list[pathlib.Path]:
  if not input_dir.is_dir():
    raise UserError(f"input folder {input_dir} does not exist (or is not a folder): pass "
                    "--input DIR naming a folder of .txt, .md or .jsonl files")
  files = sorted(p for p in input_dir.rglob("*")
                 if p.is_file() and p.suffix in SUFFIXES
                 and not any(part.startswith(".") for part in p.relative_to(input_dir).parts))
  if not files:
    found = sorted({p.suffix or p.name for p in input_dir.rglob("*") if p.is_file()})
    raise UserError(f"no .txt, .md or .jsonl files in {input_dir} (found: "
                    f"{', '.join(found) or 'nothing'}): put the corpus there as UTF-8 "
                    "text files, or JSON lines with a 'text' field")
  return files


def local_text_config(input_dir: str, *, text_key: str = "text",
                      split_fractions=DEFAULT_FRACTIONS, cleaning=None) -> LocalTextConfig:
  """A config named `<folder>_<hash>`: the hash covers the path, the listing and options."""
  root = pathlib.Path(input_dir).expanduser().resolve()
  digest = hashlib.sha256(str(root).encode())
  for path in _files(root):
    stat = path.stat()
    digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
  digest.update(repr((text_key, tuple(split_fractions), cleaning)).encode())
  stem = re.sub(r"[^a-z0-9]+", "_", root.name.lower()).strip("_") or "corpus"
  return LocalTextConfig(name=f"{stem}_{digest.hexdigest()[:10]}", input_dir=str(root),
                         text_key=text_key, split_fractions=tuple(split_fractions),
                         cleaning=cleaning,
                         description=f"Text files under {root}.")


def _jsonl_documents(text: str, path: pathlib.Path, rel: str, text_key: str):
  for number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"{path}:{number} is not valid JSON ({e.msg}): write one JSON object "
                      "per line") from None
    if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
      raise UserError(f"{path}:{number} has no string field {text_key!r}: give every line "
                      f'a {{"{text_key}": "..."}} field (or set text_key)')
    yield f"{rel}:{number}", record[text_key]


def read_documents(input_dir: str, text_key: str = "text") -> list[tuple[str, str]]:
  """(key, text) for every document under `input_dir`, in a fixed order."""
  root = pathlib.Path(input_dir)
  documents = []
  for path in _files(root):
    rel = str(path.relative_to(root))
    text = text_files.decode_utf8(path.read_bytes(), path)
    if path.suffix == ".jsonl":
      documents += _jsonl_documents(text, path, rel, text_key)
    else:
      documents.append((rel, text))
  return documents


class LocalText(OwnBuilder):
  """A local folder of text files, cleaned and split by hash."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First version."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put .txt, .md or .jsonl files in the manual_dir."

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n", 1)[0],
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(), "source": tfds.features.Text()}),
        disable_shuffling=True,  # keep file order; the pipeline shuffles
    )

  def _split_generators(self, dl_manager):
    from llmjax.data import tfds_builders  # circular at import time
    config = self.builder_config
    if config is not None and getattr(config, "input_dir", ""):
      input_dir, text_key = config.input_dir, config.text_key
      fractions, clean_config = dict(config.split_fractions), config.cleaning
    else:
      input_dir, text_key = str(dl_manager.manual_dir), "text"
      fractions, clean_config = dict(DEFAULT_FRACTIONS), None
    documents = read_documents(input_dir, text_key)
    clean_config = clean_config or cleaning.CleaningConfig()
    kept, texts, report = cleaning.clean([text for _, text in documents], clean_config)
    if not kept:
      raise UserError(f"every one of the {len(documents)} documents under {input_dir} was "
                      f"removed by cleaning:\n{report.format()}\nAdd more text, or loosen "
                      "the cleaning config (min_chars, min_letter_frac, ...)")
    tfds_builders.write_report(report, pathlib.Path(self.data_dir) / tfds_builders.REPORT_NAME)
    by_split = {name: [] for name in fractions}
    for index, text in zip(kept, texts):
      key = documents[index][0]
      by_split[cleaning.split_for_key(key, fractions)].append((key, text))
    # TFDS refuses to write an empty split; a tiny corpus may leave one empty.
    return {name: self._generate_examples(items)
            for name, items in by_split.items() if items}

  def _generate_examples(self, items):
    for key, text in items:
      yield key, {"text": text, "source": key}
