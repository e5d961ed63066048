"""benchmarks/align_vs_trl.py runs end to end at a tiny shape and prints its ratios.

One round of one step per side, in this process (`InProcess` instead of worker
processes); no timing is asserted, only that both sides do the stated work (the workers'
own checks: TRL's DPO batch unpadded, every GRPO completion max_new_tokens long) and that
the report has a ratio per task.
"""

import re

import pytest

pytest.importorskip("trl")

from benchmarks import align_vs_trl

SHAPE = "smoke"


def test_word_tokenizer_maps_ids_one_to_one():
  tok = align_vs_trl.word_tokenizer(512)
  ids = [0, 7, 510, 511]
  assert tok(align_vs_trl.text(ids))["input_ids"] == ids
  assert tok.eos_token_id == tok.pad_token_id == 511


@pytest.mark.slow
def test_one_round_prints_ratios(capsys, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  workers = [
      align_vs_trl.InProcess("llmjax-dpo", align_vs_trl.LlmjaxDPO(SHAPE, host_malloc="system")),
      align_vs_trl.InProcess("trl-dpo", align_vs_trl.TrlDPO(SHAPE, threads=1)),
      align_vs_trl.InProcess("llmjax-grpo", align_vs_trl.LlmjaxGRPO(SHAPE, host_malloc="system")),
      align_vs_trl.InProcess("trl-grpo", align_vs_trl.TrlGRPO(SHAPE, threads=1)),
  ]
  info = {w.name: w.impl.info() for w in workers}
  assert len({i["params"] for i in info.values()}) == 1
  results = align_vs_trl.run_rounds(workers, SHAPE, rounds=1, steps=1, warmup_steps=0)
  align_vs_trl.report(info, results, SHAPE)
  out = capsys.readouterr().out
  assert "round 1/1" in out
  for task in ("dpo", "grpo"):
    row = next(line for line in out.splitlines() if line.startswith(f"llmjax-{task}"))
    assert len(re.findall(r"\d+\.\d+x", row)) == 2, row  # median and min ratio to TRL
  assert "completions of 8 tokens" in out and "rows [4, 16]" in out
