"""`num2words_translate`: numbers written in words, one language -> another, offline.

A real sequence-to-sequence task that builds without a network: the PyPI package
`num2words` spells every integer in many languages, with each language's own grammar
(French "soixante et onze" = 60 + 11, German "einundzwanzig" = one-and-twenty, English
"one hundred and one"), so translating between two spellings needs the number's
structure, not a word-for-word lookup.

Configs are language pairs `<source>-<target>` over `LANGUAGES` (`num2words_translate/
en-fr`, `.../de-en`, ...), each covering the integers 0 .. max_number - 1 (10,000).
Records: `number` (int64) and one text field per language code, e.g.
`{'number': 71, 'en': 'seventy-one', 'fr': 'soixante et onze'}`.

Splits are a hash of the number (`cleaning.split_for_key`, salted with the config's
range), 90/5/5 train/validation/test: deterministic, disjoint, and a number is in the
same split for every language pair, so no pair leaks test numbers into training.
"""

import dataclasses
import importlib.util
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from llmjax.data import cleaning
from llmjax.data.tfds_builders.base import OwnBuilder
from llmjax.errors import UserError

LANGUAGES = ("en", "fr", "de", "es")
DEFAULT_MAX_NUMBER = 10_000
SPLIT_FRACTIONS = {"train": 0.9, "validation": 0.05, "test": 0.05}


@dataclasses.dataclass(eq=False)
class Num2WordsConfig(tfds.core.BuilderConfig):
  """A language pair and the range of numbers it spells."""
  source: str = "en"
  target: str = "fr"
  max_number: int = DEFAULT_MAX_NUMBER


def num2words_config(source: str, target: str,
                     max_number: int = DEFAULT_MAX_NUMBER) -> Num2WordsConfig:
  """The config for `source` -> `target` over 0 .. max_number - 1 (named 'en-fr', or
  'en-fr-<max_number>' for a non-default range)."""
  for lang in (source, target):
    if lang not in LANGUAGES:
      raise UserError(f"num2words_translate has no language {lang!r}: use a pair of "
                      f"{', '.join(LANGUAGES)}, e.g. num2words_translate/en-fr")
  if source == target:
    raise UserError(f"num2words_translate needs two different languages, got {source}-"
                    f"{target}: pick e.g. en-fr")
  if not isinstance(max_number, int) or max_number < 20:
    raise UserError(f"max_number={max_number!r} must be an int >= 20 (enough numbers for "
                    "three splits)")
  name = f"{source}-{target}"
  if max_number != DEFAULT_MAX_NUMBER:
    name += f"-{max_number}"
  return Num2WordsConfig(name=name, source=source, target=target, max_number=max_number,
                         description=f"Numbers 0..{max_number - 1}: {source} -> {target}.")


def split_of(number: int, max_number: int) -> str:
  """The split of `number` (the same for every language pair over this range)."""
  return cleaning.split_for_key(str(number), SPLIT_FRACTIONS, salt=f"num2words/{max_number}")


def _spell(number: int, lang: str) -> str:
  from num2words import num2words  # pylint: disable=import-outside-toplevel
  return num2words(number, lang=lang)


class Num2WordsTranslate(OwnBuilder):
  """Numbers in words, translated between languages (see the module docstring)."""

  name = "num2words_translate"  # TFDS would derive 'num2_words_translate' from the class
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Integers below max_number, num2words."}
  BUILDER_CONFIGS: ClassVar[list[Num2WordsConfig]] = [
      num2words_config(s, t) for s in LANGUAGES for t in LANGUAGES if s != t]

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n", 1)[0],
        features=tfds.features.FeaturesDict({
            "number": tfds.features.Scalar(dtype=np.int64),
            cfg.source: tfds.features.Text(),
            cfg.target: tfds.features.Text(),
        }),
        supervised_keys=(cfg.source, cfg.target),
        homepage="https://pypi.org/project/num2words/",
        disable_shuffling=True,  # numbers in order; the pipeline shuffles
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is computed
    if importlib.util.find_spec("num2words") is None:
      raise UserError("num2words_translate needs the `num2words` package: "
                      "pip install num2words")
    cfg = self.builder_config
    by_split = {name: [] for name in SPLIT_FRACTIONS}
    for number in range(cfg.max_number):
      by_split[split_of(number, cfg.max_number)].append(number)
    return {name: self._generate_examples(numbers) for name, numbers in by_split.items()}

  def _generate_examples(self, numbers):
    cfg = self.builder_config
    for number in numbers:
      yield number, {"number": number, cfg.source: _spell(number, cfg.source),
                     cfg.target: _spell(number, cfg.target)}
