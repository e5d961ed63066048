"""LoRA in a real run: `--gin_file=peft/lora.gin` on a warm start from a checkpoint. The
base stays bitwise the source's, only the adapter has optimizer state, and `generate`
and `convert --to_hf` fold the adapter in."""

import os

import jax
import numpy as np

from llmjax import cli
from llmjax.checkpoint import manager as ckpt_lib
from llmjax.testing import runs


def test_lora_run_from_a_checkpoint(tmp_path, data_dir, capsys, fixture_run):
  source, work = fixture_run, str(tmp_path / "lora")
  assert runs.warm_start_train(work, data_dir, source, "peft/lora.gin", params=[
            "TrainConfig.num_steps=10", "TrainConfig.checkpoint_every=10",
            "OptimizerConfig.peak_lr=0.01", "LoraConfig.rank=2"]) == 0
  base = runs.param_leaves(
      ckpt_lib.CheckpointManager(os.path.join(source, "checkpoints")).read()[0]["params"])
  state, _, meta = ckpt_lib.CheckpointManager(os.path.join(work, "checkpoints")).read(10)
  tuned = runs.param_leaves(state["params"])
  adapter = {k: v for k, v in tuned.items() if "lora_" in k}
  assert set(tuned) - set(adapter) == set(base)
  for key, value in base.items():  # the base: bitwise the source's after 10 steps
    np.testing.assert_array_equal(tuned[key], value, err_msg=key)
  assert len(adapter) == 4  # A and B of query and value (scanned: both layers in each)
  assert all(np.abs(v).max() > 0 for k, v in adapter.items() if "lora_b" in k)  # trained
  moments = [x for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0]
  assert sum(np.size(x) for x in moments) == 2 * sum(v.size for v in adapter.values())
  assert meta["peft"][0]["target"] == "attention_qv"

  capsys.readouterr()
  args = ["--prompt=ROMEO:", "--max_new_tokens=8", "--temperature=0"]
  assert cli.main(["generate", f"--workdir={work}", *args]) == 0
  tuned_text = capsys.readouterr().out
  assert cli.main(["generate", f"--workdir={source}", *args]) == 0
  assert tuned_text.startswith("ROMEO:") and tuned_text != capsys.readouterr().out
  assert cli.main(["convert", f"--workdir={work}", f"--to_hf={tmp_path / 'hf'}"]) == 0
  assert (tmp_path / "hf" / "config.json").exists()
