"""End-to-end training through the CLI and gin: smoke run, exact resume, config errors."""

import glob
import os

import numpy as np
import pytest

from llmjax import cli
from llmjax.checkpoint import manager as ckpt_lib
from llmjax.testing.runs import debug_train as _train
from llmjax.train import metrics as metrics_lib


def test_debug_smoke_run_writes_everything(tmp_path, data_dir, capsys):
  workdir = str(tmp_path / "run")
  assert _train(workdir, data_dir, "TrainConfig.num_steps=2", "TrainConfig.eval_every=2") == 0
  records = metrics_lib.read_metrics(workdir)
  train = [r for r in records if "loss" in r]
  evals = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in train] == [2] and [r["step"] for r in evals] == [2]
  for key in ("loss", "perplexity", "accuracy", "grad_norm", "param_norm", "learning_rate"):
    assert np.isfinite(train[0][key]), key
  # A freshly initialised char model predicts roughly uniformly: loss near ln(vocab).
  assert 3.0 < train[0]["loss"] < 6.0
  assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  assert os.path.getsize(os.path.join(workdir, "loss_curve.png")) > 1000
  with open(os.path.join(workdir, "operative_config.gin")) as f:
    operative = f.read()
  assert "TrainConfig.num_steps = 2" in operative and "get_preset.name = 'tiny'" in operative
  ckpt = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"))
  assert ckpt.latest_step() == 2
  _, meta = ckpt.restore_params()
  assert meta["model_config"]["num_layers"] == 2 and meta["tokenizer"]


def test_resume_is_bitwise_identical(tmp_path, data_dir):
  common = ("TrainConfig.num_steps=6", "TrainConfig.log_every=1", "TrainConfig.eval_every=100",
            "TrainConfig.checkpoint_every=3", "get_preset.dropout_rate=0.1")
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  assert _train(straight, data_dir, *common) == 0
  assert _train(resumed, data_dir, *common, "TrainConfig.stop_at_step=3") == 0
  assert ckpt_lib.CheckpointManager(os.path.join(resumed, "checkpoints")).latest_step() == 3
  assert _train(resumed, data_dir, *common) == 0

  def losses(workdir):
    return {r["step"]: r["loss"] for r in metrics_lib.read_metrics(workdir) if "loss" in r}

  assert losses(straight) == losses(resumed) and len(losses(straight)) == 6
  p1, _ = ckpt_lib.CheckpointManager(os.path.join(straight, "checkpoints")).restore_params()
  p2, _ = ckpt_lib.CheckpointManager(os.path.join(resumed, "checkpoints")).restore_params()
  flat1 = {k: np.asarray(v) for k, v in _flatten(p1).items()}
  flat2 = {k: np.asarray(v) for k, v in _flatten(p2).items()}
  assert flat1.keys() == flat2.keys()
  for k, value in flat1.items():
    np.testing.assert_array_equal(value, flat2[k], err_msg=k)


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


@pytest.mark.parametrize("param, needle", [
    ("TrainConfig.num_stepz=3", "num_stepz"),
    ("NoSuchThing.x=1", "NoSuchThing"),
    ("TrainConfig.num_steps='many'", "num_steps"),
])
def test_bad_gin_binding_is_one_clear_error(tmp_path, data_dir, capsys, param, needle):
  assert _train(str(tmp_path / "bad"), data_dir, param) == 2
  err = capsys.readouterr().err
  assert "error" in err and needle in err
  assert "Traceback" not in err


def test_missing_gin_file(tmp_path, capsys):
  code = cli.main(["train", "--gin_file=runs/nope.gin", f"--workdir={tmp_path}"])
  assert code == 2
  assert "runs/nope.gin not found" in capsys.readouterr().err


def test_generate_cli_prints_continuation(tmp_path, data_dir, capsys):
  workdir = str(tmp_path / "run")
  assert _train(workdir, data_dir, "TrainConfig.num_steps=2") == 0
  capsys.readouterr()
  assert cli.main(["generate", f"--workdir={workdir}", "--prompt=ROMEO",
                   "--max_new_tokens=5", "--temperature=0"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("ROMEO") and len(out.strip()) > len("ROMEO")


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_exits_cleanly(tmp_path, data_dir):
  import re
  import signal
  import subprocess
  import sys
  import time

  workdir = str(tmp_path / "run")
  cmd = [sys.executable, "-m", "llmjax.cli", "train", "--gin_file=runs/debug.gin",
         f"--workdir={workdir}", "--no_sample", f"--gin_param=DataConfig.data_dir={data_dir!r}",
         "--gin_param=TrainConfig.num_steps=100000", "--gin_param=TrainConfig.log_every=1",
         "--gin_param=TrainConfig.eval_every=100000",
         "--gin_param=TrainConfig.checkpoint_every=100000"]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  while len(metrics_lib.read_metrics(workdir)) < 3 and time.time() < deadline:
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  match = re.search(r"SIGTERM: saved checkpoint at step (\d+)", out)
  assert match, out
  ckpt = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"))
  assert ckpt.latest_step() == int(match.group(1)) >= 3
