"""benchmarks/lora_vs_peft.py: both sides train the same adapter at a tiny shape, and the
GEMM floor counts exactly the products a LoRA step needs (no timing is asserted)."""

import math

import pytest

pytest.importorskip("peft")

from benchmarks import lora_vs_peft as lp
from benchmarks import train_vs_torch as tvt


def _flops(gemms):
  return sum(c * 2 * m * k * n * b * share for c, m, k, n, b, share in gemms)


def test_floor_counts_the_projections_head_and_causal_scores_of_a_lora_step():
  lp._register_shapes()
  layers, heads, d, seq_len, batch = lp.SHAPES["gpt2-lora"]
  t, v, hd = seq_len * batch, tvt.VOCAB["gpt2-lora"], d // heads
  # Independently: 12 d^2 projection weights per block and the V x d head, once forward
  # and once backward, less the first block's q/k/v input gradient (frozen embeddings).
  dense = 2 * t * (layers * 12 * d * d + v * d) * 2 - 2 * t * 3 * d * d
  # Six [S, S]-sized score products per head and block (two forward, four backward,
  # less the first block's key gradient), half of them under the causal mask.
  per_product = 2 * seq_len * seq_len * hd * batch * heads / 2
  scores = (6 * layers - 1) * per_product
  assert _flops(lp.step_gemms("gpt2-lora")) == pytest.approx(dense + scores, rel=1e-12)


def test_gemm_seconds_times_every_product_in_both_libraries():
  gemms = lp.step_gemms("tiny")
  for backend in ("jax", "torch"):
    times = lp.gemm_seconds(backend, gemms, repeats=1)
    assert len(times) == len(gemms) and all(0 < s < 5 for s in times)


@pytest.mark.slow
def test_both_sides_train_the_same_number_of_adapter_parameters(capsys):
  ours, theirs = lp.LlmjaxLora(shape="tiny"), lp.PeftLora(shape="tiny", threads=1)
  assert ours.info()["trainable"] == theirs.info()["trainable"] == 2 * 2 * 8 * (32 + 32)
  assert ours.info()["opt_bytes"] == theirs.info()["opt_bytes"]
  # B is zero: both start from an untrained GPT at ln(vocab) on the same batch.
  for side in (ours, theirs):
    _, (loss,) = side.run(1, 1)
    assert abs(loss - math.log(50257)) < 0.5
  lp.report_floor({"rows": [(g, 1e-3, 2e-3) for g in lp.step_gemms("tiny")],
                   "floor": 0.5}, {"peft": [1000.0], "llmjax": [800.0]}, 64)
  out = capsys.readouterr().out
  assert "floor: 0.50 s/step" in out and "reach here: 0.13x" in out
