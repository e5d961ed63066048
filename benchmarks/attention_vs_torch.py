"""Attention alone: llmjax's attention paths vs PyTorch's `scaled_dot_product_attention`.

One layer's attention core on the nanoGPT-char shape (`[B, L, N, H]` = `[16, 256, 6, 64]`,
causal, float32 by default), forward + backward (a jitted `jax.grad` of sum(out * w);
PyTorch: `backward()` of the same) and forward alone. llmjax paths:
`cpu_flash` (the C++ kernel, `llmjax/kernels/`), `einsum` (XLA, hand-written backward, 4
causal query chunks as `train_vs_torch` used before) and `jax` (`jax.nn.dot_product_attention`).
All run in one process, interleaved round-robin (this machine's speed drifts by 2x within
seconds), PyTorch on 2 threads; each timing is the median of 5 calls after 2 warm-ups,
and the ratios are per round against PyTorch (> 1: faster than PyTorch).

  .venv/bin/python -m benchmarks.attention_vs_torch --rounds 7
  .venv/bin/python -m benchmarks.attention_vs_torch --shape 12,64,4,32   # nanoGPT's CPU config

Not a test; figures are in benchmarks/README.md.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's idle threads must not spin

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from llmjax.layers import attention

IMPLS = {  # name -> dot_product_attention keyword arguments
    "cpu_flash": {"impl": "cpu_flash"},
    "einsum": {"impl": "einsum", "causal_chunks": 4},
    "jax": {"impl": "jax"},
}


def _median_ms(fn, calls: int = 5, warmup: int = 2) -> float:
  times = []
  for i in range(warmup + calls):
    start = time.perf_counter()
    fn()
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return 1000 * statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--shape", default="16,256,6,64", help="B,L,N,H")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--threads", type=int, default=2)
  args = parser.parse_args()
  print(f"cpu: {common.cpu_info()}", flush=True)
  import torch
  torch.set_num_threads(args.threads)
  b, l, n, h = (int(x) for x in args.shape.split(","))
  rng = np.random.default_rng(0)
  q, k, v, w = (rng.normal(size=(b, l, n, h)).astype(np.float32) for _ in range(4))
  jq, jk, jv, jw = (jnp.asarray(x, args.dtype) for x in (q, k, v, w))

  def jax_fns(kw):
    core = lambda q, k, v: attention.dot_product_attention(q, k, v, causal=True, **kw)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(core(q, k, v).astype(jnp.float32) * jw),
                            argnums=(0, 1, 2)))
    fwd = jax.jit(core)
    return (lambda: jax.block_until_ready(grad(jq, jk, jv)),
            lambda: jax.block_until_ready(fwd(jq, jk, jv)))

  tdtype = getattr(torch, args.dtype)
  tq, tk, tv = (torch.tensor(x).transpose(1, 2).to(tdtype).requires_grad_() for x in (q, k, v))
  tw = torch.tensor(w).transpose(1, 2).to(tdtype)

  def torch_step():
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
    (out * tw).sum().backward()

  def torch_fwd():
    with torch.no_grad():
      torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)

  fns = {name: jax_fns(kw) for name, kw in IMPLS.items()}
  fns["torch-sdpa"] = (torch_step, torch_fwd)
  times = {(name, part): [] for name in fns for part in (0, 1)}
  for r in range(args.rounds):
    for name in common.rotate(list(fns), r):
      for part in (0, 1):
        times[name, part].append(_median_ms(fns[name][part]))
    print(f"round {r + 1}/{args.rounds}: fwd+bwd ms " + "  ".join(
        f"{name} {times[name, 0][-1]:.1f}" for name in fns))
  print(f"\nattention [B, L, N, H] = [{b}, {l}, {n}, {h}], causal, {args.dtype}, "
        f"{args.rounds} rounds, {args.threads} threads")
  rows = []
  for name in fns:
    row = [name]
    for part in (0, 1):
      stats = common.ratio_stats(times["torch-sdpa", part], times[name, part])
      row += [statistics.median(times[name, part]),
              f"{stats['median']:.2f}x / {stats['p25']:.2f}x / {stats['min']:.2f}x"]
    rows.append(row)
  common.print_table(rows, ["impl", "fwd+bwd ms", "speed vs torch (median/p25/min)",
                            "fwd ms", "speed vs torch (median/p25/min)"])


if __name__ == "__main__":
  main()
