"""Two processes on 127.0.0.1 (4 CPU devices each, `jax.distributed.initialize`) train
under fsdp on one 8-device mesh, each feeding its half of the global batch: the losses
and the checkpoint they write together equal the single-process run. Plus the start-up
settings (flags, environment, errors)."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from llmjax.checkpoint import manager as ckpt_lib
from llmjax.errors import UserError
from llmjax.sharding import mesh as mesh_lib
from llmjax.testing import sharded_run
from llmjax.train import distributed
from llmjax.train import state as train_state

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(tmp_path, num_processes=2):
  port = _free_port()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen(
      [sys.executable, "-m", "llmjax.testing.sharded_run",
       f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
       f"--process_id={i}", "--rules=fsdp", "--mesh=2,4,1", "--steps=3",
       f"--out={tmp_path / f'p{i}.json'}", f"--checkpoint_dir={tmp_path / 'ckpt'}"],
      env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
      for i in range(num_processes)]
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=240)[0].decode(errors="replace"))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(num_processes)]


def test_two_processes_match_single_process(tmp_path):
  results = _launch(tmp_path)
  assert [r["process_index"] for r in results] == [0, 1]
  assert all(r["devices"] == 8 and r["local_devices"] == 4 for r in results)
  single_mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  losses, state, _ = sharded_run.run(single_mesh, "dp", num_steps=3)
  for r in results:
    np.testing.assert_allclose(r["losses"], losses, rtol=1e-5)
  # The checkpoint both processes wrote restores in this one process, on one device.
  model = sharded_run.tiny_model()
  init = lambda rng: model.init({"params": rng}, np.zeros((1, 16), np.int32))["params"]
  target = train_state.abstract_train_state(init, sharded_run.make_tx()[0], single_mesh, "dp")
  restored, _, meta = ckpt_lib.CheckpointManager(tmp_path / "ckpt").restore(target)
  assert meta == {"rules": "fsdp"} and int(restored.step) == 3
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4)  # Adam amplifies noise in tiny grads


def test_settings_from_flags_and_environment(monkeypatch):
  for var in ("LLMJAX_COORDINATOR_ADDRESS", "LLMJAX_NUM_PROCESSES", "LLMJAX_PROCESS_ID",
              "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(var, raising=False)
  assert distributed._settings(None, None, None) == (None, None, None)
  assert distributed._settings("h:1", 4, 2) == ("h:1", 4, 2)
  monkeypatch.setenv("LLMJAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("LLMJAX_NUM_PROCESSES", "16")
  monkeypatch.setenv("LLMJAX_PROCESS_ID", "3")
  assert distributed._settings(None, None, None) == ("10.0.0.1:1234", 16, 3)
  assert distributed._settings(None, None, 5) == ("10.0.0.1:1234", 16, 5)  # flag wins
  with pytest.raises(UserError, match="process_id=16"):
    distributed._settings(None, None, 16)
  monkeypatch.delenv("LLMJAX_PROCESS_ID")
  with pytest.raises(UserError, match="process_id"):
    distributed._settings(None, None, None)


def test_cluster_detection(monkeypatch):
  for var in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(var, raising=False)
  assert not distributed.cluster_detected()
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t0")  # one-host TPU VM: nothing to do
  assert not distributed.cluster_detected()
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t0,t1")
  assert distributed.cluster_detected()
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
  monkeypatch.setenv("SLURM_JOB_ID", "7")
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert distributed.cluster_detected()
