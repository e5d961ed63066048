"""The training loop, linear as the recipe reads:

mesh -> tokenizer and data -> abstract init -> sharded init -> restore -> jit once (donated
state) -> loop with logging, eval, checkpoints, NaN/Inf checks and preemption handling.

`train` is `setup` (everything up to the compiled steps) then `run` (the step loop).
"""

import dataclasses
import math
import os
from typing import NamedTuple

import jax
from flax import linen as nn

from llmjax.checkpoint import manager as ckpt_lib
from llmjax.errors import UserError
from llmjax.models.config import TransformerConfig
from llmjax.models.transformer import Transformer
from llmjax.objectives.lm import CausalLM
from llmjax.objectives.protocol import Objective
from llmjax.optim.optimizers import OptimizerConfig
from llmjax.peft import model as peft_lib
from llmjax.scaling import counts
from llmjax.sharding import mesh as mesh_lib
from llmjax.sharding import partition
from llmjax.sharding import rules as rules_lib
from llmjax.train import eval_tasks as eval_tasks_lib
from llmjax.train import inputs, resume, reward_source, warm_start
from llmjax.train import metrics as metrics_lib
from llmjax.train import state as state_lib
from llmjax.train import step as step_lib
from llmjax.train.stepping import StepLoop

DEFAULT_PEAK_FLOPS = 256e9  # per device, for MFU: a 2-core AVX-512 CPU's fp32 peak


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
  progress_bar: bool = True
  init_from: str | None = None    # a workdir whose latest params start this run at step 0
                                  # (fine-tuning; see llmjax/train/warm_start.py)
  eval_tasks: tuple[str, ...] = ()  # also at each eval: 'perplexity', 'lm_eval:TASK[:N]'
                                  # (llmjax/train/eval_tasks.py)
  eval_task_docs: int = 20        # validation documents for 'perplexity'


class TrainResult(NamedTuple):
  state: state_lib.TrainState
  model: Transformer
  tokenizer: object
  config: TrainConfig
  objective: Objective | None = None  # `can_sample = False`: no end-of-run sample
  runtime: object = None              # the entry point's RuntimeConfig (train/main.py)


class Setup(NamedTuple):
  """Everything `run` needs: built, restored and compiled, nothing stepped yet."""
  workdir: str
  net: Transformer
  objective: Objective
  tokenizer: object
  state: state_lib.TrainState
  mesh: jax.sharding.Mesh
  rules: tuple
  train_step: object
  eval_step: object
  train_iter: object
  make_eval_iter: object
  put: object
  ckpt: ckpt_lib.CheckpointManager
  meta: dict
  flops_per_step: float
  tokens_per_step: int
  log_state: dict        # the restored checkpoint's unlogged steps (`StepLoop.log_state`)
  eval_tasks: object = None  # `eval_tasks.EvalTasks`: TrainConfig.eval_tasks at each eval


@resume.no_partial_workdir
def train(workdir: str, *, model: TransformerConfig | None = None, data,
          tokenizer: inputs.TokenizerSpec, optimizer: OptimizerConfig | None = None,
          objective: Objective | None = None, config: TrainConfig | None = None,
          operative_config: str = "", peak_flops: float = DEFAULT_PEAK_FLOPS, log=print,
          peft=()):
  """Trains `model` on `data` in `workdir`, resuming from its latest checkpoint if any.

  `peft`: adapter configs (`llmjax.peft`, e.g. `[LoraConfig(...)]`); then only the
  adapters train (unless `optimizer.trainable` says otherwise) and the network is a
  `PeftModel` (TrainResult.model; `merged(params)` gives a plain Transformer).

  Returns a TrainResult (final state, the network, the tokenizer, the loop config).
  Writes metrics.jsonl, TensorBoard events, checkpoints, the tokenizer, and
  loss_curve.png into `workdir`. `peak_flops` (per device) is MFU's denominator.
  """
  objective, config = objective or CausalLM(), config or TrainConfig()
  optimizer = optimizer or OptimizerConfig()
  if peft and optimizer.trainable is None:  # the adapters, and the objective's own head
    patterns = (peft_lib.trainable_pattern(peft), getattr(objective, "trained_params", None))
    optimizer = dataclasses.replace(optimizer, trainable=_any_of(patterns))
  peft_lib.check_data(peft, data)  # a soft prompt needs one document per row
  s = setup(os.path.abspath(workdir), model, data, tokenizer, optimizer, objective, config,
            operative_config, log, tuple(peft))
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    state = StepLoop(s, config, s.flops_per_step / (peak_flops * jax.device_count()),
                     log).run()
  s.ckpt.close()
  if jax.process_index() == 0:
    path = metrics_lib.plot_loss_curve(s.workdir)
    if path:
      log(f"loss curve: {path}")
  return TrainResult(state, s.net, s.tokenizer, config, objective)


def setup(workdir, model, data, tokenizer, optimizer, objective, config, operative_config,
          log, peft=()) -> Setup:
  """Mesh, tokenizer, data, sharded state (restored or warm-started), compiled steps."""
  resume.check_workdir(workdir)
  eval_tasks_lib.parse(config.eval_tasks)  # a bad entry stops the run before any work
  if config.on_nonfinite not in ("halt", "skip"):
    raise UserError(f"TrainConfig.on_nonfinite={config.on_nonfinite!r}; use 'halt' or 'skip'.")
  source = warm_start.load(config.init_from) if config.init_from else None
  mesh = mesh_lib.make_mesh(config.mesh_data, config.mesh_fsdp, config.mesh_tensor)
  rules = rules_lib.get_rules(config.rules)
  _check_batch_split(data.batch_size, mesh, rules)
  if source is not None and source.tokenizer_path and not tokenizer.path:
    tokenizer = dataclasses.replace(tokenizer, path=source.tokenizer_path)
  tok = inputs.resolve_tokenizer(tokenizer, workdir, data.dataset, data.data_dir,
                                 data.text_key, log=log, input_dir=data.input_dir)
  model_cfg = _model_config(model, source, tok, config.pad_vocab_to_multiple, data)
  reward_source.bind(objective, tok)  # reward='model': the reward model's config
  net = peft_lib.wrap(Transformer(model_cfg), peft)
  train_iter, make_eval_iter = _build_data(data, tok, objective, config)
  tx, schedule = optimizer.make(config.num_steps, step_lib.updates_per_step(objective))
  init_inputs = objective.init_inputs(data.lengths())
  state, shardings = state_lib.init_train_state(
      lambda rng: net.init({"params": rng}, **init_inputs)["params"], tx, mesh, config.rules,
      config.seed, objective.frozen_trees, getattr(objective, "initial_state", dict))
  num_params = counts.count_params(state.params)
  log(f"model: {num_params:,} parameters on a {dict(mesh.shape)} mesh ({config.rules})")
  ckpt = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                    save_every=config.checkpoint_every,
                                    keep=config.keep_checkpoints, cleanup_tmp=True)
  state, log_state = resume.restore(ckpt, state, shardings, train_iter, model_cfg, log, tok)
  if ckpt.latest_step() is None:  # a fresh run: warm start, soft prompts from their text
    state = _fresh_start(state, shardings, source, objective, log,
                         _fresh_pattern(optimizer.trainable, objective), peft, tok)
    state = reward_source.attach(objective, state, shardings, log)
  resume.write_operative_config(workdir, operative_config)
  meta = {"model_config": dataclasses.asdict(model_cfg), "operative_config": operative_config,
          "tokenizer": ckpt_lib.encode_bytes(tok.serialized()), "num_params": num_params,
          **({"peft": peft_lib.to_meta(peft)} if peft else {}),
          **({"init_from": os.path.abspath(config.init_from)} if config.init_from else {})}
  batch_sharding = partition.batch_sharding(mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    train_step = jax.jit(
        step_lib.make_train_step(net, objective, tx, schedule,
                                 grad_accum_steps=config.grad_accum_steps,
                                 trainable=_trainable_or_none(optimizer, state.params)),
        in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
        donate_argnums=0)
    eval_step = jax.jit(step_lib.make_eval_step(net, objective))
  tokens_per_step = data.batch_size * data.seq_len
  flops = counts.train_flops_per_token(num_params, model_cfg.num_layers, model_cfg.embed_dim,
                                       data.seq_len) * tokens_per_step
  return Setup(workdir, net, objective, tok, state, mesh, rules, train_step, eval_step, train_iter,
               make_eval_iter, lambda batch: partition.global_batch(batch, batch_sharding),
               ckpt, meta, flops, tokens_per_step, log_state,
               eval_tasks_lib.EvalTasks(config.eval_tasks, data, workdir, config.eval_task_docs))


def _model_config(model, source, tok, multiple, data) -> TransformerConfig:
  """The bound model config (or the warm-start source's) with the run's vocabulary."""
  if model is None:
    if source is None:
      raise UserError("no model config: bind `train.model` in gin (e.g. add "
                      "--gin_file=gin_configs/models/tiny.gin) or set TrainConfig.init_from.")
    model = source.model_config
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
  return model_cfg


def _fresh_start(state, shardings, source, objective, log, fresh, peft, tok):
  """Step 0 of a new run: the warm-start `source`'s parameters (if any), then the soft
  prompts that have an `init_text` set from its tokens' embeddings."""
  if source is not None:
    state = _warm_start(state, shardings, source, objective, log, fresh=fresh)
  return state.replace(params=peft_lib.init_prompts(state.params, peft, tok, log))


def _warm_start(state, shardings, source, objective, log, fresh=None):
  """A fresh run's parameters from `source`; the objective's frozen trees from them.
  Parameters the source lacks that match `fresh` (new adapters) keep their init."""
  params = warm_start.restore_params(source, state.params, shardings.params, fresh=fresh)
  if hasattr(objective, "warm_params"):  # e.g. a PPO critic copied from the policy
    params = jax.jit(objective.warm_params, out_shardings=shardings.params)(params)
  frozen = jax.jit(lambda p: nn.meta.unbox(objective.frozen_trees(p)),
                   out_shardings=shardings.frozen)(params)
  log(f"initialized parameters from {source.workdir} (step {source.step})")
  return state.replace(params=params, frozen=frozen)


def _fresh_pattern(trainable, objective) -> str | None:
  """Parameters a warm-start source may lack (they keep their init): the trained subset's
  (new adapters) and the objective's own (`new_params`: a reward head, a PPO critic)."""
  return _any_of((trainable, getattr(objective, "new_params", None)))


def _any_of(patterns) -> str | None:
  """One regex matching any of `patterns` (None entries skipped; None if none)."""
  return "|".join(f"(?:{p})" for p in patterns if p) or None


def _trainable_or_none(optimizer, params):
  """The step's trainable mask (None when everything trains)."""
  return None if optimizer.trainable is None else optimizer.trainable_mask(params)


def _check_batch_split(batch_size, mesh, rules):
  """The global batch must split evenly over the mesh axes that BATCH maps onto."""
  spec = partition.batch_sharding(mesh, rules).spec
  names = spec[0] if len(spec) else None
  names = () if names is None else (names,) if isinstance(names, str) else tuple(names)
  ways = math.prod(mesh.shape[name] for name in names)
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
