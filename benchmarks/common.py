"""Shared benchmark machinery: char-level Shakespeare batches, interleaved workers, stats.

This machine's speed drifts by 2x within seconds (shared cores), so separate averages
lie. Every implementation lives in its own worker process (its own thread pools,
libraries and flags: no OpenMP spin-waiting or XLA flags leak between peers), and the
parent runs them round-robin, one at a time, in a rotating order; ratios are taken per
round, between measurements seconds apart.

Usage (see train_vs_torch.py):
  workers = [Worker('name', 'benchmarks.train_vs_torch:make_llmjax', kwargs), ...]
  info = [w.start() for w in workers]            # builds, compiles, reports
  for r in range(rounds):
    for w in rotate(workers, r): results[w.name].append(w.call('run', ...))
"""

import dataclasses
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import traceback

import numpy as np

# Theoretical fp32 peak of this 2-core AMD EPYC (Zen 4): 2 cores x 2 FMA pipes x 16 lanes
# x 2 flops x ~2 GHz sustained all-core clock.
PEAK_FP32_FLOPS = 2 * 2 * 16 * 2 * 2.0e9
# Dense bf16 tensor-core peak of an H100 SXM (NVIDIA's datasheet, without sparsity): the
# MFU yardstick of `--device gpu` runs.
PEAK_H100_BF16_FLOPS = 989e12
CACHE_DIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), "llmjax_bench")


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")


def cpu_info() -> str:
  """The CPU model, its vector/matrix flags and core count, for every benchmark's header.

  Runs may land on different CPUs (PEAK_FP32_FLOPS assumes a Zen 4 EPYC; AMX or
  AVX-512 bf16 change what bfloat16 costs), and a figure without its CPU cannot be
  compared with another."""
  model, flags = "", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
          model = value.strip()
        elif key.strip() == "flags" and not flags:
          flags = set(value.split())
  except OSError:
    pass
  model = model or platform.processor() or "unknown CPU"
  present = [f for f in CPU_FLAGS if f in flags]
  listed = ", ".join(present) if present else f"none of {', '.join(CPU_FLAGS)}"
  return f"{model}; {listed}; {os.cpu_count()} cores"


def thread_env(threads: int) -> dict[str, str]:
  """Environment for a worker with `threads` intra-op threads (OpenMP, MKL; XLA:CPU sizes
  its pool from the CPU affinity, which the worker restricts to `threads` cores)."""
  flags = os.environ.get("XLA_FLAGS", "")
  flags = " ".join(f for f in flags.split() if "device_count" not in f)
  return {"XLA_FLAGS": flags, "OMP_NUM_THREADS": str(threads),
          "MKL_NUM_THREADS": str(threads), "TF_CPP_MIN_LOG_LEVEL": "2",
          "BENCH_THREADS": str(threads)}


def _pin_threads():
  threads = int(os.environ.get("BENCH_THREADS", "0"))
  cpus = sorted(os.sched_getaffinity(0))
  if threads and threads < len(cpus):
    os.sched_setaffinity(0, cpus[:threads])


# ---------------------------------------------------------------- data


@dataclasses.dataclass
class CharCorpus:
  """The `shakespeare` train/validation splits as one stream of char ids each."""
  train: np.ndarray
  val: np.ndarray
  vocab_size: int


def char_corpus(vocab_size: int = 65, data_dir: str | None = None) -> CharCorpus:
  """Char-level SentencePiece ids (`vocab_size` pieces, rare chars -> unk) of both splits.

  The tokenizer is trained on the train split (llmjax.data.tokenizer, whitespace-exact);
  documents are joined nanoGPT-style into one stream. Cached under CACHE_DIR.
  """
  os.makedirs(CACHE_DIR, exist_ok=True)
  path = os.path.join(CACHE_DIR, f"shakespeare_char{vocab_size}.npz")
  if not os.path.exists(path):
    from llmjax.data import datasets
    from llmjax.data import tokenizer as tok_lib
    texts = {s: list(datasets.iter_texts("shakespeare", s, data_dir))
             for s in ("train", "validation")}
    tok = tok_lib.train_tokenizer(texts["train"], os.path.join(CACHE_DIR, f"char{vocab_size}"),
                                  model_type="char", vocab_size=vocab_size,
                                  whitespace_exact=True, num_sentinels=0)
    ids = {s: np.concatenate([np.asarray(tok.encode(t), np.uint8) for t in texts[s]])
           for s in texts}
    tmp = path + ".tmp.npz"
    np.savez(tmp, train=ids["train"], val=ids["validation"], vocab_size=tok.vocab_size)
    os.replace(tmp, path)
  with np.load(path) as f:
    return CharCorpus(f["train"], f["val"], int(f["vocab_size"]))


def random_corpus(vocab_size: int, length: int = 4_000_000, seed: int = 0) -> CharCorpus:
  """Uniform random token ids: the data of shapes with a real tokenizer's vocabulary
  (GPT-2's 50257) that no bundled dataset is tokenized for. Speed does not depend on
  the ids; the initial-loss check (ln V) still holds."""
  rng = np.random.default_rng(seed)
  ids = lambda n: rng.integers(0, vocab_size, n, dtype=np.int32)
  return CharCorpus(ids(length), ids(length // 10), vocab_size)


def corpus(vocab_size: int) -> CharCorpus:
  """The benchmark data for a vocabulary: char-level Shakespeare up to 256 pieces,
  `random_corpus` beyond."""
  return char_corpus(vocab_size) if vocab_size <= 256 else random_corpus(vocab_size)


def get_batch(data: np.ndarray, batch_size: int, seq_len: int, seed: int, index: int):
  """nanoGPT's `get_batch`: random crops; batch `index` of stream `seed` is reproducible.

  Returns int32 `x, y` of shape `[batch_size, seq_len]`, y = x shifted by one.
  """
  rng = np.random.default_rng([seed, index])
  starts = rng.integers(0, len(data) - seq_len - 1, size=batch_size)
  rows = np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int32)  # [B, L+1]
  return rows[:, :-1], rows[:, 1:]


def cosine_lr(step: int, peak: float, total: int, warmup: int, end_ratio: float) -> float:
  """`llmjax.optim.schedules.make_schedule(..., 'cosine')` in plain Python (for torch)."""
  if step < warmup:
    return peak * step / warmup
  t = min(step - warmup, total - warmup) / max(total - warmup, 1)
  return peak * (end_ratio + (1 - end_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# ---------------------------------------------------------------- FLOPs and probes


def train_flops_per_token(num_params: int, num_layers: int, width: int, seq_len: int,
                          causal_halved: bool = False) -> float:
  """6N + 12 L d T (Kaplan et al. / PaLM app. B); the causal variant halves attention."""
  attention = 12 * num_layers * width * seq_len
  return 6 * num_params + (attention / 2 if causal_halved else attention)


def matmul_probe(backend: str, dtype: str = "float32", n: int = 1024, m: int = 4096,
                 reps: int = 5, device: str = "cpu") -> float:
  """Sustained GFLOP/s of an `[m, n] @ [n, n]` matmul (bf16 accumulates in f32) on
  `device` ('cpu', or 'gpu': jax's default GPU backend, torch's 'cuda')."""
  a = np.random.default_rng(0).standard_normal((m, n), np.float32)
  b = np.random.default_rng(1).standard_normal((n, n), np.float32)
  if backend == "jax":
    import jax
    import jax.numpy as jnp
    f = jax.jit(lambda x, y: jnp.einsum("mk,kn->mn", x, y, preferred_element_type=jnp.float32))
    x, y = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    run = lambda: f(x, y).block_until_ready()
  else:
    import torch
    where = "cuda" if device == "gpu" else "cpu"
    x = torch.from_numpy(a).to(where, getattr(torch, dtype))
    y = torch.from_numpy(b).to(where, getattr(torch, dtype))
    sync = torch.cuda.synchronize if device == "gpu" else lambda: None
    run = lambda: (x @ y, sync())
  run()
  best = math.inf
  for _ in range(reps):
    start = time.perf_counter()
    run()
    best = min(best, time.perf_counter() - start)
  return 2 * m * n * n / best / 1e9


# ---------------------------------------------------------------- interleaved workers


def use_source_tree(src: str):
  """Makes this process import `llmjax` and `benchmarks` from the checkout `src`.

  A spawned child gets the parent's sys.path and has already imported this module (and
  the parent's main module) from the parent's tree, so PYTHONPATH would come too late:
  `src` goes first on sys.path and the parent's `benchmarks`/`llmjax` modules leave
  sys.modules. The editable install's finder sits at the end of sys.meta_path, after
  the path finder, so `src` wins over it (the worker reports `llmjax.__file__`)."""
  src = os.path.abspath(src)
  if not os.path.isdir(os.path.join(src, "llmjax")):
    raise FileNotFoundError(f"{src} has no llmjax package")
  sys.path.insert(0, src)
  for name in list(sys.modules):
    if name.split(".")[0] in ("benchmarks", "llmjax"):
      del sys.modules[name]
  import importlib
  importlib.invalidate_caches()


def _worker_main(conn, factory: str, kwargs: dict, env: dict, src: str | None = None):
  os.environ.update(env)
  _pin_threads()
  try:
    import importlib
    if src:
      use_source_tree(src)
    module, name = factory.split(":")
    impl = getattr(importlib.import_module(module), name)(**kwargs)
    llmjax = sys.modules.get("llmjax")
    conn.send(("ok", {**impl.info(), "llmjax_file": getattr(llmjax, "__file__", None)}))
    while True:
      method, args = conn.recv()
      if method == "stop":
        break
      conn.send(("ok", getattr(impl, method)(*args)))
  except Exception:  # noqa: BLE001 (any failure goes back to the parent, with its traceback)
    conn.send(("error", traceback.format_exc()))


class Worker:
  """One implementation in its own spawned process; `call` runs a method there."""

  def __init__(self, name: str, factory: str, kwargs: dict | None = None,
               threads: int = 2, env: dict | None = None, src: str | None = None):
    """`src`: a checkout (e.g. a git worktree of an older commit) to import `llmjax` and
    `benchmarks` from, `factory` included; by default the parent's."""
    self.name, self.factory, self.kwargs, self.src = name, factory, kwargs or {}, src
    self.env = {**thread_env(threads), **(env or {})}
    self.info, self._proc, self._conn = None, None, None

  def start(self) -> dict:
    """Starts the process and waits for the implementation to build (and compile)."""
    ctx = mp.get_context("spawn")
    self._conn, child = ctx.Pipe()
    self._proc = ctx.Process(target=_worker_main, daemon=True,
                             args=(child, self.factory, self.kwargs, self.env, self.src))
    self._proc.start()
    self.info = self._receive()
    return self.info

  def call(self, method: str, *args):
    self._conn.send((method, args))
    return self._receive()

  def _receive(self):
    status, value = self._conn.recv()
    if status == "error":
      raise RuntimeError(f"worker {self.name} failed:\n{value}")
    return value

  def stop(self):
    if self._proc is not None and self._proc.is_alive():
      self._conn.send(("stop", ()))
      self._proc.join(timeout=30)


def rotate(items: list, shift: int) -> list:
  """Round r starts with a different implementation, so none always runs first."""
  shift %= len(items)
  return items[shift:] + items[:shift]


def ratio_stats(numer: list[float], denom: list[float]) -> dict[str, float]:
  """Per-round ratios numer[r] / denom[r]: median, p25 and min."""
  ratios = sorted(a / b for a, b in zip(numer, denom))
  p25 = ratios[0] if len(ratios) < 4 else statistics.quantiles(ratios, n=4)[0]
  return {"median": statistics.median(ratios), "p25": p25, "min": ratios[0]}


def print_table(rows: list[list], header: list[str]):
  cells = [[str(c) for c in header]] + [[f"{c:.3g}" if isinstance(c, float) else str(c)
                                          for c in row] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  for i, row in enumerate(cells):
    print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))))
    if i == 0:
      print("  ".join("-" * w for w in widths))
