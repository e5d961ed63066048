"""Every gin file parses and builds: its model config makes a network whose abstract init
works, and its data / tokenizer / optimizer / loop configs construct."""

import functools
import glob
import os

import gin
import jax
import pytest

from llmjax.models.transformer import Transformer
from llmjax.objectives.protocol import Objective
from llmjax.train import main

RUNS = sorted(glob.glob(os.path.join(main.GIN_ROOT, "runs", "*.gin")))
MODELS = sorted(glob.glob(os.path.join(main.GIN_ROOT, "models", "*.gin")))
ARCHS = sorted(glob.glob(os.path.join(main.GIN_ROOT, "arch", "*.gin")))


def _build(name):
  ref = gin.query_parameter(f"train.{name}")
  return ref.scoped_configurable_fn() if isinstance(ref, gin.config.ConfigurableReference) else ref


def _check_builds():
  model = _build("model").replace(vocab_size=256)
  for name in ("data", "tokenizer", "optimizer", "config", "objective", "runtime"):
    assert _build(name) is not None
  # The objective says what `init` takes (tokens; inputs + targets; classify).
  objective = _build("objective")
  assert isinstance(objective, Objective)
  inputs = objective.init_inputs(_build("data").lengths())
  longest = max(v.shape[1] for v in inputs.values() if hasattr(v, "shape"))
  model = model.replace(max_len=max(model.max_len, longest))
  shapes = jax.eval_shape(functools.partial(Transformer(model).init, **inputs),
                          jax.random.PRNGKey(0))
  assert jax.tree.leaves(shapes)
  return model


def test_gin_root_has_files():
  assert RUNS and MODELS


@pytest.mark.parametrize("path", RUNS, ids=os.path.basename)
def test_run_files_parse_and_build(path):
  files = [path]
  if "pretrain" in os.path.basename(path):  # the wiring alone leaves the model REQUIRED
    files.append(os.path.join(main.GIN_ROOT, "models", "tiny.gin"))
  warm_started = ("finetune", "sft", "reward_model", "dpo", "grpo", "ppo")  # the model: init_from's
  from_scratch = ("dpo_encdec_debug.gin",)  # post-training a preset from its init
  name = os.path.basename(path)
  if name.startswith(warm_started) and name not in from_scratch:
    main.parse_gin(files, ["TrainConfig.init_from='/some/run'"])
    assert _build("model") is None and _build("config").init_from == "/some/run"
    main.parse_gin(files + [os.path.join(main.GIN_ROOT, "models", "tiny.gin")], [])
  else:
    main.parse_gin(files, [])
  _check_builds()


@pytest.mark.parametrize("path", MODELS, ids=os.path.basename)
def test_model_files_build(path):
  main.parse_gin([os.path.join(main.GIN_ROOT, "runs", "pretrain.gin"), path], [])
  model = _check_builds()
  assert model.num_layers >= 1


@pytest.mark.parametrize("path", ARCHS, ids=os.path.basename)
def test_arch_files_build_over_the_tiny_model(path):
  main.parse_gin([os.path.join(main.GIN_ROOT, "runs", "pretrain.gin"),
                  os.path.join(main.GIN_ROOT, "models", "tiny.gin"), path], [])
  model = _check_builds()
  assert model.arch == os.path.basename(path)[:-len(".gin")]


SWEEPS = sorted(glob.glob(os.path.join(main.GIN_ROOT, "sweeps", "*.gin")))


@pytest.mark.parametrize("path", SWEEPS, ids=os.path.basename)
def test_sweep_files_parse_build_and_plan(path):
  from llmjax.scaling import sweep as sweep_lib

  main.parse_gin([path], [])
  model = _check_builds()
  sweep = gin.get_configurable("llmjax.SweepConfig")()
  data = _build("data")
  rows = sweep_lib.plan_rows(sweep, model.replace(vocab_size=89), data.seq_len,
                             data.batch_size)
  budgets = {r["budget"] for r in rows}
  assert len(budgets) == len(sweep.budgets) >= 2  # every budget keeps >= 3 shapes
  assert all(sum(r["budget"] == b for r in rows) >= 3 for b in budgets)
