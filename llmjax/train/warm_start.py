"""Warm starts: begin a new run from the parameters of another workdir.

The source is any llmjax workdir with a checkpoint: a finished pre-training run, or a
Hugging Face model imported with `llmjax convert --from_hf=DIR --workdir=SRC`. The new
run (`TrainConfig.init_from=SRC`) takes the source's latest parameters, its model config
(unless gin binds `train.model`, which must then have the same parameter shapes) and its
tokenizer (unless `TokenizerSpec.path` names another), and starts at step 0 with a fresh
optimizer state, schedule and data order. Once the new workdir has a checkpoint of its
own, resuming uses that and the source is not read again.

Scanned and unscanned layer layouts convert into each other, so a model imported with
`--no_scan_layers` can be fine-tuned with `scan_layers=True` and vice versa. A QLoRA run
(gin_configs/peft/qlora.gin), whose fresh state stores the base quantized, gets the
source's float weights quantized here, once (`llmjax.quant.qlora.quantize_like`).
"""

import dataclasses
import os
import re

import jax
import numpy as np

from llmjax.checkpoint import manager as ckpt_lib
from llmjax.errors import UserError
from llmjax.models.config import TransformerConfig
from llmjax.models.stack import stack_layers, unstack_layers
from llmjax.models.transformer import Transformer
from llmjax.quant import ptq, qlora

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


@dataclasses.dataclass(frozen=True)
class Source:
  """What a warm start reads from its source workdir."""

  workdir: str
  step: int
  model_config: TransformerConfig
  tokenizer_path: str | None   # the source's tokenizer file, if it has one


def load(workdir: str) -> Source:
  """Reads the source's latest checkpoint metadata (no arrays yet)."""
  workdir = os.path.abspath(workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise UserError(f"TrainConfig.init_from={workdir} has no checkpoints/ folder; point it at "
                    "a trained run or at a workdir made by `llmjax convert --from_hf`.")
  ckpt = ckpt_lib.CheckpointManager(ckpt_dir, async_save=False)
  try:
    step = ckpt.latest_step()
    meta = ckpt.restore_meta(step)
  finally:
    ckpt.close()
  ptq.require_float(meta, f"TrainConfig.init_from={workdir}")
  fields = {f.name for f in dataclasses.fields(TransformerConfig)}
  model_config = TransformerConfig(**{k: v for k, v in meta["model_config"].items()
                                      if k in fields})
  tokenizer_path = next((os.path.join(workdir, name) for name in TOKENIZER_FILES
                         if os.path.exists(os.path.join(workdir, name))), None)
  return Source(workdir, step, model_config, tokenizer_path)


def _strip(tree, fresh):
  """`tree` without the leaves whose path matches `fresh` (and dicts left empty)."""
  if fresh is None:
    return tree
  def keep(node, path):
    if not isinstance(node, dict):
      return node if re.search(fresh, path) is None else None
    kept = {k: keep(v, f"{path}/{k}") for k, v in node.items()}
    kept = {k: v for k, v in kept.items() if v is not None}
    return kept or None
  return keep(tree, "") or {}


def _shapes(tree):
  return jax.tree.map(lambda a: tuple(a.shape), tree)


def _match_layout(params, like):
  """`params` in the scanned/unscanned layout of `like` (both plain nested dicts)."""
  if jax.tree.structure(params) == jax.tree.structure(like):
    return params
  for convert in (stack_layers, unstack_layers):
    converted = convert(params)
    if jax.tree.structure(converted) == jax.tree.structure(like):
      return converted
  return params


def _graft(params, like, fresh, prefix=""):
  """`params` plus the leaves of `like` it lacks whose path (from the root, as `_strip`
  and the optimizer see it) matches regex `fresh` (the new run's adapters: the source
  has none)."""
  if fresh is None or not isinstance(like, dict) or not isinstance(params, dict):
    return params
  out = dict(params)
  for key, value in like.items():
    if key in params:
      out[key] = _graft(params[key], value, fresh, f"{prefix}/{key}")
    elif any(re.search(fresh, prefix + "/" + jax.tree_util.keystr(p, simple=True,
                                                                   separator="/"))
             for p, _ in jax.tree_util.tree_flatten_with_path({key: value})[0]):
      out[key] = value
  return out


def read_params(source: Source):
  """The source's parameters at its step, as saved (host arrays)."""
  ckpt = ckpt_lib.CheckpointManager(os.path.join(source.workdir, "checkpoints"),
                                    async_save=False)
  try:
    return ckpt.restore_params(source.step)[0]
  finally:
    ckpt.close()


def restore_params(source: Source, like, shardings, fresh: str | None = None, params=None):
  """The source's parameters (`params`, when already read with `read_params`), shaped
  and sharded like `like` (the fresh run's params); leaves of `like` the source lacks and
  whose path matches regex `fresh` keep `like`'s; weights `like` stores quantized
  (QLoRA) are quantized the same way."""
  params = read_params(source) if params is None else params
  params = qlora.quantize_like(Transformer(source.model_config),
                               jax.tree.map(np.asarray, params), like)
  bare = _strip(like, fresh)
  params = _match_layout(params, bare)
  params = _graft(params, like, fresh)
  if _shapes(params) != _shapes(like):
    got = dict(jax.tree_util.tree_flatten_with_path(_shapes(params))[0])
    want = dict(jax.tree_util.tree_flatten_with_path(_shapes(like))[0])
    diff = sorted({jax.tree_util.keystr(k) for k in set(got) ^ set(want)} |
                  {jax.tree_util.keystr(k) for k in set(got) & set(want) if got[k] != want[k]})
    raise UserError(f"TrainConfig.init_from={source.workdir} (step {source.step}) has "
                    f"parameters that do not fit this run's model: {diff[:6]} differ. Drop "
                    "the gin `train.model` binding to use the source's own config, or make "
                    "it match.")
  return jax.tree.map(lambda a, ref, s: jax.device_put(a.astype(ref.dtype), s),
                      params, like, shardings)
