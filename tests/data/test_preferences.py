"""Preference pairs for reward models and DPO: `shakespeare_preferences` (deterministic,
both kinds labelled, chosen != rejected, a shuffle is a permutation of the true line's
words, splits scene-disjoint and the same as `shakespeare`'s) and `local_preferences`
(the JSON-lines shapes, chat rows, and the bad-row policy: skip and log, or an error)."""

import collections
import json
import logging

import pytest

from llmjax.data import chat, datasets
from llmjax.data.tfds_builders import local_preferences, shakespeare_preferences
from llmjax.errors import UserError

SPLITS = ("train", "validation", "test")


def _write_jsonl(path, lines):
  path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                          for line in lines), encoding="utf-8")


@pytest.fixture(scope="module")
def prefs(data_dir):
  return {split: datasets.get_source("shakespeare_preferences", split, data_dir)
          for split in SPLITS}


def _all(source):
  return [source[i] for i in range(len(source))]


def test_records_are_deterministic_and_match_the_built_dataset(prefs):
  first, again = shakespeare_preferences.records(), shakespeare_preferences.records()
  assert first == again
  built = {split: _all(prefs[split]) for split in SPLITS}
  for split in SPLITS:
    want = [r for _, s, r in first if s == split]
    assert built[split] == want


def test_kinds_are_labelled_and_pairs_differ(prefs):
  kinds = collections.Counter()
  for split in SPLITS:
    for r in _all(prefs[split]):
      kinds[(split, r["kind"])] += 1
      assert r["chosen"] != r["rejected"] and r["chosen"].strip() and r["rejected"].strip()
      assert r["text"] == r["prompt"] + r["chosen"]
      if r["kind"] == "shuffled":  # the same words in another order
        assert sorted(r["rejected"].split()) == sorted(r["chosen"].split())
      else:
        assert r["kind"] == "other_scene"
        assert sorted(r["rejected"].split()) != sorted(r["chosen"].split())
  assert {k for _, k in kinds} == set(shakespeare_preferences.KINDS)
  assert min(kinds.values()) > 100, kinds


def test_splits_are_scene_disjoint_and_follow_shakespeare(prefs, data_dir):
  """Every record's scene is in that split of `shakespeare`, and so is the scene its
  true line and (other_scene) its rejected line come from."""
  split_of, lines_of = {}, {}
  for split in SPLITS:
    scenes = datasets.get_source("shakespeare", split, data_dir)
    for i in range(len(scenes)):
      s = scenes[i]
      key = (s["play"], s["act"], s["scene"])
      split_of[key] = split
      speeches = s["speeches"]  # a sequence of dicts reads as a dict of lists
      # Some sections share a key (and so a split): keep the lines of all of them.
      lines_of.setdefault(key, set()).update(
          x.strip() for text in speeches["text"] for x in text.split("\n"))
  line_split = collections.defaultdict(set)
  for key, lines in lines_of.items():
    for line in lines:
      line_split[line].add(split_of[key])
  for split in SPLITS:
    for r in _all(prefs[split]):
      key = (r["play"], r["act"], r["scene"])
      assert split_of[key] == split and r["chosen"] in lines_of[key]
      assert r["prompt"].endswith(("**  \n", "  \n"))
      if r["kind"] == "other_scene":
        assert r["rejected"] not in lines_of[key] and line_split[r["rejected"]] == {split}


def test_prompt_is_the_dialogue_before_the_line():
  lines = [(0, "IAGO", "I am not what I am."), (1, "RODERIGO", "What a full fortune"),
           (1, "RODERIGO", "does the thick-lips owe")]
  assert shakespeare_preferences.render_context(lines[:2], "RODERIGO", True) == (
      "**IAGO**  \nI am not what I am.\n\n**RODERIGO**  \nWhat a full fortune  \n")
  assert shakespeare_preferences.render_context(lines, "IAGO", False) == (
      "**IAGO**  \nI am not what I am.\n\n**RODERIGO**  \nWhat a full fortune  \n"
      "does the thick-lips owe\n\n**IAGO**  \n")
  for line in ("a b a", "to be or not to be", "x y"):
    shuffled = shakespeare_preferences.shuffle_words(line, "key")
    assert shuffled != line and sorted(shuffled.split()) == sorted(line.split())


ROWS = [
    {"prompt": "Who wrote Hamlet?", "chosen": "Shakespeare.", "rejected": "Marlowe.",
     "kind": "fact"},
    {"prompt": [{"role": "user", "content": "Hi"}],
     "chosen": [{"role": "assistant", "content": "Hello."}],
     "rejected": [{"role": "assistant", "content": "Go away."}]},
    {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
     "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "No."}]},
]
BAD = [{"prompt": "q", "chosen": "a"},                          # no rejected
       {"chosen": "a", "rejected": "b"},                        # no prompt
       {"prompt": "q", "chosen": "same", "rejected": "same"},   # chosen == rejected
       {"prompt": "q", "chosen": " ", "rejected": "b"}]         # an empty response


def test_jsonl_shapes_render_with_the_chat_template(tmp_path):
  _write_jsonl(tmp_path / "mine.jsonl", [ROWS[0], "", *ROWS[1:]])
  records = [r for _, r in local_preferences.read_records(str(tmp_path))]
  assert [r["source"] for r in records] == ["mine.jsonl:1", "mine.jsonl:3", "mine.jsonl:4"]
  user = [{"role": "user", "content": "Who wrote Hamlet?"}]
  assert (records[0]["prompt"], records[0]["chosen"]) == chat.render(
      user + [{"role": "assistant", "content": "Shakespeare."}])
  assert records[0]["rejected"] == "Marlowe." and records[0]["kind"] == "fact"
  assert records[1]["prompt"] == records[2]["prompt"] == "### User:\nHi\n\n### Assistant:\n"
  assert (records[1]["chosen"], records[1]["rejected"]) == ("Hello.", "Go away.")
  assert all(r["text"] == r["prompt"] + r["chosen"] for r in records)


def test_bad_rows_are_skipped_and_logged_or_an_error(tmp_path, caplog):
  _write_jsonl(tmp_path / "mine.jsonl", [ROWS[0], *BAD, ROWS[2]])
  with caplog.at_level(logging.WARNING):
    records = local_preferences.read_records(str(tmp_path))
  assert [r["source"] for _, r in records] == ["mine.jsonl:1", "mine.jsonl:6"]
  assert "skipped 4 of 6 rows" in caplog.text
  for number, why in ((2, "no 'rejected'"), (3, "no 'prompt'"), (4, "chosen == rejected"),
                      (5, "an empty response")):
    assert f"mine.jsonl:{number} ({why}" in caplog.text
  with pytest.raises(UserError, match=r"mine.jsonl:2: a bad preference row \(no 'rejected'"):
    local_preferences.read_records(str(tmp_path), bad_rows="error")


@pytest.mark.parametrize("line, match", [
    ('{"prompt": "q", "chosen": "a"', "not valid JSON"),
    ('["q", "a", "b"]', "not a JSON object"),
    ('{"prompt": 3, "chosen": "a", "rejected": "b"}', "'prompt' is int"),
    ('{"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}',
     "'chosen' is list"),
    (json.dumps({"chosen": [{"role": "user", "content": "q"},
                            {"role": "assistant", "content": "a"}],
                 "rejected": [{"role": "user", "content": "other"},
                              {"role": "assistant", "content": "b"}]}),
     "differ before their last turn"),
    (json.dumps({"chosen": [{"role": "user", "content": "q"}],
                 "rejected": [{"role": "user", "content": "q"}]}), "ends with a 'user' turn"),
])
def test_malformed_lines_are_errors_under_either_policy(tmp_path, line, match):
  path = tmp_path / "data.jsonl"
  _write_jsonl(path, [ROWS[0], line])
  for policy in local_preferences.BAD_ROWS:
    with pytest.raises(UserError, match=match) as e:
      local_preferences.read_records(str(tmp_path), bad_rows=policy)
    assert f"{path}:2" in str(e.value)


def test_local_preferences_dataset_and_its_policy_by_name(tmp_path, data_dir):
  folder = tmp_path / "data"
  folder.mkdir()
  _write_jsonl(folder / "train.jsonl", [dict(ROWS[0], chosen=f"yes {i}") for i in range(4)]
               + BAD[2:3])
  _write_jsonl(folder / "validation.jsonl", ROWS[1:])
  train = datasets.get_source("local_preferences", "train", data_dir, input_dir=str(folder))
  assert len(train) == 4 and train[3]["chosen"] == "yes 3"
  assert set(train[0]) == set(local_preferences.FEATURES)
  assert len(datasets.get_source("local_preferences/skip", "validation", data_dir,
                                 input_dir=str(folder))) == 2
  with pytest.raises(UserError, match="train.jsonl:5: a bad preference row"):
    datasets.get_source("local_preferences/error", "train", data_dir, input_dir=str(folder))
  with pytest.raises(UserError, match="bad_rows='drop'"):
    datasets.get_source("local_preferences/drop", "train", data_dir, input_dir=str(folder))
  with pytest.raises(UserError, match="DataConfig.input_dir"):
    datasets.get_source("local_preferences", "train", data_dir)
