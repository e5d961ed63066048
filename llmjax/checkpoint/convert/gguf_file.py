"""GGUF export for llama.cpp (`llmjax convert --to_gguf=FILE --gguf_type=f32|f16|q8_0|q4_0`).

GGUF is llama.cpp's single-file format: key/value metadata (architecture, shapes,
tokenizer) and named tensors, each in a ggml type. llama.cpp knows GPT-2 and LLaMA among
the architectures llmjax exports, so a decoder-only model shaped like either (the ones
`llmjax convert --to_hf` writes as `gpt2` or `llama`) is written under llama.cpp's names:

  gpt2    token_embd, position_embd, blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm,
          ffn_up, ffn_down}.{weight, bias}, output_norm.{weight, bias}, output.weight
  llama   token_embd, blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm,
          ffn_gate, ffn_up, ffn_down}.weight, output_norm.weight, output.weight

from the tensors of the Hugging Face export (`gpt2.params_to_hf`, `llama.params_to_hf`),
as `[out, in]` matrices (GPT-2's `Conv1D [in, out]` transposed). LLaMA's q and k rows are
reordered per head from Hugging Face's rotate-half layout (the first and second halves of
a head rotate together) to the interleaved one llama.cpp's LLaMA rope rotates (pairs
0-1, 2-3, ...), which is what HF's own converters undo in the other direction. A tied head
is written out as `output.weight` too.

Tensor types: `f32`; `f16`; `q8_0` (blocks of 32 weights, an f16 scale each, int8 codes);
`q4_0` (blocks of 32, an f16 scale, 4-bit codes), by the `gguf` package's reference
quantizers. As llama.cpp's converter does, only 2-D weight matrices take the chosen type;
norms, biases and the position table stay f32, and a matrix whose rows do not split into
blocks of 32 is written f16 instead.

Tokenizer: llmjax's SentencePiece model as `tokenizer.ggml.model = "llama"` (llama.cpp's
SentencePiece tokenizer): every piece, its score and type (normal, unknown, control,
byte, unused), the pad / eos / bos / unk ids, no BOS added; model rows beyond the
tokenizer's pieces get placeholder pieces `[PAD<i>]` (unused).

Checked against llama.cpp itself (llama-cpp-python 0.3.36, built on this machine;
tests/checkpoint/test_gguf.py): f32 files of both architectures give logits within 1e-3
of llmjax's (max |difference| 4.7e-4 GPT-2, 5.6e-4 LLaMA, tiny random models) and the same
greedy tokens. For f16 / q8_0 / q4_0, `stored_params` gives llmjax the weights exactly as
the file stores them; llama.cpp's logits are within 7e-4 of llmjax's on those for f16, and
within 0.019 for q8_0 / q4_0, which is the error of the activations llama.cpp rounds to q8_0
blocks in those matmuls (q4_0 vs the float model: 0.28). That build's AMX kernels
(`use_extra_bufts`, on by default) segfault on q8_0 / q4_0 on this AMX Xeon, llama.cpp's
own q8_0 quantization included; its plain CPU kernels run them.
"""

import numpy as np

from llmjax.errors import UserError

TYPES = ("f32", "f16", "q8_0", "q4_0")
ARCHITECTURES = ("gpt2", "llama")
BLOCK = 32  # the weights per q8_0 / q4_0 block
# Hugging Face's names of a block's tensors -> llama.cpp's.
GPT2_BLOCK = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
              "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
LLAMA_BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def _gguf():
  try:
    import gguf
  except ImportError as e:
    raise UserError("GGUF export needs the `gguf` package: pip install -e '.[quant]' (or "
                    "pip install gguf).") from e
  return gguf


def _interleave_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
  """`[heads * H, in]` rows of q or k from the rotate-half order (dims i and i + H/2 of a
  head rotate together) to the interleaved one (dims 2i and 2i + 1)."""
  rows, cols = w.shape
  half = rows // heads // 2
  return w.reshape(heads, 2, half, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def gpt2_tensors(hf: dict, cfg) -> dict[str, np.ndarray]:
  out = {"token_embd.weight": hf["transformer.wte.weight"],
         "position_embd.weight": hf["transformer.wpe.weight"],
         "output_norm.weight": hf["transformer.ln_f.weight"],
         "output_norm.bias": hf["transformer.ln_f.bias"],
         "output.weight": hf.get("lm_head.weight", hf["transformer.wte.weight"])}
  for i in range(cfg.num_layers):
    for theirs, ours in GPT2_BLOCK.items():
      for kind in ("weight", "bias"):
        t = hf[f"transformer.h.{i}.{theirs}.{kind}"]
        out[f"blk.{i}.{ours}.{kind}"] = t.T if t.ndim == 2 else t  # Conv1D: [in, out]
  return out


def llama_tensors(hf: dict, cfg) -> dict[str, np.ndarray]:
  out = {"token_embd.weight": hf["model.embed_tokens.weight"],
         "output_norm.weight": hf["model.norm.weight"],
         "output.weight": hf.get("lm_head.weight", hf["model.embed_tokens.weight"])}
  kv_heads = cfg.num_kv_heads or cfg.num_heads
  for i in range(cfg.num_layers):
    for theirs, ours in LLAMA_BLOCK.items():
      t = hf[f"model.layers.{i}.{theirs}.weight"]
      if ours == "attn_q":
        t = _interleave_rope_rows(t, cfg.num_heads)
      elif ours == "attn_k":
        t = _interleave_rope_rows(t, kv_heads)
      out[f"blk.{i}.{ours}.weight"] = t
  return out


def check_exportable(cfg) -> str:
  """The llama.cpp architecture of `cfg` ('gpt2' or 'llama'), or a UserError naming the
  ones llama.cpp knows."""
  from llmjax.checkpoint import convert
  from llmjax.checkpoint.convert import gpt2, llama
  model_type = convert.infer_model_type(cfg)
  if model_type not in ARCHITECTURES:
    raise UserError(f"GGUF export writes the architectures llama.cpp knows that llmjax "
                    f"exports: {', '.join(ARCHITECTURES)} (decoder-only; LLaMA: rope, "
                    f"rmsnorm, SwiGLU, no biases); this model is shaped like {model_type!r}. "
                    "Export it to Hugging Face with --to_hf instead.")
  (gpt2 if model_type == "gpt2" else llama).config_to_hf(cfg, {"model_type": model_type})
  if model_type == "llama" and (cfg.rope_scaling != "none" or cfg.use_bias):
    raise UserError("GGUF export of a LLaMA-shaped model needs rope_scaling='none' and no "
                    f"biases (this one: rope_scaling={cfg.rope_scaling!r}, "
                    f"use_bias={cfg.use_bias}).")
  if model_type == "gpt2" and cfg.activation != "gelu":
    raise UserError(f"llama.cpp's GPT-2 computes the tanh GELU; this model uses "
                    f"{cfg.activation!r}, so its GGUF file would compute another function.")
  return model_type


def _add_metadata(writer, gguf, arch: str, cfg, tensors_type: str) -> None:
  writer.add_name("llmjax export")
  writer.add_context_length(cfg.max_len)
  writer.add_embedding_length(cfg.embed_dim)
  writer.add_block_count(cfg.num_layers)
  writer.add_feed_forward_length(cfg.mlp_dim)
  writer.add_head_count(cfg.num_heads)
  if arch == "gpt2":
    writer.add_layer_norm_eps(cfg.norm_eps)
  else:
    writer.add_head_count_kv(cfg.num_kv_heads or cfg.num_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim or cfg.embed_dim // cfg.num_heads)
  file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
  writer.add_file_type(file_types[tensors_type])


def _add_tokenizer(writer, gguf, tokenizer, vocab_size: int) -> None:
  sp = getattr(tokenizer, "_sp", None)
  if sp is None:
    raise UserError(f"GGUF export writes llmjax's SentencePiece tokenizers; this workdir's "
                    f"is {type(tokenizer).__name__}. Export with --to_hf instead.")
  if sp.get_piece_size() > vocab_size:
    raise UserError(f"the tokenizer has {sp.get_piece_size()} pieces but the model only "
                    f"{vocab_size} rows; they do not belong together.")
  kinds = gguf.TokenType
  pieces, scores, types = [], [], []
  for i in range(sp.get_piece_size()):
    pieces.append(sp.id_to_piece(i))
    scores.append(float(sp.get_score(i)))
    types.append(kinds.UNKNOWN if sp.is_unknown(i) else kinds.CONTROL if sp.is_control(i)
                 else kinds.BYTE if sp.is_byte(i) else kinds.UNUSED if sp.is_unused(i)
                 else kinds.NORMAL)
  for i in range(len(pieces), vocab_size):  # padded model rows
    pieces.append(f"[PAD{i}]")
    scores.append(-1e4)
    types.append(kinds.UNUSED)
  writer.add_tokenizer_model("llama")
  writer.add_token_list(pieces)
  writer.add_token_scores(scores)
  writer.add_token_types(types)
  writer.add_bos_token_id(tokenizer.bos_id)
  writer.add_eos_token_id(tokenizer.eos_id)
  writer.add_unk_token_id(tokenizer.unk_id)
  writer.add_pad_token_id(tokenizer.pad_id)
  writer.add_add_bos_token(False)
  writer.add_add_eos_token(False)


def _tensor_type(name: str, t: np.ndarray, wanted: str) -> str:
  """The type a tensor is written in (module docstring)."""
  if wanted == "f32" or t.ndim != 2 or name.startswith("position_embd"):
    return "f32"
  if wanted in ("q8_0", "q4_0") and t.shape[1] % BLOCK:
    return "f16"
  return wanted


def _deinterleave_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
  """The inverse of `_interleave_rope_rows`."""
  rows, cols = w.shape
  half = rows // heads // 2
  return w.reshape(heads, half, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def _hf_from_gpt2_tensors(g: dict, cfg) -> dict:
  hf = {"transformer.wte.weight": g["token_embd.weight"],
        "transformer.wpe.weight": g["position_embd.weight"],
        "transformer.ln_f.weight": g["output_norm.weight"],
        "transformer.ln_f.bias": g["output_norm.bias"]}
  if not cfg.tie_embeddings:
    hf["lm_head.weight"] = g["output.weight"]
  for i in range(cfg.num_layers):
    for theirs, ours in GPT2_BLOCK.items():
      for kind in ("weight", "bias"):
        t = g[f"blk.{i}.{ours}.{kind}"]
        hf[f"transformer.h.{i}.{theirs}.{kind}"] = t.T if t.ndim == 2 else t
  return hf


def _hf_from_llama_tensors(g: dict, cfg) -> dict:
  hf = {"model.embed_tokens.weight": g["token_embd.weight"],
        "model.norm.weight": g["output_norm.weight"]}
  if not cfg.tie_embeddings:
    hf["lm_head.weight"] = g["output.weight"]
  kv_heads = cfg.num_kv_heads or cfg.num_heads
  for i in range(cfg.num_layers):
    for theirs, ours in LLAMA_BLOCK.items():
      t = g[f"blk.{i}.{ours}.weight"]
      if ours == "attn_q":
        t = _deinterleave_rope_rows(t, cfg.num_heads)
      elif ours == "attn_k":
        t = _deinterleave_rope_rows(t, kv_heads)
      hf[f"model.layers.{i}.{theirs}.weight"] = t
  return hf


def _gguf_tensors(cfg, params) -> tuple[str, dict]:
  """(architecture, `{llama.cpp name: float32 [rows, cols]}`) of an llmjax model."""
  import jax

  from llmjax.checkpoint.convert import gpt2, llama
  from llmjax.models.stack import unstack_layers
  arch = check_exportable(cfg)
  params = jax.tree.map(lambda a: np.asarray(a, np.float32), jax.device_get(params))
  if cfg.scan_layers:
    params = unstack_layers(params)
  hf = (gpt2 if arch == "gpt2" else llama).params_to_hf(params, cfg)
  tensors = (gpt2_tensors if arch == "gpt2" else llama_tensors)(hf, cfg)
  return arch, {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}


def _ggml_types(gguf) -> dict:
  return {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
          "q4_0": gguf.GGMLQuantizationType.Q4_0}


def stored_params(cfg, params, gguf_type: str):
  """llmjax params holding the weights exactly as a `gguf_type` file stores them
  (quantized by the same quantizer, then de-quantized): what llama.cpp computes with. The
  perplexity of a model under these params is the GGUF type's weight error measured in
  llmjax (experiments/quantization.py), and it is the reference llama.cpp's logits of a
  q8_0 / q4_0 file are checked against (tests/checkpoint/test_gguf.py)."""
  from llmjax.checkpoint.convert import gpt2, llama
  from llmjax.checkpoint.convert.common import Tensors
  from llmjax.models.stack import stack_layers
  if gguf_type not in TYPES:
    raise UserError(f"unknown --gguf_type={gguf_type!r}; use one of {', '.join(TYPES)}.")
  arch, tensors = _gguf_tensors(cfg, params)
  gguf = _gguf()
  ggml = _ggml_types(gguf)
  stored = {}
  for name, t in tensors.items():
    kind = _tensor_type(name, t, gguf_type)
    if kind == "f16":
      t = t.astype(np.float16).astype(np.float32)
    elif kind != "f32":
      t = np.asarray(gguf.quants.dequantize(gguf.quants.quantize(t, ggml[kind]), ggml[kind]),
                     np.float32).reshape(t.shape)
    stored[name] = t
  back = (_hf_from_gpt2_tensors if arch == "gpt2" else _hf_from_llama_tensors)(stored, cfg)
  out = (gpt2 if arch == "gpt2" else llama).params_from_hf(Tensors(back, "GGUF tensors"), cfg)
  return stack_layers(out) if cfg.scan_layers else out


def export_gguf(path: str, cfg, params, tokenizer, gguf_type: str = "f32") -> dict:
  """Writes `params` of `cfg` (a GPT-2- or LLaMA-shaped decoder) with `tokenizer` to the
  GGUF file `path`; returns `{tensor name: type written}`."""
  if gguf_type not in TYPES:
    raise UserError(f"unknown --gguf_type={gguf_type!r}; use one of {', '.join(TYPES)}.")
  arch, tensors = _gguf_tensors(cfg, params)
  gguf = _gguf()
  ggml = _ggml_types(gguf)
  writer = gguf.GGUFWriter(path, arch)
  _add_metadata(writer, gguf, arch, cfg, gguf_type)
  _add_tokenizer(writer, gguf, tokenizer, cfg.vocab_size)
  written = {}
  for name, t in tensors.items():
    kind = _tensor_type(name, t, gguf_type)
    if kind == "f32":
      writer.add_tensor(name, t)
    elif kind == "f16":
      writer.add_tensor(name, t.astype(np.float16))
    else:
      writer.add_tensor(name, gguf.quants.quantize(t, ggml[kind]), raw_dtype=ggml[kind])
    written[name] = kind
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return written
