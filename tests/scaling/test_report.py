"""`llmjax sweep fit` over sweep directories: a planted law comes back through the
manifest, metrics.jsonl and the three approaches; bad sweeps get one clear error."""

import io
import json
import os
from contextlib import redirect_stdout

import numpy as np
import pytest

from llmjax import cli
from llmjax.errors import UserError
from llmjax.models.presets import get_preset
from llmjax.scaling import fit, report
from llmjax.scaling import sweep as sweep_lib

LAW = fit.Law(E=1.2, A=60.0, B=400.0, alpha=0.35, beta=0.4)
SHAPES = ((1, 16), (1, 32), (2, 32), (2, 48), (2, 64), (3, 96))


def _write_sweep(sweep_dir, budgets=(1e10, 3e10, 1e11), finished=None, tokenizer_sha="t1",
                 bytes_per_token=4.0):
  """A sweep directory as `sweep run` leaves it: the manifest, and per run a metrics.jsonl
  whose losses follow LAW (training curve + final eval) and sweep_result.json."""
  cfg = sweep_lib.SweepConfig(budgets=budgets, shapes=SHAPES, head_dim=16, min_steps=2)
  rows = sweep_lib.plan_rows(cfg, get_preset("tiny", vocab_size=64), seq_len=32, batch_size=4)
  manifest = {"gin_files": [], "gin_params": [], "seq_len": 32, "batch_size": 4, "rows": rows,
              "tokenizer_sha": tokenizer_sha, "bytes_per_token": bytes_per_token}
  sweep_lib.write_manifest(sweep_dir, manifest)
  for i, row in enumerate(rows):
    if finished is not None and i >= finished:
      continue
    wd = sweep_lib.workdir(sweep_dir, row)
    os.makedirs(wd)
    n = row["non_embedding_params"]
    with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
      for step in np.linspace(1, row["num_steps"], 8).astype(int):
        tokens = step * 32 * 4
        f.write(json.dumps({"step": int(step), "loss": float(LAW.loss(n, tokens))}) + "\n")
      f.write(json.dumps({"step": row["num_steps"],
                          "eval_loss": float(LAW.loss(n, row["tokens"]))}) + "\n")
    sweep_lib.finish(sweep_dir, row, 1.0)
  return manifest


def test_a_planted_law_comes_back_through_the_sweep_files(tmp_path):
  sweep_dir = str(tmp_path / "s")
  manifest = _write_sweep(sweep_dir)
  records = report.load_records([sweep_dir], "eval_loss")
  assert len(records) == len(manifest["rows"]) >= 12
  result = report.fit_all(records, bootstrap=0)
  got = fit.Law.from_dict(result["approach3"]["law"])
  for name in ("E", "alpha", "beta"):
    assert getattr(got, name) == pytest.approx(getattr(LAW, name), rel=0.02), name
  assert result["k"] == pytest.approx(np.median([r["flops"] / (r["non_embedding_params"]
                                                               * r["tokens"]) for r in records]))
  # bits per byte: nats/token / ln 2 / bytes per token, run by run.
  r = records[0]
  assert r["bits_per_byte"] == pytest.approx(r["eval_loss"] / np.log(2) / 4.0)


def test_fit_cli_writes_json_plots_and_the_holdout(tmp_path):
  sweep_dir = str(tmp_path / "s")
  _write_sweep(sweep_dir)
  out = io.StringIO()
  with redirect_stdout(out):
    assert cli.main(["sweep", "fit", f"--sweep_dir={sweep_dir}", "--bootstrap=10",
                     "--holdout"]) == 0
  with open(os.path.join(sweep_dir, "fit", "fit.json")) as f:
    result = json.load(f)
  assert set(result["plots"]) >= {"loss_vs_compute.png", "frontier.png"}
  hold = result["holdout"]
  assert hold["budget"] == 1e11 and hold["observed"] > LAW.E
  assert "hold-out: fit without C=1e+11" in out.getvalue()
  assert result["allocation"][0]["tokens_per_param"] > 0


def test_unfinished_runs_are_named_and_partial_fits_the_rest(tmp_path):
  sweep_dir = str(tmp_path / "s")
  manifest = _write_sweep(sweep_dir, finished=8)
  with pytest.raises(UserError, match=r"have no final eval loss yet.*--partial"):
    report.load_records([sweep_dir], "eval_loss")
  assert len(report.load_records([sweep_dir], "eval_loss", partial=True)) == 8
  assert len(manifest["rows"]) > 8
  with redirect_stdout(io.StringIO()) as out:
    assert cli.main(["sweep", "fit", f"--sweep_dir={sweep_dir}", "--bootstrap=0",
                     "--partial"]) == 0
  assert "8 runs" in out.getvalue()


def test_fewer_points_than_parameters_is_refused(tmp_path):
  sweep_dir = str(tmp_path / "s")
  _write_sweep(sweep_dir, finished=4)
  records = report.load_records([sweep_dir], "eval_loss", partial=True)
  with pytest.raises(UserError, match="needs at least 6"):
    report.fit_all(records, bootstrap=0)


def test_mixed_tokenizers_need_bits_per_byte(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  _write_sweep(a, tokenizer_sha="t1")
  _write_sweep(b, tokenizer_sha="t2", bytes_per_token=1.0)
  with pytest.raises(UserError, match="--loss=bits_per_byte"):
    report.load_records([a, b], "eval_loss")
  assert len(report.load_records([a, b], "bits_per_byte")) == 2 * len(
      sweep_lib.read_manifest(a)["rows"])
