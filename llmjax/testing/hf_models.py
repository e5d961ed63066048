"""Tiny random Hugging Face models of every architecture the converter knows, and logits
of one padded batch from them and from llmjax, for the conversion and PEFT parity tests.
Needs torch and transformers (the `hf` extra)."""

import numpy as np
import torch
import transformers

from llmjax.models.transformer import Transformer

V = 97


def hf_model(name):
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


def randomize(model):
  """Non-trivial norms and biases (HF initializes them to 1 and 0)."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name.lower() or name.endswith("bias") or "ln_" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def batch(seed=0, b=3, length=12):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, V, (b, length)).astype(np.int32)
  mask = np.ones((b, length), np.int32)
  for i, n in enumerate([length, length - 4, 5][:b]):  # right padding
    mask[i, n:] = 0
  tokens = tokens * mask
  return tokens, mask


def hf_logits(model, name, tokens, mask):
  kw = {"input_ids": torch.tensor(tokens, dtype=torch.long),
        "attention_mask": torch.tensor(mask)}
  if name.startswith("t5"):
    dec, dec_mask = batch(seed=1, length=9)
    kw.update(decoder_input_ids=torch.tensor(dec, dtype=torch.long),
              decoder_attention_mask=torch.tensor(dec_mask))
  if name == "bert":
    kw["token_type_ids"] = torch.tensor((np.arange(tokens.shape[1]) >= 4).astype(np.int64)
                                        [None].repeat(tokens.shape[0], 0))
  with torch.no_grad():
    return model(**kw).logits.numpy()


def our_logits(cfg, params, name, tokens, mask, model=None):
  model = model or Transformer(cfg)
  variables = {"params": params}
  if name.startswith("t5"):
    dec, dec_mask = batch(seed=1, length=9)
    return np.asarray(model.apply(variables, dec, dec_mask, encoder_tokens=tokens,
                                  encoder_segment_ids=mask)), dec_mask
  if name == "bert":
    types = (np.arange(tokens.shape[1]) >= 4).astype(np.int32)[None].repeat(tokens.shape[0], 0)
    return np.asarray(model.apply(variables, tokens, mask, token_type_ids=types)), mask
  return np.asarray(model.apply(variables, tokens, mask)), mask


def max_diff(a, b, valid):
  return float(np.abs(a - b)[valid.astype(bool)].max())
