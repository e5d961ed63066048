"""`PeftModel`: a `Transformer` whose dense layers run through PEFT interceptors.

The training loop and the objectives use a network through `config`, `init` and
`apply`; `PeftModel` has those and enters the interceptors (`llmjax.layers.intercept`)
around `init` and `apply`, so the adapters' parameters are created and used without
an edit of the model. Under `jit` this happens while jax traces. Everything else is
the base `Transformer`'s.

  net = PeftModel(Transformer(cfg), [LoraConfig(target="attention", rank=8)])
  params = net.init(rng, tokens)["params"]          # base + lora_a_default/lora_b_default
  logits = net.apply({"params": params}, tokens)
  base, merged = net.merged(params)                 # a plain Transformer and its params
"""

import contextlib
import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from llmjax.errors import UserError
from llmjax.layers.intercept import intercept
from llmjax.layers.linear import Einsum
from llmjax.models.transformer import Transformer
from llmjax.peft import lora as lora_lib


def _method(config):
  if isinstance(config, lora_lib.LoraConfig):
    return lora_lib.Lora(config)
  raise UserError(f"unknown PEFT method config {config!r}; use a LoraConfig.")


class PeftModel:
  """`base` with `configs`' adapters (see the module docstring)."""

  def __init__(self, base: Transformer, configs: Sequence):
    self.base = base
    self.configs = tuple(configs)
    self._methods = [_method(c) for c in self.configs]

  @property
  def config(self):
    return self.base.config

  def _active(self, stack: contextlib.ExitStack):
    for method in self._methods:
      stack.enter_context(intercept(method, path=method.config.selects, layers=(Einsum,),
                                    methods=("__call__",)))

  def init(self, *args, **kwargs):
    seen = {}
    with contextlib.ExitStack() as stack:
      stack.enter_context(intercept(_recorder(seen), layers=(Einsum,), methods=("__call__",)))
      self._active(stack)
      variables = self.base.init(*args, **kwargs)
    for cfg in self.configs:
      if not any(cfg.selects(path) for path in seen):
        raise UserError(f"{type(cfg).__name__}.target={cfg.target!r} (regex "
                        f"{cfg.pattern!r}) matches no layer; the dense layers are: "
                        f"{sorted(seen)}.")
    return variables

  def apply(self, *args, **kwargs):
    with contextlib.ExitStack() as stack:
      self._active(stack)
      return self.base.apply(*args, **kwargs)

  def equations(self, *init_args, **init_kwargs) -> dict[str, str]:
    """`{layer key: Einsum equation}` of every dense layer (traced, nothing computed)."""
    return equations(self.base, *init_args, **init_kwargs)

  def merged(self, params, equations_: dict[str, str] | None = None):
    """`(base Transformer, params with every adapter folded in)`: for decoding/export."""
    eqs = equations_ or equations(self.base)
    for cfg in self.configs:
      params = lora_lib.merge(params, cfg, eqs)
    return self.base, params

  def __getattr__(self, name):  # everything else is the base model's
    if name in ("base", "configs", "_methods"):
      raise AttributeError(name)
    return getattr(self.base, name)


def _recorder(seen: dict):
  def record(call):
    seen[lora_lib.layer_key(call.path)] = call.module.equation
    return call.proceed()
  return record


def _dummy_inputs(cfg):
  tokens = jax.ShapeDtypeStruct((1, 2), np.int32)
  return (tokens,), ({"encoder_tokens": tokens} if cfg.arch == "encoder_decoder" else {})


def equations(base: Transformer, *init_args, **init_kwargs) -> dict[str, str]:
  """`{layer key: Einsum equation}` of `base`'s dense layers, by tracing its init."""
  if not init_args:
    init_args, init_kwargs = _dummy_inputs(base.config)
  seen = {}
  with intercept(_recorder(seen), layers=(Einsum,), methods=("__call__",)):
    jax.eval_shape(lambda *a: base.init(jax.random.PRNGKey(0), *a, **init_kwargs), *init_args)
  return seen


def wrap(net: Transformer, configs: Sequence):
  """`net` itself when there is no PEFT config, else a `PeftModel`."""
  return PeftModel(net, configs) if configs else net


def to_meta(configs: Sequence) -> list[dict]:
  """The configs as checkpoint metadata (`meta['peft']`)."""
  return [{"method": "lora", **dataclasses.asdict(c)} for c in configs]


def from_meta(entries) -> list:
  out = []
  for entry in entries or ():
    entry = dict(entry)
    if entry.pop("method", None) != "lora":
      raise UserError(f"unknown PEFT method in checkpoint metadata: {entry}")
    out.append(lora_lib.LoraConfig(**entry))
  return out


def merged_params(model: Transformer, params, meta: dict):
  """`params` of a checkpoint with its adapters (`meta['peft']`) folded in, for a plain
  `Transformer` (generation, export); `params` unchanged when it has none."""
  configs = from_meta(meta.get("peft"))
  return PeftModel(model, configs).merged(params)[1] if configs else params


def trainable_pattern(configs: Sequence) -> str | None:
  """The `OptimizerConfig.trainable` regex of the configs' adapters (None: no configs)."""
  return "|".join(f"(?:{c.trainable})" for c in configs) if configs else None
