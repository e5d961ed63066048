"""`local_instruct`: your own instruction data (JSON lines) as a dataset for SFT.

Each non-empty line of each `.jsonl` file under the input folder (or the one file
named) is one example, in one of the common shapes:

  {"prompt": "...", "response": "..."}                      prompt / response pairs
  {"instruction": "...", "input": "...", "output": "..."}   Alpaca (`input` optional)
  {"messages": [{"role": "user", "content": "..."}, ...]}   chat (OpenAI / HF style)

Each becomes a conversation (Alpaca: the instruction, a blank line, the input, as the
user turn) rendered by a chat template into the `prompt` and `response` strings the
SFT objective reads (`llmjax.data.chat`). The template is the first of
`chat_template.jinja` / `tokenizer_config.json` found in the input folder (copy an
imported model's `hf_tokenizer/tokenizer_config.json` there to train in its chat
format), or the repo's default. An optional string field `task` is kept, for
per-task accuracy. A line that is not one of the shapes is a UserError naming the
file, the line and the shapes.

Features: `prompt`, `response`, `text` (the two joined: what a tokenizer trains on),
`task` and `source` (`file:line`). Files named `train.jsonl`, `validation.jsonl` or
`test.jsonl` are those splits; the lines of other files are split by a hash of their
`file:line`. The config's name carries a hash of the path, the file listing (names,
sizes, mtimes) and the template, so editing either gives a new dataset.
"""

import dataclasses
import hashlib
import json
import pathlib
import re
from typing import ClassVar

import tensorflow_datasets as tfds

from llmjax.data import chat, cleaning, text_files
from llmjax.data.tfds_builders.base import OwnBuilder
from llmjax.errors import UserError

DEFAULT_FRACTIONS = (("train", 0.9), ("validation", 0.05), ("test", 0.05))
SHAPES = ('{"prompt": ..., "response": ...}, {"instruction": ..., "input": ..., '
          '"output": ...} or {"messages": [{"role": ..., "content": ...}, ...]}')


@dataclasses.dataclass(eq=False)
class LocalInstructConfig(tfds.core.BuilderConfig):
  """Where the JSON lines are and which chat template renders them."""
  input_dir: str = ""
  template: str = chat.DEFAULT_TEMPLATE  # the Jinja source (see `local_instruct_config`)
  split_fractions: tuple[tuple[str, float], ...] = DEFAULT_FRACTIONS


def jsonl_files(path: pathlib.Path) -> list[pathlib.Path]:
  """The `.jsonl` files under folder `path` (or `path` itself), sorted."""
  if path.is_file() and path.suffix == ".jsonl":
    return [path]
  files = sorted(p for p in path.rglob("*.jsonl") if p.is_file() and not any(
      part.startswith(".") for part in p.relative_to(path).parts)) if path.is_dir() else []
  if not files:
    raise UserError(f"no .jsonl files at {path}: pass --input (DataConfig.input_dir) naming "
                    f"a folder of JSON lines files, or one, each line one of {SHAPES}")
  return files


def local_instruct_config(input_dir: str, *, chat_template: str | None = None,
                          split_fractions=DEFAULT_FRACTIONS) -> LocalInstructConfig:
  """A config named `<folder>_<hash>`. chat_template: a .jinja file, a
  tokenizer_config.json or a folder holding one; None looks in the input folder."""
  root = pathlib.Path(input_dir).expanduser().resolve()
  files = jsonl_files(root)
  template = chat.load_template(chat_template or str(root if root.is_dir() else root.parent))
  chat.compile_template(template)  # a bad template fails here, before any build
  digest = hashlib.sha256(f"{root}\0{template}\0{tuple(split_fractions)}".encode())
  for path in files:
    stat = path.stat()
    digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
  stem = re.sub(r"[^a-z0-9]+", "_", root.stem.lower()).strip("_") or "instruct"
  return LocalInstructConfig(name=f"{stem}_{digest.hexdigest()[:10]}", input_dir=str(root),
                             template=template, split_fractions=tuple(split_fractions),
                             description=f"Instruction data under {root}.")


def _string_fields(record: dict, names, where: str) -> list[str]:
  values = [record.get(n, "") for n in names]
  bad = [n for n, v in zip(names, values) if not isinstance(v, str)]
  if bad:
    raise UserError(f"{where}: field {bad[0]!r} is {type(record[bad[0]]).__name__}, not a "
                    f"string; each line must be one of {SHAPES}")
  return values


def to_messages(record, where: str) -> list[dict[str, str]]:
  """One JSON record in any of the shapes (module doc) as a conversation."""
  if not isinstance(record, dict):
    raise UserError(f"{where}: a {type(record).__name__}, not a JSON object; each line "
                    f"must be one of {SHAPES}")
  if "messages" in record:
    return chat.check_messages(record["messages"], where)
  if "prompt" in record and "response" in record:
    prompt, response = _string_fields(record, ("prompt", "response"), where)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
  if "instruction" in record and "output" in record:
    instruction, extra, output = _string_fields(record, ("instruction", "input", "output"),
                                                where)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
  raise UserError(f"{where}: fields {sorted(record)} match no known shape; each line must "
                  f"be one of {SHAPES}")


def read_examples(input_dir: str, template: str = chat.DEFAULT_TEMPLATE):
  """(split or None, example) for every line, in file order; split None = hash it."""
  root = pathlib.Path(input_dir)
  compiled = chat.compile_template(template)
  examples = []
  for path in jsonl_files(root):
    rel = str(path.relative_to(root)) if root.is_dir() else path.name
    split = path.stem if path.stem in ("train", "validation", "test") else None
    text = text_files.decode_utf8(path.read_bytes(), path)
    for number, line in enumerate(text.splitlines(), start=1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"{where} is not valid JSON ({e.msg}): write one JSON object per "
                        f"line, one of {SHAPES}") from None
      prompt, response = chat.render(to_messages(record, where), compiled)
      task = record.get("task", "")
      examples.append((split, {"prompt": prompt, "response": response,
                               "text": prompt + response, "source": f"{rel}:{number}",
                               "task": task if isinstance(task, str) else str(task)}))
  return examples


class LocalInstruct(OwnBuilder):
  """Local JSON lines of instructions, rendered by a chat template."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First version."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put .jsonl files of instruction records in the manual_dir."

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__.split("\n\n", 1)[0],
        features=tfds.features.FeaturesDict({
            "prompt": text, "response": text, "text": text, "task": text, "source": text}),
        disable_shuffling=True,  # keep file order; the pipeline shuffles
    )

  def _split_generators(self, dl_manager):
    config = self.builder_config
    if config is not None and getattr(config, "input_dir", ""):
      input_dir, template = config.input_dir, config.template
      fractions = dict(config.split_fractions)
    else:
      input_dir = str(dl_manager.manual_dir)
      template, fractions = chat.load_template(input_dir), dict(DEFAULT_FRACTIONS)
    by_split = {name: [] for name in ("train", "validation", "test", *fractions)}
    for split, example in read_examples(input_dir, template):
      split = split or cleaning.split_for_key(example["source"], fractions)
      by_split[split].append(example)
    # TFDS refuses to write an empty split; a small file may leave one empty.
    return {name: self._generate_examples(items) for name, items in by_split.items()
            if items}

  def _generate_examples(self, items):
    for example in items:
      yield example["source"], example
