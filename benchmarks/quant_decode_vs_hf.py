"""Decoding speed by weight format: llmjax float32, bfloat16, int8 and W8A8 vs Hugging Face.

GPT-2 124M's shape with random weights (std 0.02), greedy, prompt 16 tokens, `--new_tokens`
new ones at forced length, batch 1 and 8. llmjax: the jit-compiled KV-cache loop
(`decode.generate`) on the float32 params, on a bfloat16 copy (weights and compute), and on
the `llmjax quantize` int8 and W8A8 trees (`QuantizedModel`: int8 codes cast in the
product, float32 accumulation; W8A8: int8 x int8 -> int32). HF: `GPT2LMHeadModel.generate`
in float32 (PyTorch on CPU, 2 threads) on the same weights (`decode_vs_hf.to_hf`). All run
interleaved for `--rounds` rounds, rotating which goes first, because this machine's speed
drifts: only ratios within a round mean anything. Prints tokens/s per round and the median
ratio of each to HF.

  .venv/bin/python benchmarks/quant_decode_vs_hf.py --rounds 3
  XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text" \
    .venv/bin/python benchmarks/quant_decode_vs_hf.py --batches 1 --rounds 1

The second writes XLA's optimized programs, to see what XLA:CPU made of the int8
products (whether the int8 weights reach a dot or are converted to float first). Not a
test; figures go to benchmarks/README.md.
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.decode_vs_hf import build, to_hf
from llmjax.decode.generate import generate
from llmjax.decode.sampling import SamplingConfig
from llmjax.models.transformer import Transformer
from llmjax.quant import ptq
from llmjax.quant.model import QuantizedModel

PROMPT_LEN = 16


def variants(model, params):
  """name -> (network, params) for every llmjax format."""
  cfg16 = model.config.replace(dtype="bfloat16", param_dtype="bfloat16")
  out = {"f32": (model, params),
         "bf16": (Transformer(cfg16), jax.tree.map(lambda a: a.astype(jnp.bfloat16), params))}
  for method in ("int8", "w8a8"):
    qparams, _ = ptq.quantize_params(model, params, method)
    out[method] = (QuantizedModel(model, ptq.QuantConfig(method=method)), qparams)
  return out


def run_batch(batch, rounds, new_tokens, model, params, hf):
  import torch

  prompts = np.random.default_rng(1).integers(1, model.config.vocab_size, (batch, PROMPT_LEN))
  greedy = SamplingConfig(temperature=0.0)
  fns, first = {}, {}
  for name, (net, p) in variants(model, params).items():
    fns[name] = (lambda net=net, p=p: generate(net, p, prompts.tolist(),
                                               max_new_tokens=new_tokens,
                                               sampling=greedy).tokens)

  def theirs():
    with torch.inference_mode():
      ids = torch.from_numpy(prompts)
      out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                        pad_token_id=0, eos_token_id=None)
    return out[:, PROMPT_LEN:].numpy()

  fns["hf"] = theirs
  for name, fn in fns.items():  # warm-up (compile) and the tokens for agreement
    start = time.perf_counter()
    first[name] = np.asarray(fn())
    print(f"  batch {batch} {name}: first call {time.perf_counter() - start:.1f} s, tokens "
          f"agree with f32 {float((first[name] == first['f32']).mean()):.1%}", flush=True)
  speeds = {name: [] for name in fns}
  names = list(fns)
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      start = time.perf_counter()
      fns[name]()
      speeds[name].append(batch * new_tokens / (time.perf_counter() - start))
    print(f"  round {r}: " + "  ".join(f"{n} {speeds[n][-1]:7.1f}" for n in names) +
          " tok/s", flush=True)
  print(f"batch {batch}, median tok/s and ratio to HF (per round):")
  for name in names:
    ratios = [a / b for a, b in zip(speeds[name], speeds["hf"])]
    to_f32 = [a / b for a, b in zip(speeds[name], speeds["f32"])]
    print(f"  {name:5s} {statistics.median(speeds[name]):8.1f} tok/s   vs hf "
          f"{statistics.median(ratios):5.2f}x   vs llmjax f32 {statistics.median(to_f32):5.2f}x")


def main():
  import torch

  torch.set_num_threads(2)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--preset", default="gpt2-124m")
  args = parser.parse_args()
  print(f"cpu: {common.cpu_info()}")
  print(f"jax {jax.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")
  cfg, model, params = build(args.preset, {})
  hf = to_hf(cfg, params)
  for batch in (int(b) for b in args.batches.split(",")):
    run_batch(batch, args.rounds, args.new_tokens, model, params, hf)


if __name__ == "__main__":
  main()
