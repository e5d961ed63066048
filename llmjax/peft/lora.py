"""LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024) on any `Einsum` of the network.

A targeted layer `y = x W + b` (W: the kernel, any einsum, e.g. `'BLD,DNH->BLNH'`) gets
two parameters beside its kernel, created by the interceptor (`llmjax.layers.intercept`),
so the model is not edited:

  lora_a_<name>  [in..., r]   uniform(+-1/sqrt(fan_in)) (PEFT's kaiming-uniform a=sqrt(5))
  lora_b_<name>  [r, out...]  zeros: step 0 computes exactly the base model
  y = x W + b + s * dropout(x) A B,      s = alpha / r   (rsLoRA: alpha / sqrt(r))

`in...` are the kernel's contracted dimensions (D for q/k/v, (N, H) for the output
projection), `out...` the ones it keeps. DoRA adds a magnitude: each output column of
the adapted kernel is rescaled to `||W||_col + lora_m_<name>` (the parameter is the
change from the base kernel's column norms, zeros at the start, so the adapter is exact
on whatever base it is loaded onto; PEFT's `magnitude` is the sum):

  y = (||W||_col + m) / ||W + s A B||_col * (x W + s dropout(x) A B) + b

The column norm is treated as a constant in the backward pass (`stop_gradient`), as the
DoRA paper (sec. 4.3) and Hugging Face PEFT do. `merge` folds an adapter into the kernels
(for export and fast decoding) and drops its parameters; `unmerge` takes it out again
(LoRA only: DoRA's rescaling cannot be undone without the norms). Several adapters may
live in one tree under different names; the model computes with the one configured.

Written here rather than taken from qwix: qwix intercepts `dot_general` and has no
merge, no unmerge, no DoRA and no PEFT export; here the whole method is this file.
"""

import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llmjax.errors import UserError
from llmjax.layers.linear import Einsum

# Module-path regexes (searched) of the common target sets.
PRESETS = {
    "attention_qv": r"attention/(query|value)$",
    "attention": r"attention/(query|key|value|out)$",
    "all_linear": r"attention/(query|key|value|out)$|mlp/(wi|wi_0|wi_1|wo)$",
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which layers get an adapter and its hyperparameters (gin: `LoraConfig.*`)."""

  target: str = "attention_qv"   # a preset name (PRESETS) or a regex over module paths
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0           # on the adapter's input, training only
  rslora: bool = False           # scale alpha / sqrt(rank) (Kalajdzievski 2023)
  dora: bool = False             # weight-decomposed LoRA (magnitude + direction)
  name: str = "default"          # several adapters in one tree differ by name

  def __post_init__(self):
    if not isinstance(self.rank, int) or self.rank <= 0:
      raise UserError(f"LoraConfig.rank={self.rank!r} must be a positive integer.")
    if not 0.0 <= self.dropout < 1.0:
      raise UserError(f"LoraConfig.dropout={self.dropout} must be in [0, 1).")
    if not re.fullmatch(r"[A-Za-z0-9]+", self.name):
      raise UserError(f"LoraConfig.name={self.name!r}: use letters and digits only.")
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise UserError(f"LoraConfig.target={self.target!r} is not a preset "
                      f"{sorted(PRESETS)} nor a valid regex ({e}).") from e

  @property
  def pattern(self) -> str:
    return PRESETS.get(self.target, self.target)

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  def names(self) -> tuple[str, str, str]:
    """The parameter names `(A, B, magnitude)` of this adapter."""
    return tuple(f"lora_{p}_{self.name}" for p in "abm")

  def selects(self, path: str) -> bool:
    return re.search(self.pattern, path) is not None

  @property
  def trainable(self) -> str:
    """A regex for `OptimizerConfig.trainable`: this adapter's parameters only."""
    return rf"/lora_[abm]_{self.name}$"


def split_equation(equation: str) -> tuple[str, str, str, str, str]:
  """`(x, kernel, out, contracted, kept)` letters of an `Einsum` equation."""
  x, kernel, out = equation.replace("->", ",").split(",")
  contracted = "".join(c for c in kernel if c not in out)
  kept = "".join(c for c in kernel if c in out)
  return x, kernel, out, contracted, kept


def delta_kernel(a: jax.Array, b: jax.Array, equation: str, scale: float) -> jax.Array:
  """`s * A B` laid out like the kernel (`[in..., r] x [r, out...]`)."""
  _, kernel, _, contracted, kept = split_equation(equation)
  return scale * jnp.einsum(f"{contracted}R,R{kept}->{kernel}", a, b,
                            precision=jax.lax.Precision.HIGHEST)


def dora_factor(kernel, a, b, m, equation: str, scale: float) -> jax.Array:
  """DoRA's per-column rescaling `(||W|| + m) / ||W + s A B||`, the second norm held
  constant in the backward pass (DoRA sec. 4.3, as PEFT)."""
  adapted = kernel.astype(jnp.float32) + delta_kernel(a, b, equation, scale)
  return (column_norm(kernel, equation) + m) / jax.lax.stop_gradient(
      column_norm(adapted, equation))


def column_norm(kernel: jax.Array, equation: str) -> jax.Array:
  """The norm of each output column of a kernel over its contracted dims: `[out...]`."""
  _, letters, _, _, kept = split_equation(equation)
  squares = jnp.einsum(f"{letters}->{kept}", jnp.square(kernel.astype(jnp.float32)))
  return jnp.sqrt(squares)


class Lora:
  """The interceptor of one adapter: `with intercept(Lora(cfg), path=cfg.selects)`."""

  def __init__(self, config: LoraConfig):
    self.config = config

  def __call__(self, call):
    cfg, layer = self.config, call.module
    x, y = call.args[0], call.proceed()
    xs, _, out, contracted, kept = split_equation(layer.equation)
    a, b, m = self._params(layer, contracted, kept)
    h = x
    if cfg.dropout and layer.has_rng("dropout"):
      keep = jax.random.bernoulli(layer.make_rng("dropout"), 1.0 - cfg.dropout, x.shape)
      h = jnp.where(keep, x / (1.0 - cfg.dropout), 0.0).astype(x.dtype)
    batch = "".join(c for c in xs if c not in contracted)
    low = jnp.einsum(f"{xs},{contracted}R->{batch}R", h, a.astype(layer.dtype),
                     preferred_element_type=jnp.float32)
    delta = jnp.einsum(f"{batch}R,R{kept}->{out}", low, b.astype(jnp.float32),
                       preferred_element_type=jnp.float32) * cfg.scale
    y32 = y.astype(jnp.float32)
    if m is None:
      return (y32 + delta).astype(y.dtype)
    kernel, bias = layer.weights()
    factor = dora_factor(kernel, a, b, m, layer.equation, cfg.scale)       # [out...]
    base = y32 - (0.0 if bias is None else bias.astype(jnp.float32))
    # = factor * (x W + delta) + bias, written so that factor == 1 returns y unchanged
    return (y32 + (factor - 1.0) * base + factor * delta).astype(y.dtype)

  def _params(self, layer: Einsum, contracted: str, kept: str):
    cfg = self.config
    kernel_letters = split_equation(layer.equation)[1]
    dims = dict(zip(kernel_letters, layer.shape))
    axes = dict(zip(kernel_letters, layer.axes))
    in_shape = tuple(dims[c] for c in contracted)
    out_shape = tuple(dims[c] for c in kept)
    fan_in, fan_out = math.prod(in_shape), math.prod(out_shape)
    if cfg.rank > min(fan_in, fan_out):
      raise UserError(f"LoraConfig.rank={cfg.rank} exceeds the layer "
                      f"{'/'.join(map(str, layer.path))} ({fan_in} -> {fan_out}); use a "
                      f"rank <= {min(fan_in, fan_out)}.")
    bound = 1.0 / math.sqrt(fan_in)
    init_a = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    name_a, name_b, name_m = cfg.names()
    a = layer.param(name_a, nn.with_logical_partitioning(
        init_a, tuple(axes[c] for c in contracted) + (None,)), in_shape + (cfg.rank,),
        layer.param_dtype)
    b = layer.param(name_b, nn.with_logical_partitioning(
        nn.initializers.zeros, (None,) + tuple(axes[c] for c in kept)),
        (cfg.rank,) + out_shape, layer.param_dtype)
    m = None
    if cfg.dora:  # stored as the change of the magnitude from ||W||: zeros at the start
      m = layer.param(name_m, nn.with_logical_partitioning(
          nn.initializers.zeros, tuple(axes[c] for c in kept)), out_shape, layer.param_dtype)
    return a, b, m


def _layers(tree, prefix=""):
  """`(path, node)` of every dict in a param tree that holds a `kernel`."""
  if not isinstance(tree, dict):
    return
  if "kernel" in tree:
    yield prefix, tree
  for key, value in tree.items():
    yield from _layers(value, f"{prefix}/{key}" if prefix else key)


def _fold(kernel, a, b, m, eq, scale, sign):
  """One layer's kernel with `sign * s A B` added (and DoRA's rescaling when merging);
  scanned layers (a leading layer axis on all four) are mapped over."""
  if kernel.ndim == len(split_equation(eq)[1]) + 1:
    return jax.vmap(lambda k, a, b, m: _fold(k, a, b, m, eq, scale, sign))(kernel, a, b, m)
  new = kernel.astype(jnp.float32) + sign * delta_kernel(a, b, eq, scale)
  if m is not None:
    new = new * dora_factor(kernel, a, b, m, eq, scale)
  return new.astype(kernel.dtype)


def merge(params, config: LoraConfig, equations: dict[str, str]):
  """`params` with adapter `config.name` folded into its kernels and removed.

  `equations`: module path -> `Einsum.equation` (`llmjax.peft.model.equations`). Raises
  if the tree has no such adapter (merging twice is refused).
  """
  name_a, name_b, name_m = config.names()
  params = jax.tree.map(lambda v: v, params)  # fresh containers; arrays shared
  merged = 0
  for path, node in _layers(params):
    if name_a in node:
      a, b, m = node.pop(name_a), node.pop(name_b), node.pop(name_m, None)
      node["kernel"] = _fold(node["kernel"], a, b, m, _equation(equations, path),
                             config.scale, 1.0)
      merged += 1
  if not merged:
    raise UserError(f"no LoRA adapter {config.name!r} in these parameters (already merged, "
                    "or trained with another LoraConfig.name); nothing was changed.")
  return params


def unmerge(params, adapter: dict, config: LoraConfig, equations: dict[str, str]):
  """Takes adapter `config.name` (`adapter_params(...)` of the unmerged tree) back out of
  merged kernels and puts its parameters back: the inverse of `merge` for LoRA."""
  if config.dora:
    raise UserError("a merged DoRA adapter cannot be unmerged (its column norms are gone); "
                    "keep the unmerged parameters instead.")
  name_a, name_b, _ = config.names()
  params = jax.tree.map(lambda v: v, params)
  for path, node in _layers(params):
    if path in adapter:
      if name_a in node:
        raise UserError(f"{path} already has adapter {config.name!r}: it is not merged.")
      part = adapter[path]
      node["kernel"] = _fold(node["kernel"], part[name_a], part[name_b], None,
                             _equation(equations, path), config.scale, -1.0)
      node.update(part)
  return params


def adapter_params(params, config: LoraConfig) -> dict:
  """`{module path: {param name: array}}` of adapter `config.name`."""
  names = set(config.names())
  return {path: {k: v for k, v in node.items() if k in names}
          for path, node in _layers(params) if names & set(node)}


def layer_key(path: str) -> str:
  """A module path with unscanned layer names folded ('layers_3' -> 'layers')."""
  return re.sub(r"/layers_\d+(?=/|$)", "/layers", path)


def _equation(equations, path):
  if layer_key(path) not in equations:
    raise UserError(f"no Einsum at {path} in this model; the adapter belongs to another.")
  return equations[layer_key(path)]


def num_params(tree) -> int:
  return int(sum(np.size(a) for a in jax.tree.leaves(tree)))
