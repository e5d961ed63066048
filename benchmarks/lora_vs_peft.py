"""LoRA fine-tuning step: llmjax vs Hugging Face `peft` + `transformers` on PyTorch.

Both sides train a GPT-2-shaped model (learned positions, LayerNorm, exact GELU, tied
head) with LoRA of rank 8, alpha 16 on the attention's query and value projections, only
the adapter trained (AdamW, clipping at 1.0), on the same random-crop batches, one
worker process each, interleaved round-robin (benchmarks/common.py):

  llmjax         llmjax.peft.PeftModel (LoraConfig('attention_qv')), the library's train
                 step with the trainable mask; unrolled layers as in train_vs_torch
  llmjax-bf16    the same with bfloat16 compute (float32 parameters and adapter)
  peft           peft.get_peft_model(GPT2LMHeadModel, LoraConfig(target_modules=['c_attn']))
                 in float32; GPT-2's fused q/k/v projection gets one rank-8 adapter,
                 which has exactly as many parameters as llmjax's two on q and v
  peft-bf16      the same under torch.autocast(bfloat16)

  .venv/bin/python -m benchmarks.lora_vs_peft --rounds 6 --steps 2 [--shape gpt2-lora]

It prints tokens/s per round, the per-round ratios to the PyTorch peer of the same
precision, and per method the trainable parameters and optimizer-state bytes. Figures:
benchmarks/README.md, "LoRA fine-tuning vs peft".

It then prints the step's GEMM floor (`--no_floor` skips it; `--floor_only` prints only
it): every matrix product a LoRA step must do (`step_gemms`: the blocks' projections
forward, their input gradients backward, the tied head both ways, attention's score
products at half their FLOPs; the adapters and all elementwise work left out), each timed alone in both workers' own libraries
(XLA and torch, both operand layouts, best of 3) and the faster taken. No implementation
of the step on this CPU can beat that sum while its GEMMs run no faster than either
library's, so `peer seconds / floor` is the highest ratio any implementation could reach.
"""

import argparse
import math
import time

import numpy as np

from benchmarks import common
from benchmarks import train_vs_torch as tvt

FACTORY = "benchmarks.lora_vs_peft:"
SHAPES = {"gpt2-lora": (12, 12, 768, 256, 4), "small": (4, 4, 256, 128, 4),
          "tiny": (2, 2, 32, 16, 4)}
RANK = 8


def _register_shapes():
  for name, shape in SHAPES.items():
    tvt.SHAPES.setdefault(name, shape)
    tvt.VOCAB.setdefault(name, 50257)


class _Timed:
  """`info` and `run` (timed steps) of a worker; subclasses give `_prepare(index)` (untimed)
  and `_step(prepared) -> loss` (timed, synchronous)."""

  def info(self):
    return {"params": self.num_params, "trainable": self.trainable,
            "opt_bytes": self.opt_bytes, "compile_s": self.compile_s}

  def run(self, start, n):
    """`n` timed steps on batches start..start+n-1: (seconds per step, losses)."""
    times, losses = [], []
    for i in range(start, start + n):
      prepared = self._prepare(i)
      t0 = time.perf_counter()
      losses.append(self._step(prepared))
      times.append(time.perf_counter() - t0)
    return times, losses


class LlmjaxLora(_Timed):
  """llmjax's own train step on a `PeftModel`, jitted with donation."""

  def __init__(self, shape="gpt2-lora", dtype="float32", seed=0, data_seed=1234, lr=1e-3,
               attention_impl=None):
    _register_shapes()
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from llmjax.models.transformer import Transformer
    from llmjax.optim.optimizers import OptimizerConfig
    from llmjax.peft.lora import LoraConfig
    from llmjax.peft.model import PeftModel, trainable_pattern
    from llmjax.train import step as step_lib
    from llmjax.train.state import TrainState

    self.seq_len, self.batch_size = SHAPES[shape][3:]
    overrides = {"attention_impl": attention_impl} if attention_impl else None
    cfg = tvt.llmjax_config(shape, dtype=dtype, overrides=overrides)
    self.data, self.data_seed = common.corpus(cfg.vocab_size), data_seed
    lora = [LoraConfig(target="attention_qv", rank=RANK, alpha=2.0 * RANK)]
    net = PeftModel(Transformer(cfg), lora)
    optimizer = OptimizerConfig(peak_lr=lr, warmup_steps=0, weight_decay=0.0,
                                trainable=trainable_pattern(lora))
    tx, schedule = optimizer.make(10**6)
    tokens = jnp.zeros((1, self.seq_len), jnp.int32)
    params = nn.meta.unbox(net.init(jax.random.PRNGKey(seed), tokens)["params"])
    self.state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=tx.init(params),
                            rng=jax.random.key_data(jax.random.PRNGKey(seed + 1)))
    mask = optimizer.trainable_mask(params)
    self.trainable = int(sum(np.size(p) for p, t in zip(jax.tree.leaves(params),
                                                         jax.tree.leaves(mask)) if t))
    self.num_params = int(sum(np.size(p) for p in jax.tree.leaves(params)))
    self.opt_bytes = int(sum(x.nbytes for x in jax.tree.leaves(self.state.opt_state)
                             if np.ndim(x)))
    step = step_lib.make_train_step(net, tvt.NextTokenLM(), tx, schedule, trainable=mask)
    start = time.perf_counter()
    self.step = jax.jit(step, donate_argnums=0)
    self.state, _ = self.step(self.state, self._batch(0))
    jax.block_until_ready(self.state)
    self.compile_s = time.perf_counter() - start

  def _batch(self, index):
    x, y = common.get_batch(self.data.train, self.batch_size, self.seq_len, self.data_seed,
                            index)
    return {"inputs": x, "targets": y}

  def _prepare(self, index):
    return self._batch(index)

  def _step(self, batch):
    import jax
    self.state, metrics = self.step(self.state, batch)
    jax.block_until_ready((self.state, metrics))
    return float(metrics["loss"])


class PeftLora(_Timed):
  """transformers' GPT2LMHeadModel under peft's LoRA, eager PyTorch."""

  def __init__(self, shape="gpt2-lora", dtype="float32", seed=0, data_seed=1234, lr=1e-3,
               threads=2):
    _register_shapes()
    import contextlib

    import peft
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    self.seq_len, self.batch_size = SHAPES[shape][3:]
    base = tvt.torch_model("hf", shape)
    self.data, self.data_seed = common.corpus(base.config.vocab_size), data_seed
    self.model = peft.get_peft_model(base, peft.LoraConfig(
        r=RANK, lora_alpha=2 * RANK, target_modules=["c_attn"], fan_in_fan_out=True,
        lora_dropout=0.0))
    self.model.train()
    trainable = [p for p in self.model.parameters() if p.requires_grad]
    self.opt = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    self.autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) \
        if dtype == "bfloat16" else contextlib.nullcontext
    self.trainable = sum(p.numel() for p in trainable)
    self.num_params = sum(p.numel() for p in self.model.parameters())
    start = time.perf_counter()
    self._step(self._prepare(0))
    self.compile_s = time.perf_counter() - start
    self.opt_bytes = sum(t.numel() * t.element_size() for s in self.opt.state.values()
                         for t in s.values() if t.dim())

  def _step(self, index):
    import torch
    import torch.nn.functional as F
    x, y = common.get_batch(self.data.train, self.batch_size, self.seq_len, self.data_seed,
                            index)
    x, y = torch.from_numpy(x).long(), torch.from_numpy(y).long()
    with self.autocast():
      logits = self.model(input_ids=x).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]],
                                   1.0)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return loss.item()

  def _prepare(self, index):
    return index  # the batch is built inside the timed step, as train_vs_torch does


def step_gemms(shape: str) -> list[tuple[int, int, int, int, int, float]]:
  """`(count, M, K, N, batch, share)` of the matrix products one LoRA step (adapters on q
  and v, the base frozen) cannot avoid, `share` of each product's FLOPs counted:
  per block the fused q/k/v, output and two MLP projections forward and their input
  gradients backward (the first block's q/k/v input gradient is not needed: the
  embeddings are frozen), the tied head forward and backward, and attention's two score
  products forward and four backward per head (the first block's key gradient is not
  needed), at half their FLOPs: the causal mask lets a kernel skip the upper triangle."""
  layers, heads, d, seq_len, batch = SHAPES[shape]
  t, v, bh, hd = seq_len * batch, tvt.VOCAB.get(shape, 50257), batch * heads, d // heads
  dense = [(layers, t, d, 3 * d), (layers, t, d, d), (layers, t, d, 4 * d),
           (layers, t, 4 * d, d), (1, t, d, v),
           (layers - 1, t, 3 * d, d), (layers, t, d, d), (layers, t, 4 * d, d),
           (layers, t, d, 4 * d), (1, t, v, d)]
  # q k^T and dO V^T are [S, hd] x [hd, S]; P V, P^T dO, dS K and dS^T Q are [S, S] x [S, hd]
  scores = [(2 * layers, seq_len, hd, seq_len), (4 * layers - 1, seq_len, seq_len, hd)]
  return [(*g, 1, 1.0) for g in dense] + [(*g, bh, 0.5) for g in scores]


def gemm_seconds(backend: str, gemms, repeats: int = 3) -> list[float]:
  """Best time of each product alone in `backend` ('jax' | 'torch'), float32, over both
  layouts of the right operand ([K, N] and [N, K] transposed), times its `share`."""
  rng = np.random.default_rng(0)
  best = []
  for _, m, k, n, batch, share in gemms:
    a = rng.standard_normal((batch, m, k), np.float32)
    b = rng.standard_normal((batch, k, n), np.float32)
    bt = np.ascontiguousarray(np.swapaxes(b, 1, 2))
    if backend == "jax":
      import jax
      runs = [(jax.jit(lambda x, y: x @ y), b),
              (jax.jit(lambda x, y: x @ y.swapaxes(1, 2)), bt)]
      sync, convert = jax.block_until_ready, jax.numpy.asarray
    else:
      import torch
      runs = [(torch.bmm, b), (lambda x, y: torch.bmm(x, y.transpose(1, 2)), bt)]
      sync, convert = (lambda x: x), torch.from_numpy
    times = []
    for fn, right in runs:
      x, y = convert(a), convert(right)
      sync(fn(x, y))
      for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn(x, y))
        times.append(time.perf_counter() - t0)
    best.append(share * min(times))
  return best


class GemmTimer:
  """A worker that times `step_gemms` in one library (`gemm_seconds`)."""

  def __init__(self, backend="jax", shape="gpt2-lora"):
    _register_shapes()
    self.backend, self.gemms = backend, step_gemms(shape)

  def info(self):
    return {}

  def run(self, start, n):
    del start, n
    return gemm_seconds(self.backend, self.gemms), []


def gemm_floor(shape: str, threads: int) -> dict:
  """Times the step's GEMMs in a jax and a torch worker: per product the faster, and the
  floor (their sum with counts) in seconds per step."""
  gemms, times = step_gemms(shape), {}
  for backend in ("jax", "torch"):
    w = common.Worker(f"gemm-{backend}", FACTORY + "GemmTimer",
                      {"backend": backend, "shape": shape}, threads=threads)
    try:
      w.start()
      times[backend] = w.call("run", 0, 0)[0]
    finally:
      w.stop()
  rows = [(g, tj, tt) for g, tj, tt in zip(gemms, times["jax"], times["torch"])]
  return {"rows": rows, "floor": sum(g[0] * min(tj, tt) for g, tj, tt in rows)}


def report_floor(floor: dict, results: dict, tokens_per_step: int):
  print("\nGEMM floor of one step (float32; GFLOP/s of each product alone):")
  table = [[(f"{c} x {f'{b} x ' if b > 1 else ''}[{m},{k}]x[{k},{n}]"
             f"{' (half)' if share < 1 else ''}"), 2e-9 * b * share * m * k * n / tj,
            2e-9 * b * share * m * k * n / tt, c * min(tj, tt)]
           for (c, m, k, n, b, share), tj, tt in floor["rows"]]
  common.print_table(table, ["product", "XLA GFLOP/s", "torch GFLOP/s", "s/step (faster)"])
  print(f"floor: {floor['floor']:.2f} s/step")
  for name in ("peft", "llmjax"):
    if name in results:
      step_s = tokens_per_step / float(np.median(results[name]))
      print(f"{name}: {step_s:.2f} s/step = {step_s / floor['floor']:.2f} x the floor")
  if "peft" in results:
    peer_s = tokens_per_step / float(np.median(results["peft"]))
    print(f"highest ratio to peft any implementation could reach here: "
          f"{peer_s / floor['floor']:.2f}x")


def make_workers(impls, shape, threads, attention_impl=None):
  impl = {"attention_impl": attention_impl} if attention_impl else {}
  specs = {"llmjax": ("LlmjaxLora", impl),
           "llmjax-bf16": ("LlmjaxLora", {"dtype": "bfloat16", **impl}),
           "peft": ("PeftLora", {"threads": threads}),
           "peft-bf16": ("PeftLora", {"dtype": "bfloat16", "threads": threads})}
  return [common.Worker(name, FACTORY + specs[name][0], {"shape": shape, **specs[name][1]},
                        threads=threads) for name in impls.split(",")]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=6)
  parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
  parser.add_argument("--warmup_steps", type=int, default=2)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--shape", default="gpt2-lora", choices=sorted(SHAPES))
  parser.add_argument("--impls", default="llmjax,llmjax-bf16,peft,peft-bf16")
  parser.add_argument("--attention_impl", default=None,
                      help="llmjax's attention (default: train_vs_torch.FAST_ATTENTION)")
  parser.add_argument("--no_floor", action="store_true", help="skip the GEMM floor")
  parser.add_argument("--floor_only", action="store_true", help="only the GEMM floor")
  args = parser.parse_args()
  print(f"cpu: {common.cpu_info()}", flush=True)
  _register_shapes()
  common.corpus(50257)
  if args.floor_only:
    _, _, _, seq_len, batch = SHAPES[args.shape]
    return report_floor(gemm_floor(args.shape, args.threads), {}, batch * seq_len)
  workers = make_workers(args.impls, args.shape, args.threads, args.attention_impl)
  info = {}
  try:
    for w in workers:
      info[w.name] = w.start()
      print(f"{w.name}: built, first step {info[w.name]['compile_s']:.1f}s", flush=True)
    tvt.warm_up(workers, args.warmup_steps)
    _, _, _, seq_len, batch = SHAPES[args.shape]
    results, _ = tvt.run_rounds(workers, args.rounds, args.steps, batch * seq_len,
                                first_batch=1 + args.warmup_steps)
  finally:
    for w in workers:
      w.stop()
  report(info, results)
  if not args.no_floor:
    report_floor(gemm_floor(args.shape, args.threads), results, batch * seq_len)


def report(info, results):
  rows = []
  for name, tps in results.items():
    peer = "peft-bf16" if name.endswith("bf16") else "peft"
    ratio = common.ratio_stats(tps, results[peer]) if peer in results else None
    i = info[name]
    rows.append([name, float(np.median(tps)), ratio["median"] if ratio else "-",
                 ratio["min"] if ratio else "-", f"{i['params']:,}", f"{i['trainable']:,}",
                 f"{100 * i['trainable'] / i['params']:.2f}%",
                 f"{i['opt_bytes'] / 2**20:.2f} MiB"])
  common.print_table(rows, ["impl", "tokens/s (median)", "x peer (median)", "x peer (min)",
                            "params", "trainable", "trainable %", "optimizer state"])
  print(f"(rounds: {len(next(iter(results.values())))}; peer = peft of the same precision;"
        f" ln(50257) = {math.log(50257):.2f})")


if __name__ == "__main__":
  main()
