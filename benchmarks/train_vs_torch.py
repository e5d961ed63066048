"""Training throughput: llmjax vs PyTorch peers, interleaved in one run.

Command (repository root; `--rounds 10 --steps 2` is the reported setting):
  .venv/bin/python -m benchmarks.train_vs_torch --rounds 10 --steps 2
  .venv/bin/python -m benchmarks.train_vs_torch --loss_curve --shape race --curve_steps 200

Same work on every side: nanoGPT-char (6 layers, 6 heads, 384 wide, 256 context, vocab 65,
dropout 0, tied embeddings, exact GELU), batch 16 x 256, AdamW (lr 1e-3, betas 0.9/0.99,
weight decay 0.1 on matrices, clip 1.0), identical char-level batches of the `shakespeare`
data. Peers: `transformers` GPT2LMHeadModel (eager and torch.compile) and the plain
PyTorch reference in benchmarks/torch_gpt.py. Parameter counts must be equal and initial
losses near ln(65) = 4.17 before anything is timed.

Each implementation runs in its own process with 2 threads (common.Worker); after its first
step (compile) each takes `--warmup_steps` untimed steps (default 8), then per round each
does `--steps` timed steps, every step ending with a device sync (`block_until_ready` /
`loss.item()`). Reported: tokens/s per implementation (median over rounds), per-round
ratios llmjax / best PyTorch peer (median, p25, min), first-step (compile) time, and MFU
with 6N + 12 L d T FLOPs/token (and the causal-halved variant) against the theoretical
fp32 peak (common.PEAK_FP32_FLOPS) and against matmul probes measured in the same run.

`--impls` entries take options after `@`: model config overrides (`llmjax@attention_impl=jax`),
XLA flags (`@xla=--xla_cpu_enable_fast_math=true`) and `@devices=N`, which splits the
worker's cores into N CPU devices (`--xla_force_host_platform_device_count=N`) and trains
data parallel over them with the library's "dp" rules, as `llmjax train` does on any mesh.

Before/after a refactor, in one interleaved run: `@src=DIR` makes a worker import `llmjax`
and `benchmarks` (this file's implementation classes included) from the checkout DIR, e.g.
a `git worktree add --detach` of the older commit, and `@label=NAME` names its row:
  --impls llmjax,llmjax@src=/tmp/before@label=before,torch-ref
Each worker's header line says which `llmjax` it imported; the report adds per-round
ratios of every implementation to its `@src` twin (the same spec without @src/@label).
benchmarks/before_after.sh runs this and decode_vs_hf for both trees.

`--device gpu --shape gpt2-124m` (a GPU machine): GPT-2 124M at 1024 context, batch 12,
random token ids (no GPT-2-tokenized data is bundled), every worker on the one GPU (JAX
allocating on demand), PyTorch peers with fused AdamW and, with `@dtype=bfloat16`,
autocast mixed precision; MFU against the H100's 989 TFLOP/s dense bf16 peak and a bf16
matmul probe (8192^3) measured in the same run. The reported run (benchmarks/README.md):
  python3 -m benchmarks.train_vs_torch --device gpu --shape gpt2-124m --rounds 3 --steps 10 \
    --warmup_steps 3 --impls llmjax-bf16@attention_impl=cudnn,torch-ref-compile@dtype=bfloat16
Use `@attention_impl=cudnn` there: the CPU default (einsum attention in 16 causal chunks)
takes minutes to compile on a GPU. JAX and PyTorch keep their memory pools, so more than
two JAX workers at once can run an 80 GB GPU out of memory.

`--loss_curve` trains llmjax in float32 and in bfloat16 (f32 accumulation), and float32
from another init seed (the noise yardstick), on the same batches, and compares curves.
"""

import argparse
import math
import os
import statistics
import time

import numpy as np

from benchmarks import common

SHAPES = {  # (num_layers, num_heads, width, seq_len, batch_size)
    "nanogpt-char": (6, 6, 384, 256, 16),
    "race": (4, 4, 128, 64, 12),      # nanoGPT's shakespeare_char CPU config
    "tiny": (2, 2, 32, 16, 4),        # smoke tests
    "gpt2-124m": (12, 12, 768, 1024, 12),  # --device gpu: nanoGPT's GPT-2 micro-batch
}
VOCAB = {"gpt2-124m": 50257}  # others: 65 (char-level Shakespeare)
INIT_BATCH = 10**9  # the batch index of the initial-loss check (never trained on)


# What these small models train fastest with on CPU (see benchmarks/README.md, "Profile"):
# unrolled layers (the scanned stack spends ~1/3 of the step stacking and slicing
# per-layer residuals; `llmjax-scan` measures the scanned default) and, in float32,
# attention in the C++ FlashAttention kernel (`attention_impl='cpu_flash'`: +6% per
# nanoGPT-char step). The kernel computes in float32, so in bfloat16 XLA's einsum path
# (bfloat16 products with float32 accumulation, causal query chunks of 64) is as fast at
# 256 tokens and 6% faster at the race's 64; `llmjax-bf16@attention_impl=cpu_flash` and
# `llmjax@attention_impl=einsum` measure the other choice.
FAST_SMALL_MODEL = {"scan_layers": False}
FAST_ATTENTION = {"float32": "cpu_flash", "bfloat16": "einsum"}
CAUSAL_CHUNK = 64


def llmjax_config(shape: str, vocab_size: int | None = None, dtype: str = "float32",
                  overrides=None):
  """The llmjax `TransformerConfig` of a benchmark shape (GPT-2 style, exact GELU)."""
  from llmjax.models.presets import get_preset
  layers, heads, width, seq_len, _ = SHAPES[shape]
  vocab_size = vocab_size or VOCAB.get(shape, 65)
  kwargs = {"vocab_size": vocab_size, "num_layers": layers, "num_heads": heads,
            "embed_dim": width, "mlp_dim": 4 * width, "max_len": seq_len, "dropout_rate": 0.0,
            "dtype": dtype, **FAST_SMALL_MODEL,
            "attention_impl": FAST_ATTENTION.get(dtype, "einsum"),
            "causal_chunks": max(1, seq_len // CAUSAL_CHUNK)}
  # Overrides may change any field, the shape's too (then only llmjax variants compare:
  # the parent's same-work check refuses unequal parameter counts).
  return get_preset("nanogpt-char", **{**kwargs, **(overrides or {})})


def torch_model(kind: str, shape: str, vocab_size: int | None = None):
  """The PyTorch peer of a shape: 'ref' (torch_gpt.GPT) or 'hf' (GPT2LMHeadModel)."""
  layers, heads, width, seq_len, _ = SHAPES[shape]
  vocab_size = vocab_size or VOCAB.get(shape, 65)
  if kind == "ref":
    from benchmarks import torch_gpt
    return torch_gpt.GPT(torch_gpt.GPTConfig(vocab_size, seq_len, layers, heads, width, 0.0))
  import transformers
  config = transformers.GPT2Config(
      vocab_size=vocab_size, n_positions=seq_len, n_embd=width, n_layer=layers, n_head=heads,
      n_inner=4 * width, activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0,
      attn_pdrop=0.0, layer_norm_epsilon=1e-5, tie_word_embeddings=True, bos_token_id=None,
      eos_token_id=None)
  return transformers.GPT2LMHeadModel(config)


class LlmjaxImpl:
  """llmjax's own train step (`llmjax.train.step.make_train_step`), jitted with donation."""

  def __init__(self, shape="nanogpt-char", vocab_size=None, dtype="float32", seed=0,
               data_seed=1234, lr=1e-3, warmup=0, total_steps=0, overrides=None, devices=1,
               rules="dp", host_malloc="reuse"):
    from llmjax.train import host_memory
    host_memory.configure(host_malloc)  # as the train loop does, before jax starts
    import jax
    from flax import linen as nn

    from llmjax.models.transformer import Transformer
    from llmjax.optim import optimizers, schedules
    from llmjax.sharding import mesh as mesh_lib
    from llmjax.sharding import partition
    from llmjax.sharding import rules as rules_lib
    from llmjax.train import step as step_lib
    from llmjax.train.state import TrainState, state_shardings

    self.seq_len, self.batch_size = SHAPES[shape][3:]
    self.cfg = llmjax_config(shape, vocab_size, dtype, overrides)
    self.data, self.data_seed = common.corpus(self.cfg.vocab_size), data_seed
    model = Transformer(self.cfg)
    schedule = (schedules.make_schedule(lr, total_steps, warmup, "cosine", 0.1)
                if total_steps else lambda _: lr)
    tx = optimizers.adamw(schedule, b1=0.9, b2=0.99, weight_decay=0.1, clip_norm=1.0)
    objective = NextTokenLM()

    seed_key = jax.random.PRNGKey(seed)
    tokens = jax.numpy.zeros((1, self.seq_len), jax.numpy.int32)
    init_params = lambda rng: model.init(rng, tokens)["params"]  # boxed (logical axes)

    def init(rng):
      params = nn.meta.unbox(init_params(rng))
      return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                        opt_state=tx.init(params),
                        rng=jax.random.key_data(jax.random.PRNGKey(seed + 1)))

    # `devices` > 1: data parallel over that many CPU devices (the worker sets
    # --xla_force_host_platform_device_count), placed by the library's rule set `rules`
    # ("dp"; "zero1" splits the optimizer state, "fsdp" the parameters too) as `llmjax
    # train` does; the initial state is the single-device one, so only the placement
    # differs.
    if jax.device_count() < devices:
      raise ValueError(f"devices={devices} but jax sees {jax.device_count()}; start the "
                       f"process with XLA_FLAGS=--xla_force_host_platform_device_count={devices}")
    self.devices = devices
    fsdp = rules in ("fsdp", "fsdp_tp")  # these split over the 'fsdp' mesh axis
    mesh = mesh_lib.make_mesh(data=1 if fsdp else devices, fsdp=devices if fsdp else 1,
                              devices=jax.devices()[:devices])
    mesh_rules = rules_lib.get_rules(rules)
    shardings = state_shardings(jax.eval_shape(init_params, seed_key), tx, mesh, rules)
    self.batch_sharding = partition.batch_sharding(mesh, mesh_rules)
    self.state = jax.device_put(jax.jit(init)(seed_key), shardings)
    step = step_lib.make_train_step(model, objective, tx, schedule)
    start = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_rules):
      self.step = jax.jit(step, in_shardings=(shardings, self.batch_sharding),
                          out_shardings=(shardings, None), donate_argnums=0)
      self.step = self.step.lower(self.state, self._put(*self.batch(0))).compile()
    self.compile_s = time.perf_counter() - start
    self.cost = (self.step.cost_analysis() or {}) if hasattr(self.step, "cost_analysis") else {}
    self.eval_fn = jax.jit(step_lib.make_eval_step(model, objective))
    self.initial_loss = self.eval_loss([self.batch(INIT_BATCH)])
    self.num_params = sum(math.prod(p.shape) for p in jax.tree.leaves(self.state.params))

  def batch(self, index, split="train"):
    data = self.data.train if split == "train" else self.data.val
    return common.get_batch(data, self.batch_size, self.seq_len, self.data_seed, index)

  def gpt2_weights(self):
    """The current parameters as GPT-2 tensors (HF names, numpy), for `TorchImpl.load_gpt2`."""
    import jax

    from llmjax.checkpoint.convert import gpt2 as gpt2_convert
    from llmjax.models.stack import unstack_layers
    params = jax.device_get(self.state.params)
    params = unstack_layers(params) if self.cfg.scan_layers else params
    return gpt2_convert.params_to_hf(params, self.cfg)

  def _put(self, x, y):
    import jax
    return jax.device_put({"inputs": x, "targets": y}, self.batch_sharding)

  def info(self):
    flops = self.cost.get("flops") if isinstance(self.cost, dict) else None
    flops = flops and flops * self.devices  # SPMD: the cost analysis is per device
    return {"params": self.num_params, "initial_loss": self.initial_loss,
            "compile_s": self.compile_s, "xla_flops": flops,
            "layers": self.cfg.num_layers, "width": self.cfg.embed_dim}

  def run(self, start, n):
    """`n` timed steps on batches start..start+n-1: (seconds per step, losses)."""
    import jax

    from llmjax.train import host_memory
    times, losses = [], []
    for i in range(start, start + n):
      x, y = self.batch(i)
      t0 = time.perf_counter()
      self.state, metrics = self.step(self.state, self._put(x, y))
      jax.block_until_ready((self.state, metrics))
      times.append(time.perf_counter() - t0)
      losses.append(float(metrics["loss"]))
      host_memory.trim_if_grown()  # as the train loop does after each step
    return times, losses

  def eval_loss(self, batches):
    import jax
    sums = [self.eval_fn(self.state.params, {"inputs": x, "targets": y}) for x, y in batches]
    total = jax.device_get(jax.tree.map(lambda *a: sum(a), *sums))
    return float(total["loss"] / total["weight"])

  def eval_split(self, split, num_batches, seed=99):
    return self.eval_loss([common.get_batch(self.data.val if split == "val" else self.data.train,
                                            self.batch_size, self.seq_len, seed, i)
                           for i in range(num_batches)])


class NextTokenLM:
  """Objective on `{'inputs', 'targets'}` [B, L] (nanoGPT's random-crop batches): the two
  methods of `llmjax.objectives.protocol.Objective` the train and eval steps call (llmjax
  is imported lazily here, so the PyTorch workers never load jax)."""

  def loss_sums(self, model, params, batch, *, rng=None, deterministic=True, frozen=None):
    import jax.numpy as jnp

    from llmjax.objectives import losses
    rngs = {"dropout": rng} if (rng is not None and not deterministic) else None
    logits = model.apply({"params": params}, batch["inputs"], deterministic=deterministic,
                         rngs=rngs)
    weights = jnp.ones(batch["targets"].shape, jnp.float32)
    return losses.cross_entropy_sums(logits, batch["targets"], weights)

  def summarize(self, sums):
    from llmjax.objectives import losses
    return losses.summarize(sums)


class TorchImpl:
  """A PyTorch peer: 'ref' (benchmarks/torch_gpt.py) or 'hf' (GPT2LMHeadModel)."""

  def __init__(self, kind="ref", compile=False, shape="nanogpt-char", vocab_size=None, seed=0,
               data_seed=1234, lr=1e-3, warmup=0, total_steps=0, threads=2, dtype="float32",
               device="cpu"):
    import contextlib

    import torch

    from benchmarks import torch_gpt
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    self.seq_len, self.batch_size = SHAPES[shape][3:]
    self.model = torch_model(kind, shape, vocab_size)
    self.data = common.corpus(self.model.config.vocab_size)
    self.data_seed = data_seed
    self.lr_args = (lr, total_steps, warmup, 0.1)
    # 'gpu': CUDA, fused AdamW; bfloat16 is autocast's mixed precision (f32 weights and
    # optimizer, bf16 matmuls and attention), as nanoGPT trains on GPUs.
    self.device = "cuda" if device == "gpu" else "cpu"
    self.model.to(self.device)
    self.autocast = (lambda: torch.autocast(self.device, dtype=torch.bfloat16)) \
        if dtype == "bfloat16" else contextlib.nullcontext
    if kind == "ref":
      self.forward = lambda m, x: m(x)[0]
    else:
      self.forward = lambda m, x: m(input_ids=x).logits
    self.model.train()
    self.num_params = sum(p.numel() for p in self.model.parameters())
    self.kind = kind
    self.opt = torch_gpt.adamw(self.model, lr, betas=(0.9, 0.99), weight_decay=0.1,
                               fused=self.device == "cuda")
    self.compiled = torch.compile(self.model) if compile else self.model
    self.initial_loss = self.eval_loss([self.batch(INIT_BATCH)])
    start = time.perf_counter()
    self._train_step(*self.batch(0), step=0, update=False)  # compiles (if compiled)
    self.compile_s = time.perf_counter() - start

  def load_gpt2(self, tensors: dict):
    """Loads GPT-2 tensors (HF names, `LlmjaxImpl.gpt2_weights`): the same initial weights
    on both sides. HF's Conv1D keeps `[in, out]`; the reference's nn.Linear `[out, in]`.
    The copy is in place, so tied tables and the (still empty) optimizer keep pointing
    at the loaded tensors."""
    import torch
    state = {}
    for name, value in tensors.items():
      if self.kind == "ref":
        name = name.removeprefix("transformer.")
        if name.endswith("weight") and any(k in name for k in ("c_attn", "c_proj", "c_fc")):
          value = value.T
      value = np.array(value, np.float32)  # a writable copy: from_numpy warns on read-only arrays
      state[name] = torch.from_numpy(value).to(self.device)
    missing, unexpected = self.model.load_state_dict(state, strict=False)
    allowed = ("lm_head.weight", ".attn.bias", ".masked_bias")  # tied; causal-mask buffers
    if unexpected or any(not m.endswith(allowed) for m in missing):
      raise ValueError(f"GPT-2 weights do not fit: missing {missing}, unexpected {unexpected}")
    self.initial_loss = self.eval_loss([self.batch(INIT_BATCH)])
    return self.initial_loss

  def batch(self, index, split="train"):
    data = self.data.train if split == "train" else self.data.val
    x, y = common.get_batch(data, self.batch_size, self.seq_len, self.data_seed, index)
    return self._tensors(x, y)

  def _tensors(self, x, y):
    import torch
    return (torch.from_numpy(x).long().to(self.device),
            torch.from_numpy(y).long().to(self.device))

  def info(self):
    return {"params": self.num_params, "initial_loss": self.initial_loss,
            "compile_s": self.compile_s}

  def _loss(self, x, y):
    import torch.nn.functional as F
    with self.autocast():
      logits = self.forward(self.compiled, x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))

  def _train_step(self, x, y, step, update=True):
    import torch
    lr, total, warmup, end = self.lr_args
    if total:
      for group in self.opt.param_groups:
        group["lr"] = common.cosine_lr(step, lr, total, warmup, end)
    loss = self._loss(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    if update:
      self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return loss.item()  # the sync

  def run(self, start, n):
    times, losses = [], []
    for i in range(start, start + n):
      x, y = self.batch(i)
      t0 = time.perf_counter()
      losses.append(self._train_step(x, y, i))
      times.append(time.perf_counter() - t0)
    return times, losses

  def eval_loss(self, batches):
    import torch
    self.model.eval()
    with torch.no_grad():
      losses = [self._loss(x, y).item() for x, y in batches]
    self.model.train()
    return float(np.mean(losses))

  def eval_split(self, split, num_batches, seed=99):
    data = self.data.val if split == "val" else self.data.train
    batches = [common.get_batch(data, self.batch_size, self.seq_len, seed, i)
               for i in range(num_batches)]
    return self.eval_loss([self._tensors(x, y) for x, y in batches])


class ProbeImpl:
  """Matmul probes in the same run: what a plain GEMM sustains right now."""

  def __init__(self, backend="jax", threads=2, device="cpu"):
    if backend == "torch":
      import torch
      torch.set_num_threads(threads)
    self.backend, self.device = backend, device

  def info(self):
    return {}

  def run(self, start, n):
    size = {"n": 8192, "m": 8192, "reps": 20} if self.device == "gpu" else {}
    return ([common.matmul_probe(self.backend, "float32", device=self.device, **size),
             common.matmul_probe(self.backend, "bfloat16", device=self.device, **size)], [])


FACTORY = "benchmarks.train_vs_torch:"


def make_workers(impls: str, threads: int, device: str = "cpu",
                 **kwargs) -> list[common.Worker]:
  """The implementations `impls` (comma-separated) names, as workers (not started);
  `kwargs` (shape, schedule) go to every implementation. `device='gpu'`: every worker
  trains on the GPU (JAX allocating on demand, so that the workers share its memory)."""
  shape = kwargs
  specs = {
      "llmjax": (FACTORY + "LlmjaxImpl", shape),
      "llmjax-bf16": (FACTORY + "LlmjaxImpl", {**shape, "dtype": "bfloat16"}),
      "llmjax-scan": (FACTORY + "LlmjaxImpl", {**shape, "overrides": {"scan_layers": True}}),
      "torch-ref": (FACTORY + "TorchImpl", {**shape, "kind": "ref"}),
      "torch-ref-compile": (FACTORY + "TorchImpl", {**shape, "kind": "ref", "compile": True}),
      "hf-eager": (FACTORY + "TorchImpl", {**shape, "kind": "hf"}),
      "hf-compile": (FACTORY + "TorchImpl", {**shape, "kind": "hf", "compile": True}),
  }
  gpu_env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"} if device == "gpu" else {}
  workers = []
  for name in impls.split(","):
    base, *options = name.split("@")
    if base not in specs:
      raise SystemExit(f"unknown implementation {base!r}; choose from {', '.join(specs)}")
    factory, kwargs = specs[base]
    kwargs, flags = dict(kwargs), [common.thread_env(1)["XLA_FLAGS"]]
    if device == "gpu" and factory.endswith("TorchImpl"):
      kwargs["device"] = device
    where, same_as = {}, [base]
    for option in options:  # llmjax@attention_impl=jax@devices=2@xla=--xla_cpu_enable_fast_math=true
      key, _, value = option.partition("=")
      if key in ("src", "label"):  # another checkout's code (before/after); the row's name
        where[key] = value
        continue
      same_as.append(option)
      if key == "xla":
        flags.append(value)
      elif key == "devices":  # data parallel over CPU devices that split the cores
        kwargs["devices"] = int(value)
        flags.append(f"--xla_force_host_platform_device_count={int(value)}")
      elif key in ("rules", "host_malloc", "dtype"):  # rule set; malloc mode; torch's dtype
        kwargs[key] = value
      else:
        kwargs.setdefault("overrides", {})[key] = _parse_value(value)
    env = {"XLA_FLAGS": " ".join(f for f in flags if f), **gpu_env}
    src = where.get("src") and os.path.abspath(where["src"])
    worker = common.Worker(where.get("label", name), factory, kwargs, threads=threads,
                           env=env, src=src)
    # What the worker measures, without where its code comes from: rows of one spec from
    # two checkouts are compared with each other (`report`).
    worker.spec, worker.is_torch = "@".join(same_as), factory.endswith("TorchImpl")
    workers.append(worker)
  names = [w.name for w in workers]
  if len(set(names)) < len(names) or any(n.startswith("probe") for n in names):
    raise SystemExit(f"implementation names must be unique and not start with 'probe': {names}")
  return workers


def _parse_value(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return {"True": True, "False": False, "None": None}.get(text, text)


def check_same_work(info: dict[str, dict], vocab_size: int = 65, tolerance: float = 0.15):
  """Equal parameter counts, initial losses within `tolerance` of ln(V) and of each other.

  At init the logits have a standard deviation of ~0.02 sqrt(D) (tied embeddings on a
  normalized residual), which adds about half its square to ln(V): 0.08 at the char
  shapes, 0.15 at GPT-2's width; hence a wider `tolerance` there."""
  counts = {name: i["params"] for name, i in info.items() if "params" in i}
  if len(set(counts.values())) > 1:
    raise SystemExit(f"parameter counts differ: {counts}")
  losses = {name: i["initial_loss"] for name, i in info.items() if "initial_loss" in i}
  target = math.log(vocab_size)
  bad = {n: v for n, v in losses.items() if abs(v - target) > tolerance}
  if bad or max(losses.values()) - min(losses.values()) > tolerance:
    raise SystemExit(f"initial losses {losses} are not all within {tolerance} of "
                     f"ln({vocab_size})={target:.3f} and of each other")
  print(f"same work: {next(iter(counts.values())):,} parameters everywhere; initial losses "
        + ", ".join(f"{n} {v:.3f}" for n, v in losses.items()))


def warm_up(workers, steps: int):
  """`steps` untimed training steps per implementation (batches 1..steps), one after the
  other: what a training run has behind it after its first few steps (for llmjax, the heap
  holding its step blocks; glibc's memalign can grow it for a dozen steps, see
  benchmarks/README.md)."""
  for w in workers if steps else []:
    if not w.name.startswith("probe"):
      t0 = time.perf_counter()
      w.call("run", 1, steps)
      print(f"{w.name}: {steps} warm-up steps {time.perf_counter() - t0:.1f}s", flush=True)


def run_rounds(workers, rounds: int, steps: int, tokens_per_step: int, first_batch: int = 1):
  """Round-robin: tokens/s of every worker in every round (probes: GFLOP/s)."""
  results = {w.name: [] for w in workers}
  losses = {w.name: [] for w in workers}
  for r in range(rounds):
    for w in common.rotate(workers, r):
      times, loss = w.call("run", first_batch + r * steps, steps)
      results[w.name].append(times if w.name.startswith("probe") else
                             tokens_per_step * len(times) / sum(times))
      losses[w.name] += loss
    line = "  ".join(f"{n} {v[-1]:.0f}" for n, v in results.items() if not n.startswith("probe"))
    print(f"round {r + 1}/{rounds}: tokens/s {line}", flush=True)
  return results, losses


def report(args, info, results, workers):
  layers, _, width, seq_len, batch = SHAPES[args.shape]
  num_params = next(i["params"] for i in info.values() if "params" in i)
  # the model's own depth and width where llmjax overrides changed the shape's
  layers = next((i["layers"] for i in info.values() if "layers" in i), layers)
  width = next((i["width"] for i in info.values() if "width" in i), width)
  probe = {}
  for k, dtype in enumerate(("float32", "bfloat16")):
    per_round = [max(vals[k] for vals in rnd) for rnd in zip(results["probe-jax"],
                                                             results["probe-torch"])]
    probe[dtype] = statistics.median(per_round) * 1e9
  flops = {"6N+12LdT": common.train_flops_per_token(num_params, layers, width, seq_len),
           "causal": common.train_flops_per_token(num_params, layers, width, seq_len, True)}
  impls = [n for n in results if not n.startswith("probe")]
  peers = [w for w in workers if w.name in impls]  # the probes aside
  torch_names = [w.name for w in peers if w.is_torch]
  # MFU yardsticks: this CPU's fp32 peak and f32 probe; on a GPU, the H100's dense bf16
  # peak and the bf16 probe.
  gpu = args.device == "gpu"
  peak, (probe_dtype, other) = ((common.PEAK_H100_BF16_FLOPS, ("bfloat16", "float32")) if gpu
                                else (common.PEAK_FP32_FLOPS, ("float32", "bfloat16")))
  where = "GPU" if gpu else f"{args.threads} threads each"
  print(f"\n{args.shape}: {num_params:,} params, batch {batch} x {seq_len}, "
        f"{args.warmup_steps} warm-up steps, then {args.rounds} rounds x {args.steps} steps, "
        f"{where}")
  print(f"matmul probe (best of jax/torch, median over rounds): {probe_dtype} "
        f"{probe[probe_dtype] / 1e9:.0f} GFLOP/s, {other} {probe[other] / 1e9:.0f} GFLOP/s; "
        f"theoretical peak {peak / 1e9:.0f} GFLOP/s ({'H100 SXM bf16' if gpu else 'fp32'})")
  for name in impls:
    if info[name].get("xla_flops"):
      print(f"{name}: XLA cost analysis {info[name]['xla_flops'] / 1e9:.3g} GFLOP/step vs "
            f"6N+12LdT {flops['6N+12LdT'] * batch * seq_len / 1e9:.3g} GFLOP/step")
  rows = []
  for name in impls:
    tps = statistics.median(results[name])
    mfu = tps * flops["6N+12LdT"] / peak
    rows.append([name, f"{tps:.0f}", f"{info[name]['compile_s']:.1f}", f"{mfu:.1%}",
                 f"{tps * flops['causal'] / peak:.1%}",
                 f"{tps * flops['6N+12LdT'] / probe[probe_dtype]:.1%}"])
  common.print_table(rows, ["impl", "tokens/s", "first step s", "MFU peak",
                            "MFU peak causal", f"vs {probe_dtype} probe"])
  if torch_names:
    best = [max(results[n][r] for n in torch_names) for r in range(args.rounds)]
    print("\nper-round ratio vs the best PyTorch peer of that round:")
    rows = []
    for name in impls:
      if name in torch_names and len(torch_names) == 1:
        continue
      st = common.ratio_stats(results[name], best)
      rows.append([name, f"{st['median']:.2f}x", f"{st['p25']:.2f}x", f"{st['min']:.2f}x"])
    common.print_table(rows, ["impl", "median", "p25", "min"])
  report_before_after(results, peers)


def report_before_after(results, workers):
  """Per-round ratios of each worker to its `@src` twin (the same spec from another
  checkout): the refactor's own speed change, measured seconds apart."""
  rows = []
  for before in (w for w in workers if w.src):
    for after in (w for w in workers if w.spec == before.spec and w.src != before.src):
      st = common.ratio_stats(results[after.name], results[before.name])
      rows.append([f"{after.name} / {before.name}", f"{st['median']:.2f}x",
                   f"{st['p25']:.2f}x", f"{st['min']:.2f}x"])
  if rows:
    print("\nper-round ratio vs the same implementation from the @src checkout "
          "(> 1: faster than it):")
    common.print_table(rows, ["impls", "median", "p25", "min"])


def loss_curve(args):
  """llmjax f32 vs bf16 (and f32 with another init seed) on the same batches."""
  base = {"shape": args.shape}
  workers = [common.Worker("f32", FACTORY + "LlmjaxImpl", base, threads=args.threads),
             common.Worker("bf16", FACTORY + "LlmjaxImpl", {**base, "dtype": "bfloat16"},
                           threads=args.threads),
             common.Worker("f32-seed1", FACTORY + "LlmjaxImpl", {**base, "seed": 1},
                           threads=args.threads)]
  for w in workers:
    w.start()
  curves = {w.name: [] for w in workers}
  chunk = 20
  for start in range(0, args.curve_steps, chunk):
    for w in workers:
      curves[w.name] += w.call("run", start, min(chunk, args.curve_steps - start))[1]
  window = 20
  means = {n: [float(np.mean(c[i:i + window])) for i in range(0, len(c), window)]
           for n, c in curves.items()}
  print(f"loss every {window} steps (window means), {args.shape}:")
  common.print_table([[f"{(i + 1) * window}"] + [f"{means[n][i]:.4f}" for n in means]
                      for i in range(len(means["f32"]))], ["step"] + list(means))
  bf16 = max(abs(a - b) for a, b in zip(means["bf16"], means["f32"]))
  noise = max(abs(a - b) for a, b in zip(means["f32-seed1"], means["f32"]))
  print(f"max |bf16 - f32| {bf16:.4f}; noise yardstick max |f32 seed1 - f32| {noise:.4f}")
  for w in workers:
    w.stop()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
  parser.add_argument("--warmup_steps", type=int, default=8,
                      help="untimed steps per implementation before the first round")
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--shape", default="nanogpt-char", choices=sorted(SHAPES))
  parser.add_argument("--impls", default="llmjax,llmjax-bf16,torch-ref,hf-eager,hf-compile")
  parser.add_argument("--loss_curve", action="store_true")
  parser.add_argument("--curve_steps", type=int, default=200)
  parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"),
                      help="gpu: every implementation (and probe) on the machine's GPU")
  args = parser.parse_args()
  print(f"cpu: {common.cpu_info()}", flush=True)
  common.corpus(VOCAB.get(args.shape, 65))  # build the cache once, before the workers read it
  if args.loss_curve:
    return loss_curve(args)
  workers = make_workers(args.impls, args.threads, args.device, shape=args.shape)
  probe_env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"} if args.device == "gpu" else {}
  workers += [common.Worker(f"probe-{backend}", FACTORY + "ProbeImpl",
                            {"backend": backend, "device": args.device},
                            threads=args.threads, env=probe_env)
              for backend in ("jax", "torch")]
  info = {}
  for w in workers:
    info[w.name] = w.start()
    if "compile_s" in info[w.name]:
      source = info[w.name].get("llmjax_file")
      print(f"{w.name}: built, first step {info[w.name]['compile_s']:.1f}s"
            + (f", llmjax from {os.path.dirname(source)}" if source else ""), flush=True)
  try:
    check_same_work(info, VOCAB.get(args.shape, 65), 0.3 if args.shape in VOCAB else 0.15)
    _, _, _, seq_len, batch = SHAPES[args.shape]
    warm_up(workers, args.warmup_steps)
    results, _ = run_rounds(workers, args.rounds, args.steps, batch * seq_len,
                            first_batch=1 + args.warmup_steps)
    report(args, info, results, workers)
  finally:
    for w in workers:
      w.stop()


if __name__ == "__main__":
  main()
