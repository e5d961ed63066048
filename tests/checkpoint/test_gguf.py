"""GGUF export (`llmjax convert --to_gguf`): the file read back with the `gguf` package's
reader holds llama.cpp's names, shapes, metadata and tokenizer; its f32 tensors are the
Hugging Face export's, laid out as llama.cpp wants (GPT-2's Conv1D transposed, LLaMA's q/k
rows interleaved per head); q8_0 / q4_0 de-quantize within their block error; bad requests
are refused before anything is written. Where `llama-cpp-python` is installed (the
optional `llama` extra builds llama.cpp), llama.cpp itself loads the file and its logits
and greedy tokens equal llmjax's."""

import os

import numpy as np
import pytest

from llmjax import cli
from llmjax.checkpoint.convert import gguf_file, gpt2, llama
from llmjax.data import tokenizer as tokenizer_lib
from llmjax.errors import UserError
from llmjax.models.stack import unstack_layers
from llmjax.testing import reference

gguf = pytest.importorskip("gguf")
TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "fixtures",
                         "a5996b6_tiny_run", "tokenizer.model")


def _export(tmp_path, preset, gguf_type="f32", **overrides):
  model, params = reference.preset_model(preset, std=0.05, **overrides)
  tok = tokenizer_lib.load_any(TOKENIZER)
  path = str(tmp_path / f"{preset}_{gguf_type}.gguf")
  written = gguf_file.export_gguf(path, model.config, params, tok, gguf_type)
  return model, params, tok, path, written


def _read(path):
  reader = gguf.GGUFReader(path)
  fields = {name: field for name, field in reader.fields.items()}
  tensors = {t.name: t for t in reader.tensors}
  return reader, fields, tensors


def _value(field):
  return field.contents()


def _float(t):
  """A tensor of the file as float32 `[rows, cols]` (numpy order), de-quantized."""
  if t.tensor_type == gguf.GGMLQuantizationType.F32:
    return np.asarray(t.data, np.float32)
  return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)


def _hf(model, params, conv):
  return conv.params_to_hf(unstack_layers(params), model.config)


def test_gpt2_f32_tensors_metadata_and_tokenizer(tmp_path):
  model, params, tok, path, written = _export(tmp_path, "tiny")
  cfg = model.config
  _, fields, tensors = _read(path)
  assert _value(fields["general.architecture"]) == "gpt2"
  assert _value(fields["gpt2.block_count"]) == cfg.num_layers
  assert _value(fields["gpt2.embedding_length"]) == cfg.embed_dim
  assert _value(fields["gpt2.attention.head_count"]) == cfg.num_heads
  assert _value(fields["tokenizer.ggml.model"]) == "llama"
  pieces = _value(fields["tokenizer.ggml.tokens"])
  assert len(pieces) == cfg.vocab_size and pieces[:tok.vocab_size] == [
      tok.id_to_piece(i) for i in range(tok.vocab_size)]
  assert pieces[tok.vocab_size] == f"[PAD{tok.vocab_size}]"
  assert _value(fields["tokenizer.ggml.eos_token_id"]) == tok.eos_id
  hf = _hf(model, params, gpt2)
  assert set(written.values()) == {"f32"}
  np.testing.assert_array_equal(_float(tensors["token_embd.weight"]),
                                hf["transformer.wte.weight"])
  np.testing.assert_array_equal(_float(tensors["output.weight"]), hf["transformer.wte.weight"])
  for i in range(cfg.num_layers):  # Conv1D [in, out] -> [out, in]
    np.testing.assert_array_equal(_float(tensors[f"blk.{i}.attn_qkv.weight"]),
                                  hf[f"transformer.h.{i}.attn.c_attn.weight"].T)
    np.testing.assert_array_equal(_float(tensors[f"blk.{i}.ffn_down.weight"]),
                                  hf[f"transformer.h.{i}.mlp.c_proj.weight"].T)
    np.testing.assert_array_equal(_float(tensors[f"blk.{i}.attn_norm.bias"]),
                                  hf[f"transformer.h.{i}.ln_1.bias"])
  assert len(tensors) == 4 + 1 + 12 * cfg.num_layers  # + position_embd


def test_llama_q_and_k_rows_are_interleaved_per_head(tmp_path):
  model, params, _, path, _ = _export(tmp_path, "tiny-llama")
  cfg = model.config
  _, fields, tensors = _read(path)
  assert _value(fields["general.architecture"]) == "llama"
  assert _value(fields["llama.attention.head_count_kv"]) == cfg.num_kv_heads
  assert _value(fields["llama.rope.dimension_count"]) == cfg.head_dim
  hf = _hf(model, params, llama)
  h = cfg.head_dim
  for name, heads in (("q_proj", cfg.num_heads), ("k_proj", cfg.num_kv_heads)):
    ours = _float(tensors[f"blk.1.attn_{name[0]}.weight"])
    theirs = hf[f"model.layers.1.self_attn.{name}.weight"]
    for head in range(heads):
      for j in range(h // 2):  # HF rotates dims j and j + H/2 together; llama.cpp 2j, 2j+1
        np.testing.assert_array_equal(ours[head * h + 2 * j], theirs[head * h + j])
        np.testing.assert_array_equal(ours[head * h + 2 * j + 1], theirs[head * h + h // 2 + j])
  np.testing.assert_array_equal(_float(tensors["blk.0.ffn_gate.weight"]),
                                hf["model.layers.0.mlp.gate_proj.weight"])
  np.testing.assert_array_equal(_float(tensors["output.weight"]), hf["lm_head.weight"])


# q8_0: d = absmax / 127, codes round(x / d): half a step. q4_0: d = (the signed value of
# largest magnitude) / -8, codes in [-8, 7]: that value maps to -8 exactly, but one of
# the opposite sign and the same magnitude clips at 7, a whole step off.
@pytest.mark.parametrize("gguf_type,code_max,steps", [("q8_0", 127, 0.5), ("q4_0", 8, 1.0)])
def test_block_quantized_types(tmp_path, gguf_type, code_max, steps):
  model, params, _, path, written = _export(tmp_path, "tiny", gguf_type)
  _, _, tensors = _read(path)
  hf = _hf(model, params, gpt2)
  assert written["blk.0.attn_qkv.weight"] == gguf_type
  assert written["position_embd.weight"] == written["blk.0.attn_norm.weight"] == "f32"
  w = hf["transformer.h.0.attn.c_attn.weight"].T
  got = _float(tensors["blk.0.attn_qkv.weight"])
  blocks = np.abs(w).reshape(w.shape[0], -1, 32).max(-1, keepdims=True) / code_max
  # The rounding step(s) of the block's (f16) scale, plus the scale's own f16 rounding.
  bound = np.repeat(blocks * (steps + 2e-3 * code_max), 32, axis=-1).reshape(w.shape)
  assert (np.abs(got - w) <= bound + 1e-7).all()
  assert np.abs(got - w).max() > 0


def test_rows_not_in_blocks_of_32_fall_back_to_f16(tmp_path):
  model, params, _, path, written = _export(tmp_path, "tiny", "q8_0", embed_dim=48,
                                            num_heads=3, mlp_dim=96)
  assert written["blk.0.attn_qkv.weight"] == "f16"  # rows of 48
  assert written["blk.0.ffn_down.weight"] == "q8_0"  # rows of 96
  _, _, tensors = _read(path)
  hf = _hf(model, params, gpt2)
  np.testing.assert_array_equal(_float(tensors["blk.0.attn_qkv.weight"]),
                                hf["transformer.h.0.attn.c_attn.weight"].T.astype(np.float16))


def test_cli_and_bad_requests(fixture_run, tmp_path, capsys):
  out = str(tmp_path / "model.gguf")
  assert cli.main(["convert", f"--workdir={fixture_run}", f"--to_gguf={out}",
                   "--gguf_type=f16"]) == 0
  assert "wrote" in capsys.readouterr().out and os.path.getsize(out) > 0

  def fails(argv, *fragments):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert all(f in err for f in fragments), err

  fails(["convert", f"--workdir={fixture_run}", f"--to_gguf={out}"], "exists already")
  fails(["convert", f"--workdir={fixture_run}", f"--to_gguf={tmp_path / 'b.gguf'}",
         "--gguf_type=q5_k"], "unknown --gguf_type='q5_k'", "q8_0")
  q = str(tmp_path / "q")
  assert cli.main(["quantize", f"--workdir={fixture_run}", "--method=int8",
                   f"--output={q}"]) == 0
  fails(["convert", f"--workdir={q}", f"--to_gguf={tmp_path / 'c.gguf'}"],
        "is quantized (int8)", "--to_gguf writes float weights")
  assert not (tmp_path / "b.gguf").exists() and not (tmp_path / "c.gguf").exists()
  bert, bert_params = reference.preset_model("bert-tiny")
  with pytest.raises(UserError, match="gpt2, llama"):
    gguf_file.export_gguf(str(tmp_path / "d.gguf"), bert.config, bert_params,
                          tokenizer_lib.load_any(TOKENIZER))
  nano, nano_params = reference.preset_model("tiny", activation="gelu_exact")
  with pytest.raises(UserError, match="tanh GELU"):
    gguf_file.export_gguf(str(tmp_path / "e.gguf"), nano.config, nano_params,
                          tokenizer_lib.load_any(TOKENIZER))


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_llama_cpp_loads_it_and_computes_the_same(tmp_path, preset):
  llama_cpp = pytest.importorskip(
      "llama_cpp", reason="llama-cpp-python (the optional `llama` extra) is not installed")
  import jax.numpy as jnp
  model, params, _, path, _ = _export(tmp_path, preset, vocab_size=89)
  tokens = [40, 37, 48, 33, 37, 46, 6, 11, 7, 16, 16, 9]
  ours = np.asarray(model.apply({"params": params}, jnp.asarray([tokens])))[0]
  llm = llama_cpp.Llama(model_path=path, n_ctx=64, logits_all=True, verbose=False,
                        n_threads=2)
  llm.eval(tokens)
  theirs = np.asarray(llm.scores[:len(tokens)], np.float32)
  np.testing.assert_allclose(theirs, ours, atol=1e-3, rtol=0)
  # Greedy continuation: the same 8 tokens.
  want, seq = [], list(tokens)
  for _ in range(8):
    logits = np.asarray(model.apply({"params": params}, jnp.asarray([seq])))[0, -1]
    want.append(int(logits.argmax()))
    seq.append(want[-1])
  llm.reset()
  got = []
  for t in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
    got.append(int(t))
    if len(got) == 8:
      break
  assert got == want


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0", "q4_0"])
def test_llama_cpp_computes_with_the_stored_weights(tmp_path, monkeypatch, preset, gguf_type):
  """llama.cpp's logits of an f16 / q8_0 / q4_0 file equal llmjax's run on
  `gguf_file.stored_params` (the weights as the file stores them) within the error of the
  activations llama.cpp itself rounds to q8_0 blocks in those matmuls; for q4_0 that is
  over 10x closer than to the float model, so the file holds what we think it holds."""
  llama_cpp = pytest.importorskip(
      "llama_cpp", reason="llama-cpp-python (the optional `llama` extra) is not installed")
  import jax.numpy as jnp
  import llama_cpp.llama_cpp as capi
  # llama.cpp 0.3.36's AMX repacked q8_0/q4_0 matmul segfaults on this Xeon (AMX_INT8);
  # its plain CPU kernels (no extra buffer types) run.
  default_params = capi.llama_model_default_params

  def plain_cpu_params():
    p = default_params()
    p.use_extra_bufts = False
    return p

  monkeypatch.setattr(capi, "llama_model_default_params", plain_cpu_params)
  model, params, _, path, written = _export(tmp_path, preset, gguf_type, vocab_size=89)
  assert gguf_type in written.values()
  tokens = [40, 37, 48, 33, 37, 46, 6, 11, 7, 16, 16, 9]
  run = lambda p: np.asarray(model.apply({"params": p}, jnp.asarray([tokens])))[0]
  ours, stored = run(params), run(gguf_file.stored_params(model.config, params, gguf_type))
  llm = llama_cpp.Llama(model_path=path, n_ctx=64, logits_all=True, verbose=False,
                        n_threads=2)
  llm.eval(tokens)
  theirs = np.asarray(llm.scores[:len(tokens)], np.float32)
  to_stored = np.abs(theirs - stored).max()
  assert to_stored < (1e-3 if gguf_type == "f16" else 0.03), to_stored
  if gguf_type == "q4_0":
    assert to_stored < 0.1 * np.abs(theirs - ours).max()
  assert (theirs.argmax(-1) == stored.argmax(-1)).mean() >= 0.9


def test_stored_params_are_the_files_tensors(tmp_path):
  """`stored_params` maps the file's de-quantized tensors back onto llmjax's tree: the
  GGUF tensors of the stored params, exported as f32, equal the q4_0 file's de-quantized
  tensors exactly (LLaMA: q/k rows de-interleaved and interleaved again)."""
  for preset in ("tiny", "tiny-llama"):
    model, params, tok, path, _ = _export(tmp_path, preset, "q4_0")
    stored = gguf_file.stored_params(model.config, params, "q4_0")
    again = str(tmp_path / f"{preset}_again.gguf")
    gguf_file.export_gguf(again, model.config, stored, tok, "f32")
    _, _, quantized = _read(path)
    _, _, plain = _read(again)
    for name, t in quantized.items():
      np.testing.assert_array_equal(_float(plain[name]).reshape(-1), _float(t).reshape(-1))
    with pytest.raises(UserError, match="unknown --gguf_type='q2_k'"):
      gguf_file.stored_params(model.config, params, "q2_k")
