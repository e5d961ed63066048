"""`llmjax peft merge|export|import` on a LoRA run warm-started from a checkpoint: the
adapter-only checkpoint is small and refuses another base, merged decoding equals the
adapter run's, and the PEFT folder goes through `peft` and back into llmjax."""

import os

import numpy as np
import pytest

from llmjax import cli
from llmjax.checkpoint import manager as ckpt_lib
from llmjax.testing import runs

GENERATE = ["--prompt=ROMEO:", "--max_new_tokens=8", "--temperature=0"]


def _leaves(workdir, step=None):
  ckpt = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"))
  params, _ = ckpt.restore_params(step)
  ckpt.close()
  return runs.param_leaves(params)


def _generate(workdir, capsys):
  capsys.readouterr()
  assert cli.main(["generate", f"--workdir={workdir}", *GENERATE]) == 0
  return capsys.readouterr().out


def _train(tmp_path, data_dir, source, extra=()):
  work = str(tmp_path / "lora")
  assert runs.warm_start_train(work, data_dir, source, "peft/lora.gin", params=[
      "TrainConfig.num_steps=6", "TrainConfig.checkpoint_every=6",
      "OptimizerConfig.peak_lr=0.02", "LoraConfig.rank=2", *extra]) == 0
  return work


def test_merge_and_adapter_only_checkpoints(tmp_path, data_dir, capsys, fixture_run):
  source = fixture_run
  work = _train(tmp_path, data_dir, source)
  tuned = _leaves(work)

  adapter = str(tmp_path / "adapter")
  assert cli.main(["peft", "export", f"--workdir={work}", f"--to_adapter={adapter}"]) == 0
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(adapter)
             for f in fs)
  full = sum(os.path.getsize(os.path.join(d, f))
             for d, _, fs in os.walk(os.path.join(work, "checkpoints")) for f in fs)
  with capsys.disabled():
    print(f"adapter-only checkpoint {size} bytes, full checkpoint {full} bytes")
  assert size < full / 3

  again = str(tmp_path / "again")
  assert cli.main(["peft", "import", f"--from_adapter={adapter}", f"--workdir={source}",
                   f"--output={again}"]) == 0
  restored = _leaves(again)
  assert set(restored) == set(tuned)
  for key, value in tuned.items():
    np.testing.assert_array_equal(restored[key], value, err_msg=key)

  merged = str(tmp_path / "merged")
  assert cli.main(["peft", "merge", f"--workdir={work}", f"--output={merged}"]) == 0
  assert not any("lora_" in k for k in _leaves(merged))
  assert _generate(merged, capsys) == _generate(work, capsys) != _generate(source, capsys)

  # The merged model is another base: the adapter refuses it, naming both, and writes
  # nothing.
  capsys.readouterr()
  assert cli.main(["peft", "import", f"--from_adapter={adapter}", f"--workdir={merged}",
                   f"--output={tmp_path / 'wrong'}"]) == 2
  err = capsys.readouterr().err
  assert "trained on the base" in err and source in err and merged in err
  assert not (tmp_path / "wrong").exists()


def test_peft_folder_round_trip_through_an_hf_export(tmp_path, data_dir, capsys, fixture_run):
  peft = pytest.importorskip("peft")
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  source = fixture_run
  work = _train(tmp_path, data_dir, source, extra=("LoraConfig.dora=True",))
  hf_dir, adapter = tmp_path / "hf", tmp_path / "peft_adapter"
  assert cli.main(["convert", f"--workdir={source}", f"--to_hf={hf_dir}"]) == 0
  assert cli.main(["peft", "export", f"--workdir={work}", f"--to_peft={adapter}"]) == 0

  model = peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(hf_dir), adapter).eval()
  prompt = transformers.AutoTokenizer.from_pretrained(hf_dir)("ROMEO:")["input_ids"]
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8,
                         do_sample=False, pad_token_id=0)
  hf_text = transformers.AutoTokenizer.from_pretrained(hf_dir).decode(
      out[0], skip_special_tokens=True)
  assert _generate(work, capsys).strip().startswith(hf_text.strip())

  imported, back = str(tmp_path / "imported"), str(tmp_path / "back")
  assert cli.main(["convert", f"--from_hf={hf_dir}", f"--workdir={imported}"]) == 0
  assert cli.main(["peft", "import", f"--from_peft={adapter}", f"--workdir={imported}",
                   f"--output={back}"]) == 0
  tuned = _generate(work, capsys)
  assert _generate(back, capsys) == tuned

  # A second, named adapter made by peft itself, beside the first in one checkpoint.
  torch.manual_seed(0)
  made = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(hf_dir),
                             peft.LoraConfig(r=2, init_lora_weights=False))
  made.save_pretrained(tmp_path / "made")
  both = str(tmp_path / "both")
  assert cli.main(["peft", "import", f"--from_peft={tmp_path / 'made'}", f"--workdir={back}",
                   f"--output={both}", "--name=second"]) == 0
  second = _generate(both, capsys)  # the newest adapter is the active one
  assert second not in (tuned, _generate(source, capsys))
  capsys.readouterr()
  assert cli.main(["generate", f"--workdir={both}", "--adapter=default", *GENERATE]) == 0
  assert capsys.readouterr().out == tuned
  assert cli.main(["generate", f"--workdir={both}", "--adapter=none", *GENERATE]) == 0
  assert capsys.readouterr().out == _generate(source, capsys)
  assert cli.main(["generate", f"--workdir={both}", "--adapter=third", *GENERATE]) == 2
  assert "holds ['default', 'second']" in capsys.readouterr().err
  merged = str(tmp_path / "merged_default")
  assert cli.main(["peft", "merge", f"--workdir={both}", f"--output={merged}",
                   "--name=default"]) == 0
  assert _generate(merged, capsys) == tuned
  assert cli.main(["peft", "import", f"--from_peft={tmp_path / 'made'}", f"--workdir={both}",
                   f"--output={tmp_path / 'clash'}", "--name=second"]) == 2
  assert "already has an adapter named ['second']" in capsys.readouterr().err
