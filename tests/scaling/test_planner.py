"""The compute-optimal planner: the allocation under a law, its inversions, the shape
search against exact counts, and the CLI's memory and wall-time table."""

import io
import json
import math
import re
from contextlib import redirect_stdout

import pytest

from llmjax import cli
from llmjax.errors import UserError
from llmjax.scaling import counts, fit, planner


@pytest.mark.parametrize("law", [fit.CHINCHILLA, fit.EPOCH])
def test_allocation_spends_the_budget_and_inverts(law):
  c, n, d = planner.allocation(law, flops=5.76e23)
  assert 6 * n * d == pytest.approx(c, rel=1e-12)
  # Optimal: moving along the budget in either direction raises the loss.
  for f in (0.8, 1.25):
    assert law.loss(n * f, d / f) > law.loss(n, d)
  assert planner.allocation(law, params=n)[0] == pytest.approx(c, rel=1e-9)
  assert planner.allocation(law, tokens=d)[0] == pytest.approx(c, rel=1e-9)
  with pytest.raises(UserError, match="exactly one"):
    planner.allocation(law, flops=1e20, params=1e9)


@pytest.mark.parametrize("family,target", [("gpt2", 124e6), ("llama", 7e9)])
def test_shape_search_meets_the_target_by_exact_count(family, target):
  cfg = planner.shape_for(target, family, seq_len=1024)
  exact = counts.param_counts(cfg)["total"]
  assert abs(exact / target - 1) < 0.1, (cfg, exact)
  assert cfg.embed_dim % cfg.num_heads == 0 and 32 <= cfg.embed_dim / cfg.num_layers <= 256
  if family == "llama":
    assert cfg.num_heads % cfg.num_kv_heads == 0 and cfg.activation == "swiglu"


def test_a_fitted_law_loads_with_its_convention(tmp_path):
  law = fit.Law(E=1.5, A=300.0, B=900.0, alpha=0.3, beta=0.35)
  path = tmp_path / "fit.json"
  path.write_text(json.dumps({"params": "non_embedding", "approach3": {"law": law.to_dict()}}))
  assert planner.load_law(str(path)) == (law, "non_embedding")
  assert planner.load_law("epoch") == (fit.EPOCH, "total")
  with pytest.raises(UserError, match="neither a published law"):
    planner.load_law(str(tmp_path / "missing.json"))


def test_cli_prints_allocation_shape_memory_and_time():
  out = io.StringIO()
  with redirect_stdout(out):
    code = cli.main(["scaling", "plan", "--flops=1e20", "--devices=8", "--device=h100",
                     "--mfu=0.5", "--seq_len=1024", "--batch_size=64"])
  text = out.getvalue()
  assert code == 0
  _, n, d = planner.allocation(fit.CHINCHILLA, flops=1e20)
  assert f"N_opt = {n:.3e}" in text and f"D_opt = {d:.3e}" in text
  hours = 1e20 / (8 * planner.DEVICE_FLOPS["h100"] * 0.5) / 3600
  assert f"{hours:,.1f} h on 8" in text
  rows = [line.split()[0] for line in text.splitlines() if re.match(r"^(dp|zero1|fsdp)", line)]
  assert rows == list(planner.STRATEGIES)
  steps = int(re.search(r"([\d,]+) steps of 64 x 1024", text).group(1).replace(",", ""))
  assert steps == round(d / (64 * 1024))
  assert math.isfinite(float(re.search(r"predicted loss ([\d.]+)", text).group(1)))


def test_cli_errors_name_the_fix():
  assert cli.main(["scaling", "plan", "--flops=1e20", "--device=tpu9"]) == 2
  assert cli.main(["scaling", "plan", "--flops=1e20", "--params=1e9"]) == 2
  assert cli.main(["scaling", "plan", "--flops=1e20", "--mfu=1.5"]) == 2
