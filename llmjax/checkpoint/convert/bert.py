"""BERT (Devlin et al. 2019) <-> llmjax: HF `BertForMaskedLM` folders.

Post-norm LayerNorm blocks (`attention.output.LayerNorm` -> `attention_norm`,
`output.LayerNorm` -> `mlp_norm`), learned positions, token-type embeddings, embedding
LayerNorm, exact (erf) GELU, and the MLM head: dense + GELU + LayerNorm
(`cls.predictions.transform` -> `mlm_transform`, `mlm_norm`), then the tied embedding
and a vocabulary bias (`cls.predictions.bias` -> `logits_bias`). A pooler, if present,
is ignored: it belongs to classification fine-tuning.

A `BertModel` folder (the encoder without the MLM head) imports with the head
initialised as `BertForMaskedLM` initialises it (dense ~ N(0, initializer_range), zero
biases, unit LayerNorm; a warning says so): the encoder's outputs are the checkpoint's,
MLM logits mean nothing until the head is trained.
"""

import logging

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

MODEL_TYPES = ("bert",)
_ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "relu": "relu", "silu": "silu"}
_ATTN = (("query", "query"), ("key", "key"), ("value", "value"))


def config_from_hf(hf: dict, tensors: dict | None = None) -> TransformerConfig:
  del tensors
  act = hf.get("hidden_act", "gelu")
  if act not in _ACTIVATIONS:
    raise unsupported("bert", "hidden_act", act, f"use one of {sorted(_ACTIVATIONS)}.")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise unsupported("bert", "position_embedding_type", hf["position_embedding_type"],
                      "only absolute (learned) positions are implemented.")
  return TransformerConfig(
      arch="encoder_only", vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
      mlp_dim=hf["intermediate_size"], max_len=hf["max_position_embeddings"],
      position="learned", norm="layernorm", norm_position="post",
      norm_eps=hf.get("layer_norm_eps", 1e-12), final_norm=False, embed_norm=True,
      activation=_ACTIVATIONS[act], use_bias=True, tie_embeddings=True,
      num_token_types=hf.get("type_vocab_size", 2), mlm_head=True, logits_bias=True,
      init_std=hf.get("initializer_range", 0.02))


def _dense(t, name, kernel_fn=linear):
  return {"kernel": kernel_fn(t(f"{name}.weight")), "bias": t(f"{name}.bias")}


def _norm(t, name):
  return {"scale": t(f"{name}.weight"), "bias": t(f"{name}.bias")}


def params_from_hf(t: Tensors, cfg: TransformerConfig) -> dict:
  p = "bert." if "bert.embeddings.word_embeddings.weight" in t else ""
  n = cfg.num_heads
  encoder = {}
  for i in range(cfg.num_layers):
    h = f"{p}encoder.layer.{i}."
    attention = {ours: {"kernel": split_heads_in(linear(t(f"{h}attention.self.{hf}.weight")), n),
                        "bias": t(f"{h}attention.self.{hf}.bias").reshape(n, -1)}
                 for hf, ours in _ATTN}
    attention["out"] = {
        "kernel": split_heads_out(linear(t(f"{h}attention.output.dense.weight")), n),
        "bias": t(f"{h}attention.output.dense.bias")}
    encoder[f"layers_{i}"] = {
        "attention": attention, "attention_norm": _norm(t, f"{h}attention.output.LayerNorm"),
        "mlp": {"wi": _dense(t, f"{h}intermediate.dense"), "wo": _dense(t, f"{h}output.dense")},
        "mlp_norm": _norm(t, f"{h}output.LayerNorm")}
  e = f"{p}embeddings."
  return {"embed": {"embedding": t(f"{e}word_embeddings.weight")},
          "pos_embed": {"embedding": t(f"{e}position_embeddings.weight")},
          "token_type_embed": {"embedding": t(f"{e}token_type_embeddings.weight")},
          "embed_norm": _norm(t, f"{e}LayerNorm"), "encoder": encoder, **_mlm_head(t, cfg)}


def _mlm_head(t: Tensors, cfg: TransformerConfig) -> dict:
  if "cls.predictions.bias" in t:
    return {"mlm_transform": _dense(t, "cls.predictions.transform.dense"),
            "mlm_norm": _norm(t, "cls.predictions.transform.LayerNorm"),
            "logits_bias": t("cls.predictions.bias")}
  logging.getLogger(__name__).warning(
      "this BERT checkpoint has no MLM head (a BertModel folder): the head is initialised "
      "(normal(%s) dense, zero biases); fine-tune it before reading MLM logits.",
      cfg.init_std)
  d = cfg.embed_dim
  kernel = np.random.default_rng(0).normal(0.0, cfg.init_std, (d, d)).astype(np.float32)
  return {"mlm_transform": {"kernel": kernel, "bias": np.zeros(d, np.float32)},
          "mlm_norm": {"scale": np.ones(d, np.float32), "bias": np.zeros(d, np.float32)},
          "logits_bias": np.zeros(cfg.vocab_size, np.float32)}


def config_to_hf(cfg: TransformerConfig, base: dict) -> dict:
  act = {v: k for k, v in _ACTIVATIONS.items()}
  if (cfg.arch, cfg.position, cfg.norm, cfg.norm_position, cfg.embed_norm, cfg.mlm_head,
      cfg.logits_bias, cfg.tie_embeddings, cfg.use_bias) != (
          "encoder_only", "learned", "layernorm", "post", True, True, True, True, True) \
      or cfg.final_norm or cfg.activation not in act or cfg.num_kv_heads != cfg.num_heads \
      or cfg.query_scale is not None or not cfg.num_token_types:
    raise unsupported("bert", "this llmjax config", "(not BERT shaped)",
                      "BERT needs post-norm layernorm, embed_norm, mlm_head, logits_bias.")
  return {**base, "model_type": "bert", "architectures": ["BertForMaskedLM"],
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim,
          "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
          "intermediate_size": cfg.mlp_dim, "max_position_embeddings": cfg.max_len,
          "layer_norm_eps": cfg.norm_eps, "hidden_act": act[cfg.activation],
          "type_vocab_size": cfg.num_token_types, "position_embedding_type": "absolute",
          "tie_word_embeddings": True}


def params_to_hf(params: dict, cfg: TransformerConfig) -> dict[str, np.ndarray]:
  e = "bert.embeddings."
  out = {f"{e}word_embeddings.weight": params["embed"]["embedding"],
         f"{e}position_embeddings.weight": params["pos_embed"]["embedding"],
         f"{e}token_type_embeddings.weight": params["token_type_embed"]["embedding"],
         f"{e}LayerNorm.weight": params["embed_norm"]["scale"],
         f"{e}LayerNorm.bias": params["embed_norm"]["bias"],
         "cls.predictions.transform.dense.weight": params["mlm_transform"]["kernel"].T,
         "cls.predictions.transform.dense.bias": params["mlm_transform"]["bias"],
         "cls.predictions.transform.LayerNorm.weight": params["mlm_norm"]["scale"],
         "cls.predictions.transform.LayerNorm.bias": params["mlm_norm"]["bias"],
         "cls.predictions.bias": params["logits_bias"]}
  for i in range(cfg.num_layers):
    layer, h = params["encoder"][f"layers_{i}"], f"bert.encoder.layer.{i}."
    att = layer["attention"]
    for hf, ours in _ATTN:
      out[f"{h}attention.self.{hf}.weight"] = merge_heads_in(att[ours]["kernel"]).T
      out[f"{h}attention.self.{hf}.bias"] = att[ours]["bias"].reshape(-1)
    out[f"{h}attention.output.dense.weight"] = merge_heads_out(att["out"]["kernel"]).T
    out[f"{h}attention.output.dense.bias"] = att["out"]["bias"]
    for hf, ours in (("attention.output.LayerNorm", "attention_norm"),
                     ("output.LayerNorm", "mlp_norm")):
      out[f"{h}{hf}.weight"] = layer[ours]["scale"]
      out[f"{h}{hf}.bias"] = layer[ours]["bias"]
    for hf, ours in (("intermediate.dense", "wi"), ("output.dense", "wo")):
      out[f"{h}{hf}.weight"] = layer["mlp"][ours]["kernel"].T
      out[f"{h}{hf}.bias"] = layer["mlp"][ours]["bias"]
  return out
