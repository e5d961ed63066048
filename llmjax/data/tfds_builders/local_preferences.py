"""`local_preferences`: your own preference pairs (JSON lines) for reward models and DPO.

Each non-empty line of each `.jsonl` file under the input folder (or the one file
named) is one pair, in one of the shapes TRL's preference datasets use:

  {"prompt": "...", "chosen": "...", "rejected": "..."}          strings
  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
                                          chat, explicit prompt (the responses are the
                                          assistant turns that follow it)
  {"chosen": [messages], "rejected": [messages]}
                                          chat, implicit prompt: two whole conversations
                                          that differ in their last (assistant) turn

(`[messages]` is `[{"role": ..., "content": ...}, ...]`.) As in `local_instruct`, each
side becomes a conversation rendered by the chat template (the folder's
`chat_template.jinja` / `tokenizer_config.json`, or the repo's default) into the record
`shakespeare_preferences` documents: `prompt`, `chosen`, `rejected` strings, the prompt
being the conversation up to the response with the generation prompt. An optional
string `kind` is kept (for metrics per kind of pair).

Bad rows, decided here for every objective that reads pairs: a row that lacks
`chosen`, `rejected` or (strings shape) `prompt`, has an empty response, or whose
chosen and rejected render the same, teaches nothing. The dataset `local_preferences`
(config `skip`, the default) leaves such rows out and logs how many and where at build
time; `local_preferences/error` stops at the first with a UserError naming its
file:line. A line that is not JSON or not one of the shapes (a number where a string
goes, a conversation that does not end with an assistant turn, two conversations that
differ before their last turn) is always a UserError.

Features: `prompt`, `chosen`, `rejected`, `kind`, `text` (prompt + chosen: what a
tokenizer trains on) and `source` (`file:line`). Files named `train.jsonl`,
`validation.jsonl` or `test.jsonl` are those splits; other lines are split by a hash
of their `file:line`. The config's name hashes the path, the file listing, the
template and the bad-row policy, so changing any of them gives a new dataset.
"""

import dataclasses
import hashlib
import json
import logging
import pathlib
import re
from typing import ClassVar

import tensorflow_datasets as tfds

from llmjax.data import chat, cleaning, text_files
from llmjax.data.tfds_builders import local_instruct
from llmjax.data.tfds_builders.base import OwnBuilder
from llmjax.errors import UserError

BAD_ROWS = ("skip", "error")
SHAPES = ('{"prompt": "...", "chosen": "...", "rejected": "..."}, the same with lists of '
          '{"role": ..., "content": ...} messages, or {"chosen": [messages], "rejected": '
          '[messages]} (two conversations that differ in their last turn)')
FEATURES = ("prompt", "chosen", "rejected", "kind", "text", "source")


class BadRow(Exception):
  """A row that teaches nothing (see the module docstring); skipped or a UserError."""


@dataclasses.dataclass(eq=False)
class LocalPreferencesConfig(tfds.core.BuilderConfig):
  """Where the JSON lines are, which chat template renders them, what bad rows do."""
  input_dir: str = ""
  template: str = chat.DEFAULT_TEMPLATE
  split_fractions: tuple[tuple[str, float], ...] = local_instruct.DEFAULT_FRACTIONS
  bad_rows: str = "skip"


def local_preferences_config(input_dir: str, *, chat_template: str | None = None,
                             split_fractions=local_instruct.DEFAULT_FRACTIONS,
                             bad_rows: str = "skip") -> LocalPreferencesConfig:
  """A config named `<folder>_<hash>`; chat_template as `local_instruct_config`'s."""
  if bad_rows not in BAD_ROWS:
    raise UserError(f"local_preferences bad_rows={bad_rows!r}: use one of {BAD_ROWS} "
                    "(the dataset names local_preferences/skip, local_preferences/error)")
  root = pathlib.Path(input_dir).expanduser().resolve()
  files = _files(root)
  template = chat.load_template(chat_template or str(root if root.is_dir() else root.parent))
  chat.compile_template(template)  # a bad template fails here, before any build
  digest = hashlib.sha256(f"{root}\0{template}\0{tuple(split_fractions)}\0{bad_rows}".encode())
  for path in files:
    stat = path.stat()
    digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
  stem = re.sub(r"[^a-z0-9]+", "_", root.stem.lower()).strip("_") or "preferences"
  return LocalPreferencesConfig(
      name=f"{stem}_{digest.hexdigest()[:10]}", input_dir=str(root), template=template,
      split_fractions=tuple(split_fractions), bad_rows=bad_rows,
      description=f"Preference pairs under {root}.")


def _files(root: pathlib.Path) -> list[pathlib.Path]:
  try:
    return local_instruct.jsonl_files(root)
  except UserError:
    raise UserError(f"no .jsonl files at {root}: set DataConfig.input_dir to a folder of "
                    f"JSON lines files (or one), each line one of {SHAPES}") from None


def _conversation(value, where: str, name: str) -> list:
  if not isinstance(value, list):
    raise UserError(f"{where}: {name!r} is a {type(value).__name__}; in a chat row it "
                    f"must be a list of messages. Each line must be one of {SHAPES}")
  return list(value)  # checked with the rest of its side in `parse_row`


def _sides(record, where: str):
  """(chosen conversation, rejected conversation) of one row in any shape."""
  if not isinstance(record, dict):
    raise UserError(f"{where}: a {type(record).__name__}, not a JSON object; each line "
                    f"must be one of {SHAPES}")
  missing = [k for k in ("chosen", "rejected") if record.get(k) is None]
  if missing:
    raise BadRow(f"no {missing[0]!r} field")
  if isinstance(record["chosen"], str) or isinstance(record["rejected"], str):
    if record.get("prompt") is None:
      raise BadRow("no 'prompt' field")
    for key in ("prompt", "chosen", "rejected"):
      if not isinstance(record[key], str):
        raise UserError(f"{where}: field {key!r} is {type(record[key]).__name__}, not a "
                        f"string like the others; each line must be one of {SHAPES}")
    if not record["chosen"].strip() or not record["rejected"].strip():
      raise BadRow("an empty response")
    user = [{"role": "user", "content": record["prompt"]}]
    return ([*user, {"role": "assistant", "content": record["chosen"]}],
            [*user, {"role": "assistant", "content": record["rejected"]}])
  prompt = _conversation(record.get("prompt") or [], where, "prompt")
  return (prompt + _conversation(record["chosen"], where, "chosen"),
          prompt + _conversation(record["rejected"], where, "rejected"))


def parse_row(record, where: str, template) -> dict:
  """One row -> its record (module docstring); BadRow or UserError when it is not one."""
  chosen, rejected = (chat.check_messages(side, f"{where} ({name})") for name, side in
                      zip(("chosen", "rejected"), _sides(record, where)))
  prompt, chosen_text = chat.render(chosen, template)
  rejected_prompt, rejected_text = chat.render(rejected, template)
  if prompt != rejected_prompt:
    raise UserError(f"{where}: the chosen and rejected conversations differ before their "
                    "last turn, so they answer different prompts: give them the same "
                    "earlier turns (or use the explicit 'prompt' shape)")
  if not chosen_text.strip() or not rejected_text.strip():
    raise BadRow("an empty response")
  if chosen_text == rejected_text:
    raise BadRow("chosen == rejected")
  kind = record.get("kind", "")
  return {"prompt": prompt, "chosen": chosen_text, "rejected": rejected_text,
          "kind": kind if isinstance(kind, str) else str(kind), "text": prompt + chosen_text}


def read_records(input_dir: str, template: str = chat.DEFAULT_TEMPLATE,
                 bad_rows: str = "skip"):
  """(split or None, record) for every good line, in file order; split None = hash it."""
  root = pathlib.Path(input_dir)
  compiled = chat.compile_template(template)
  out, bad = [], []
  for path in _files(root):
    rel = str(path.relative_to(root)) if root.is_dir() else path.name
    split = path.stem if path.stem in ("train", "validation", "test") else None
    text = text_files.decode_utf8(path.read_bytes(), path)
    for number, line in enumerate(text.splitlines(), start=1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        record = parse_row(json.loads(line), where, compiled)
      except json.JSONDecodeError as e:
        raise UserError(f"{where} is not valid JSON ({e.msg}): write one JSON object per "
                        f"line, one of {SHAPES}") from None
      except BadRow as e:
        if bad_rows == "error":
          raise UserError(f"{where}: a bad preference row ({e}): fix or remove it, or use "
                          "the dataset local_preferences/skip to leave such rows out") from None
        bad.append(f"{rel}:{number} ({e})")
        continue
      out.append((split, dict(record, source=f"{rel}:{number}")))
  if bad:
    logging.getLogger(__name__).warning(
        "local_preferences: skipped %d of %d rows (missing field, empty response or chosen "
        "== rejected): %s%s", len(bad), len(bad) + len(out), ", ".join(bad[:5]),
        ", ..." if len(bad) > 5 else "")
  return out


class LocalPreferences(OwnBuilder):
  """Local JSON lines of preference pairs, rendered by a chat template."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First version."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put .jsonl files of preference pairs in the manual_dir."

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__.split("\n\n", 1)[0],
        features=tfds.features.FeaturesDict({name: text for name in FEATURES}),
        disable_shuffling=True,  # keep file order; the pipeline shuffles
    )

  def _split_generators(self, dl_manager):
    config = self.builder_config
    if config is not None and getattr(config, "input_dir", ""):
      input_dir, template, bad_rows = config.input_dir, config.template, config.bad_rows
      fractions = dict(config.split_fractions)
    else:
      input_dir, bad_rows = str(dl_manager.manual_dir), "skip"
      template, fractions = chat.load_template(input_dir), dict(local_instruct.DEFAULT_FRACTIONS)
    by_split = {name: [] for name in ("train", "validation", "test", *fractions)}
    for split, record in read_records(input_dir, template, bad_rows):
      by_split[split or cleaning.split_for_key(record["source"], fractions)].append(record)
    # TFDS refuses to write an empty split; a small file may leave one empty.
    return {name: self._generate_examples(items) for name, items in by_split.items()
            if items}

  def _generate_examples(self, items):
    for record in items:
      yield record["source"], record
