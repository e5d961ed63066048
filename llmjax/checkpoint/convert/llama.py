"""LLaMA (Touvron et al. 2023) and its kin <-> llmjax: HF `LlamaForCausalLM`,
`MistralForCausalLM`, `Qwen2ForCausalLM` and `GemmaForCausalLM` folders.

RoPE (rotate-half layout, the same as llmjax's, so q/k need no permutation; scaling
'linear', 'llama3', 'yarn', 'dynamic'), RMSNorm, SwiGLU (`gate_proj` is the activated gate
`wi_0`, `up_proj` the linear branch `wi_1`, `down_proj` is `wo`), grouped-query
attention, untied `lm_head` unless `tie_word_embeddings`. The three share tensor names;
they differ in config: Mistral adds a sliding attention window (`sliding_window`), Qwen2
has q/k/v biases without o/MLP biases (`qkv_bias=True, use_bias=False`) and a sliding
window only when every layer uses it (mixed layers are refused); Gemma (1) gates with
tanh GELU (`geglu`), scales the embeddings by sqrt(D), ties the head, and its RMSNorm
multiplies by 1 + weight (imported as `scale = 1 + weight`, exported as `scale - 1`).
Gemma 2/3 (soft-capping, alternating windows, extra norms) are refused.
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

MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM"}
_ACTIVATIONS = {"llama": ("silu", "swiglu"), "mistral": ("silu", "swiglu"),
                "qwen2": ("silu", "swiglu"), "gemma": ("gelu_pytorch_tanh", "geglu")}
_SCALINGS = ("linear", "llama3", "yarn", "dynamic")
_PROJ = (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"))
_MLP = (("gate_proj", "wi_0"), ("up_proj", "wi_1"), ("down_proj", "wo"))


def _rope(hf: dict, model_type: str) -> dict:
  """TransformerConfig's rope fields from transformers' `rope_parameters` (5.x) or
  `rope_scaling` + `rope_theta` (4.x)."""
  from llmjax.layers.position import yarn_attention_factor
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  kind = rope.get("rope_type", rope.get("type", "default"))
  theta = float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)))
  if kind == "default":
    return {"rope_theta": theta}
  if kind not in _SCALINGS:
    raise unsupported(model_type, "rope_type", kind, f"RoPE scaling {_SCALINGS} is "
                      "implemented; convert a checkpoint with one of those (or none).")
  factor = float(rope.get("factor") or 1.0)
  # dynamic NTK grows theta past max_position_embeddings (transformers' reading)
  original = rope.get("original_max_position_embeddings") or hf.get(
      "max_position_embeddings", 2048)
  out = {"rope_theta": theta, "rope_scaling": kind, "rope_factor": factor,
         "rope_original_max_len": int(original)}
  if kind == "llama3":
    out.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
               rope_high_freq_factor=float(rope["high_freq_factor"]))
  if kind == "yarn":
    if rope.get("mscale") or rope.get("mscale_all_dim"):
      raise unsupported(model_type, "yarn mscale", rope.get("mscale"),
                        "only YaRN's attention_factor (or its default) is mapped.")
    attention = rope.get("attention_factor")
    out.update(rope_beta_fast=float(rope.get("beta_fast") or 32.0),
               rope_beta_slow=float(rope.get("beta_slow") or 1.0),
               rope_truncate=bool(rope.get("truncate", True)),
               rope_attention_factor=float(yarn_attention_factor(factor) if attention is None
                                           else attention))
  return out


def _rope_to_hf(cfg: TransformerConfig) -> dict:
  rope = {"rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling,
          "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling != "none":
    rope["factor"] = cfg.rope_factor
  if cfg.rope_scaling in ("llama3", "yarn"):
    rope["original_max_position_embeddings"] = cfg.rope_original_max_len
  if cfg.rope_scaling == "llama3":
    rope.update(low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor)
  if cfg.rope_scaling == "yarn":
    rope.update(beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow,
                truncate=cfg.rope_truncate, attention_factor=cfg.rope_attention_factor)
  return rope


def _biases(hf: dict, model_type: str) -> dict:
  if model_type == "qwen2":  # q/k/v always, o_proj and the MLP never
    return {"use_bias": False, "qkv_bias": True}
  attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
  if attention_bias != mlp_bias:
    raise unsupported(model_type, "attention_bias != mlp_bias", (attention_bias, mlp_bias),
                      "llmjax's use_bias covers attention and MLP together.")
  return {"use_bias": bool(attention_bias)}


def _sliding_window(hf: dict, model_type: str) -> int:
  if model_type in ("llama", "gemma"):
    return 0
  kinds = set(hf.get("layer_types") or ())
  if model_type == "qwen2" and not hf.get("use_sliding_window"):
    return 0
  if kinds - {"sliding_attention"}:
    if "sliding_attention" in kinds:
      raise unsupported(model_type, "layer_types", sorted(kinds), "llmjax uses one "
                        "attention window for every layer; mixed full/sliding layers "
                        "(max_window_layers < num_hidden_layers) are not mapped.")
    return 0
  return int(hf.get("sliding_window") or 0)


def config_from_hf(hf: dict, tensors: dict | None = None) -> TransformerConfig:
  del tensors  # the config alone decides
  model_type = hf.get("model_type", "llama")
  act, ours = _ACTIVATIONS[model_type]
  if hf.get("hidden_act", act) not in (act, "gelu" if model_type == "gemma" else act):
    raise unsupported(model_type, "hidden_act", hf["hidden_act"], f"only {act} is mapped.")
  gemma = model_type == "gemma"
  d, n = hf["hidden_size"], hf["num_attention_heads"]
  return TransformerConfig(
      arch="decoder_only", vocab_size=hf["vocab_size"], embed_dim=d,
      num_layers=hf["num_hidden_layers"], num_heads=n,
      num_kv_heads=hf.get("num_key_value_heads") or n, head_dim=hf.get("head_dim") or d // n,
      mlp_dim=hf["intermediate_size"], max_len=hf.get("max_position_embeddings", 2048),
      position="rope", **_rope(hf, model_type), norm="rmsnorm", norm_position="pre",
      norm_eps=hf.get("rms_norm_eps", 1e-6), activation=ours, **_biases(hf, model_type),
      sliding_window=_sliding_window(hf, model_type), scale_embeddings=gemma,
      tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
      init_std=hf.get("initializer_range", 0.02))


def _maybe_bias(t, name, shape=None):
  if f"{name}.bias" not in t:
    return {}
  bias = t(f"{name}.bias")
  return {"bias": bias if shape is None else bias.reshape(shape)}


def params_from_hf(t: Tensors, cfg: TransformerConfig) -> dict:
  """Unscanned llmjax params from `model.*` / `lm_head.weight` tensors."""
  p = "model." if "model.embed_tokens.weight" in t else ""
  offset = 1.0 if _is_gemma(cfg) else 0.0
  norm = lambda name: {"scale": t(name) + np.float32(offset)}
  heads = {"query": cfg.num_heads, "key": cfg.num_kv_heads, "value": cfg.num_kv_heads}
  decoder = {"final_norm": norm(f"{p}norm.weight")}
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
        "attention_norm": norm(f"{h}input_layernorm.weight"), "attention": attention,
        "mlp_norm": norm(f"{h}post_attention_layernorm.weight"),
        "mlp": {ours: {"kernel": linear(t(f"{h}mlp.{hf}.weight")), **_maybe_bias(t, f"{h}mlp.{hf}")}
                for hf, ours in _MLP}}
  params = {"embed": {"embedding": t(f"{p}embed_tokens.weight")}, "decoder": decoder}
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": linear(t("lm_head.weight"))}
  return params


def _is_gemma(cfg: TransformerConfig) -> bool:
  return cfg.activation == "geglu" and cfg.scale_embeddings


def infer_model_type(cfg: TransformerConfig) -> str:
  """The one of MODEL_TYPES that holds `cfg` (qkv-only biases: qwen2; a window: mistral;
  GeGLU with scaled embeddings: gemma)."""
  if _is_gemma(cfg):
    return "gemma"
  if cfg.qkv_bias and not cfg.use_bias:
    return "qwen2"
  return "mistral" if cfg.sliding_window else "llama"


def config_to_hf(cfg: TransformerConfig, base: dict) -> dict:
  model_type = base.get("model_type") or infer_model_type(cfg)
  act, ours = _ACTIVATIONS[model_type]
  if (cfg.arch, cfg.position, cfg.norm, cfg.norm_position, cfg.activation) != (
      "decoder_only", "rope", "rmsnorm", "pre", ours) or cfg.query_scale is not None \
      or cfg.logits_scale != 1.0 or cfg.scale_embeddings != (model_type == "gemma"):
    raise unsupported(model_type, "this llmjax config", "(not LLaMA shaped)",
                      f"{model_type} needs rope, rmsnorm, pre-norm and {ours}"
                      + (", scaled embeddings." if model_type == "gemma" else "."))
  fits = {"llama": cfg.qkv_bias == cfg.use_bias and not cfg.sliding_window,
          "mistral": not cfg.qkv_bias and not cfg.use_bias,
          "qwen2": cfg.qkv_bias and not cfg.use_bias,
          "gemma": not (cfg.qkv_bias or cfg.use_bias or cfg.sliding_window)
          and cfg.tie_embeddings}[model_type]
  if not fits:
    raise unsupported(model_type, "biases/sliding_window", (cfg.qkv_bias, cfg.use_bias,
                      cfg.sliding_window), f"export as {infer_model_type(cfg)!r} instead.")
  base = {k: v for k, v in base.items() if k not in ("rope_scaling", "rope_theta")}
  out = {**base, "model_type": model_type, "architectures": [_ARCHITECTURES[model_type]],
         "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim,
         "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
         "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
         "intermediate_size": cfg.mlp_dim, "max_position_embeddings": cfg.max_len,
         "rope_parameters": _rope_to_hf(cfg),
         "rope_theta": cfg.rope_theta,  # transformers 4.x reads this one
         "rms_norm_eps": cfg.norm_eps, "hidden_act": act,
         "tie_word_embeddings": cfg.tie_embeddings}
  if model_type in ("llama", "gemma"):
    out.update(attention_bias=cfg.use_bias)
  if model_type == "llama":
    out["mlp_bias"] = cfg.use_bias
  elif model_type != "gemma":
    out["sliding_window"] = cfg.sliding_window or None
  if model_type == "qwen2":
    kind = "sliding_attention" if cfg.sliding_window else "full_attention"
    out.update(use_sliding_window=bool(cfg.sliding_window), max_window_layers=0,
               layer_types=[kind] * cfg.num_layers)
  return out


def params_to_hf(params: dict, cfg: TransformerConfig) -> dict[str, np.ndarray]:
  dec = params["decoder"]
  offset = np.float32(1.0 if _is_gemma(cfg) else 0.0)  # Gemma stores weight = scale - 1
  out = {"model.embed_tokens.weight": params["embed"]["embedding"],
         "model.norm.weight": dec["final_norm"]["scale"] - offset}
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
    out[f"{h}input_layernorm.weight"] = layer["attention_norm"]["scale"] - offset
    out[f"{h}post_attention_layernorm.weight"] = layer["mlp_norm"]["scale"] - offset
    for hf, ours in _MLP:
      out[f"{h}mlp.{hf}.weight"] = layer["mlp"][ours]["kernel"].T
      if "bias" in layer["mlp"][ours]:
        out[f"{h}mlp.{hf}.bias"] = layer["mlp"][ours]["bias"]
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = params["lm_head"]["kernel"].T
  return out
