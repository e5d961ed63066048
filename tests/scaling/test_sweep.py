"""Sweeps: the manifest's arithmetic, its validation, and a micro-sweep end to end through
every executor (SLURM script, Ray, local), killed midway and finished without redoing
finished runs, then fitted."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout

import pytest

from llmjax import cli
from llmjax.errors import UserError
from llmjax.models.presets import get_preset
from llmjax.scaling import counts, executors
from llmjax.scaling import sweep as sweep_lib

MICRO = "sweeps/micro.gin"


def _child_env():
  """The runs' environment: one CPU device (the tests' 8 simulated ones only slow them)."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  return env


def test_isoflop_rows_spend_their_budget_and_count_exactly():
  sweep = sweep_lib.SweepConfig(budgets=(1e10, 4e10), shapes=((1, 32), (2, 64), (4, 64)),
                                head_dim=16, min_steps=2)
  base = get_preset("tiny", vocab_size=89)
  rows = sweep_lib.plan_rows(sweep, base, seq_len=32, batch_size=8)
  assert len(rows) == 6
  for row in rows:
    cfg = sweep_lib.shape_config(base, row["num_layers"], row["embed_dim"], sweep)
    step_flops = counts.flops_per_token(cfg, 32) * 32 * 8
    assert row["tokens"] == row["num_steps"] * 32 * 8
    assert row["flops"] == pytest.approx(counts.flops_per_token(cfg, 32) * row["tokens"])
    assert abs(row["flops"] - row["budget"]) <= step_flops / 2 + 1  # rounded to whole steps
    assert row["params"] == counts.param_counts(cfg)["total"]
    assert row["non_embedding_params"] == counts.param_counts(cfg)["non_embedding"]
    assert f"TrainConfig.num_steps={row['num_steps']}" in row["bindings"]
  small, large = rows[0], rows[2]  # same budget: the larger model trains on fewer tokens
  assert small["tokens"] > large["tokens"]


def test_grid_rows_are_shapes_times_tokens_and_steps_bound_isoflop_rows():
  base = get_preset("tiny", vocab_size=89)
  grid = sweep_lib.SweepConfig(mode="grid", tokens=(2560, 5120), shapes=((1, 32), (2, 32)),
                               head_dim=16)
  rows = sweep_lib.plan_rows(grid, base, seq_len=32, batch_size=8)
  assert [r["tokens"] for r in rows] == [2560, 2560, 5120, 5120]
  tight = sweep_lib.SweepConfig(budgets=(1e9,), shapes=((1, 32), (4, 64)), head_dim=16,
                                min_steps=10)
  kept = sweep_lib.plan_rows(tight, base, seq_len=32, batch_size=8)
  assert all(r["num_steps"] >= 10 for r in kept) and len(kept) < 2
  with pytest.raises(UserError, match="head_dim"):
    sweep_lib.plan_rows(sweep_lib.SweepConfig(budgets=(1e9,), shapes=((1, 40),)), base, 32, 8)


def test_replanning_with_more_shapes_keeps_the_runs_it_had():
  base = get_preset("tiny", vocab_size=89)
  plan = lambda shapes: sweep_lib.plan_rows(
      sweep_lib.SweepConfig(budgets=(1e10, 2e10), shapes=shapes, head_dim=16, min_steps=1),
      base, seq_len=32, batch_size=8)
  before, after = plan(((1, 32), (2, 64))), plan(((1, 16), (1, 32), (2, 64)))
  assert len(after) == len(before) + 2
  assert {r["id"]: r for r in before}.items() <= {r["id"]: r for r in after}.items()
  with pytest.raises(UserError, match="twice"):
    plan(((1, 32), (1, 32)))


def test_an_edited_manifest_is_refused_before_anything_runs():
  base = get_preset("tiny")  # learned positions, max_len 64
  rows = sweep_lib.plan_rows(sweep_lib.SweepConfig(budgets=(1e10,), shapes=((1, 32),),
                                                   head_dim=16, min_steps=1), base, 32, 8)
  bad = dict(rows[0], id="edited", bindings=[b.replace("num_heads=2", "num_heads=3")
                                             for b in rows[0]["bindings"]])
  manifest = {"rows": [rows[0], bad], "batch_size": 6, "seq_len": 128}
  with pytest.raises(UserError) as e:
    sweep_lib.validate_rows(manifest, base, {"data": 4, "fsdp": 1, "tensor": 1})
  msg = str(e.value)
  assert "embed_dim=32 is not a multiple of num_heads=3" in msg
  assert "seq_len 128 exceeds max_len 64" in msg and "does not split" in msg
  assert "nothing was run" in msg


def test_ray_missing_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
  with pytest.raises(UserError, match=r"llmjax\[ray\]"):
    executors.import_ray()


def _plan(sweep_dir, data_dir):
  out = io.StringIO()
  with redirect_stdout(out):
    assert cli.main(["sweep", "plan", f"--gin_file={MICRO}", f"--sweep_dir={sweep_dir}",
                     f"--gin_param=DataConfig.data_dir={data_dir!r}"]) == 0
  return sweep_lib.read_manifest(sweep_dir)


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def _wait_for(predicate, timeout=300):
  start = time.time()
  while not predicate():
    if time.time() - start > timeout:
      raise TimeoutError
    time.sleep(0.2)


@pytest.mark.slow
def test_micro_sweep_through_every_executor_killed_and_resumed_then_fitted(tmp_path, data_dir):
  sweep_dir = str(tmp_path / "sweep")
  manifest = _plan(sweep_dir, data_dir)
  rows = manifest["rows"]
  assert len(rows) == 6 and manifest["tokenizer_sha"]
  assert 0.95 < manifest["bytes_per_token"] < 1.05  # a char tokenizer (+ EOS per scene)
  # SLURM: the array script runs one row per task index (bash stands in for sbatch).
  script = executors.write_slurm(sweep_dir, rows)
  assert "#SBATCH --array=0-5" in _read(script)
  subprocess.run(["bash", script], check=True, env={**_child_env(), "SLURM_ARRAY_TASK_ID": "0"},
                 capture_output=True)
  assert [sweep_lib.status(sweep_dir, r) for r in rows[:2]] == ["done", "pending"]
  # Ray: a local instance started here runs row 1 as a task.
  ray = pytest.importorskip("ray")
  ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
  try:
    (result,) = executors.run_ray(sweep_dir, manifest, [rows[1]], env=_child_env())
  finally:
    ray.shutdown()
  assert result["status"] == "done" and sweep_lib.status(sweep_dir, rows[1]) == "done"
  # Local, killed once row 3 has a checkpoint but is not done; then run again.
  finished = {r["id"]: os.path.getmtime(os.path.join(sweep_lib.workdir(sweep_dir, r),
                                                     sweep_lib.RESULT)) for r in rows[:2]}
  cmd = [sys.executable, "-m", "llmjax.cli", "sweep", "run", f"--sweep_dir={sweep_dir}"]
  proc = subprocess.Popen(cmd, env=_child_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
  try:
    _wait_for(lambda: sweep_lib.status(sweep_dir, rows[3]) == "partial")
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  assert sweep_lib.status(sweep_dir, rows[2]) == "done"
  assert sweep_lib.status(sweep_dir, rows[3]) == "partial"
  out = subprocess.run(cmd, env=_child_env(), capture_output=True, text=True, check=True).stdout
  assert "3 of 6 runs already done; running 3" in out and "6 of 6 runs done" in out
  for r in rows[:2]:  # not redone
    path = os.path.join(sweep_lib.workdir(sweep_dir, r), sweep_lib.RESULT)
    assert os.path.getmtime(path) == finished[r["id"]]
  log3 = _read(os.path.join(sweep_lib.workdir(sweep_dir, rows[3]), "train.log"))
  assert "resumed from step" in log3
  # The fit: all three approaches over the six runs; fit.json and plots.
  out = io.StringIO()
  with redirect_stdout(out):
    assert cli.main(["sweep", "fit", f"--sweep_dir={sweep_dir}", "--bootstrap=20"]) == 0
  fitted = json.loads(_read(os.path.join(sweep_dir, "fit", "fit.json")))
  assert fitted["n_points"] == 6 and "approach3" in fitted and "approach2" in fitted
  for name in fitted["plots"]:
    with open(os.path.join(sweep_dir, "fit", name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "Approach 3" in out.getvalue()
