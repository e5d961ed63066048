"""Reading user text files (.txt, .md, .jsonl, or folders of them), with one strict
UTF-8 decoder whose error says where."""

import glob
import json
import os
from collections.abc import Iterable, Iterator

from llmjax.errors import UserError


def decode_utf8(data: bytes, path, offset: int = 0) -> str:
  """Decodes `data` (read from `path`, starting at byte `offset` of the file) as UTF-8."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"{path} is not UTF-8: byte 0x{data[e.start]:02x} at byte offset "
                    f"{offset + e.start} cannot be decoded. Convert the file (e.g. `iconv -f "
                    "latin1 -t utf-8`) or remove it from the input") from None


TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


def _expand_paths(paths: Iterable[str]) -> list[str]:
  files = []
  for path in ([paths] if isinstance(paths, str) else paths):
    if os.path.isdir(path):
      found = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                     if f.endswith(TEXT_SUFFIXES) and os.path.isfile(f))
      if not found:
        raise UserError(f"folder {path!r} holds no {'/'.join(TEXT_SUFFIXES)} files; "
                        "point --input at the text files or a folder that holds them")
      files.extend(found)
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise UserError(f"input {path!r} does not exist; pass existing text files or "
                      "folders of .txt/.md/.jsonl files")
  return files


def iter_text_files(paths: str | Iterable[str], text_key: str = "text") -> Iterator[str]:
  """Yields one text per .txt/.md file and one per .jsonl line (its `text_key` field).

  Folders are searched recursively in sorted order. All paths are checked before the
  first text is yielded; non-UTF-8 bytes raise UserError naming the file and offset.
  """
  for path in _expand_paths(paths):
    with open(path, "rb") as f:
      data = f.read()
    if not path.endswith(".jsonl"):
      yield decode_utf8(data, path)
      continue
    offset = 0
    for lineno, raw in enumerate(data.split(b"\n"), 1):
      line = decode_utf8(raw, path, offset)
      offset += len(raw) + 1
      if not line.strip():
        continue
      try:
        yield json.loads(line)[text_key]
      except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}:{lineno}: not a JSON object with a {text_key!r} string "
                        f"field ({e}); write one JSON object per line") from e
