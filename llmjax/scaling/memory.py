"""Training memory per device: weights, gradients, optimizer state and activations.

The accounting of ZeRO (Rajbhandari et al. 2020, §3) for AdamW in float32: every
parameter costs 4 bytes of weights, 4 of gradients and 8 of optimizer state (the two
moments), 16 in all, plus activations, which scale with batch x sequence x layers and
depend on what the backward pass keeps (Korthikanti et al. 2022 count them per layer).
Over N data-parallel devices the ZeRO stages divide these terms:

  stage         weights  grads  optimizer   bytes/param (fp32 AdamW)
  dp (DDP)         4       4       8        16
  zero1            4       4      8/N       8 + 8/N
  zero2            4      4/N     8/N       4 + 12/N
  fsdp (zero3)    4/N     4/N     8/N       16/N

`estimate` computes the terms for a real config, rule set and mesh: weights and optimizer
state exactly, from the shardings the rule set gives each array (`sharding.partition`);
activations exactly as jax's autodiff saves them (the stacked residuals of the forward
layer scan, read from the jaxpr of the gradient for the per-device shapes: no compile);
and the peak as the largest of three phases of the step (backward, loss head, optimizer
update; see `estimate`). `llmjax.train.xla_memory.compiled` asks XLA for the same
number: `memory_analysis()` of the jitted, donated train step, whose per-device peak is arguments + temporaries (+
outputs not aliased to donated arguments: only the metrics). That is what
tests/scaling/test_memory.py and experiments/zero_memory_table.py compare against.

Mixed precision changes the split, not the sum: bfloat16 weights and gradients (2 + 2)
with a float32 master copy beside the two moments (4 + 8) are 16 bytes per parameter
too (`mixed_precision_table`). A model kept only for inference, or a frozen base under
QLoRA, needs its weights alone, in whatever format it is stored (`weight_formats`:
float32, bfloat16, and the packed formats of `llmjax.quant`, counted from the arrays
`llmjax quantize` would write).
"""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from llmjax.errors import UserError
from llmjax.sharding import partition
from llmjax.sharding import rules as rules_lib

GIB = 1024**3
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 1024,
          "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_bytes(text: str) -> int:
  """'16GiB', '80GB', '512MiB', '1e9' -> bytes."""
  m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
  if not m or m.group(2).lower() not in _UNITS:
    raise UserError(f"cannot read the memory size {text!r}; write it like 16GiB, 80GB or "
                    "512MiB.")
  return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def zero_table(num_devices: int, param_bytes: int = 4, moments: int = 2) -> dict:
  """Bytes per parameter per device for each ZeRO stage (the table above)."""
  n, w, o = num_devices, param_bytes, moments * param_bytes
  return {"dp": (w, w, o), "zero1": (w, w, o / n), "zero2": (w, w / n, o / n),
          "fsdp": (w / n, w / n, o / n)}


def mixed_precision_table(num_devices: int) -> dict:
  """Bytes per parameter per device (weights, grads, optimizer) per ZeRO stage for AdamW
  with bfloat16 weights and gradients and a float32 master copy, counted with the
  optimizer (Rajbhandari et al. 2020: 2 + 2 + 12)."""
  n = num_devices
  return {"dp": (2, 2, 12), "zero1": (2, 2, 12 / n), "zero2": (2, 2 / n, 12 / n),
          "fsdp": (2 / n, 2 / n, 12 / n)}


# name -> `llmjax.quant.ptq.QuantConfig` fields (None: a float dtype).
WEIGHT_FORMATS = {
    "float32": None, "bfloat16": None, "int8": {"method": "int8"},
    "int4 g128": {"method": "int4", "group_size": 128},
    "int4 g64": {"method": "int4", "group_size": 64},
    "nf4": {"method": "nf4"}, "nf4 + dq": {"method": "nf4", "double_quant": True},
}


def weight_bytes(model_cfg, fmt: str) -> int:
  """Bytes of the model's weights stored in format `fmt` (a `WEIGHT_FORMATS` key):
  exactly the arrays `llmjax quantize --method=...` writes (its defaults: the dense
  layers quantized, the embedding, head and norms kept in the parameter dtype), from
  abstract shapes (`jax.eval_shape`, nothing computed)."""
  from llmjax.models.transformer import Transformer
  from llmjax.quant import ptq

  if fmt not in WEIGHT_FORMATS:
    raise UserError(f"unknown weight format {fmt!r}; use one of {', '.join(WEIGHT_FORMATS)}.")
  params = nn.meta.unbox(abstract_params(model_cfg))
  opts = WEIGHT_FORMATS[fmt]
  if opts is None:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params)) * np.dtype(fmt).itemsize
  qcfg, total = ptq.QuantConfig(**opts), _nbytes(params)
  model = Transformer(model_cfg)
  for path, layer in ptq.dense_layers(model).items():
    node = ptq.node_at(params, path)
    if node is None or layer.weight not in node or not ptq.selected(
        layer, qcfg, model_cfg.tie_embeddings):
      continue
    w = node[layer.weight]
    arrays = jax.eval_shape(lambda v, layer=layer: ptq.quantize_weight(v, layer, qcfg), w)
    total += _nbytes(arrays) - _nbytes(w)
  return total


def weight_formats(model_cfg) -> dict:
  """`{format: (bytes, bytes per parameter)}` of the model's weights in every format."""
  params = nn.meta.unbox(abstract_params(model_cfg))
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  out = {}
  for fmt in WEIGHT_FORMATS:
    size = weight_bytes(model_cfg, fmt)
    out[fmt] = (size, size / count)
  return out


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes per device. `working`: the loss's logits buffers, AdamW's update tree and,
  under fsdp, one gathered layer and its gradient."""

  rule_set: str
  mesh: dict
  num_params: int
  weights: int
  gradients: int
  optimizer: int
  activations: int
  working: int

  @property
  def total(self) -> int:
    return self.weights + self.gradients + self.optimizer + self.activations + self.working


def _leaf_bytes(x, spec, mesh_shape) -> int:
  """Bytes of one device's shard of `x` under mesh PartitionSpec `spec`."""
  elems = 1
  for i, size in enumerate(x.shape):
    entry = spec[i] if i < len(spec) else None
    names = () if entry is None else (entry,) if isinstance(entry, str) else entry
    elems *= size // math.prod(mesh_shape[n] for n in names)
  return elems * np.dtype(x.dtype).itemsize


def _tree_bytes(boxed_abstract, mesh_shape, rules) -> int:
  """Per-device bytes of a boxed abstract tree placed by `rules` on a mesh of this shape."""
  specs = partition.mesh_specs(boxed_abstract, mesh_shape, rules)
  shapes = nn.meta.unbox(boxed_abstract)
  return sum(jax.tree.leaves(jax.tree.map(
      lambda x, s: _leaf_bytes(x, s, mesh_shape), shapes, specs,
      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))))


def abstract_params(model_cfg, seq_len: int = 8):
  """The boxed abstract parameters of `Transformer(model_cfg)` (no compute)."""
  from llmjax.models.transformer import Transformer
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  kwargs = {"encoder_tokens": tokens} if model_cfg.arch == "encoder_decoder" else {}
  return jax.eval_shape(lambda: Transformer(model_cfg).init(
      {"params": jax.random.PRNGKey(0)}, tokens, **kwargs)["params"])


def _nbytes(tree) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _shard_config(cfg, tensor: int):
  """The block one device computes under tensor parallelism: heads and MLP hidden / t."""
  if tensor == 1 or cfg.num_kv_heads % tensor or cfg.mlp_dim % tensor:
    return cfg
  return cfg.replace(num_heads=cfg.num_heads // tensor, num_kv_heads=cfg.num_kv_heads // tensor,
                     head_dim=cfg.head_dim, mlp_dim=cfg.mlp_dim // tensor)


def block_residual_bytes(cfg, batch: int, seq_len: int, remat: str | None = None) -> int:
  """Bytes one block keeps for its backward pass: the residuals of `jax.vjp` through it
  (what autodiff saves under the remat policy), less its own parameters. Abstract only."""
  from llmjax.layers import masks
  from llmjax.models.block import TransformerBlock
  from llmjax.models.stack import _DETERMINISTIC_ARGNUM, _REMAT_POLICIES

  remat = cfg.remat if remat is None else remat
  block_cls = TransformerBlock
  if remat != "none":
    block_cls = nn.remat(block_cls, policy=_REMAT_POLICIES[remat],
                         static_argnums=(_DETERMINISTIC_ARGNUM,))
  block = block_cls(cfg)
  x = jax.ShapeDtypeStruct((batch, seq_len, cfg.embed_dim), cfg.compute_dtype)
  args = (masks.causal_mask(seq_len), None, None, None, True)
  params = jax.eval_shape(lambda x: block.init(jax.random.PRNGKey(0), x, *args), x)
  apply = lambda p, x: block.apply(p, x, *args)
  residuals = jax.eval_shape(lambda p, x: jax.vjp(apply, p, x)[1], params, x)
  return _nbytes(residuals) - _nbytes(params)


def _forward_scan_bytes(cfg, batch: int, seq_len: int) -> int | None:
  """Bytes of the stacked residuals the forward layer scans hand to the backward pass:
  the scan outputs in the jaxpr of the loss's gradient (jax's own partial evaluation,
  after it hoists loop invariants such as the mask). None for an unscanned stack."""
  from llmjax.models.transformer import Transformer
  from llmjax.objectives.lm import CausalLM

  if not cfg.scan_layers or cfg.arch != "decoder_only":
    return None
  model = Transformer(cfg)
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  params = nn.meta.unbox(abstract_params(cfg))
  rows = {"tokens": tokens, "tokens_segment_ids": tokens, "tokens_positions": tokens}
  loss = lambda p, b: CausalLM().loss_sums(model, p, b)["loss"]
  eqns = [e for e in jax.make_jaxpr(jax.grad(loss))(params, rows).jaxpr.eqns
          if e.primitive.name == "scan"]
  forward = eqns[0]  # the backward (transposed) scan comes after it
  return _nbytes([v.aval for v in forward.outvars[forward.params["num_carry"]:]])


def residual_bytes(cfg, batch_per_device: int, seq_len: int, tensor: int = 1,
                   remat: str | None = None) -> int:
  """Bytes one device keeps for the backward pass over all layers (the residuals)."""
  shard = _shard_config(cfg, tensor).replace(remat=cfg.remat if remat is None else remat)
  scanned = _forward_scan_bytes(shard, batch_per_device, seq_len)
  if scanned is not None:
    return scanned
  layers = cfg.num_layers + (cfg.num_encoder_layers if cfg.arch == "encoder_decoder" else 0)
  return layers * block_residual_bytes(shard, batch_per_device, seq_len)


def _logits_bytes(cfg, batch_per_device, seq_len, tensor):
  """One float32 [B, L, V] buffer (V split over 'tensor' when it divides)."""
  vocab = cfg.vocab_size // tensor if cfg.vocab_size % tensor == 0 else cfg.vocab_size
  return 4 * batch_per_device * seq_len * vocab


def _embedding_bytes(boxed, mesh_shape, rules) -> int:
  """The token table's bytes on one device once gathered over 'data' and 'fsdp'."""
  whole = {**mesh_shape, "data": 1, "fsdp": 1}
  return _tree_bytes({"embed": boxed["embed"]}, whole, rules) if "embed" in boxed else 0


def _phases(cfg, boxed, rule_set, mesh_shape, batch, seq_len, state) -> dict:
  """Bytes beyond the state (the arguments) at each candidate peak; see `estimate`."""
  rules, tensor = rules_lib.get_rules(rule_set), mesh_shape["tensor"]
  gathered = mesh_shape["fsdp"] > 1 and rules != rules_lib.dp()
  local_grads = _tree_bytes(boxed, {**mesh_shape, "data": 1, "fsdp": 1}, rules)
  reduced = local_grads if state["optimizer_replicated"] else state["optimizer"] // 2
  residuals = residual_bytes(cfg, batch, seq_len, tensor)
  layer = residual_bytes(cfg, batch, seq_len, tensor, remat="none") // max(cfg.num_layers, 1)
  embed = _embedding_bytes(boxed, mesh_shape, rules)
  # remat 'none': the cotangents of the block's largest intermediates (its scores and
  # probabilities' gradients next to the saved ones): about half its residuals. Under
  # remat the block's residuals are recomputed and freed as its backward consumes them:
  # XLA keeps about 3/4 of them at once (measured on tiny and GPT-2 124M alike).
  block = layer // 2 if cfg.remat == "none" else 3 * layer // 4
  return {
      "residuals": residuals,
      "gradients": local_grads,
      "backward": residuals + local_grads + reduced + block + (embed if gathered else 0),
      "head": (residuals + _logits_bytes(cfg, batch, seq_len, tensor)
               + embed * (2 if gathered else 1)),
      "update": local_grads + state["optimizer"],
  }


def estimate(model_cfg, rule_set: str, mesh_shape: dict, batch_size: int, seq_len: int,
             tx=None) -> MemoryEstimate:
  """Bytes per device of training `model_cfg` with global `batch_size` rows of `seq_len`.

  `mesh_shape` maps 'data', 'fsdp', 'tensor' to sizes; `tx` is the optax optimizer
  (default AdamW, whose state is two moments in the parameter dtype).

  The peak is the state (weights + optimizer, exact) plus the largest of three phases:
    backward  residuals of all layers (the scan's stacked buffers live until the backward
              scan ends) + each device's local gradients (tensor-split only) + their
              reduced copy (dp: all-reduced, whole; zero1/fsdp: reduce-scattered, a
              shard) + one block's working set (remat 'none': the cotangents of its
              largest intermediates, ~half its residuals; under remat: ~3/4 of
              its recomputed residuals) + under fsdp the gathered token table;
    head      residuals + one float32 [B, L, V] buffer (XLA overwrites the logits with
              their gradient) + the token table's gradient (+ the gathered table under
              fsdp);
    update    local gradients + new moments and update tree (optimizer-sized).
  `gradients` and `activations` report the local gradients and residuals; `working`
  the rest of the largest phase.
  """
  from llmjax.optim.optimizers import OptimizerConfig
  tx = tx or OptimizerConfig().make(1)[0]
  boxed = abstract_params(model_cfg, seq_len)
  rules = rules_lib.get_rules(rule_set)
  weights = _tree_bytes(boxed, mesh_shape, rules)
  optimizer = _tree_bytes(jax.eval_shape(tx.init, boxed), mesh_shape,
                          rules_lib.opt_state_rules(rule_set))
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(boxed)))
  data = mesh_shape["data"] * mesh_shape["fsdp"]
  if batch_size % data:
    raise UserError(f"global batch_size={batch_size} does not split over {data} "
                    "data-parallel devices; make it a multiple.")
  replicated = _tree_bytes(jax.eval_shape(tx.init, boxed), {**mesh_shape, "data": 1,
                                                             "fsdp": 1}, rules)
  state = {"optimizer": optimizer, "optimizer_replicated": optimizer >= replicated}
  phases = _phases(model_cfg, boxed, rule_set, mesh_shape, batch_size // data, seq_len, state)
  residuals, grads = phases["residuals"], phases["gradients"]
  peak = max(phases["backward"], phases["head"], phases["update"])
  return MemoryEstimate(rule_set, dict(mesh_shape), num_params, weights, grads, optimizer,
                        residuals, peak - residuals - grads)
