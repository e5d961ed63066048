"""GPT-2 (Radford et al. 2019) <-> llmjax: HF `GPT2LMHeadModel` / `GPT2Model` folders.

GPT-2 is llmjax's default decoder: learned positions, pre-norm LayerNorm with biases,
tanh GELU ("gelu_new"), tied embeddings. HF stores its projections as `Conv1D`
(`weight [in, out]`, no transpose) with q, k, v fused in `c_attn [D, 3D]`.
"""

import numpy as np

from llmjax.checkpoint.convert.common import (
  Tensors,
  merge_heads_in,
  merge_heads_out,
  split_heads_in,
  split_heads_out,
  unsupported,
)
from llmjax.models.config import TransformerConfig

MODEL_TYPES = ("gpt2",)
_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu",
                "gelu": "gelu_exact", "relu": "relu", "silu": "silu"}


def config_from_hf(hf: dict, tensors: dict | None = None) -> TransformerConfig:
  del tensors  # the config alone decides
  act = hf.get("activation_function", "gelu_new")
  if act not in _ACTIVATIONS:
    raise unsupported("gpt2", "activation_function", act, f"use one of {sorted(_ACTIVATIONS)}.")
  for option in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
    if hf.get(option):
      raise unsupported("gpt2", option, True, "llmjax's attention has no such option.")
  d = hf["n_embd"]
  return TransformerConfig(
      arch="decoder_only", vocab_size=hf["vocab_size"], embed_dim=d,
      num_layers=hf["n_layer"], num_heads=hf["n_head"], mlp_dim=hf.get("n_inner") or 4 * d,
      max_len=hf["n_positions"], position="learned", norm="layernorm", norm_position="pre",
      norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation=_ACTIVATIONS[act],
      use_bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
      query_scale=None if hf.get("scale_attn_weights", True) else 1.0,
      init_std=hf.get("initializer_range", 0.02))


def _norm(t, name):
  return {"scale": t(f"{name}.weight"), "bias": t(f"{name}.bias")}


def params_from_hf(t: Tensors, cfg: TransformerConfig) -> dict:
  """Unscanned llmjax params (`decoder/layers_i/...`) from GPT-2 tensors."""
  p = "transformer." if "transformer.wte.weight" in t else ""
  n, d = cfg.num_heads, cfg.embed_dim
  decoder = {"final_norm": _norm(t, f"{p}ln_f")}
  for i in range(cfg.num_layers):
    h = f"{p}h.{i}."
    qkv_w, qkv_b = t(h + "attn.c_attn.weight"), t(h + "attn.c_attn.bias")   # [D, 3D], [3D]
    attention = {name: {"kernel": split_heads_in(qkv_w[:, j * d:(j + 1) * d], n),
                        "bias": qkv_b[j * d:(j + 1) * d].reshape(n, -1)}
                 for j, name in enumerate(("query", "key", "value"))}
    attention["out"] = {"kernel": split_heads_out(t(h + "attn.c_proj.weight"), n),
                        "bias": t(h + "attn.c_proj.bias")}
    decoder[f"layers_{i}"] = {
        "attention_norm": _norm(t, h + "ln_1"), "attention": attention,
        "mlp_norm": _norm(t, h + "ln_2"),
        "mlp": {"wi": {"kernel": t(h + "mlp.c_fc.weight"), "bias": t(h + "mlp.c_fc.bias")},
                "wo": {"kernel": t(h + "mlp.c_proj.weight"), "bias": t(h + "mlp.c_proj.bias")}}}
  params = {"embed": {"embedding": t(f"{p}wte.weight")},
            "pos_embed": {"embedding": t(f"{p}wpe.weight")}, "decoder": decoder}
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": t("lm_head.weight").T}
  return params


def config_to_hf(cfg: TransformerConfig, base: dict) -> dict:
  act = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu", "silu": "silu"}
  if (cfg.arch, cfg.position, cfg.norm, cfg.norm_position) != (
      "decoder_only", "learned", "layernorm", "pre") or cfg.activation not in act \
      or not cfg.use_bias or cfg.head_dim * cfg.num_heads != cfg.embed_dim \
      or cfg.num_kv_heads != cfg.num_heads:
    raise unsupported("gpt2", "this llmjax config", "(not GPT-2 shaped)",
                      "export it as another model_type (llama for rope/rmsnorm models).")
  return {**base, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
          "vocab_size": cfg.vocab_size, "n_embd": cfg.embed_dim, "n_layer": cfg.num_layers,
          "n_head": cfg.num_heads, "n_inner": cfg.mlp_dim, "n_positions": cfg.max_len,
          "layer_norm_epsilon": cfg.norm_eps, "activation_function": act[cfg.activation],
          "tie_word_embeddings": cfg.tie_embeddings,
          "scale_attn_weights": cfg.query_scale is None}


def params_to_hf(params: dict, cfg: TransformerConfig) -> dict[str, np.ndarray]:
  """GPT-2 tensors (`transformer.*`, `lm_head.weight`) from unscanned llmjax params."""
  dec = params["decoder"]
  out = {"transformer.wte.weight": params["embed"]["embedding"],
         "transformer.wpe.weight": params["pos_embed"]["embedding"],
         "transformer.ln_f.weight": dec["final_norm"]["scale"],
         "transformer.ln_f.bias": dec["final_norm"]["bias"]}
  for i in range(cfg.num_layers):
    layer, h = dec[f"layers_{i}"], f"transformer.h.{i}."
    att = layer["attention"]
    names = ("query", "key", "value")
    out[h + "attn.c_attn.weight"] = np.concatenate(
        [merge_heads_in(att[n]["kernel"]) for n in names], axis=1)     # [D, 3D]
    out[h + "attn.c_attn.bias"] = np.concatenate([att[n]["bias"].reshape(-1) for n in names])
    out[h + "attn.c_proj.weight"] = merge_heads_out(att["out"]["kernel"])
    out[h + "attn.c_proj.bias"] = att["out"]["bias"]
    for hf_name, ours in (("ln_1", "attention_norm"), ("ln_2", "mlp_norm")):
      out[h + hf_name + ".weight"] = layer[ours]["scale"]
      out[h + hf_name + ".bias"] = layer[ours]["bias"]
    for hf_name, ours in (("c_fc", "wi"), ("c_proj", "wo")):
      out[h + f"mlp.{hf_name}.weight"] = layer["mlp"][ours]["kernel"]
      out[h + f"mlp.{hf_name}.bias"] = layer["mlp"][ours]["bias"]
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = params["lm_head"]["kernel"].T
  return out
