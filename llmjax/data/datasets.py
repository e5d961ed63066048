"""Datasets by name: our own TFDS builders and a few public TFDS text datasets.

`get_source(dataset, split)` returns a random-access source (`len` + `[i]`, what
`grain.MapDataset.source` wants) whose records are dicts with `str` text (TFDS hands
back `bytes`; mock data hands back `str`; we make both `str`). Our builders
(`shakespeare`, `local_text`, `num2words_translate`) are built on first use into
`data_dir`; so are the instruction sets for SFT, `shakespeare_instruct` and
`local_instruct` (a folder of JSON lines; records with `prompt` and `response`), and the
preference pairs for reward models and DPO, `shakespeare_preferences` and
`local_preferences` (records with `prompt`, `chosen` and `rejected`; see
`tfds_builders/shakespeare_preferences.py` for the format). Public datasets (`lm1b`,
`c4`, `tiny_shakespeare`, `wmt14_translate`) go through `tfds.data_source` with
array_record files, which downloads and prepares them where the network allows;
`tfds.testing.mock_data` patches exactly that call, which is how the tests run them.

Names may carry a TFDS config: `c4/realnewslike`, `wmt14_translate/fr-en`,
`num2words_translate/de-en` (or `.../en-fr-1000`: numbers below 1000 only),
`local_preferences/error` (a bad preference row stops the build; the default, `/skip`,
leaves such rows out and logs them).
"""

import dataclasses
import importlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from llmjax.errors import UserError

TextKey = str | tuple[str, ...]
OWN = ("shakespeare", "local_text", "num2words_translate", "shakespeare_instruct",
       "local_instruct", "shakespeare_preferences", "local_preferences")
# What the folder datasets read, and how to name it.
_FOLDER_INPUT = {
    "local_text": ("a folder of .txt, .md or .jsonl files",
                   "pass --input DIR (input_dir=DIR; in gin, DataConfig.input_dir='DIR')"),
    "local_instruct": ("a folder of .jsonl instruction files (or one such file)",
                       "set --gin_param=\"DataConfig.input_dir='DIR'\" (input_dir=DIR)"),
    "local_preferences": ("a folder of .jsonl preference files (or one such file)",
                          "set --gin_param=\"DataConfig.input_dir='DIR'\" (input_dir=DIR)")}
# Our builders that take a config after the slash, and the one used without it.
OWN_DEFAULT_CONFIG = {"num2words_translate": "en-fr", "local_preferences": "skip"}
# Our builders over the plays, by the class name in `tfds_builders`.
_SHAKESPEARE = {"shakespeare": "Shakespeare", "shakespeare_instruct": "ShakespeareInstruct",
                "shakespeare_preferences": "ShakespearePreferences"}


@dataclasses.dataclass(frozen=True)
class _Public:
  default_config: str | None
  module: str  # imported so TFDS registers the builder (its lazy registry misses some)
  text_key: TextKey | None  # None: the language pair named by the config ('de-en')


PUBLIC = {
    "lm1b": _Public(None, "tensorflow_datasets.text.lm1b", "text"),
    "c4": _Public("en", "tensorflow_datasets.text.c4", "text"),
    "tiny_shakespeare": _Public(None, "tensorflow_datasets.text.tiny_shakespeare", "text"),
    "wmt14_translate": _Public("de-en", "tensorflow_datasets.translate.wmt14", None),
}


def known_datasets() -> list[str]:
  return sorted([*OWN, *PUBLIC])


def _parse_name(dataset: str) -> tuple[str, str | None]:
  base, _, config = dataset.partition("/")
  if base not in OWN and base not in PUBLIC:
    raise UserError(f"unknown dataset {dataset!r}: known datasets are "
                    f"{', '.join(known_datasets())} (a TFDS config goes after a slash, "
                    "e.g. c4/en)")
  if base in OWN and config and base not in OWN_DEFAULT_CONFIG:
    raise UserError(f"dataset {base!r} takes no config ({dataset!r}): drop '/{config}'")
  if base in OWN:
    return base, config or OWN_DEFAULT_CONFIG.get(base)
  return base, config or PUBLIC[base].default_config


def default_text_key(dataset: str) -> TextKey:
  """The field(s) holding the text: 'text', or both sides of a translation pair."""
  base, config = _parse_name(dataset)
  if base == "num2words_translate":  # 'en-fr' or 'en-fr-<max_number>'
    return tuple(config.split("-")[:2])
  if base in OWN or PUBLIC[base].text_key is not None:
    return "text" if base in OWN else PUBLIC[base].text_key
  return tuple(config.split("-"))


def _decode(value: Any) -> Any:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, Mapping):
    return {k: _decode(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_decode(v) for v in value]
  if hasattr(value, "dtype") and value.dtype.kind in "OS":  # numpy arrays of bytes
    return [_decode(v) for v in value.tolist()]
  return value


class DecodedSource(Sequence):
  """A random-access TFDS source whose records have `str` instead of `bytes`."""

  def __init__(self, source, name: str):
    self._source, self.name = source, name

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < len(self._source):
      raise IndexError(f"index {index} out of range for {self.name} ({len(self)} records)")
    return _decode(self._source[index])

  def __repr__(self) -> str:
    return f"DecodedSource({self.name}, {len(self)} records)"


def _split_check(builder, split: str) -> None:
  available = list(builder.info.splits)
  if split.partition("[")[0] not in available:
    raise UserError(f"{builder.name} has no split {split!r}: use one of "
                    f"{', '.join(available)}")


def own_builder(dataset: str, data_dir: str | None = None, *, build: bool = True,
                **kwargs):
  """Our builder for `dataset`, built (array_record) unless it is or `build=False`."""
  from llmjax.data import tfds_builders  # pylint: disable=import-outside-toplevel
  base, config = _parse_name(dataset)
  if base == "num2words_translate":
    parts = config.split("-")
    if len(parts) not in (2, 3) or (len(parts) == 3 and not parts[2].isdigit()):
      raise UserError(f"bad num2words_translate config {config!r}: use SOURCE-TARGET or "
                      "SOURCE-TARGET-MAX_NUMBER, e.g. num2words_translate/en-fr-1000")
    source, target = parts[:2]
    if len(parts) == 3:
      kwargs.setdefault("max_number", int(parts[2]))
    n2w_config = tfds_builders.num2words_config(source, target, **kwargs)
    if n2w_config.name in tfds_builders.Num2WordsTranslate.builder_configs:
      n2w_config = n2w_config.name  # TFDS refuses a custom copy of a registered config
    builder = tfds_builders.Num2WordsTranslate(config=n2w_config, data_dir=data_dir)
  elif base in _SHAKESPEARE:
    if kwargs:
      raise UserError(f"{base} takes no options, got {sorted(kwargs)}: drop them")
    builder = getattr(tfds_builders, _SHAKESPEARE[base])(data_dir=data_dir)
  else:
    if base == "local_preferences":
      kwargs.setdefault("bad_rows", config)
    builder = _folder_builder(base, data_dir, kwargs)
  return tfds_builders.build(builder) if build else builder


def _folder_builder(base: str, data_dir, kwargs):
  """`local_text` / `local_instruct` / `local_preferences`: the builder over the user's
  folder `input_dir`."""
  from llmjax.data import tfds_builders  # pylint: disable=import-outside-toplevel
  input_dir = kwargs.pop("input_dir", None)
  if not input_dir:
    what, how = _FOLDER_INPUT[base]
    raise UserError(f"{base} needs {what}: {how}")
  if base == "local_text":
    config = tfds_builders.local_text_config(input_dir, **kwargs)
    return tfds_builders.LocalText(config=config, data_dir=data_dir)
  if base == "local_preferences":
    config = tfds_builders.local_preferences_config(input_dir, **kwargs)
    return tfds_builders.LocalPreferences(config=config, data_dir=data_dir)
  config = tfds_builders.local_instruct_config(input_dir, **kwargs)
  return tfds_builders.LocalInstruct(config=config, data_dir=data_dir)


def get_source(dataset: str, split: str, data_dir: str | None = None,
               **kwargs) -> DecodedSource:
  """A random-access source of `dataset`'s `split` (see the module docstring).

  kwargs: for `local_text`, `input_dir` (required) and `text_key`, `split_fractions`,
  `cleaning` (see `local_text_config`); for `local_instruct`, `input_dir` and
  `chat_template`, `split_fractions` (see `local_instruct_config`); for
  `local_preferences`, those and `bad_rows` (its config names it too); otherwise nothing.
  """
  base, config = _parse_name(dataset)
  if base in OWN:
    builder = own_builder(f"{base}/{config}" if config else base, data_dir, **kwargs)
    _split_check(builder, split)
    return DecodedSource(builder.as_data_source(split=split), f"{dataset}[{split}]")
  if kwargs:
    raise UserError(f"{dataset} takes no options, got {sorted(kwargs)}: drop them")
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  importlib.import_module(PUBLIC[base].module)
  name = f"{base}/{config}" if config else base
  try:
    source = tfds.data_source(
        name, split=split, data_dir=data_dir, download=True,
        download_and_prepare_kwargs={"file_format": "array_record"})
  except Exception as e:  # download/prepare failures: offline machines, bad splits
    raise UserError(
        f"could not load {name} split {split!r} from data_dir={data_dir}: {e}\nBuild it "
        f"where the network allows (`tfds build {name} --file_format=array_record "
        "--data_dir D`), copy D here and pass --data_dir D") from e
  return DecodedSource(source, f"{name}[{split}]")


def example_text(example: Mapping[str, Any], text_key: TextKey) -> str:
  """The text of one record; several keys are joined by newlines."""
  keys = (text_key,) if isinstance(text_key, str) else tuple(text_key)
  for key in keys:
    if key not in example:
      raise UserError(f"records have no field {key!r} (fields: {sorted(example)}): "
                      "set text_key to one of them")
  return "\n".join(example[k] for k in keys)


def iter_texts(dataset: str, split: str, data_dir: str | None = None,
               text_key: TextKey | None = None, **kwargs) -> Iterator[str]:
  """Every text of a split in order; each side of a translation pair separately."""
  text_key = text_key or default_text_key(dataset)
  keys = (text_key,) if isinstance(text_key, str) else tuple(text_key)
  source = get_source(dataset, split, data_dir, **kwargs)
  for i in range(len(source)):
    example = source[i]
    for key in keys:
      yield example_text(example, key)
