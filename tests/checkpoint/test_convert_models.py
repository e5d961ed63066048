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
from llmjax.testing import hf_models

V = hf_models.V
TOL = 1e-4
_hf_model, _randomize, _batch = hf_models.hf_model, hf_models.randomize, hf_models.batch
_hf_logits, _our_logits = hf_models.hf_logits, hf_models.our_logits
_max_diff = hf_models.max_diff


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
