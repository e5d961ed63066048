"""The bad-input table (README, Troubleshooting): each row is a mistake a user makes, and
each gives one clear error naming the problem and the fix, no traceback, and leaves the
workdir as it was (no partial checkpoint, tokenizer or config behind)."""

import os
import shutil

import pytest

from llmjax.data import tokenizer as tokenizer_lib
from llmjax.testing.runs import debug_train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
  """A finished 2-step debug run, copied by the rows that resume it."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  assert _train(workdir, data_dir, ["TrainConfig.num_steps=2"]) == 0
  return workdir


def _train(workdir, data_dir, params, gin_file="runs/debug.gin"):
  return debug_train(workdir, data_dir, *params, gin_file=gin_file)


def _snapshot(path):
  """Every file under `path` with its size and modification time (None: no such path)."""
  if not os.path.exists(path):
    return None
  files = {os.path.relpath(os.path.join(d, f), path): (os.path.getsize(os.path.join(d, f)),
                                                        os.stat(os.path.join(d, f)).st_mtime_ns)
           for d, _, files in os.walk(path) for f in files}
  folders = {os.path.relpath(d, path): "folder" for d, _, _ in os.walk(path) if d != path}
  return folders | files


def _corpus(tmp_path, files):
  folder = tmp_path / "corpus"
  folder.mkdir()
  for name, data in files.items():
    (folder / name).write_bytes(data)
  return ["DataConfig.dataset='local_text'", f"DataConfig.input_dir={str(folder)!r}"]


def _other_tokenizer(tmp_path, workdir):
  tok = tokenizer_lib.train_tokenizer(["abc xyz " * 50], str(tmp_path / "other"),
                                      model_type="char", vocab_size=None)
  tok.save(os.path.join(workdir, "tokenizer.model"))


# name -> (set-up(tmp_path, workdir, trained) -> gin params or (params, gin file),
#          words the message must contain: the problem and the fix)
ROWS = {
    "unknown_gin_binding": (lambda t, w, r: ["TrainConfig.num_stepz=3"],
                            ["num_stepz", "spelling"]),
    "missing_gin_file": (lambda t, w, r: ([], "runs/nope.gin"),
                         ["runs/nope.gin not found", "--gin_file"]),
    "wrong_type": (lambda t, w, r: ["TrainConfig.num_steps='many'"],
                   ["TrainConfig.num_steps='many' has type str", "quotes"]),
    "moved_runtime_setting": (lambda t, w, r: ["TrainConfig.sample_prompt='JULIET'"],
                              ["sample_prompt", "RuntimeConfig.<name>"]),
    "unquoted_string": (lambda t, w, r: ["TrainConfig.rules=fsdp"],
                        ["TrainConfig.rules=fsdp", "strings need quotes",
                         "TrainConfig.rules='fsdp'"]),
    "missing_data_directory": (
        lambda t, w, r: ["DataConfig.dataset='local_text'",
                         f"DataConfig.input_dir={str(t / 'no_such_corpus')!r}"],
        ["no_such_corpus does not exist", "--input"]),
    "empty_corpus_after_cleaning": (  # an empty file, one of control characters
        lambda t, w, r: _corpus(t, {"a.txt": b"", "b.md": b"\x01\x02\x03\x04"}),
                                    ["removed by cleaning", "loosen"]),
    "non_utf8_input": (lambda t, w, r: _corpus(t, {"a.txt": "caf\xe9 ".encode("latin-1") * 99}),
                       ["a.txt is not UTF-8", "iconv"]),
    "tokenizer_not_matching_checkpoint": (
        lambda t, w, r: (shutil.copytree(r, w), _other_tokenizer(t, w), [])[-1],
        ["tokenizer (", "not the one the checkpoint", "tokenizer.model back"]),
    "checkpoint_into_other_architecture": (
        lambda t, w, r: (shutil.copytree(r, w), ["get_preset.num_layers=3"])[-1],
        ["different model config", "num_layers", "new --workdir"]),
    "batch_not_divisible_by_data_parallel": (lambda t, w, r: ["DataConfig.batch_size=12"],
                                             ["batch_size=12", "multiple of 8"]),
    "sequence_longer_than_max_len": (lambda t, w, r: ["DataConfig.seq_len=65"],
                                     ["65", "max_len=64", "raise max_len"]),
    "workdir_not_writable": (lambda t, w, r: [], ["is not writable", "--workdir"]),
}


@pytest.mark.parametrize("row", sorted(ROWS))
def test_bad_input_is_one_clear_error(row, tmp_path, data_dir, trained, capsys):
  setup, needles = ROWS[row]
  workdir = str(tmp_path / "run")
  if row == "workdir_not_writable":  # root can write anywhere: a path under a file cannot be
    (tmp_path / "a_file").write_text("x")
    workdir = str(tmp_path / "a_file" / "run")
  params = setup(tmp_path, workdir, trained)
  params, gin_file = params if isinstance(params, tuple) else (params, "runs/debug.gin")
  before, data_before = _snapshot(workdir), _snapshot(data_dir)
  capsys.readouterr()
  assert _train(workdir, data_dir, params, gin_file) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err and err.count("error:") == 1, err
  assert "In call to configurable" not in err, err
  for needle in needles:
    assert needle in err, (needle, err)
  assert _snapshot(workdir) == before  # nothing created, nothing half-written or replaced
  built = set(_snapshot(data_dir) or {}) - set(data_before or {})
  assert not any(k in p for p in built for k in ("incomplete", "local_text", "downloads")), built


def test_help_texts_show_examples_and_defaults_once(capsys):
  from llmjax import cli

  def help_of(*argv):
    with pytest.raises(SystemExit) as stop:
      cli.main([*argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out

  text = help_of("tokenizer")
  assert "\n  llmjax tokenizer info --model DIR/spm.model" in text  # examples keep their lines
  train = help_of("tokenizer", "train")
  assert "(default: None)" not in train
  assert all(line.count("(default") <= 1 for line in train.splitlines())
  assert "dataset split to train on (default: train)" in " ".join(train.split())
  generate = " ".join(help_of("generate").split())
  assert "--max_new_tokens MAX_NEW_TOKENS tokens to generate" in generate
  assert "--seed SEED sampling seed" in generate and "--tokenizer TOKENIZER" in generate
