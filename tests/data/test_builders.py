"""TFDS builders without TensorFlow: shakespeare, local_text, and named datasets."""

import collections
import json
import pathlib
import unicodedata

import pytest
import tensorflow_datasets as tfds

from llmjax.data import cleaning, datasets, packing, pipeline, tfds_builders
from llmjax.data.tfds_builders import shakespeare
from llmjax.errors import UserError

SPLITS = ("train", "validation", "test")


class Chars:
  """A char-level stand-in tokenizer: id = code point + 3 (0 pad, 1 eos, 2 bos)."""
  pad_id, eos_id, bos_id = 0, 1, 2

  def encode(self, text, add_bos=False, add_eos=False):
    return [2] * add_bos + [ord(c) + 3 for c in text] + [1] * add_eos


def _scenes_by_split(data_dir):
  out = {}
  for split in SPLITS:
    source = datasets.get_source("shakespeare", split, str(data_dir))
    out[split] = [source[i] for i in range(len(source))]
  return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  return data_dir, _scenes_by_split(data_dir)


@pytest.fixture(scope="module")
def parsed():
  return shakespeare.parse_all()


IRREGULAR = """\
## PROLOGUE

### SCENE I. Before an alehouse.

_Enter SLY and Hostess_

**SLY**  
I'll pheeze you,  
in faith.

**Hostess**  
A pair of stocks!

## ACT I

_Enter GOWER_

### Prologue

**GOWER**  
To sing a song that old was sung,

#### ACT II

### SCENE III. A hall.

*Enter King, with
lords.*

**KING**  
Welcome all.

_Aside_

Yet beware.

**ROSENCRANTZ & GUILDENSTERN**  
My lord!

# INTERMISSION

# EPILOGUE

**GOWER**  
So on your patience evermore attending.
"""


def test_parse_play_handles_irregular_structure():
  scenes = shakespeare.parse_play(IRREGULAR, slug="measure-for-measure", genre="problems")
  assert [(s["act"], s["scene"], s["location"]) for s in scenes] == [
      ("PROLOGUE", "I", "Before an alehouse."), ("I", "PROLOGUE", ""),
      ("II", "III", "A hall."), ("EPILOGUE", "EPILOGUE", "")]
  assert {s["play"] for s in scenes} == {"Measure for Measure"}  # no title line
  assert scenes[0]["speeches"] == [{"speaker": "SLY", "text": "I'll pheeze you,\nin faith."},
                                   {"speaker": "Hostess", "text": "A pair of stocks!"}]
  # A multi-line direction is not speech; a speech goes on after '_Aside_'.
  assert scenes[2]["speeches"] == [
      {"speaker": "KING", "text": "Welcome all.\nYet beware."},
      {"speaker": "ROSENCRANTZ & GUILDENSTERN", "text": "My lord!"}]
  # The text is the markdown as written: heading first, trailing two spaces kept.
  assert scenes[0]["text"].startswith("### SCENE I. Before an alehouse.\n\n_Enter SLY")
  assert "**SLY**  \nI'll pheeze you,  \nin faith." in scenes[0]["text"]
  assert [s["scene_index"] for s in scenes] == [0, 1, 2, 3]


def test_every_play_parses_into_scenes_with_speeches(parsed):
  files = shakespeare.play_files()
  assert len(files) == 38
  assert len({s["play"] for s in parsed}) == len(files)
  for scene in parsed:
    assert scene["play"] and scene["act"] and scene["scene"] and scene["genre"]
    assert scene["speeches"], f"{shakespeare.split_key(scene)} has no speech"
    for speech in scene["speeches"]:
      assert speech["speaker"] and speech["text"].strip()
      assert not speech["text"].startswith(("_", "**", "#"))
  # Every speaker tag in the corpus became exactly one speech.
  tags = sum(p.read_text().count("\n**") + p.read_text().startswith("**") for _, p in files)
  assert sum(len(s["speeches"]) for s in parsed) == tags
  assert collections.Counter(s["play"] for s in parsed)["Hamlet"] == 20


def test_shakespeare_build_splits_partition_scenes_deterministically(built, parsed):
  data_dir, by_split = built
  assert all(by_split[s] for s in SPLITS), "validation and test must not be empty"
  keys = {split: [(x["play"], x["scene_index"]) for x in rows]
          for split, rows in by_split.items()}
  everything = [k for rows in keys.values() for k in rows]
  assert len(everything) == len(set(everything)) == len(parsed)  # a partition
  for split, rows in by_split.items():
    for x in rows:
      assert cleaning.split_for_key(shakespeare.split_key(x), shakespeare.SPLIT_FRACTIONS
                                    ) == split
  # A second build into another data_dir assigns every scene to the same split.
  other = data_dir.parent / (data_dir.name + "_again")
  again = _scenes_by_split(other)
  assert {s: [(x["play"], x["scene_index"]) for x in rows] for s, rows in again.items()
          } == keys


def test_shakespeare_features_and_cleaning_report(built, parsed):
  data_dir, by_split = built
  x = by_split["validation"][0]
  original = next(p for p in parsed
                  if (p["play"], p["scene_index"]) == (x["play"], x["scene_index"]))
  assert x["text"] == unicodedata.normalize("NFKC", original["text"])  # whitespace kept
  assert x["speeches"]["speaker"] == [sp["speaker"] for sp in original["speeches"]]
  assert (x["act"], x["scene"], x["location"]) == (
      original["act"], original["scene"], original["location"])
  report_path = pathlib.Path(data_dir) / "shakespeare" / "1.0.0" / "cleaning_report.json"
  report = json.loads(report_path.read_text())
  stages = {s["name"]: s for s in report["stages"]}
  assert stages["normalize"]["docs_in"] == len(parsed)
  assert {"exact_dedup", "near_dedup"} <= set(stages)
  assert stages["near_dedup"]["docs_out"] == sum(map(len, by_split.values()))


def test_shakespeare_first_fit_packing_efficiency(built):
  data_dir, _ = built
  config = pipeline.DataConfig(data_dir=str(data_dir), seq_len=256, batch_size=16)
  it = pipeline.make_pipeline(config, Chars(), process_index=0, process_count=1)
  batches = [next(it) for _ in range(20)]
  assert packing.packing_efficiency(batches) >= 0.95


def _corpus(root: pathlib.Path) -> pathlib.Path:
  (root / "sub").mkdir(parents=True)
  (root / "a.txt").write_text("Alpha document with several words in it.\n")
  (root / "sub" / "b.md").write_text("# Beta\n\nA markdown *document*.\n")
  lines = [{"text": f"Json line number {i} about topic {i * 7}."} for i in range(30)]
  lines.append({"text": "Alpha document with several words in it.\n"})  # exact dup
  (root / "c.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
  (root / "notes.csv").write_text("ignored,file\n")
  return root


def _leftovers(data_dir: pathlib.Path) -> list[str]:
  return [str(p) for p in data_dir.rglob("*") if p.name == "1.0.0"
          or "incomplete" in p.name or (p.parent.name == "local_text")]


def test_local_text_build(tmp_path):
  corpus = _corpus(tmp_path / "corpus")
  data_dir = str(tmp_path / "tfds")
  train = list(datasets.iter_texts("local_text", "train", data_dir, input_dir=str(corpus)))
  builder = datasets.own_builder("local_text", data_dir, input_dir=str(corpus))
  counts = {name: info.num_examples for name, info in builder.info.splits.items()}
  assert counts["train"] == len(train)
  assert sum(counts.values()) == 32  # 33 documents less one exact duplicate
  fractions = dict(tfds_builders.local_text.DEFAULT_FRACTIONS)
  all_texts = []
  for split in counts:
    source = datasets.get_source("local_text", split, data_dir, input_dir=str(corpus))
    for i in range(len(source)):
      assert cleaning.split_for_key(source[i]["source"], fractions) == split
      all_texts.append(source[i]["text"])
  assert all_texts.count("Alpha document with several words in it.\n") == 1
  assert "# Beta\n\nA markdown *document*.\n" in all_texts
  assert tfds_builders.load_report(builder)["stages"][0]["docs_in"] == 33
  # Editing the corpus makes a new dataset instead of reusing the stale one.
  (corpus / "d.txt").write_text("A new document arrives.\n")
  again = datasets.own_builder("local_text", data_dir, input_dir=str(corpus))
  assert again.data_dir != builder.data_dir
  assert sum(info.num_examples for info in again.info.splits.values()) == 33


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("no_files", r"no \.txt, \.md or \.jsonl files .*found: \.csv"),
    ("latin1", r"bad\.txt is not UTF-8: byte 0xe9 at byte offset 8"),
    ("bad_json", r"c\.jsonl:2 is not valid JSON"),
    ("no_text_field", r"c\.jsonl:1 has no string field 'text'"),
    ("empty_after_cleaning", "removed by cleaning"),
])
def test_local_text_bad_input_is_a_user_error_and_leaves_nothing(tmp_path, case, match):
  corpus = tmp_path / "corpus"
  if case != "missing":
    corpus.mkdir()
  if case == "no_files":
    (corpus / "table.csv").write_text("a,b\n")
  elif case == "latin1":
    (corpus / "ok.txt").write_text("fine text\n")
    (corpus / "bad.txt").write_bytes("good caf\u00e9".encode("latin-1"))
  elif case == "bad_json":
    (corpus / "c.jsonl").write_text('{"text": "ok"}\n{"text": \n')
  elif case == "no_text_field":
    (corpus / "c.jsonl").write_text('{"body": "ok"}\n')
  elif case == "empty_after_cleaning":
    (corpus / "empty.txt").write_text("")
    (corpus / "also.md").write_text("")
  data_dir = tmp_path / "tfds"
  with pytest.raises(UserError, match=match):
    datasets.get_source("local_text", "train", str(data_dir), input_dir=str(corpus))
  assert not data_dir.exists() or not _leftovers(data_dir)


def test_named_dataset_through_mock_data_and_the_pipeline(tmp_path):
  with tfds.testing.mock_data(num_examples=12):
    source = datasets.get_source("lm1b", "train", str(tmp_path))
    assert len(source) == 12 and isinstance(source[0]["text"], str)
    config = pipeline.DataConfig(dataset="lm1b", data_dir=str(tmp_path), seq_len=32,
                                 batch_size=4, num_epochs=1, shuffle=False)
    batches = list(pipeline.make_eval_pipeline(config, Chars(), process_index=0,
                                               process_count=1))
    texts = [source[i]["text"] for i in range(len(source))]
    # Every character of every record arrives, plus bos/eos per record.
    n_tokens = sum(int((b["tokens_segment_ids"] > 0).sum()) for b in batches)
    assert n_tokens == sum(len(t) + 2 for t in texts)
    pairs = list(datasets.iter_texts("wmt14_translate", "train", str(tmp_path)))
    assert len(pairs) == 24  # de and en of 12 records
  assert datasets.default_text_key("wmt14_translate/fr-en") == ("fr", "en")


def test_unknown_dataset_lists_the_known_ones():
  with pytest.raises(UserError, match="known datasets are .*lm1b.*shakespeare"):
    datasets.get_source("not_a_dataset", "train")
  with pytest.raises(UserError, match="takes no config"):
    datasets.get_source("shakespeare/extra", "train")


def test_unknown_split_is_a_user_error(built):
  data_dir, _ = built
  with pytest.raises(UserError, match="no split 'dev'.*train"):
    datasets.get_source("shakespeare", "dev", str(data_dir))
