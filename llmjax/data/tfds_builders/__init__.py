"""TFDS builders that need no TensorFlow: they write `array_record` files.

Importing this package registers the builders with TFDS (`tfds.builder('shakespeare')`
works after it). Build with `builder.download_and_prepare(file_format='array_record')`
(`build` below does that) and read with `builder.as_data_source()`.

Each text builder cleans its corpus at build time (`llmjax.data.cleaning`) and saves
the cleaning report as `cleaning_report.json` beside the dataset files; the instruction
builders for SFT (`shakespeare_instruct`, `local_instruct`) and the preference builders
for reward models and DPO (`shakespeare_preferences`, `local_preferences`) keep their
records as written (the Shakespeare ones read `shakespeare`'s cleaned scenes). TFDS writes into
an `incomplete.*` folder and renames it when the build succeeds, so a failed build
leaves no dataset behind.
"""

import json
import os
import pathlib
import tempfile

import tensorflow_datasets as tfds

from llmjax.data.tfds_builders.local_instruct import (
    LocalInstruct,
    LocalInstructConfig,
    local_instruct_config,
)
from llmjax.data.tfds_builders.local_preferences import (
    LocalPreferences,
    LocalPreferencesConfig,
    local_preferences_config,
)
from llmjax.data.tfds_builders.local_text import LocalText, LocalTextConfig, local_text_config
from llmjax.data.tfds_builders.num2words_translate import (
    Num2WordsConfig,
    Num2WordsTranslate,
    num2words_config,
)
from llmjax.data.tfds_builders.shakespeare import Shakespeare
from llmjax.data.tfds_builders.shakespeare_instruct import ShakespeareInstruct
from llmjax.data.tfds_builders.shakespeare_preferences import ShakespearePreferences

REPORT_NAME = "cleaning_report.json"

__all__ = ["LocalInstruct", "LocalInstructConfig", "LocalPreferences",
           "LocalPreferencesConfig", "LocalText", "LocalTextConfig", "Num2WordsConfig",
           "Num2WordsTranslate", "Shakespeare", "ShakespeareInstruct",
           "ShakespearePreferences", "build", "load_report", "local_instruct_config",
           "local_preferences_config", "local_text_config", "num2words_config",
           "write_report"]


def write_report(report, path: os.PathLike) -> None:
  """Saves a `cleaning.CleaningReport` as JSON (atomically) and prints it."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    json.dump(report.to_dict(), f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  print(report.format(), flush=True)


def load_report(builder: tfds.core.DatasetBuilder) -> dict | None:
  """The cleaning report saved with a built dataset, or None if there is none."""
  path = pathlib.Path(builder.data_dir) / REPORT_NAME
  return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def build(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
  """Builds `builder` as array_record files unless it is already built."""
  if builder.is_prepared():
    return builder
  folders = [builder.data_path.parent]  # <data_dir>/<name>[/<config>]/<version>
  if builder.builder_config is not None:
    folders.append(folders[0].parent)
  downloads = folders[-1].parent / "downloads"  # TFDS's download dir, made even offline
  if not downloads.exists():
    folders.append(downloads)
  try:
    builder.download_and_prepare(file_format="array_record")
  except BaseException:
    # TFDS already removed its incomplete.* folder; drop the empty config/dataset (and
    # downloads) folders it made too, so a failed build leaves nothing behind.
    for folder in folders:
      if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    raise
  return builder
