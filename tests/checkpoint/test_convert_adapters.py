"""Hugging Face PEFT interop: a LoRA / DoRA adapter trained in llmjax loads with
`peft.PeftModel.from_pretrained` onto the `convert --to_hf` export and gives the same
logits; an adapter made by `peft` imports into llmjax and gives the same logits."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from llmjax.checkpoint import convert
from llmjax.checkpoint.convert import adapters
from llmjax.errors import UserError
from llmjax.models.transformer import Transformer
from llmjax.peft.lora import LoraConfig
from llmjax.peft.model import PeftModel
from llmjax.testing import hf_models

TOL = 1e-4
# (model, scanned, llmjax target, DoRA, PEFT target_modules, PEFT rank_pattern)
CASES = [("gpt2", True, "attention_qv", False, ["c_attn", "c_proj"], {}),
         ("llama", False, "all_linear", True, ["q_proj", "v_proj", "down_proj"],
          {"v_proj": 2}),
         ("bert", True, "attention", False, ["query", "value", "dense"], {}),
         ("t5", False, "all_linear", False, ["q", "v", "wo"], {})]


def _with_adapter(net, cfg, base, seed):
  """`base` params plus `net`'s adapter leaves, with random (non-zero) B and magnitude."""
  tokens = jnp.zeros((1, 2), jnp.int32)
  extra = {"encoder_tokens": tokens} if cfg.arch == "encoder_decoder" else {}
  fresh = traverse_util.flatten_dict(jax.device_get(nn.meta.unbox(
      net.init(jax.random.PRNGKey(seed), tokens, **extra)["params"])))
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(base)
  for key, value in fresh.items():
    if key not in flat:
      noisy = key[-1].startswith(("lora_b", "lora_m"))
      flat[key] = (0.2 * rng.standard_normal(value.shape)).astype(np.float32) if noisy \
          else np.asarray(value)
  return traverse_util.unflatten_dict(flat)


def _peft_logits(hf_dir, adapter_dir, model_cls, name, tokens, mask):
  base = model_cls.from_pretrained(hf_dir).eval()
  model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
  return hf_models.hf_logits(model, name, tokens, mask)


@pytest.mark.parametrize("name,scan,target,dora,hf_targets,rank_pattern", CASES)
def test_adapters_round_trip_through_peft(name, scan, target, dora, hf_targets,
                                          rank_pattern, tmp_path):
  hf = hf_models.randomize(hf_models.hf_model(name))
  hf.save_pretrained(tmp_path / "hf")
  cfg, base, hf_config = convert.import_hf(str(tmp_path / "hf"), scan_layers=scan)
  tokens, mask = hf_models.batch()

  # llmjax -> PEFT: our adapter on our import; PEFT's on the export of the same base.
  lora = LoraConfig(target=target, rank=4, alpha=8.0, dora=dora)
  net = PeftModel(Transformer(cfg), [lora])
  params = _with_adapter(net, cfg, base, seed=1)
  ours, valid = hf_models.our_logits(cfg, params, name, tokens, mask, model=net)
  convert.export_hf(str(tmp_path / "out"), cfg, base, base_config=hf_config)
  adapters.export_adapter(str(tmp_path / "adapter"), cfg, params, lora, model_type=name)
  theirs = _peft_logits(tmp_path / "out", tmp_path / "adapter", type(hf), name, tokens, mask)
  plain, _ = hf_models.our_logits(cfg, base, name, tokens, mask)
  assert hf_models.max_diff(plain, theirs, valid) > 100 * TOL  # the adapter matters
  diff = hf_models.max_diff(ours, theirs, valid)
  print(f"{name}: llmjax adapter in PEFT, max |diff| = {diff:.2e}")
  assert diff <= TOL
  # ... and back: the same logits, and the same adapter.
  back_cfg, back = adapters.import_adapter(str(tmp_path / "adapter"), cfg, base,
                                           model_type=name)
  again, _ = hf_models.our_logits(cfg, back, name, tokens, mask,
                                  model=PeftModel(Transformer(cfg), [back_cfg]))
  assert hf_models.max_diff(again, ours, valid) <= 1e-5

  # PEFT -> llmjax: an adapter `peft` trained-looking (random B), maybe of mixed ranks.
  torch.manual_seed(2)
  made = peft.get_peft_model(type(hf).from_pretrained(tmp_path / "out"), peft.LoraConfig(
      r=4, lora_alpha=6, target_modules=hf_targets, use_dora=dora, init_lora_weights=False,
      rank_pattern=rank_pattern, use_rslora=name == "bert"))
  made.save_pretrained(tmp_path / "made")
  want = _peft_logits(tmp_path / "out", tmp_path / "made", type(hf), name, tokens, mask)
  got_cfg, got = adapters.import_adapter(str(tmp_path / "made"), cfg, base, model_type=name)
  logits, _ = hf_models.our_logits(cfg, got, name, tokens, mask,
                                   model=PeftModel(Transformer(cfg), [got_cfg]))
  diff = hf_models.max_diff(logits, want, valid)
  print(f"{name}: PEFT adapter in llmjax ({got_cfg.target}), max |diff| = {diff:.2e}")
  assert diff <= TOL


def test_gpt2_fused_qkv_adapter_is_written_with_its_rank(tmp_path):
  hf = hf_models.hf_model("gpt2")
  hf.save_pretrained(tmp_path / "hf")
  cfg, base, _ = convert.import_hf(str(tmp_path / "hf"))
  lora = LoraConfig(target="attention_qv", rank=2, alpha=4.0)
  params = _with_adapter(PeftModel(Transformer(cfg), [lora]), cfg, base, seed=0)
  adapters.export_adapter(str(tmp_path / "a"), cfg, params, lora, model_type="gpt2")
  conf = json.loads((tmp_path / "a" / adapters.CONFIG).read_text())
  assert conf["target_modules"] == ["transformer.h.0.attn.c_attn",
                                    "transformer.h.1.attn.c_attn"]
  assert conf["fan_in_fan_out"] and set(conf["rank_pattern"].values()) == {4}
  assert set(conf["alpha_pattern"].values()) == {8.0}  # q and v: rank 4, same scale 2


def test_an_adapter_for_another_base_is_refused(tmp_path):
  hf = hf_models.hf_model("llama")
  made = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["q_proj"]))
  made.save_pretrained(tmp_path / "made")
  hf_models.hf_model("gpt2").save_pretrained(tmp_path / "gpt2")
  cfg, base, _ = convert.import_hf(str(tmp_path / "gpt2"))
  with pytest.raises(UserError, match="another base.*model.layers.0.self_attn.q_proj"):
    adapters.import_adapter(str(tmp_path / "made"), cfg, base, model_type="gpt2")
  (tmp_path / "made" / adapters.WEIGHTS).unlink()
  with pytest.raises(UserError, match="adapter_model.safetensors is missing"):
    adapters.import_adapter(str(tmp_path / "made"), cfg, base, model_type="gpt2")


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_soft_prompts_round_trip_through_peft(name, tmp_path):
  from llmjax.checkpoint.convert import prompts
  from llmjax.peft.prompt_tuning import PromptTuningConfig
  hf = hf_models.randomize(hf_models.hf_model(name))
  hf.save_pretrained(tmp_path / "hf")
  cfg, base, _ = convert.import_hf(str(tmp_path / "hf"))
  tokens, mask = hf_models.batch()
  k = 3

  def peft_logits(adapter_dir):  # PEFT returns the k virtual tokens' logits too
    return _peft_logits(tmp_path / "hf", adapter_dir, type(hf), name, tokens, mask)[:, k:]

  config = PromptTuningConfig(length=k)
  net = PeftModel(Transformer(cfg), [config])
  params = {**base, "embed": {**base["embed"], "prompt_default": (
      0.5 * np.random.default_rng(0).standard_normal((k, cfg.embed_dim))).astype(np.float32)}}
  ours, valid = hf_models.our_logits(cfg, params, name, tokens, mask, model=net)
  prompts.export_prompt(str(tmp_path / "prompt"), cfg, params, config)
  diff = hf_models.max_diff(ours, peft_logits(tmp_path / "prompt"), valid)
  print(f"{name}: llmjax soft prompt in PEFT, max |diff| = {diff:.2e}")
  assert diff <= TOL
  plain, _ = hf_models.our_logits(cfg, base, name, tokens, mask)
  assert hf_models.max_diff(plain, ours, valid) > 100 * TOL  # the prompt matters

  torch.manual_seed(3)
  made = peft.get_peft_model(type(hf).from_pretrained(tmp_path / "hf"), peft.PromptTuningConfig(
      task_type="CAUSAL_LM", num_virtual_tokens=5))
  made.save_pretrained(tmp_path / "made")
  got_cfg, got = prompts.import_prompt(str(tmp_path / "made"), cfg, base)
  k = got_cfg.length
  logits, _ = hf_models.our_logits(cfg, got, name, tokens, mask,
                                   model=PeftModel(Transformer(cfg), [got_cfg]))
  diff = hf_models.max_diff(logits, peft_logits(tmp_path / "made"), valid)
  print(f"{name}: PEFT soft prompt in llmjax, max |diff| = {diff:.2e}")
  assert k == 5 and diff <= TOL
