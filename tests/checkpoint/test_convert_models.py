"""Hugging Face parity: import GPT-2, LLaMA (RoPE scalings), Mistral, Qwen2, BERT and T5
(v1.0, v1.1) checkpoints built by
`transformers` from tiny random configs, compare logits on padded batches, export back
and reload with `from_pretrained`, and compare greedy generations (decoders)."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmjax.checkpoint import convert
from llmjax.checkpoint.convert import hf_io
from llmjax.errors import UserError
from llmjax.models.transformer import Transformer

V = 97
TOL = 1e-4


def _hf_model(name):
  torch.manual_seed(0)
  T = transformers
  if name == "gpt2":
    cfg = T.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=V, n_positions=32,
                       bos_token_id=0, eos_token_id=0)
    return T.GPT2LMHeadModel(cfg)
  if name.startswith("llama"):
    # Llama 3.1's RoPE scaling over a short original context (16), so that the head's
    # wavelengths (6 to 1,400 positions) fall in all three bands; linear; YaRN; and
    # dynamic NTK past max_position_embeddings=8 (the batches are 12 long).
    rope = {"llama3": {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0,
                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 16},
            "llama-linear": {"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0},
            "llama-yarn": {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0,
                           "original_max_position_embeddings": 64},
            "llama-dynamic": {"rope_type": "dynamic", "rope_theta": 500.0, "factor": 2.0},
            }.get(name, {"rope_type": "default", "rope_theta": 500.0})
    cfg = T.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=96, vocab_size=V,
                        max_position_embeddings=8 if name == "llama-dynamic" else 64,
                        rope_parameters=rope, bos_token_id=1,
                        eos_token_id=2, tie_word_embeddings=False)
    return T.LlamaForCausalLM(cfg)
  if name in ("mistral", "qwen2"):  # a 4-token window over 12-token batches
    shape = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": V,
             "max_position_embeddings": 64, "sliding_window": 4, "bos_token_id": 1,
             "eos_token_id": 2}
    if name == "mistral":
      return T.MistralForCausalLM(T.MistralConfig(**shape, tie_word_embeddings=False))
    return T.Qwen2ForCausalLM(T.Qwen2Config(**shape, use_sliding_window=True,
                                            max_window_layers=0, tie_word_embeddings=True))
  if name == "gemma":  # GeGLU, sqrt(D)-scaled embeddings, RMSNorm by 1 + weight, tied
    cfg = T.GemmaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=32, intermediate_size=96, vocab_size=V,
                        max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    return T.GemmaForCausalLM(cfg)
  if name == "t5v1":  # T5 v1.0: ReLU MLP, tied head over outputs scaled by d_model**-0.5
    cfg = T.T5Config(num_layers=2, d_model=64, d_kv=16, num_heads=4, d_ff=96, vocab_size=V,
                     feed_forward_proj="relu", relative_attention_num_buckets=8,
                     relative_attention_max_distance=12, decoder_start_token_id=0)
    return T.T5ForConditionalGeneration(cfg)
  if name == "t5":
    cfg = T.T5Config(num_layers=2, num_decoder_layers=2, d_model=64, d_kv=16, num_heads=4,
                     d_ff=96, vocab_size=V, feed_forward_proj="gated-gelu",
                     relative_attention_num_buckets=8, relative_attention_max_distance=12,
                     tie_word_embeddings=False, decoder_start_token_id=0)
    return T.T5ForConditionalGeneration(cfg)
  cfg = T.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                     intermediate_size=96, vocab_size=V, max_position_embeddings=32)
  return T.BertForMaskedLM(cfg)


def _randomize(model):
  """Non-trivial norms and biases (HF initializes them to 1 and 0)."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name.lower() or name.endswith("bias") or "ln_" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _batch(seed=0, b=3, length=12):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, V, (b, length)).astype(np.int32)
  mask = np.ones((b, length), np.int32)
  for i, n in enumerate([length, length - 4, 5][:b]):  # right padding
    mask[i, n:] = 0
  tokens = tokens * mask
  return tokens, mask


def _hf_logits(model, name, tokens, mask):
  kw = {"input_ids": torch.tensor(tokens, dtype=torch.long),
        "attention_mask": torch.tensor(mask)}
  if name.startswith("t5"):
    dec, dec_mask = _batch(seed=1, length=9)
    kw.update(decoder_input_ids=torch.tensor(dec, dtype=torch.long),
              decoder_attention_mask=torch.tensor(dec_mask))
  if name == "bert":
    kw["token_type_ids"] = torch.tensor((np.arange(tokens.shape[1]) >= 4).astype(np.int64)
                                        [None].repeat(tokens.shape[0], 0))
  with torch.no_grad():
    return model(**kw).logits.numpy()


def _our_logits(cfg, params, name, tokens, mask):
  model = Transformer(cfg)
  variables = {"params": params}
  if name.startswith("t5"):
    dec, dec_mask = _batch(seed=1, length=9)
    return np.asarray(model.apply(variables, dec, dec_mask, encoder_tokens=tokens,
                                  encoder_segment_ids=mask)), dec_mask
  if name == "bert":
    types = (np.arange(tokens.shape[1]) >= 4).astype(np.int32)[None].repeat(tokens.shape[0], 0)
    return np.asarray(model.apply(variables, tokens, mask, token_type_ids=types)), mask
  return np.asarray(model.apply(variables, tokens, mask)), mask


def _max_diff(a, b, valid):
  return float(np.abs(a - b)[valid.astype(bool)].max())


@pytest.mark.parametrize("name,scan", [("gpt2", True), ("llama", False), ("t5", True),
                                       ("bert", False), ("llama3", True),
                                       ("llama-linear", False), ("llama-yarn", True),
                                       ("llama-dynamic", False), ("mistral", True),
                                       ("qwen2", False), ("t5v1", False),
                                       ("gemma", True)])
def test_import_export_parity(name, scan, tmp_path):
  hf = _randomize(_hf_model(name))
  hf.save_pretrained(tmp_path / "hf")
  cfg, params, hf_config = convert.import_hf(str(tmp_path / "hf"), scan_layers=scan)
  stack = params["encoder" if name == "bert" else "decoder"]
  assert cfg.scan_layers == scan and ("layers" in stack) == scan  # scanned: a leading axis
  tokens, mask = _batch()
  want = _hf_logits(hf, name, tokens, mask)
  got, valid = _our_logits(cfg, params, name, tokens, mask)
  diff = _max_diff(got, want, valid)
  print(f"{name}: max |llmjax - HF| logits = {diff:.2e}")
  assert diff <= TOL

  convert.export_hf(str(tmp_path / "out"), cfg, params, base_config=hf_config)
  reloaded = transformers.AutoConfig.from_pretrained(tmp_path / "out")
  back = type(hf).from_pretrained(tmp_path / "out", config=reloaded).eval()
  again = _hf_logits(back, name, tokens, mask)
  assert _max_diff(again, want, valid) <= 1e-6  # float32 weights round-trip exactly
  cfg2, params2, _ = convert.import_hf(str(tmp_path / "out"), scan_layers=scan)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def _hf_greedy(model, prompt, n):
  ids = torch.tensor([prompt], dtype=torch.long)
  with torch.no_grad():
    for _ in range(n):
      nxt = model(input_ids=ids).logits[0, -1].argmax()
      ids = torch.cat([ids, nxt.view(1, 1)], axis=1)
  return ids[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral", "qwen2", "gemma"])
def test_greedy_generation_matches(name, tmp_path):
  from llmjax.decode.generate import generate
  from llmjax.decode.sampling import SamplingConfig
  hf = _randomize(_hf_model(name))
  hf.save_pretrained(tmp_path / "hf")
  cfg, params, _ = convert.import_hf(str(tmp_path / "hf"))
  prompt = [5, 17, 42, 8]
  model = Transformer(cfg)
  # The reference loop: a full forward pass per token over a fixed buffer (one compile;
  # causal attention makes the unused tail irrelevant).
  forward = jax.jit(lambda p, t, cur: model.apply({"params": p}, t)[0, cur - 1].argmax())
  buffer = np.zeros((1, len(prompt) + 10), np.int32)
  buffer[0, :len(prompt)] = prompt
  for cur in range(len(prompt), buffer.shape[1]):
    buffer[0, cur] = int(forward(params, buffer, cur))
  want = _hf_greedy(hf, prompt, 10)
  assert buffer[0, len(prompt):].tolist() == want
  # The KV-cache generator, with a longer second prompt (the first row is left-padded):
  # the sliding window (Mistral, Qwen2 here: 4) runs over cache slots.
  other = [9, 3, 11, 60, 7, 21, 30]
  out = generate(model, jax.device_put(params), [prompt, other], max_new_tokens=10,
                 sampling=SamplingConfig(temperature=0.0))
  assert [list(map(int, row)) for row in out.tokens] == [want, _hf_greedy(hf, other, 10)]


def test_sharded_round_trip(tmp_path):
  hf = _randomize(_hf_model("llama"))
  hf.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
  assert (tmp_path / "hf" / hf_io.INDEX).exists()
  cfg, params, hf_config = convert.import_hf(str(tmp_path / "hf"))
  convert.export_hf(str(tmp_path / "out"), cfg, params, base_config=hf_config,
                    max_shard_bytes=60_000)
  shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
  assert len(shards) > 1 and (tmp_path / "out" / hf_io.INDEX).exists()
  back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
  tokens, mask = _batch()
  assert _max_diff(_hf_logits(back, "llama", tokens, mask),
                   _hf_logits(hf, "llama", tokens, mask), mask) <= 1e-6


def test_unsupported_inputs_are_user_errors(tmp_path):
  hf = _hf_model("gpt2")
  hf.save_pretrained(tmp_path / "ok")
  bad = tmp_path / "bad_type"
  bad.mkdir()
  (bad / "config.json").write_text('{"model_type": "mamba"}')
  with pytest.raises(UserError, match="model_type 'mamba' is not supported"):
    convert.import_hf(str(bad))
  pickled = tmp_path / "pickled"
  pickled.mkdir()
  (pickled / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
  (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
  with pytest.raises(UserError, match="pickle"):
    convert.import_hf(str(pickled))


def test_rope_scaling_not_implemented_is_a_user_error(tmp_path):
  hf = _hf_model("llama")
  hf.save_pretrained(tmp_path / "hf")
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 500.0, "factor": 4.0}
  (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
  with pytest.raises(UserError, match="rope_type='longrope'.*'yarn', 'dynamic'"):
    convert.import_hf(str(tmp_path / "hf"))
  # Qwen2 with full attention in its first layers and a window in the others: refused.
  qwen = _hf_model("qwen2")
  qwen.config.max_window_layers = 1
  qwen.config.layer_types = ["full_attention", "sliding_attention"]
  qwen.save_pretrained(tmp_path / "qwen")
  with pytest.raises(UserError, match="mixed full/sliding layers"):
    convert.import_hf(str(tmp_path / "qwen"))


def test_bert_model_without_mlm_head(tmp_path, caplog):
  """A `BertModel` folder: the encoder is the checkpoint's, the MLM head initialised."""
  torch.manual_seed(0)
  hf = transformers.BertModel(_hf_model("bert").config).eval()
  _randomize(hf).save_pretrained(tmp_path / "hf")
  cfg, params, _ = convert.import_hf(str(tmp_path / "hf"), scan_layers=False)
  assert "no MLM head" in caplog.text
  np.testing.assert_array_equal(params["logits_bias"], 0)
  tokens, mask = _batch()
  types = np.zeros_like(tokens)
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(tokens, dtype=torch.long),
              attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  got = np.asarray(Transformer(cfg).apply({"params": params}, tokens, mask,
                                          token_type_ids=types, method="encode"))
  assert _max_diff(got, want, mask) <= TOL
