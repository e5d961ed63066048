"""The gin entry point for training: `llmjax train --gin_file=F --gin_param=K=V --workdir=W`.

This is the only place (with other entry points) that imports gin. Gin binds the frozen
config dataclasses and the entry function's arguments, never module internals:

  train.model = @TransformerConfig()      TransformerConfig.num_layers = 6
  train.data = @DataConfig()              DataConfig.seq_len = 256
  train.tokenizer = @TokenizerSpec()      TrainConfig.num_steps = 2000 ...

Settings of the machine and of this invocation rather than of the run (the host
allocator, the peak FLOP rate for MFU, the end-of-run sample) are `RuntimeConfig`'s,
bound as `RuntimeConfig.*` and applied here, outside the loop.
"""

import dataclasses
import logging
import os
import re

import gin

from llmjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
  """What this machine and invocation add to a run (gin: `RuntimeConfig.*`)."""

  host_malloc: str = "reuse"      # reuse | reuse_threads | system: keep freed step
                                  # buffers mapped (CPU; llmjax/train/host_memory.py)
  peak_flops: float = 256e9       # per device, MFU's denominator (2-core AVX-512 fp32)
  sample_prompt: str = "ROMEO"    # `llmjax train`'s end-of-run sample (causal LMs)
  sample_tokens: int = 200
  sample_temperature: float = 0.8


GIN_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
                        "gin_configs")
_REGISTERED = False
# `K=word`: a value that is no number, quoted string, list, reference or macro.
_UNQUOTED = re.compile(r"^\s*[\w.]+\s*=\s*(?!True\b|False\b|None\b)[A-Za-z_][\w.]*\s*$")
# Former TrainConfig fields that are RuntimeConfig's now (for the error's hint).
_MOVED_TO_RUNTIME = ("host_malloc", "peak_flops", "sample_prompt", "sample_tokens",
                     "sample_temperature")


def register_configurables():
  """Makes the config dataclasses and small factories visible to gin (idempotent)."""
  global _REGISTERED
  if _REGISTERED:
    return
  from llmjax.data.pipeline import DataConfig
  from llmjax.eval.config import EvalConfig
  from llmjax.models import presets
  from llmjax.models.config import TransformerConfig
  from llmjax.objectives.lm import CausalLM
  from llmjax.optim.optimizers import OptimizerConfig
  from llmjax.peft.adapters import AdapterConfig
  from llmjax.peft.lora import LoraConfig
  from llmjax.peft.prompt_tuning import PromptTuningConfig
  from llmjax.scaling.sweep import SweepConfig
  from llmjax.train.inputs import TokenizerSpec
  from llmjax.train.loop import TrainConfig

  for cls in (TransformerConfig, DataConfig, TokenizerSpec, OptimizerConfig, TrainConfig,
              RuntimeConfig, CausalLM, LoraConfig, AdapterConfig, PromptTuningConfig,
              SweepConfig, EvalConfig):
    gin.external_configurable(cls, module="llmjax")
  gin.external_configurable(presets.get_preset, module="llmjax")
  from llmjax.quant import qat, qlora
  for cls in (qat.QatConfig, qlora.QloraConfig):  # in train.peft: QAT, QLoRA's base
    gin.external_configurable(cls, module="llmjax")
  from llmjax.objectives import classification, dpo, mlm, reward, seq2seq, sft, span_corruption
  from llmjax.objectives.grpo import GRPO
  from llmjax.objectives.ppo import PPO
  for cls in (mlm.MaskedLM, span_corruption.SpanCorruption, seq2seq.Seq2Seq,
              classification.Classification, sft.SFT, reward.RewardModel, dpo.DPO, GRPO,
              PPO):
    gin.external_configurable(cls, module="llmjax")
  _REGISTERED = True


def parse_gin(gin_files, gin_params):
  """Parses gin files (paths, or paths relative to gin_configs/) and `K=V` overrides.

  Every problem (missing file, unknown configurable or parameter, a value that does not
  parse) becomes one UserError naming it.
  """
  register_configurables()
  gin.clear_config()
  if os.path.isdir(GIN_ROOT):
    gin.add_config_file_search_path(GIN_ROOT)
  for path in gin_files:
    if not os.path.exists(path) and not os.path.exists(os.path.join(GIN_ROOT, path)):
      raise UserError(f"gin file {path} not found (looked in the current directory and in "
                      f"{GIN_ROOT}); check the --gin_file path.")
  quiet = _DropMessages("Path not found")  # gin probes each search path and logs misses
  logging.getLogger().addFilter(quiet)
  try:
    gin.parse_config_files_and_bindings(gin_files, gin_params, finalize_config=False)
  except (ValueError, SyntaxError, NameError, KeyError, TypeError) as e:
    hint = ""
    if any(f"'{k}'" in str(e) for k in _MOVED_TO_RUNTIME):
      hint = "\nHost and sample settings moved: bind RuntimeConfig.<name> instead."
    unquoted = [p for p in gin_params if _UNQUOTED.match(p)]
    if "malformed node" in str(e) and unquoted:
      key, _, value = unquoted[0].partition("=")
      raise UserError(f"bad gin binding {unquoted[0]!r}: strings need quotes, e.g. "
                      f"--gin_param=\"{key.strip()}='{value.strip()}'\".") from None
    raise UserError(f"bad gin config: {e}\nCheck the binding's spelling against the "
                    "config dataclasses (TransformerConfig, DataConfig, TokenizerSpec, "
                    "OptimizerConfig, TrainConfig, RuntimeConfig) and the value's type."
                    f"{hint}") from e
  finally:
    logging.getLogger().removeFilter(quiet)


class _DropMessages(logging.Filter):

  def __init__(self, prefix):
    super().__init__()
    self.prefix = prefix

  def filter(self, record):
    return not str(record.msg).startswith(self.prefix)


def _check_required(cfg):
  """A dataclass field bound to %gin.REQUIRED in a gin file and never given a value."""
  if not dataclasses.is_dataclass(cfg):
    return
  missing = [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) is gin.REQUIRED]
  if missing:
    name = type(cfg).__name__
    raise UserError(f"{', '.join(f'{name}.{m}' for m in missing)} must be set (the gin "
                    f"files mark it %gin.REQUIRED); add e.g. --gin_param=\"{name}.{missing[0]}"
                    "=...\".")


def bound(name: str, default=None):
  """What the parsed gin config binds `train.<name>` to, built (`default` if unbound):
  the commands that read a run's config without training it (memory, sweep, eval)."""
  try:
    ref = gin.query_parameter(f"train.{name}")
  except ValueError:
    return default
  return ref.scoped_configurable_fn() if isinstance(ref, gin.config.ConfigurableReference) else ref


@gin.configurable(module="llmjax")
def train(workdir=gin.REQUIRED, model=gin.REQUIRED, data=gin.REQUIRED, tokenizer=gin.REQUIRED,
          optimizer=None, objective=None, config=None, runtime=None, peft=()):
  """The configurable training entry: builds what gin says and runs `loop.train`.
  `peft`: a list of adapter configs (`train.peft = [@LoraConfig()]`, `@AdapterConfig()`,
  `@PromptTuningConfig()`; gin_configs/peft/)."""
  from llmjax.train import host_memory, loop
  from llmjax.validation import check_types

  runtime = runtime or RuntimeConfig()
  peft = list(peft or ())
  for cfg in (model, data, tokenizer, optimizer, objective, config, runtime, *peft):
    _check_required(cfg)
    check_types(cfg)
  host_memory.configure(runtime.host_malloc)  # before the first jax computation
  result = loop.train(workdir, model=model, data=data, tokenizer=tokenizer,
                      optimizer=optimizer, objective=objective, config=config,
                      operative_config=gin.operative_config_str(),
                      peak_flops=runtime.peak_flops, peft=peft)
  return result._replace(runtime=runtime)


def run(gin_files, gin_params, workdir):
  """Parses the config and trains; returns `loop.TrainResult`."""
  from llmjax.train import distributed
  distributed.initialize()  # multi-host from LLMJAX_* env or TPU/SLURM; no-op on one host
  parse_gin(gin_files, list(gin_params) + [f"train.workdir = {workdir!r}"])
  try:
    return train()  # pylint: disable=no-value-for-parameter (gin supplies them)
  except RuntimeError as e:
    if "Required bindings" not in str(e):
      raise
    raise UserError(f"{e}\nAdd the missing bindings to a --gin_file or as --gin_param.") from e

