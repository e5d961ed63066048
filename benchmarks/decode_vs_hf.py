"""Greedy decoding speed: llmjax's jit-compiled KV-cache loop vs Hugging Face `generate`.

Same architecture and the same random weights in both (llmjax params exported with
`llmjax.checkpoint.convert.gpt2` into `transformers.GPT2LMHeadModel`, PyTorch on CPU,
`generate(use_cache=True)`); prompt 16 tokens, 200 new tokens, greedy, forced length
(no EOS). The two run interleaved for several rounds, alternating which goes first,
because this machine's speed drifts by 2x within seconds: only per-round ratios mean
anything. Prints tokens/s per round and the median ratio llmjax / HF.

  .venv/bin/python benchmarks/decode_vs_hf.py                      # all three cases
  .venv/bin/python benchmarks/decode_vs_hf.py --cases=char-b1 --rounds=3

Targets (issue 5): >= 4x HF at batch 1 and >= 2x at batch 8 on the char shape, >= 1.5x
on the GPT-2 124M shape. Not a test; numbers are in the PR note / benchmarks/README.md.
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's idle threads must not spin
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

import llmjax
from benchmarks import common
from llmjax.checkpoint.convert import gpt2 as gpt2_convert
from llmjax.decode.generate import generate
from llmjax.decode.sampling import SamplingConfig
from llmjax.models.presets import get_preset
from llmjax.models.stack import unstack_layers
from llmjax.models.transformer import Transformer
from llmjax.testing import reference

# name -> (preset, overrides, batch). nanoGPT-char uses exact GELU; tanh GELU here so
# that HF's GPT-2 ("gelu_new") computes the same function. Dropout is off at inference.
CASES = {
    "char-b1": ("nanogpt-char", {"activation": "gelu", "dropout_rate": 0.0}, 1),
    "char-b8": ("nanogpt-char", {"activation": "gelu", "dropout_rate": 0.0}, 8),
    "gpt2-124m-b1": ("gpt2-124m", {}, 1),
}
PROMPT_LEN, NEW_TOKENS = 16, 200


def build(preset, overrides, seed=0):
  cfg = get_preset(preset, **overrides)
  model = Transformer(cfg)
  params = reference.random_params(model, np.ones((1, 8), np.int32), seed=seed, std=0.02)
  return cfg, model, params


def to_hf(cfg, params):
  import torch
  import transformers

  hf_cfg = gpt2_convert.config_to_hf(cfg, {})
  hf_cfg = {k: v for k, v in hf_cfg.items() if k not in ("model_type", "architectures")}
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_cfg)).eval()
  np_params = jax.tree.map(np.asarray, unstack_layers(params) if cfg.scan_layers else params)
  tensors = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32))
             for k, v in gpt2_convert.params_to_hf(np_params, cfg).items()}
  missing, unexpected = model.load_state_dict(tensors, strict=False)
  assert not unexpected and all(m == "lm_head.weight" or m.endswith("attn.bias")
                                for m in missing), (missing, unexpected)
  model.tie_weights()
  return model


def run_case(name, rounds):
  import torch

  preset, overrides, batch = CASES[name]
  cfg, model, params = build(preset, overrides)
  hf = to_hf(cfg, params)
  prompts = np.random.default_rng(1).integers(1, cfg.vocab_size, (batch, PROMPT_LEN))
  greedy = SamplingConfig(temperature=0.0)

  def ours():
    return generate(model, params, prompts.tolist(), max_new_tokens=NEW_TOKENS,
                    sampling=greedy).tokens

  def theirs():
    with torch.inference_mode():
      ids = torch.from_numpy(prompts)
      out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                        min_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
                        pad_token_id=0, eos_token_id=None)
    return out[:, PROMPT_LEN:].numpy()

  start = time.perf_counter()
  a = ours()                                               # warm-up (compile) + agreement
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  b = theirs()
  hf_first_s = time.perf_counter() - start
  agree = float((a == b).mean())
  first_diff = int(np.argmax((a != b).any(0))) if (a != b).any() else NEW_TOKENS
  speeds = {"llmjax": [], "hf": []}
  for r in range(rounds):
    order = (("llmjax", ours), ("hf", theirs))
    for label, fn in order if r % 2 == 0 else order[::-1]:
      start = time.perf_counter()
      fn()
      speeds[label].append(batch * NEW_TOKENS / (time.perf_counter() - start))
  ratios = [x / y for x, y in zip(speeds["llmjax"], speeds["hf"])]
  print(f"{name}: batch {batch}, {preset}, tokens agree {agree:.1%} "
        f"(first difference at step {first_diff}); first call (llmjax compile + run) "
        f"{compile_s:.1f} s, hf first call {hf_first_s:.1f} s")
  for r in range(rounds):
    print(f"  round {r}: llmjax {speeds['llmjax'][r]:8.1f} tok/s   hf {speeds['hf'][r]:8.1f} "
          f"tok/s   ratio {ratios[r]:.2f}")
  print(f"  median: llmjax {statistics.median(speeds['llmjax']):.1f} tok/s, "
        f"hf {statistics.median(speeds['hf']):.1f} tok/s, ratio {statistics.median(ratios):.2f}x",
        flush=True)
  return statistics.median(ratios)


def main():
  import torch

  torch.set_num_threads(2)       # XLA:CPU's pool has one thread per core: 2 on this machine
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {list(CASES)}")
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  print(f"cpu: {common.cpu_info()}")
  print(f"llmjax from {os.path.dirname(llmjax.__file__)}")
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cpus; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads")
  for name in args.cases.split(","):
    run_case(name, args.rounds)


if __name__ == "__main__":
  main()
