"""T5 (Raffel et al. 2020; v1.0: ReLU MLP; v1.1: gated GELU) <-> llmjax: HF
`T5ForConditionalGeneration` folders.

Encoder-decoder with one shared embedding, pre-norm RMSNorm without bias ("T5LayerNorm"),
relative position bias (`relative_attention_bias` of block 0, shared by every layer of its
stack -> `encoder|decoder/relpos_bias/embedding`), unscaled q.k (`query_scale=1.0`),
cross-attention in the decoder. HF blocks: encoder `layer.0` self-attention, `layer.1`
MLP; decoder `layer.0` self, `layer.1` cross (`EncDecAttention`), `layer.2` MLP.

T5 v1.0 scales the decoder output by d_model**-0.5 before its tied head
(`scale_decoder_outputs`, or `tie_word_embeddings` not false in older configs):
`logits_scale = d_model**-0.5`; v1.1 has none (`logits_scale = 1`).
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

MODEL_TYPES = ("t5",)
_FF = {"gated-gelu": "geglu", "gated-gelu_new": "geglu", "gated-silu": "swiglu",
       "relu": "relu", "gelu": "gelu_exact", "gelu_new": "gelu"}
_ATTN = (("q", "query"), ("k", "key"), ("v", "value"))


def _scales_output(hf: dict) -> bool:
  # transformers 5 writes `scale_decoder_outputs`; 4.x used tie_word_embeddings for it.
  if "scale_decoder_outputs" in hf:
    return bool(hf["scale_decoder_outputs"])
  return hf.get("tie_word_embeddings", True) is not False


def config_from_hf(hf: dict, tensors: dict | None = None) -> TransformerConfig:
  ff = hf.get("feed_forward_proj", "relu")
  if ff not in _FF:
    raise unsupported("t5", "feed_forward_proj", ff, f"use one of {sorted(_FF)}.")
  return TransformerConfig(
      arch="encoder_decoder", vocab_size=hf["vocab_size"], embed_dim=hf["d_model"],
      num_layers=hf.get("num_decoder_layers") or hf["num_layers"],
      num_encoder_layers=hf["num_layers"], num_heads=hf["num_heads"], head_dim=hf["d_kv"],
      mlp_dim=hf["d_ff"], max_len=hf.get("n_positions") or 512, position="t5_relative",
      relative_buckets=hf.get("relative_attention_num_buckets", 32),
      relative_max_distance=hf.get("relative_attention_max_distance", 128), query_scale=1.0,
      norm="rmsnorm", norm_position="pre", norm_eps=hf.get("layer_norm_epsilon", 1e-6),
      activation=_FF[ff], use_bias=False, tie_embeddings=_tied(tensors),
      logits_scale=hf["d_model"] ** -0.5 if _scales_output(hf) else 1.0)


def _tied(tensors) -> bool:
  """No separate lm_head, or one equal to the embedding (as `export_hf` writes it)."""
  if tensors is None or "lm_head.weight" not in tensors:
    return True
  return np.array_equal(tensors["lm_head.weight"], tensors["shared.weight"])


def _attention(t, prefix, heads):
  out = {ours: {"kernel": split_heads_in(linear(t(f"{prefix}.{hf}.weight")), heads)}
         for hf, ours in _ATTN}
  out["out"] = {"kernel": split_heads_out(linear(t(f"{prefix}.o.weight")), heads)}
  return out


def _mlp(t, prefix, gated):
  names = ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")
  return {n: {"kernel": linear(t(f"{prefix}.DenseReluDense.{n}.weight"))} for n in names}


def _stack(t, name, num_layers, cfg, decoder):
  stack = {"final_norm": {"scale": t(f"{name}.final_layer_norm.weight")},
           "relpos_bias": {"embedding": t(
               f"{name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")}}
  for i in range(num_layers):
    b = f"{name}.block.{i}.layer"
    layer = {"attention_norm": {"scale": t(f"{b}.0.layer_norm.weight")},
             "attention": _attention(t, f"{b}.0.SelfAttention", cfg.num_heads)}
    if decoder:
      layer["cross_attention_norm"] = {"scale": t(f"{b}.1.layer_norm.weight")}
      layer["cross_attention"] = _attention(t, f"{b}.1.EncDecAttention", cfg.num_heads)
    ff = 2 if decoder else 1
    layer["mlp_norm"] = {"scale": t(f"{b}.{ff}.layer_norm.weight")}
    layer["mlp"] = _mlp(t, f"{b}.{ff}", cfg.gated)
    stack[f"layers_{i}"] = layer
  return stack


def params_from_hf(t: Tensors, cfg: TransformerConfig) -> dict:
  params = {"embed": {"embedding": t("shared.weight")},
            "encoder": _stack(t, "encoder", cfg.num_encoder_layers, cfg, decoder=False),
            "decoder": _stack(t, "decoder", cfg.num_layers, cfg, decoder=True)}
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": linear(t("lm_head.weight"))}
  return params


def config_to_hf(cfg: TransformerConfig, base: dict) -> dict:
  ff = {v: k for k, v in _FF.items() if k != "gated-gelu_new"}
  if (cfg.arch, cfg.position, cfg.norm, cfg.norm_position, cfg.use_bias, cfg.query_scale) != (
      "encoder_decoder", "t5_relative", "rmsnorm", "pre", False, 1.0) \
      or cfg.activation not in ff or cfg.num_kv_heads != cfg.num_heads:
    raise unsupported("t5", "this llmjax config", "(not T5 shaped)",
                      "T5 needs encoder_decoder, t5_relative, rmsnorm, no bias, query_scale=1.")
  scaled = cfg.logits_scale != 1.0
  if scaled and (cfg.logits_scale != cfg.embed_dim ** -0.5 or not cfg.tie_embeddings):
    raise unsupported("t5", "logits_scale", cfg.logits_scale, "T5 v1.0 scales the tied head "
                      "by d_model**-0.5 exactly; set logits_scale to that or 1.")
  base = {k: v for k, v in base.items() if k != "scale_decoder_outputs"}
  return {**base, "model_type": "t5", "architectures": ["T5ForConditionalGeneration"],
          "vocab_size": cfg.vocab_size, "d_model": cfg.embed_dim, "d_kv": cfg.head_dim,
          "d_ff": cfg.mlp_dim, "num_layers": cfg.num_encoder_layers,
          "num_decoder_layers": cfg.num_layers, "num_heads": cfg.num_heads,
          "relative_attention_num_buckets": cfg.relative_buckets,
          "relative_attention_max_distance": cfg.relative_max_distance,
          "layer_norm_epsilon": cfg.norm_eps, "feed_forward_proj": ff[cfg.activation],
          # transformers reads tie_word_embeddings as "scale the decoder output" (v1.0)
          "is_encoder_decoder": True, "tie_word_embeddings": scaled,
          "decoder_start_token_id": base.get("decoder_start_token_id", 0)}


def _attention_to_hf(att, prefix, out):
  for hf, ours in _ATTN:
    out[f"{prefix}.{hf}.weight"] = merge_heads_in(att[ours]["kernel"]).T
  out[f"{prefix}.o.weight"] = merge_heads_out(att["out"]["kernel"]).T


def _stack_to_hf(stack, name, num_layers, decoder, out):
  out[f"{name}.final_layer_norm.weight"] = stack["final_norm"]["scale"]
  out[f"{name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
      stack["relpos_bias"]["embedding"])
  for i in range(num_layers):
    layer, b = stack[f"layers_{i}"], f"{name}.block.{i}.layer"
    out[f"{b}.0.layer_norm.weight"] = layer["attention_norm"]["scale"]
    _attention_to_hf(layer["attention"], f"{b}.0.SelfAttention", out)
    if decoder:
      out[f"{b}.1.layer_norm.weight"] = layer["cross_attention_norm"]["scale"]
      _attention_to_hf(layer["cross_attention"], f"{b}.1.EncDecAttention", out)
    ff = 2 if decoder else 1
    out[f"{b}.{ff}.layer_norm.weight"] = layer["mlp_norm"]["scale"]
    for n, p in layer["mlp"].items():
      out[f"{b}.{ff}.DenseReluDense.{n}.weight"] = p["kernel"].T


def params_to_hf(params: dict, cfg: TransformerConfig) -> dict[str, np.ndarray]:
  out = {"shared.weight": params["embed"]["embedding"]}
  _stack_to_hf(params["encoder"], "encoder", cfg.num_encoder_layers, False, out)
  _stack_to_hf(params["decoder"], "decoder", cfg.num_layers, True, out)
  # Always written: transformers 4.x reads an untied lm_head (tie_word_embeddings=false).
  out["lm_head.weight"] = (params["embed"]["embedding"] if cfg.tie_embeddings
                           else params["lm_head"]["kernel"].T)
  return out
