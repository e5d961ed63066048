"""The memory estimator: the ZeRO table, exact state bytes against jax's own shard shapes,
the total against XLA's memory_analysis() of the compiled step, and the CLI."""

import io
import math
from contextlib import redirect_stdout

import jax
import numpy as np
import pytest

from llmjax import cli
from llmjax.errors import UserError
from llmjax.models.presets import get_preset
from llmjax.models.transformer import Transformer
from llmjax.optim.optimizers import OptimizerConfig
from llmjax.scaling import memory
from llmjax.sharding import mesh as mesh_lib
from llmjax.train import state as train_state
from llmjax.train import xla_memory

STRATEGIES = {"dp": (8, 1, 1), "zero1": (8, 1, 1), "fsdp": (1, 8, 1), "fsdp_tp": (1, 4, 2)}


def test_zero_table_is_the_16_bytes_per_parameter_accounting():
  table = memory.zero_table(8)
  assert table["dp"] == (4, 4, 8) and sum(table["dp"]) == 16
  assert sum(table["zero1"]) == 4 + 4 + 8 / 8
  assert sum(table["zero2"]) == 4 + 12 / 8
  assert sum(table["fsdp"]) == 16 / 8
  assert sum(memory.zero_table(1)["fsdp"]) == 16


def test_parse_bytes():
  assert memory.parse_bytes("16GiB") == 16 * 2**30
  assert memory.parse_bytes("80GB") == 80 * 10**9
  assert memory.parse_bytes("512 MiB") == 512 * 2**20
  with pytest.raises(UserError, match="16GiB"):
    memory.parse_bytes("sixteen")


def _shard_bytes(tree):
  """Per-device bytes from jax's own shard shapes of ShapeDtypeStructs with shardings."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("rule_set", list(STRATEGIES))
def test_state_bytes_match_the_placed_arrays(rule_set):
  cfg = get_preset("tiny")
  est = memory.estimate(cfg, rule_set, dict(zip(mesh_lib.MESH_AXES, STRATEGIES[rule_set])),
                        batch_size=8, seq_len=16)
  model = Transformer(cfg)
  tx, _ = OptimizerConfig().make(1)
  init = lambda rng: model.init({"params": rng}, np.zeros((1, 16), np.int32))["params"]
  state = train_state.abstract_train_state(init, tx, mesh_lib.make_mesh(*STRATEGIES[rule_set]),
                                         rule_set)
  assert est.weights == _shard_bytes(state.params)
  assert est.optimizer == _shard_bytes(state.opt_state)
  if rule_set == "dp":  # the table as a special case: 4 + 8 bytes per parameter
    assert est.weights == 4 * est.num_params
    assert est.optimizer - 8 * est.num_params <= 16  # + AdamW's step counters
  if rule_set == "zero1":
    assert est.optimizer < 8 * est.num_params / 8 * 1.1


@pytest.mark.parametrize("rule_set,remat", [(r, "none") for r in STRATEGIES]
                         + [("zero1", "full"), ("fsdp_tp", "full")])
def test_estimate_within_15_percent_of_xla(rule_set, remat):
  cfg, batch, seq_len = get_preset("tiny", max_len=16, remat=remat), 64, 16
  mesh = mesh_lib.make_mesh(*STRATEGIES[rule_set])
  xla = xla_memory.compiled(cfg, rule_set, mesh, batch, seq_len)
  est = memory.estimate(cfg, rule_set, dict(mesh.shape), batch, seq_len)
  assert abs(est.total / xla["total"] - 1) < 0.15, (est, xla)


def test_cli_prints_every_strategy_and_whether_it_fits():
  out = io.StringIO()
  with redirect_stdout(out):
    code = cli.main(["memory", "--gin_file=runs/debug.gin", "--devices=8",
                     "--device_memory=64KiB"])
  text = out.getvalue()
  assert code == 0
  rows = {line.split()[0]: line for line in text.splitlines()
          if line.split() and line.split()[0] in STRATEGIES and "," in line}
  assert set(rows) == set(STRATEGIES)
  assert all(row.endswith("NO") for row in rows.values())  # 64 KiB is too small for any
  assert "zero1" in text and "16.00" in text
  formats = {line.split()[0] for line in text.split("storage format")[1].splitlines()[2:]}
  assert {"float32", "bfloat16", "int8", "int4", "nf4"} <= formats


def test_mixed_precision_table_is_2_2_12():
  table = memory.mixed_precision_table(8)
  assert sum(table["dp"]) == 16 and table["dp"] == (2, 2, 12)
  assert sum(table["fsdp"]) == 16 / 8 and sum(table["zero2"]) == 2 + 14 / 8


@pytest.mark.parametrize("fmt", ["int8", "int4 g64", "nf4 + dq"])
def test_weight_bytes_equal_the_arrays_quantize_writes(fmt):
  from llmjax.quant import ptq
  from llmjax.testing import reference
  model, params = reference.preset_model("tiny", std=0.05)
  cfg = model.config
  _, info = ptq.quantize_params(model, params, **memory.WEIGHT_FORMATS[fmt])
  assert memory.weight_bytes(cfg, fmt) == info["all_bytes_after"]
  assert memory.weight_bytes(cfg, "float32") == info["all_bytes_before"]
  assert memory.weight_bytes(cfg, "bfloat16") * 2 == info["all_bytes_before"]
  with pytest.raises(UserError, match="nf4 \\+ dq"):
    memory.weight_bytes(cfg, "fp8")
