"""The training loop, linear as the recipe reads:

mesh -> tokenizer and data -> abstract init -> sharded init -> restore -> jit once (donated
state) -> loop with logging, eval, checkpoints, NaN/Inf checks and preemption handling.
"""

import dataclasses
import functools
import os
import shutil
import signal
import time
from typing import NamedTuple

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import PartitionSpec

from llmjax.checkpoint import manager as ckpt_lib
from llmjax.errors import NonFiniteError, UserError
from llmjax.models.config import TransformerConfig
from llmjax.models.transformer import Transformer
from llmjax.objectives import losses
from llmjax.objectives.lm import CausalLM
from llmjax.optim.optimizers import OptimizerConfig
from llmjax.scaling import counts
from llmjax.sharding import mesh as mesh_lib
from llmjax.sharding import partition
from llmjax.sharding import rules as rules_lib
from llmjax.train import host_memory, inputs, warm_start
from llmjax.train import metrics as metrics_lib
from llmjax.train import step as step_lib
from llmjax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Loop knobs (what gin binds as `TrainConfig.*`)."""

  num_steps: int = 1000           # the schedule's length: where the run ends
  stop_at_step: int | None = None # stop (with a checkpoint) earlier in this invocation;
                                  # re-running resumes as if never interrupted
  log_every: int = 50
  eval_every: int = 250
  eval_batches: int = 20
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  seed: int = 0
  grad_accum_steps: int = 1
  on_nonfinite: str = "halt"      # halt | skip: what a NaN/Inf loss or gradient does
  mesh_data: int = -1             # mesh sizes; -1 takes the remaining devices
  mesh_fsdp: int = 1
  mesh_tensor: int = 1
  rules: str = "dp"               # dp | fsdp | fsdp_tp
  pad_vocab_to_multiple: int = 1  # model vocab = tokenizer vocab rounded up to this
  peak_flops: float = 256e9       # per device, for MFU (2-core AVX-512 CPU fp32 peak)
  sample_prompt: str = "ROMEO"
  sample_tokens: int = 200
  sample_temperature: float = 0.8
  progress_bar: bool = True
  init_from: str | None = None    # a workdir whose latest params start this run at step 0
                                  # (fine-tuning; see llmjax/train/warm_start.py)
  host_malloc: str = "reuse"      # reuse | reuse_threads | system: keep freed step
                                  # buffers mapped (CPU; llmjax/train/host_memory.py)


class TrainResult(NamedTuple):
  state: TrainState
  model: Transformer
  tokenizer: object
  config: TrainConfig
  objective: object = None  # `can_sample = False` objectives skip the end-of-run sample


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. inside a test runner thread)
      self._old = None

  def _handle(self, signum, frame):
    self.requested = True

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _check_workdir(workdir):
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_probe")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserError(f"workdir {workdir} is not writable ({e.strerror}); pass a --workdir "
                    "you can write to.") from e


def _init_inputs(objective, lengths):
  """`model.init` keyword arguments: the objective's own (encoder-decoder, classifier), or
  one row of tokens for objectives that define none (causal LM)."""
  if hasattr(objective, "init_inputs"):
    return objective.init_inputs(lengths)
  return {"tokens": jax.numpy.zeros((1, lengths["tokens"]), jax.numpy.int32)}


def _init_state(model, tx, cfg, mesh, rules, init_inputs):
  """Abstract init -> logical specs -> mesh shardings -> jitted init with out_shardings."""

  def init_boxed(rng):  # params wrapped in their logical-axis metadata
    return model.init({"params": rng}, **init_inputs)["params"]

  # Built directly sharded: abstract init -> logical specs -> rule set -> out_shardings.
  return partition.init_train_state(init_boxed, tx, mesh, cfg.rules, cfg.seed)


def _evaluate(eval_step, params, make_eval_iter, num_batches, put):
  total = None
  for i, batch in enumerate(make_eval_iter()):
    if i >= num_batches:
      break
    sums = eval_step(params, put(batch))
    total = sums if total is None else jax.tree.map(lambda a, b: a + b, total, sums)
  if total is None:
    return {}
  summary = losses.summarize(jax.device_get(total))
  return {f"eval_{k}": v for k, v in summary.items()}


def _batch_putter(mesh, rules):
  """Host-local numpy batch [B_local, L] -> global jax.Array sharded along BATCH."""
  from llmjax.sharding import axes
  sharding = nn.logical_to_mesh_sharding(PartitionSpec(axes.BATCH, None), mesh, rules)

  def put(batch):
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}

  return put, sharding


def _check_batch_split(batch_size, mesh, rules):
  """The global batch must split evenly over the mesh axes that BATCH maps onto."""
  from llmjax.sharding import axes
  spec = nn.logical_to_mesh_axes((axes.BATCH,), rules)[0]
  names = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  ways = int(np.prod([mesh.shape[n] for n in names]))
  if batch_size % ways:
    raise UserError(f"global batch_size={batch_size} does not split over the {ways} "
                    f"data-parallel shards of the mesh {dict(mesh.shape)}: make "
                    f"DataConfig.batch_size a multiple of {ways} (or change TrainConfig.mesh_*).")


def _build_data(data_cfg, tokenizer, objective, cfg):
  from llmjax.data import pipeline
  if data_cfg.batch_size % cfg.grad_accum_steps:
    raise UserError(f"batch_size={data_cfg.batch_size} is not divisible by grad_accum_steps="
                    f"{cfg.grad_accum_steps}; change one of them.")
  train_iter = pipeline.make_pipeline(data_cfg, tokenizer, objective.feature_fn)
  eval_cfg = dataclasses.replace(data_cfg, split="validation")
  make_eval_iter = lambda: pipeline.make_eval_pipeline(eval_cfg, tokenizer, objective.feature_fn)
  return train_iter, make_eval_iter


def _meta_checker(ckpt, model_cfg, tok):
  """Rejects a checkpoint step made for another model or tokenizer before arrays load."""
  want = dataclasses.asdict(model_cfg)

  def check(meta):
    saved = meta.get("model_config", {})
    if tok is not None and meta.get("tokenizer") not in (None, ckpt_lib.encode_bytes(
        tok.serialized())):
      raise UserError(
          f"the tokenizer ({tok.vocab_size} pieces) is not the one the checkpoint in "
          f"{ckpt.directory} was trained with (its embedding has {saved.get('vocab_size')} "
          "rows); put the run's original tokenizer.model back into the workdir (a copy is "
          "in every checkpoint's meta) or use a new --workdir.")
    if saved and saved != want:
      diff = {k: (saved.get(k), v) for k, v in want.items() if saved.get(k) != v}
      raise UserError(f"the checkpoint in {ckpt.directory} was trained with a different "
                      f"model config (field: (checkpoint, now) = {diff}); use a new "
                      "--workdir or restore the original config.")

  return check


def _restore(ckpt, state, shardings, train_iter, model_cfg, log, tok=None):
  if ckpt.latest_step() is None:
    return state
  abstract = ckpt_lib.abstract_like(state, shardings)
  state, data_state, _ = ckpt.restore(abstract, check_meta=_meta_checker(ckpt, model_cfg, tok))
  for bad, why in sorted(ckpt.bad_steps.items()):
    log(f"checkpoint step {bad} in {ckpt.directory} is bad and was skipped: {why}")
  train_iter.set_state(data_state)
  log(f"resumed from step {int(state.step)} in {ckpt.directory}")
  return state


def _no_partial_workdir(fn):
  """A run stopped by a UserError before its first checkpoint leaves the workdir as it
  found it: what it wrote (a freshly trained tokenizer, the operative config) would
  otherwise be silently reused by the next run in that workdir."""

  @functools.wraps(fn)
  def wrapper(workdir, *args, **kwargs):
    path = os.path.abspath(workdir)
    before = set(os.listdir(path)) if os.path.isdir(path) else None
    try:
      return fn(workdir, *args, **kwargs)
    except UserError:
      checkpoints = os.path.join(path, "checkpoints")
      saved = os.path.isdir(checkpoints) and os.listdir(checkpoints)  # even one in flight
      if os.path.isdir(path) and not saved and jax.process_index() == 0:
        for name in set(os.listdir(path)) - (before or set()):
          target = os.path.join(path, name)
          if os.path.isdir(target):
            shutil.rmtree(target)
          else:
            os.remove(target)
        if before is None:
          os.rmdir(path)
      raise

  return wrapper


@_no_partial_workdir
def train(workdir: str, *, model: TransformerConfig | None = None, data, tokenizer: inputs.TokenizerSpec,
          optimizer: OptimizerConfig | None = None, objective=None,
          config: TrainConfig | None = None, operative_config: str = "", log=print):
  """Trains `model` on `data` in `workdir`, resuming from its latest checkpoint if any.

  Returns a TrainResult (final state, the network, the tokenizer, the loop config). Writes metrics.jsonl, TensorBoard events, checkpoints,
  the tokenizer, and loss_curve.png into `workdir`.
  """
  optimizer, objective = optimizer or OptimizerConfig(), objective or CausalLM()
  config = config or TrainConfig()
  host_memory.configure(config.host_malloc)  # before the first jax computation
  workdir = os.path.abspath(workdir)
  _check_workdir(workdir)
  source = warm_start.load(config.init_from) if config.init_from else None
  if model is None:
    if source is None:
      raise UserError("no model config: bind `train.model` in gin (e.g. add "
                      "--gin_file=gin_configs/models/tiny.gin) or set TrainConfig.init_from.")
    model = source.model_config
  if source is not None and source.tokenizer_path and not tokenizer.path:
    tokenizer = dataclasses.replace(tokenizer, path=source.tokenizer_path)
  if config.on_nonfinite not in ("halt", "skip"):
    raise UserError(f"TrainConfig.on_nonfinite={config.on_nonfinite!r}; use 'halt' or 'skip'.")
  mesh = mesh_lib.make_mesh(config.mesh_data, config.mesh_fsdp, config.mesh_tensor)
  rules = rules_lib.get_rules(config.rules)
  _check_batch_split(data.batch_size, mesh, rules)
  tok = inputs.resolve_tokenizer(tokenizer, workdir, data.dataset, data.data_dir,
                                 data.text_key, log=log, input_dir=data.input_dir)
  multiple = config.pad_vocab_to_multiple
  model_cfg = model.replace(vocab_size=-(-tok.vocab_size // multiple) * multiple)
  if source is not None:  # the source's embedding table decides the vocabulary
    model_cfg = model.replace(vocab_size=source.model_config.vocab_size)
    if tok.vocab_size > model_cfg.vocab_size:
      raise UserError(f"the tokenizer has {tok.vocab_size} pieces but the init_from model "
                      f"only {model_cfg.vocab_size} embeddings; use the source's own "
                      "tokenizer (leave TokenizerSpec.path unset).")
  row_len = max(data.lengths().values())  # seq_len, or the longest packed feature
  if row_len > model_cfg.max_len and model_cfg.position == "learned":
    raise UserError(f"data row length {row_len} (seq_len / feature_lengths) exceeds the "
                    f"model's max_len={model_cfg.max_len}; shorten the rows or raise max_len.")
  net = Transformer(model_cfg)
  train_iter, make_eval_iter = _build_data(data, tok, objective, config)
  tx, schedule = optimizer.make(config.num_steps)
  state, shardings = _init_state(net, tx, config, mesh, rules,
                                 _init_inputs(objective, data.lengths()))
  num_params = counts.count_params(state.params)
  log(f"model: {num_params:,} parameters on a {dict(mesh.shape)} mesh ({config.rules})")

  ckpt = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                    save_every=config.checkpoint_every,
                                    keep=config.keep_checkpoints, cleanup_tmp=True)
  state = _restore(ckpt, state, shardings, train_iter, model_cfg, log, tok)
  if source is not None and ckpt.latest_step() is None:
    state = state.replace(params=warm_start.restore_params(source, state.params,
                                                           shardings.params))
    log(f"initialized parameters from {source.workdir} (step {source.step})")
  if operative_config and jax.process_index() == 0:  # after restore: a rejected config
    path = os.path.join(workdir, "operative_config.gin")  # must not replace the run's own
    with open(path + ".tmp", "w") as f:
      f.write(operative_config)
    os.replace(path + ".tmp", path)
  meta = {"model_config": dataclasses.asdict(model_cfg), "operative_config": operative_config,
          "tokenizer": ckpt_lib.encode_bytes(tok.serialized()), "num_params": num_params}

  put, batch_sharding = _batch_putter(mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    train_step = jax.jit(
        step_lib.make_train_step(net, objective, tx, schedule,
                                 grad_accum_steps=config.grad_accum_steps),
        in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
        donate_argnums=0)
    eval_step = jax.jit(step_lib.make_eval_step(net, objective))
    flops = counts.train_flops_per_token(num_params, model_cfg.num_layers,
                                         model_cfg.embed_dim, data.seq_len)
    tokens_per_step = data.batch_size * data.seq_len
    state = _run(state, train_step, eval_step, train_iter, make_eval_iter, put, ckpt, meta,
                 config, workdir, flops * tokens_per_step / (config.peak_flops *
                                                            jax.device_count()),
                 tokens_per_step, log)
  ckpt.close()
  if jax.process_index() == 0:
    path = metrics_lib.plot_loss_curve(workdir)
    if path:
      log(f"loss curve: {path}")
  return TrainResult(state, net, tok, config, objective)


def _run(state, train_step, eval_step, train_iter, make_eval_iter, put, ckpt, meta, cfg,
         workdir, mfu_per_step_per_s, tokens_per_step, log):
  """The step loop. Metrics are fetched one step late, so the host never waits on the
  step it just dispatched; a NaN/Inf update has already been dropped inside the step."""
  from tqdm.auto import tqdm

  is_main = jax.process_index() == 0
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
  preempt = _Preemption()
  start_step = int(state.step)
  bar = tqdm(total=cfg.num_steps, initial=start_step, disable=not (cfg.progress_bar and is_main),
             dynamic_ncols=True, desc="train")
  window, pending, skipped = [], None, 0
  window_start, timed_steps = time.time(), 0

  def settle(step, metrics):
    nonlocal skipped
    metrics = jax.device_get(metrics)
    host_memory.trim_if_grown()  # hand back step blocks the heap could not reuse
    if metrics["nonfinite"]:
      skipped += 1
      if cfg.on_nonfinite == "halt":
        ckpt.wait()  # the step named below is on disk, not still being written
        last = ckpt.latest_step()
        raise NonFiniteError(
            f"non-finite loss or gradient at step {step} (loss={metrics['loss']}, grad_norm="
            f"{metrics['grad_norm']}); the update was not applied. Last good checkpoint: "
            f"{'step ' + str(last) if last is not None else 'none'} in {ckpt.directory}. "
            "Lower the learning rate or set TrainConfig.on_nonfinite='skip'.")
    window.append(metrics)

  try:
    end = min(cfg.num_steps, cfg.stop_at_step or cfg.num_steps)
    for step in range(start_step, end):
      batch = put(next(train_iter))
      state, metrics = train_step(state, batch)
      timed_steps += 1
      if step == start_step:  # the first call compiles: keep that out of tokens/s
        jax.block_until_ready(metrics)
        bar.write(f"compiled and ran the first step in {time.time() - window_start:.1f}s")
        window_start, timed_steps = time.time(), 0
      if pending is not None:
        settle(*pending)
      pending = (step + 1, metrics)
      done = step + 1
      if done % cfg.log_every == 0 or done == cfg.num_steps:
        settle(*pending)
        pending = None
        elapsed = max(time.time() - window_start, 1e-9)
        record = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
        if timed_steps:
          record.update(step_time=elapsed / timed_steps,
                        tokens_per_s=tokens_per_step * timed_steps / elapsed,
                        mfu=mfu_per_step_per_s * timed_steps / elapsed)
        record["nonfinite_total"] = skipped
        writer.write(done, record)
        bar.set_postfix(loss=f"{record['loss']:.3f}",
                        tok_s=f"{record.get('tokens_per_s', 0):.0f}")
        window, window_start, timed_steps = [], time.time(), 0
      if done % cfg.eval_every == 0 or done == cfg.num_steps:
        ev = _evaluate(eval_step, state.params, make_eval_iter, cfg.eval_batches, put)
        if ev:
          writer.write(done, ev)
          bar.write(f"step {done}: eval_loss {ev['eval_loss']:.4f} "
                    f"(ppl {ev['eval_perplexity']:.2f})")
        window_start, timed_steps = time.time(), 0  # keep eval time out of tokens/s
      bar.update(1)
      ckpt.save(done, state, train_iter.get_state(), meta, force=done == end)
      if preempt.requested:
        ckpt.save(done, state, train_iter.get_state(), meta, force=True)
        ckpt.wait()
        log(f"SIGTERM: saved checkpoint at step {done} in {ckpt.directory}; exiting. "
            "Run the same command again to resume.")
        break
  finally:
    bar.close()
    writer.close()
    preempt.restore()
  return state
