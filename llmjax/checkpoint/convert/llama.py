"""LLaMA (Touvron et al. 2023) <-> llmjax: HF `LlamaForCausalLM` folders.

RoPE (rotate-half layout, the same as llmjax's, so q/k need no permutation), RMSNorm,
SwiGLU (`gate_proj` is the activated gate `wi_0`, `up_proj` the linear branch `wi_1`,
`down_proj` is `wo`), grouped-query attention, untied `lm_head` unless
`tie_word_embeddings`.
"""

import numpy as np

from llmjax.checkpoint.convert.common import (
  Tensors,
  linear,
  merge_heads_in,
  merge_heads_out,
  split_heads_in,
  split_heads_out,
  unsupported,
)
from llmjax.models.config import TransformerConfig

MODEL_TYPE = "llama"
_PROJ = (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"))
_MLP = (("gate_proj", "wi_0"), ("up_proj", "wi_1"), ("down_proj", "wo"))


def _rope(hf: dict) -> dict:
  """TransformerConfig's rope fields from transformers' `rope_parameters` (5.x) or
  `rope_scaling` + `rope_theta` (4.x)."""
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  kind = rope.get("rope_type", rope.get("type", "default"))
  theta = float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)))
  if kind == "default":
    return {"rope_theta": theta}
  if kind not in ("linear", "llama3"):
    raise unsupported("llama", "rope_type", kind, "RoPE scaling 'linear' and 'llama3' are "
                      "implemented; convert a checkpoint with one of those (or none).")
  out = {"rope_theta": theta, "rope_scaling": kind, "rope_factor": float(rope["factor"])}
  if kind == "llama3":
    out.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
               rope_high_freq_factor=float(rope["high_freq_factor"]),
               rope_original_max_len=int(rope["original_max_position_embeddings"]))
  return out


def _rope_to_hf(cfg: TransformerConfig) -> dict:
  rope = {"rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling,
          "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling != "none":
    rope["factor"] = cfg.rope_factor
  if cfg.rope_scaling == "llama3":
    rope.update(low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_len)
  return rope


def config_from_hf(hf: dict, tensors: dict | None = None) -> TransformerConfig:
  del tensors  # the config alone decides
  if hf.get("hidden_act", "silu") != "silu":
    raise unsupported("llama", "hidden_act", hf["hidden_act"], "only silu (SwiGLU) is mapped.")
  attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
  if attention_bias != mlp_bias:
    raise unsupported("llama", "attention_bias != mlp_bias", (attention_bias, mlp_bias),
                      "llmjax's use_bias covers attention and MLP together.")
  d, n = hf["hidden_size"], hf["num_attention_heads"]
  return TransformerConfig(
      arch="decoder_only", vocab_size=hf["vocab_size"], embed_dim=d,
      num_layers=hf["num_hidden_layers"], num_heads=n,
      num_kv_heads=hf.get("num_key_value_heads") or n, head_dim=hf.get("head_dim") or d // n,
      mlp_dim=hf["intermediate_size"], max_len=hf.get("max_position_embeddings", 2048),
      position="rope", **_rope(hf), norm="rmsnorm", norm_position="pre",
      norm_eps=hf.get("rms_norm_eps", 1e-6), activation="swiglu", use_bias=bool(attention_bias),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      init_std=hf.get("initializer_range", 0.02))


def _maybe_bias(t, name, shape=None):
  if f"{name}.bias" not in t:
    return {}
  bias = t(f"{name}.bias")
  return {"bias": bias if shape is None else bias.reshape(shape)}


def params_from_hf(t: Tensors, cfg: TransformerConfig) -> dict:
  """Unscanned llmjax params from `model.*` / `lm_head.weight` tensors."""
  p = "model." if "model.embed_tokens.weight" in t else ""
  heads = {"query": cfg.num_heads, "key": cfg.num_kv_heads, "value": cfg.num_kv_heads}
  decoder = {"final_norm": {"scale": t(f"{p}norm.weight")}}
  for i in range(cfg.num_layers):
    h = f"{p}layers.{i}."
    attention = {ours: {"kernel": split_heads_in(linear(t(f"{h}self_attn.{hf}.weight")),
                                                 heads[ours]),
                        **_maybe_bias(t, f"{h}self_attn.{hf}", (heads[ours], -1))}
                 for hf, ours in _PROJ}
    attention["out"] = {"kernel": split_heads_out(linear(t(f"{h}self_attn.o_proj.weight")),
                                                  cfg.num_heads),
                        **_maybe_bias(t, f"{h}self_attn.o_proj")}
    decoder[f"layers_{i}"] = {
        "attention_norm": {"scale": t(f"{h}input_layernorm.weight")}, "attention": attention,
        "mlp_norm": {"scale": t(f"{h}post_attention_layernorm.weight")},
        "mlp": {ours: {"kernel": linear(t(f"{h}mlp.{hf}.weight")), **_maybe_bias(t, f"{h}mlp.{hf}")}
                for hf, ours in _MLP}}
  params = {"embed": {"embedding": t(f"{p}embed_tokens.weight")}, "decoder": decoder}
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": linear(t("lm_head.weight"))}
  return params


def config_to_hf(cfg: TransformerConfig, base: dict) -> dict:
  if (cfg.arch, cfg.position, cfg.norm, cfg.norm_position, cfg.activation) != (
      "decoder_only", "rope", "rmsnorm", "pre", "swiglu") or cfg.query_scale is not None:
    raise unsupported("llama", "this llmjax config", "(not LLaMA shaped)",
                      "LLaMA needs rope, rmsnorm, pre-norm and swiglu.")
  base = {k: v for k, v in base.items() if k not in ("rope_scaling", "rope_theta")}
  return {**base, "model_type": "llama", "architectures": ["LlamaForCausalLM"],
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim,
          "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
          "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
          "intermediate_size": cfg.mlp_dim, "max_position_embeddings": cfg.max_len,
          "rope_parameters": _rope_to_hf(cfg),
          "rope_theta": cfg.rope_theta,  # transformers 4.x reads this one
          "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
          "attention_bias": cfg.use_bias, "mlp_bias": cfg.use_bias,
          "tie_word_embeddings": cfg.tie_embeddings}


def params_to_hf(params: dict, cfg: TransformerConfig) -> dict[str, np.ndarray]:
  dec = params["decoder"]
  out = {"model.embed_tokens.weight": params["embed"]["embedding"],
         "model.norm.weight": dec["final_norm"]["scale"]}
  for i in range(cfg.num_layers):
    layer, h = dec[f"layers_{i}"], f"model.layers.{i}."
    att = layer["attention"]
    for hf, ours in _PROJ:
      out[f"{h}self_attn.{hf}.weight"] = merge_heads_in(att[ours]["kernel"]).T
      if "bias" in att[ours]:
        out[f"{h}self_attn.{hf}.bias"] = att[ours]["bias"].reshape(-1)
    out[f"{h}self_attn.o_proj.weight"] = merge_heads_out(att["out"]["kernel"]).T
    if "bias" in att["out"]:
      out[f"{h}self_attn.o_proj.bias"] = att["out"]["bias"]
    out[f"{h}input_layernorm.weight"] = layer["attention_norm"]["scale"]
    out[f"{h}post_attention_layernorm.weight"] = layer["mlp_norm"]["scale"]
    for hf, ours in _MLP:
      out[f"{h}mlp.{hf}.weight"] = layer["mlp"][ours]["kernel"].T
      if "bias" in layer["mlp"][ours]:
        out[f"{h}mlp.{hf}.bias"] = layer["mlp"][ours]["bias"]
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = params["lm_head"]["kernel"].T
  return out
