"""The grain pipeline: shapes, resume from saved state, seeds, per-host slicing."""

import collections
import dataclasses
import json

import numpy as np
import pytest

from llmjax.data import datasets, pipeline
from llmjax.errors import UserError

L, B = 32, 4
WORDS = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler", "in", "mind", "suffer"]


class Chars:
  """A char-level stand-in tokenizer: id = code point + 3 (0 pad, 1 eos, 2 bos)."""
  pad_id, eos_id, bos_id = 0, 1, 2

  def encode(self, text, add_bos=False, add_eos=False):
    return [2] * add_bos + [ord(c) + 3 for c in text] + [1] * add_eos


def decode(ids):
  return "".join(chr(i - 3) for i in ids if i > 2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """60 documents 'docNN: words...' of 7 to ~120 characters, in one jsonl file."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  docs = [f"doc{i:02d}: " + " ".join(rng.choice(WORDS, rng.integers(0, 20)))
          for i in range(60)]
  (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  data_dir = tmp_path_factory.mktemp("tfds")
  config = pipeline.DataConfig(
      dataset="local_text", input_dir=str(root), data_dir=str(data_dir), seq_len=L,
      batch_size=B, shuffle_buffer=8, num_packing_bins=4,
      cleaning=None)
  # The train split's documents (about 90% of them), in file order.
  train = list(datasets.iter_texts("local_text", "train", str(data_dir), input_dir=str(root)))
  assert 40 < len(train) < 60 and set(train) <= set(docs)
  return config, train


def _run(config, n, state=None, **hosts):
  hosts = hosts or {"process_index": 0, "process_count": 1}
  it = pipeline.make_pipeline(config, Chars(), **hosts)
  if state is not None:
    it.set_state(state)
  return [next(it) for _ in range(n)], it


def _documents(batches):
  """Documents by their 'docNN' tag, from the segments that start with bos."""
  found = []
  for batch in batches:
    for tokens, seg in zip(batch["tokens"], batch["tokens_segment_ids"]):
      for s in np.unique(seg[seg > 0]):
        ids = tokens[seg == s]
        if ids[0] == 2:
          found.append(decode(ids)[:5])
  return found


def test_batches_have_packed_layout(corpus):
  config, _ = corpus
  it = pipeline.make_pipeline(config, Chars())  # jax's process index/count: 0 of 1
  batches = [next(it) for _ in range(3)]
  for batch in batches:
    assert set(batch) == {"tokens", "tokens_segment_ids", "tokens_positions"}
    for value in batch.values():
      assert value.shape == (B, L) and value.dtype == np.int32
    for seg, pos in zip(batch["tokens_segment_ids"], batch["tokens_positions"]):
      starts = np.flatnonzero(np.diff(seg, prepend=0) != 0)
      for a, b in zip(starts, [*starts[1:], L]):
        if seg[a]:
          assert np.array_equal(pos[a:b], np.arange(b - a))  # restart per segment


@pytest.mark.parametrize("packing", ["first_fit", "concat", "none"])
def test_resume_from_saved_state_gives_the_same_batches(corpus, packing):
  config = dataclasses.replace(corpus[0], packing=packing)
  epoch = len(list(pipeline.make_eval_pipeline(config, Chars(), process_index=0,
                                                process_count=1)))
  k, n = epoch - 2, 6  # the resumed part crosses into the second epoch
  straight, _ = _run(config, k + n)
  _, it = _run(config, k)
  state = json.loads(json.dumps(it.get_state()))  # survives a JSON checkpoint
  resumed, _ = _run(config, n, state=state)
  for want, got in zip(straight[k:], resumed):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_state_from_another_config_is_refused(corpus):
  config, _ = corpus
  _, it = _run(config, 1)
  other = pipeline.make_pipeline(dataclasses.replace(config, seed=1), Chars(),
                                 process_index=0, process_count=1)
  with pytest.raises(UserError, match="different data config"):
    other.set_state(it.get_state())


def test_seeds(corpus):
  config, _ = corpus
  a, _ = _run(config, 5)
  b, _ = _run(config, 5)
  c, _ = _run(dataclasses.replace(config, seed=1), 5)
  stack = lambda bs: np.stack([x["tokens"] for x in bs])
  np.testing.assert_array_equal(stack(a), stack(b))
  assert not np.array_equal(stack(a), stack(c))


def test_eval_pipeline_is_one_ordered_pass(corpus):
  config, docs = corpus
  batches = list(pipeline.make_eval_pipeline(config, Chars(), process_index=0,
                                             process_count=1))
  assert all(b["tokens"].shape == (B, L) for b in batches)  # last batch padded
  assert sorted(_documents(batches)) == [d[:5] for d in docs]
  used = sum(int((b["tokens_segment_ids"] > 0).sum()) for b in batches)
  assert used == sum(len(d) + 2 for d in docs)  # every character plus bos and eos
  again = list(pipeline.make_eval_pipeline(config, Chars(), process_index=0,
                                           process_count=1))
  assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(batches, again))


def test_hosts_read_disjoint_shards_that_cover_the_split(corpus):
  config, docs = corpus
  per_host = []
  for index in range(2):
    batches = list(pipeline.make_eval_pipeline(config, Chars(), process_index=index,
                                               process_count=2))
    assert all(b["tokens"].shape == (B // 2, L) for b in batches)
    per_host.append(_documents(batches))
  assert not set(per_host[0]) & set(per_host[1])
  assert sorted(per_host[0] + per_host[1]) == [d[:5] for d in docs]
  # Training batches are local too, and the hosts see different data.
  first = [_run(config, 1, process_index=i, process_count=2)[0][0] for i in range(2)]
  assert first[0]["tokens"].shape == (B // 2, L)
  assert not np.array_equal(first[0]["tokens"], first[1]["tokens"])


def test_global_batch_must_split_over_hosts(corpus):
  config, _ = corpus
  with pytest.raises(UserError, match="multiple of 3"):
    pipeline.make_pipeline(config, Chars(), process_index=0, process_count=3)


def test_stateless_cleaning_drops_documents(corpus):
  from llmjax.data import cleaning  # pylint: disable=import-outside-toplevel
  config, docs = corpus
  keep = cleaning.CleaningConfig(min_chars=40)
  config = dataclasses.replace(config, clean=True, cleaning=keep)
  batches = list(pipeline.make_eval_pipeline(config, Chars(), process_index=0,
                                             process_count=1))
  assert sorted(_documents(batches)) == [d[:5] for d in docs if len(d) >= 40]


def test_custom_multi_feature_function(corpus):
  config, docs = corpus

  def halves(example, tokenizer):
    ids = tokenizer.encode(example["text"])
    return {"inputs": ids[:len(ids) // 2], "targets": ids[len(ids) // 2:] + [1]}

  config = dataclasses.replace(config, feature_lengths={"inputs": 24, "targets": 16})
  batches = list(pipeline.make_eval_pipeline(config, Chars(), halves, process_index=0,
                                             process_count=1))
  first = batches[0]
  assert first["inputs"].shape == (B, 24) and first["targets_segment_ids"].shape == (B, 16)
  pairs = collections.Counter()
  for b in batches:
    for row in range(B):
      pairs[len(np.unique(b["inputs_segment_ids"][row][b["inputs_segment_ids"][row] > 0]))
            ] += 1
      assert set(b["inputs_segment_ids"][row]) - {0} == set(b["targets_segment_ids"][row]) - {0}
  assert sum(k * v for k, v in pairs.items()) == len(docs)  # every pair packed once


def test_cli_build_and_inspect(corpus, tmp_path, capsys):
  from llmjax import cli  # pylint: disable=import-outside-toplevel
  from llmjax.data import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
  config, train = corpus
  tok_lib.train_tokenizer(train, str(tmp_path / "char"), model_type="char")
  source = ["--dataset", "local_text", "--input", config.input_dir,
            "--data_dir", config.data_dir]
  assert cli.main(["data", "build", *source]) == 0
  out = capsys.readouterr().out
  assert f"train {len(train):>9,} examples" in " ".join(out.split("  "))
  assert "already built; its cleaning report" in out
  assert cli.main(["data", "inspect", *source, "--tokenizer", str(tmp_path / "char.model"),
                   "--seq_len", "32", "--batch_size", "4", "--num_batches", "3"]) == 0
  out = capsys.readouterr().out
  efficiency = float(out.split("packing efficiency: ")[1].split("%")[0]) / 100
  from llmjax.data import packing  # pylint: disable=import-outside-toplevel
  same = pipeline.DataConfig(dataset="local_text", input_dir=config.input_dir,
                             data_dir=config.data_dir, seq_len=32, batch_size=4)
  it = pipeline.make_pipeline(same, tok_lib.Tokenizer.load(str(tmp_path / "char.model")),
                              process_index=0, process_count=1)
  batches = [next(it) for _ in range(3)]
  assert efficiency == pytest.approx(packing.packing_efficiency(batches), abs=1e-4)
  assert "segment 1 (" in out and "doc" in out
  assert cli.main(["data", "build", "--dataset", "nope"]) == 2
  assert "known datasets are" in capsys.readouterr().err
