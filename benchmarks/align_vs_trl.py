"""Alignment training speed: llmjax's DPO and GRPO train steps vs TRL's DPOTrainer and
GRPOTrainer, on the same GPT-2-shaped model, interleaved in one run.

  .venv/bin/python -m benchmarks.align_vs_trl --rounds 3 [--shape small] [--tasks dpo,grpo]

Model (`--shape`): GPT-2 style (learned positions, LayerNorm, exact GELU, tied head,
dropout 0), float32, random weights; `small` (the default) is lora_vs_peft's "small":
4 layers, 4 heads, 256 wide, context 128, GPT-2's vocabulary of 50257 (16.1M parameters,
most of them the tied embedding); `gpt2-124m` is GPT-2 small itself. llmjax builds it with
benchmarks/train_vs_torch.py's `llmjax_config` (unrolled layers, the C++ float32
attention kernel), TRL gets `transformers.GPT2LMHeadModel` from `torch_model('hf', ...)`,
saved to a temporary directory from which TRL loads both the policy and its reference.
Both sides use AdamW (betas 0.9/0.999, eps 1e-8, no weight decay, lr 1e-5 constant,
gradient clipping at 1.0), no gradient accumulation, one worker process per side with
2 threads (benchmarks/common.py). TRL runs with `bf16=False` and
`gradient_checkpointing=False` (its defaults are True for both), `use_cpu=True`, no
vLLM, no logging or saving; `HF_HUB_OFFLINE=1`, and the tokenizer is a word-level one
built in memory (token i is the word `t{i}`, id V-1 is `<|endoftext|>`), so that text
and ids map one to one and TRL sees exactly the ids llmjax trains on.

What one timed step is, per side:

  DPO (`--pairs` pairs of prompt `--prompt_tokens` + response `--response_tokens` tokens,
  the response ending in EOS; chosen and rejected of equal length, so nothing is padded;
  sigmoid loss, beta `--beta`):
    llmjax  the jitted, donated `make_train_step(model, DPO(beta), ...)` on one batch:
            one forward + backward of the policy over [chosen; rejected] (2 x pairs rows),
            one forward of the frozen reference (`TrainState.frozen['reference']`), the
            per-pair loss, clipping and the AdamW update; ends with block_until_ready.
    TRL     one step of `DPOTrainer.train()` (model given as the saved path, so the
            reference is a second copy loaded from it): from the `on_step_begin` to the
            `on_step_end` callback, i.e. the policy's forward + backward over [chosen;
            rejected] (TRL's chunked log-prob head), the reference forward under no_grad,
            TRL's loss and metrics, clipping, AdamW and zero_grad. Collating the batch
            happens before `on_step_begin` and is not timed (llmjax's batch is also built
            untimed; its host-to-device copy is timed).
  GRPO (`--prompts` prompts of `--prompt_len` tokens, `--num_generations` completions
  each, exactly `--max_new_tokens` sampled tokens per completion at temperature 1, beta
  `--grpo_beta` > 0 so both hold a reference, one update per generation, reward: the
  fraction of even token ids in the completion, a function of the ids on both sides):
    llmjax  the jitted `make_train_step(model, GRPO(...), ...)` (the experience path):
            the rollout (prefill + `max_new_tokens` cached steps in `lax.scan`) of
            prompts x generations rows, the reward, group advantages, the reference's
            log-probs (one forward), the policy's forward + backward and the AdamW update.
            `eos_id=-1`, an id never sampled: no completion is cut short (the rollout
            always runs `max_new_tokens` steps anyway; this keeps the loss masks full,
            as TRL's are).
    TRL     one step of `GRPOTrainer.train()` (`loss_type='grpo'`, the per-completion
            token mean llmjax uses, `scale_rewards='group'`, `num_iterations=1`), timed as
            for DPO: `transformers` `generate` (sampling, KV cache) of the same rows with
            `min_new_tokens = max_new_tokens`, so EOS is suppressed and every completion
            has exactly `max_new_tokens` tokens; decoding to text, the reward function,
            advantages, the reference forward, the policy's forward + backward (TRL's
            chunked log-prob + entropy head), AdamW.
  Checked before timing (the run stops otherwise): equal parameter counts, TRL's collated
  DPO batch is [2 x pairs, prompt + response] with no padding and the completion mask on
  the responses, llmjax scores `pairs` pairs; every GRPO completion on both sides has
  max_new_tokens tokens (checked again after every round).

Each worker takes its first step (llmjax: the compile) and `--warmup_steps` more untimed;
then per round every worker does `--steps` timed steps, in a rotating order. Printed:
per round pairs/s (DPO) and completions/s (GRPO) of each side, then per task the median
rate and the per-round ratio llmjax / TRL (median, min). Targets (the issue): DPO >= 1.2x,
GRPO >= 2x. Figures: benchmarks/README.md, "Alignment training vs TRL". On a machine
whose cores other processes keep busy, also run `--threads 1`: PyTorch eager's per-op
OpenMP barriers then slow TRL with 2 threads far more than llmjax (there: TRL 1.8x / 4.1x
faster with one thread, llmjax unchanged), which inflates the 2-thread ratios.
"""

import argparse
import os
import queue
import tempfile
import threading
import time

import numpy as np

from benchmarks import common
from benchmarks import train_vs_torch as tvt

FACTORY = "benchmarks.align_vs_trl:"
# name -> (num_layers, num_heads, width, context, vocab)
SHAPES = {"small": (4, 4, 256, 128, 50257), "gpt2-124m": (12, 12, 768, 1024, 50257),
          "smoke": (2, 2, 32, 32, 512)}
# name -> workload: DPO pairs and lengths; GRPO prompts, group size and lengths
WORKLOADS = {
    "small": {"pairs": 4, "prompt_tokens": 64, "response_tokens": 64,
              "prompts": 4, "num_generations": 4, "prompt_len": 32, "max_new_tokens": 32},
    "gpt2-124m": {"pairs": 4, "prompt_tokens": 128, "response_tokens": 128,
                  "prompts": 2, "num_generations": 4, "prompt_len": 32, "max_new_tokens": 64},
    "smoke": {"pairs": 2, "prompt_tokens": 8, "response_tokens": 8,
              "prompts": 2, "num_generations": 2, "prompt_len": 8, "max_new_tokens": 8},
}
LR, DPO_BETA, GRPO_BETA = 1e-5, 0.1, 0.04
DATA_ROWS = 64  # distinct pairs / prompts in the data set (cycled)
REWARD = "even_ids"


def _shape_key(shape: str) -> str:
  """Registers `shape` in train_vs_torch's table (a prefixed name: never shadows its own)."""
  layers, heads, width, context, _ = SHAPES[shape]
  key = f"align-{shape}"
  tvt.SHAPES.setdefault(key, (layers, heads, width, context, 1))
  return key


def even_ids(tokens, mask, tables):
  """The reward: the fraction of a completion's tokens with an even id, `[B]` float32."""
  import jax.numpy as jnp
  del tables
  hits = jnp.sum(((tokens % 2) == 0) & mask, axis=1)
  return (hits / jnp.maximum(jnp.sum(mask, axis=1), 1)).astype(jnp.float32)


def trl_even_ids(prompts, completions, completion_ids, **kwargs):
  """The same reward for TRL: a function of the completion's token ids."""
  del prompts, completions, kwargs
  return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


# --------------------------------------------------------------------------- data


def dpo_pairs(vocab: int, prompt_tokens: int, response_tokens: int, rows: int = DATA_ROWS,
              seed: int = 0) -> dict[str, np.ndarray]:
  """`{'prompt' [N, P], 'chosen' [N, R], 'rejected' [N, R]}` int32 ids; responses end in
  EOS (id V-1), which appears nowhere else."""
  rng = np.random.default_rng(seed)
  ids = lambda n: rng.integers(0, vocab - 1, (rows, n), dtype=np.int32)
  eos = np.full((rows, 1), vocab - 1, np.int32)
  return {"prompt": ids(prompt_tokens),
          "chosen": np.concatenate([ids(response_tokens - 1), eos], axis=1),
          "rejected": np.concatenate([ids(response_tokens - 1), eos], axis=1)}


def grpo_prompts(vocab: int, prompt_len: int, rows: int = DATA_ROWS, seed: int = 1):
  """`[N, prompt_len]` int32 prompt ids (no EOS)."""
  return np.random.default_rng(seed).integers(0, vocab - 1, (rows, prompt_len), dtype=np.int32)


def text(ids) -> str:
  """Ids as the word-level tokenizer's text (`t{i}`; V-1 is `<|endoftext|>`)."""
  return " ".join(f"t{int(i)}" for i in ids)


def word_tokenizer(vocab: int):
  """A `PreTrainedTokenizerFast` whose token i is the word `t{i}` (id V-1 is EOS = pad):
  built in memory, nothing downloaded."""
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  eos = "<|endoftext|>"
  words = {f"t{i}": i for i in range(vocab - 1)}
  words[eos] = vocab - 1
  tok = Tokenizer(models.WordLevel(words, unk_token=eos))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos,
                                              pad_token=eos)


# --------------------------------------------------------------------------- llmjax


class _Llmjax:
  """A llmjax train step on a GPT-2-shaped model, jitted with donation; subclasses give
  the objective, `_batch(index)` and `_check(metrics)`."""

  def __init__(self, objective, shape="small", seed=0, host_malloc="reuse"):
    from llmjax.train import host_memory
    host_memory.configure(host_malloc)  # as the train loop does, before jax starts
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from llmjax.models.transformer import Transformer
    from llmjax.optim import optimizers
    from llmjax.train import step as step_lib
    from llmjax.train.state import TrainState

    self.shape, self.work = shape, WORKLOADS[shape]
    self.vocab = SHAPES[shape][4]
    cfg = tvt.llmjax_config(_shape_key(shape), vocab_size=self.vocab)
    model = Transformer(cfg)
    tx = optimizers.adamw(lambda _: LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                          clip_norm=1.0)
    tokens = jnp.zeros((1, cfg.max_len), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), tokens)["params"])
    self.num_params = int(sum(np.size(p) for p in jax.tree.leaves(params)))
    self.state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=tx.init(params),
                            rng=jax.random.key_data(jax.random.PRNGKey(seed + 1)),
                            frozen=objective.frozen_trees(params),
                            objective=getattr(objective, "initial_state", dict)())
    self.step = jax.jit(step_lib.make_train_step(model, objective, tx, lambda _: LR),
                        donate_argnums=0)
    start = time.perf_counter()
    self._run_one(0)
    self.first_step_s = time.perf_counter() - start

  def _run_one(self, index):
    import jax

    from llmjax.train import host_memory
    batch = self._batch(index)
    t0 = time.perf_counter()
    self.state, metrics = self.step(self.state, batch)
    jax.block_until_ready((self.state, metrics))
    elapsed = time.perf_counter() - t0
    host_memory.trim_if_grown()  # as the train loop does after each step
    metrics = jax.device_get(metrics)
    self._check(metrics)
    return elapsed, float(metrics["loss"])

  def info(self):
    return {"params": self.num_params, "first_step_s": self.first_step_s, "checks": self.checks}

  def run(self, start, n):
    """`n` timed steps on batches start..start+n-1: (seconds per step, losses)."""
    times, losses = [], []
    for i in range(start, start + n):
      elapsed, loss = self._run_one(i)
      times.append(elapsed)
      losses.append(loss)
    return times, losses


class LlmjaxDPO(_Llmjax):
  """`DPO(beta, loss='sigmoid')` with the frozen reference in `TrainState.frozen`."""

  def __init__(self, shape="small", beta=DPO_BETA, **kwargs):
    from llmjax.objectives.dpo import DPO
    work = WORKLOADS[shape]
    self.data = dpo_pairs(SHAPES[shape][4], work["prompt_tokens"], work["response_tokens"])
    self.checks = f"rows [{2 * work['pairs']}, {work['prompt_tokens'] + work['response_tokens']}]"
    super().__init__(DPO(beta=beta, loss="sigmoid"), shape, **kwargs)

  def _batch(self, index):
    pairs, p = self.work["pairs"], self.work["prompt_tokens"]
    take = (index * pairs + np.arange(pairs)) % DATA_ROWS
    out = {}
    for side in ("chosen", "rejected"):
      rows = np.concatenate([self.data["prompt"][take], self.data[side][take]], axis=1)
      mask = np.zeros_like(rows)
      mask[:, p:] = 1  # the response and its EOS
      out[f"{side}_tokens"], out[f"{side}_mask"] = rows, mask
    return out

  def _check(self, metrics):
    if int(metrics["pairs"]) != self.work["pairs"]:
      raise RuntimeError(f"llmjax DPO scored {metrics['pairs']} pairs, not {self.work['pairs']}")


class LlmjaxGRPO(_Llmjax):
  """`GRPO` with beta > 0 (a frozen reference) and the `even_ids` reward."""

  def __init__(self, shape="small", beta=GRPO_BETA, **kwargs):
    from llmjax.objectives import rewards
    from llmjax.objectives.grpo import GRPO
    rewards.register(REWARD)(even_ids)
    work = WORKLOADS[shape]
    self.prompts = grpo_prompts(SHAPES[shape][4], work["prompt_len"])
    self.checks = f"completions of {work['max_new_tokens']} tokens"
    objective = GRPO(prompt_len=work["prompt_len"], max_new_tokens=work["max_new_tokens"],
                     num_generations=work["num_generations"], beta=beta, reward=REWARD,
                     temperature=1.0, eos_id=-1)
    super().__init__(objective, shape, **kwargs)

  def _batch(self, index):
    take = (index * self.work["prompts"] + np.arange(self.work["prompts"])) % DATA_ROWS
    return {"prompt": self.prompts[take]}

  def _check(self, metrics):
    if float(metrics["completion_length"]) != self.work["max_new_tokens"]:
      raise RuntimeError(f"llmjax GRPO completions average {metrics['completion_length']} "
                         f"tokens, not {self.work['max_new_tokens']}")


# --------------------------------------------------------------------------- TRL


class _StepGate:
  """A `TrainerCallback` that holds `trainer.train()` (run in a thread) at every step's
  start until `run` lets one step go, and times it from `on_step_begin` to `on_step_end`."""

  def __init__(self):
    self.ready, self.go, self.done = threading.Event(), threading.Semaphore(0), queue.Queue()
    self._t0 = 0.0

  def callback(self):
    from transformers import TrainerCallback
    gate = self

    class Gate(TrainerCallback):
      def on_step_begin(self, args, state, control, **kwargs):
        gate.ready.set()
        gate.go.acquire()
        gate.ready.clear()
        gate._t0 = time.perf_counter()

      def on_step_end(self, args, state, control, **kwargs):
        gate.done.put(("ok", time.perf_counter() - gate._t0))

    return Gate()

  def wait_ready(self, thread):
    while not self.ready.wait(timeout=1.0):
      if not thread.is_alive():
        self._raise()

  def step(self, thread) -> float:
    """Lets one step run; returns its seconds once the trainer waits at the next step."""
    self.wait_ready(thread)
    self.go.release()
    status, value = self.done.get()
    if status != "ok":
      raise RuntimeError(value)
    self.wait_ready(thread)  # the step's tail (logging, the next batch) is done, untimed
    return value

  def _raise(self):
    status, value = self.done.get(timeout=5)
    raise RuntimeError(value if status != "ok" else "the TRL trainer stopped")


class _Trl:
  """A TRL trainer driven through `train()` in a thread, one gated step at a time.

  Everything torch does in this process happens in that thread (building and saving the
  model, the trainer, training), so the process has one OpenMP team, as a plain training
  script has; the main thread only answers the parent."""

  def __init__(self, shape, threads, seed=0):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    self.shape, self.work, self.threads, self.seed = shape, WORKLOADS[shape], threads, seed
    self.vocab = SHAPES[shape][4]
    self._tmp = tempfile.TemporaryDirectory(prefix="align_vs_trl_")
    self.gate = _StepGate()
    self._thread = threading.Thread(target=self._train, daemon=True)
    self._thread.start()
    self.gate.wait_ready(self._thread)
    start = time.perf_counter()
    self.gate.step(self._thread)
    self.first_step_s = time.perf_counter() - start
    self.checks = self._check()

  def _build(self):
    import torch
    torch.set_num_threads(self.threads)  # per thread (OpenMP's setting is)
    torch.manual_seed(self.seed)
    self.model_dir = os.path.join(self._tmp.name, "init")
    model = tvt.torch_model("hf", _shape_key(self.shape), vocab_size=self.vocab)
    model.config.eos_token_id = model.config.pad_token_id = self.vocab - 1
    model.generation_config.eos_token_id = self.vocab - 1
    model.save_pretrained(self.model_dir)
    self.tokenizer = word_tokenizer(self.vocab)
    self.tokenizer.save_pretrained(self.model_dir)
    self.trainer = self._make_trainer()
    self.num_params = sum(p.numel() for p in self.trainer.model.parameters())
    self._check_data()

  def _check_data(self):
    """Checks of the trainer's batches, before training (in the thread)."""

  def _common_args(self):
    return {"output_dir": os.path.join(self._tmp.name, "out"), "use_cpu": True,
            "bf16": False, "fp16": False, "gradient_checkpointing": False,
            "learning_rate": LR, "lr_scheduler_type": "constant", "warmup_steps": 0,
            "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8,
            "max_grad_norm": 1.0, "gradient_accumulation_steps": 1, "max_steps": 10**6,
            "logging_steps": 10**6, "save_strategy": "no", "report_to": "none",
            "disable_tqdm": True, "dataloader_num_workers": 0, "seed": 0}

  def _train(self):
    try:
      self._build()
      self.trainer.train()
      self.gate.done.put(("error", "trainer.train() returned (max_steps reached)"))
    except BaseException:  # noqa: BLE001 (reported to the caller of run)
      import traceback
      self.gate.done.put(("error", traceback.format_exc()))

  def info(self):
    optimizer = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)
    return {"params": self.num_params, "first_step_s": self.first_step_s, "checks": self.checks,
            "optimizer": type(optimizer).__name__}

  def run(self, start, n):
    """`n` timed steps (the trainer's own data order): (seconds per step, no losses)."""
    del start
    return [self.gate.step(self._thread) for _ in range(n)], []


class TrlDPO(_Trl):
  """`trl.DPOTrainer`, sigmoid loss, policy and reference loaded from the saved init."""

  def __init__(self, shape="small", beta=DPO_BETA, threads=2):
    self.beta = beta
    super().__init__(shape, threads)

  def _make_trainer(self):
    import datasets
    import trl
    work = self.work
    data = dpo_pairs(self.vocab, work["prompt_tokens"], work["response_tokens"])
    rows = {"prompt": [text(r) for r in data["prompt"]],
            "chosen": [" " + text(r) for r in data["chosen"]],
            "rejected": [" " + text(r) for r in data["rejected"]]}
    args = trl.DPOConfig(**self._common_args(), per_device_train_batch_size=work["pairs"],
                         beta=self.beta, loss_type=["sigmoid"],
                         max_length=work["prompt_tokens"] + work["response_tokens"],
                         precompute_ref_log_probs=False,
                         model_init_kwargs={"dtype": "float32"})
    return trl.DPOTrainer(model=self.model_dir, args=args,
                          train_dataset=datasets.Dataset.from_dict(rows),
                          processing_class=self.tokenizer, callbacks=[self.gate.callback()])

  def _check_data(self):
    batch = next(iter(self.trainer.get_train_dataloader()))
    want = (2 * self.work["pairs"], self.work["prompt_tokens"] + self.work["response_tokens"])
    if tuple(batch["input_ids"].shape) != want or not bool(batch["attention_mask"].all()):
      raise RuntimeError(f"TRL's DPO batch is {tuple(batch['input_ids'].shape)} with "
                         f"{int((batch['attention_mask'] == 0).sum())} pad tokens; want {want}, none")
    if int(batch["completion_mask"].sum()) != want[0] * self.work["response_tokens"]:
      raise RuntimeError("TRL's DPO completion mask does not cover exactly the responses")

  def _check(self):
    work = self.work
    return f"rows [{2 * work['pairs']}, {work['prompt_tokens'] + work['response_tokens']}]"


class TrlGRPO(_Trl):
  """`trl.GRPOTrainer` with a reference (beta > 0), transformers generation."""

  def __init__(self, shape="small", beta=GRPO_BETA, threads=2):
    self.beta = beta
    super().__init__(shape, threads)

  def _make_trainer(self):
    import datasets
    import trl
    work = self.work
    prompts = [text(r) for r in grpo_prompts(self.vocab, work["prompt_len"])]
    rows = work["prompts"] * work["num_generations"]  # TRL's batch counts completions
    args = trl.GRPOConfig(**self._common_args(), per_device_train_batch_size=rows,
                          num_generations=work["num_generations"],
                          max_completion_length=work["max_new_tokens"],
                          generation_kwargs={"min_new_tokens": work["max_new_tokens"]},
                          temperature=1.0, top_p=1.0, top_k=0, beta=self.beta,
                          loss_type="grpo", scale_rewards="group", num_iterations=1,
                          use_vllm=False, model_init_kwargs={"dtype": "float32"})
    return trl.GRPOTrainer(model=self.model_dir, reward_funcs=trl_even_ids, args=args,
                           train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                           processing_class=self.tokenizer, callbacks=[self.gate.callback()])

  def _check(self):
    metrics, want = self.trainer._metrics["train"], self.work["max_new_tokens"]
    lengths = (metrics["completions/min_length"][-1], metrics["completions/max_length"][-1])
    if lengths != (want, want):
      raise RuntimeError(f"TRL's completions have {lengths} (min, max) tokens, not {want}")
    return f"completions of {want} tokens"

  def run(self, start, n):
    times, losses = super().run(start, n)
    self._check()
    return times, losses


# --------------------------------------------------------------------------- driver


IMPLS = {"dpo": ("LlmjaxDPO", "TrlDPO"), "grpo": ("LlmjaxGRPO", "TrlGRPO")}


class InProcess:
  """`common.Worker`'s interface on an object in this process (the smoke test)."""

  def __init__(self, name, impl):
    self.name, self.impl = name, impl

  def call(self, method, *args):
    return getattr(self.impl, method)(*args)


def make_workers(tasks, shape, threads, dpo_beta=DPO_BETA, grpo_beta=GRPO_BETA):
  workers = []
  for task in tasks:
    beta = dpo_beta if task == "dpo" else grpo_beta
    ours, theirs = IMPLS[task]
    workers.append(common.Worker(f"llmjax-{task}", FACTORY + ours,
                                 {"shape": shape, "beta": beta}, threads=threads))
    workers.append(common.Worker(f"trl-{task}", FACTORY + theirs,
                                 {"shape": shape, "beta": beta, "threads": threads},
                                 threads=threads, env={"HF_HUB_OFFLINE": "1"}))
  return workers


def units(task, shape) -> tuple[str, int]:
  """The unit of a task's rate and how many of it one step does."""
  work = WORKLOADS[shape]
  if task == "dpo":
    return "pairs/s", work["pairs"]
  return "completions/s", work["prompts"] * work["num_generations"]


def run_rounds(workers, shape, rounds, steps, warmup_steps, first_batch=1):
  """Warm-up, then round-robin: `{name: [rate per round]}`."""
  for w in workers if warmup_steps else []:
    t0 = time.perf_counter()
    w.call("run", first_batch, warmup_steps)
    print(f"{w.name}: {warmup_steps} warm-up steps {time.perf_counter() - t0:.1f}s", flush=True)
  results = {w.name: [] for w in workers}
  start = first_batch + warmup_steps
  for r in range(rounds):
    for w in common.rotate(workers, r):
      times, _ = w.call("run", start + r * steps, steps)
      _, per_step = units(w.name.split("-")[-1], shape)
      results[w.name].append(per_step * len(times) / sum(times))
    print(f"round {r + 1}/{rounds}: " + "  ".join(
        f"{n} {v[-1]:.2f} {units(n.split('-')[-1], shape)[0]}" for n, v in results.items()),
        flush=True)
  return results


def report(info, results, shape):
  rows = []
  for name, rates in results.items():
    task = name.split("-")[-1]
    unit, per_step = units(task, shape)
    peer = f"trl-{task}"
    ratio = (common.ratio_stats(rates, results[peer])
             if name.startswith("llmjax") and peer in results else None)
    rows.append([name, unit, float(np.median(rates)), float(np.median(rates)) / per_step,
                 f"{ratio['median']:.2f}x" if ratio else "-",
                 f"{ratio['min']:.2f}x" if ratio else "-",
                 f"{info[name]['first_step_s']:.1f}", f"{info[name]['params']:,}",
                 info[name]["checks"]])
  common.print_table(rows, ["impl", "unit", "rate (median)", "steps/s", "x TRL (median)",
                            "x TRL (min)", "first step s", "params", "checked"])
  print(f"(rounds: {len(next(iter(results.values())))}; x TRL = per-round ratio llmjax / TRL; "
        "targets: DPO >= 1.2x, GRPO >= 2x)")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
  parser.add_argument("--warmup_steps", type=int, default=2)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
  parser.add_argument("--tasks", default="dpo,grpo")
  parser.add_argument("--beta", type=float, default=DPO_BETA, help="DPO's beta")
  parser.add_argument("--grpo_beta", type=float, default=GRPO_BETA)
  args = parser.parse_args(argv)
  tasks = args.tasks.split(",")
  if set(tasks) - set(IMPLS):
    raise SystemExit(f"--tasks: choose from {sorted(IMPLS)}")
  print(f"cpu: {common.cpu_info()}", flush=True)
  layers, heads, width, context, vocab = SHAPES[args.shape]
  print(f"shape {args.shape}: {layers} layers, {heads} heads, {width} wide, context {context}, "
        f"vocab {vocab}; workload {WORKLOADS[args.shape]}", flush=True)
  workers = make_workers(tasks, args.shape, args.threads, args.beta, args.grpo_beta)
  info = {}
  try:
    for w in workers:
      info[w.name] = w.start()
      print(f"{w.name}: built, first step {info[w.name]['first_step_s']:.1f}s, "
            f"{info[w.name]['params']:,} parameters, checked {info[w.name]['checks']}"
            + (f", optimizer {info[w.name]['optimizer']}" if "optimizer" in info[w.name] else ""),
            flush=True)
    for task in tasks:
      counts = {info[f"{side}-{task}"]["params"] for side in ("llmjax", "trl")}
      if len(counts) != 1:
        raise SystemExit(f"{task}: unequal parameter counts {counts}")
    results = run_rounds(workers, args.shape, args.rounds, args.steps, args.warmup_steps)
  finally:
    for w in workers:
      w.stop()
  report(info, results, args.shape)


if __name__ == "__main__":
  main()
