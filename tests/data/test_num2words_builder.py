"""num2words_translate: builds offline, deterministic disjoint splits, real spellings;
wmt14_translate by name through tfds mock data and the seq2seq pipeline."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from num2words import num2words

from llmjax.data import datasets, pipeline
from llmjax.data.tfds_builders import num2words_translate as n2w
from llmjax.errors import UserError
from llmjax.objectives.seq2seq import Seq2Seq

MAX = 300


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  out = {}
  for split in ("train", "validation", "test"):
    source = datasets.get_source(f"num2words_translate/de-fr-{MAX}", split, data_dir)
    out[split] = [source[i] for i in range(len(source))]
  return out


def test_splits_are_disjoint_complete_and_deterministic(splits):
  numbers = {name: [r["number"] for r in records] for name, records in splits.items()}
  union = [n for name in numbers for n in numbers[name]]
  assert sorted(union) == list(range(MAX))  # disjoint and complete
  assert 0.8 < len(numbers["train"]) / MAX < 0.97 and numbers["validation"]
  for name, values in numbers.items():
    assert all(n2w.split_of(n, MAX) == name for n in values)


def test_records_are_num2words_spellings(splits):
  for record in splits["validation"]:
    assert record["de"] == num2words(record["number"], lang="de")
    assert record["fr"] == num2words(record["number"], lang="fr")
  assert datasets.default_text_key(f"num2words_translate/de-fr-{MAX}") == ("de", "fr")


def test_bad_names_are_user_errors():
  with pytest.raises(UserError, match="language"):
    datasets.get_source("num2words_translate/en-xx", "train", "/nonexistent")
  with pytest.raises(UserError, match="SOURCE-TARGET"):
    datasets.get_source("num2words_translate/enfr", "train", "/nonexistent")


class Chars:
  pad_id, eos_id, bos_id = 0, 1, 2

  def encode(self, text):
    return [ord(c) % 250 + 5 for c in text]


def test_wmt14_by_name_through_mock_data_and_the_seq2seq_pipeline(tmp_path):
  objective = Seq2Seq(inputs_key="de", targets_key="en")
  config = pipeline.DataConfig(dataset="wmt14_translate/de-en", split="validation",
                               data_dir=str(tmp_path),
                               feature_lengths={"inputs": 512, "targets": 512},
                               batch_size=2, packing="none", num_epochs=1, shuffle=False)
  with tfds.testing.mock_data(num_examples=6):
    source = datasets.get_source("wmt14_translate/de-en", "validation", str(tmp_path))
    records = [source[i] for i in range(len(source))]
    batches = list(pipeline.make_eval_pipeline(config, Chars(), objective.feature_fn,
                                               process_index=0, process_count=1))
  rows = [(b["inputs"][i], b["inputs_segment_ids"][i], b["targets"][i],
           b["targets_segment_ids"][i]) for b in batches for i in range(len(b["inputs"]))]
  for record, (inputs, in_seg, targets, t_seg) in zip(records, rows):
    want_in = (Chars().encode(record["de"]) + [1])[:512]
    np.testing.assert_array_equal(inputs[in_seg > 0], want_in)
    want_t = (Chars().encode(record["en"]) + [1])[:512]
    np.testing.assert_array_equal(targets[t_seg > 0], want_t)
  assert len(rows) == len(records) == 6
