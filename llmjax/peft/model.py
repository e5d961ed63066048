"""`PeftModel`: a `Transformer` whose layers run through PEFT interceptors.

The training loop and the objectives use a network through `config`, `init` and
`apply`; `PeftModel` has those and enters the interceptors (`llmjax.layers.intercept`)
around `init` and `apply`, so the adapters' parameters are created and used without
an edit of the model. Under `jit` this happens while jax traces. Everything else is
the base `Transformer`'s. Methods (`_method`): LoRA/DoRA (`lora`) and bottleneck
adapters (`adapters`) on `Einsum`s, prompt tuning (`prompt_tuning`) on the `embed`
lookup plus k input slots that `apply` adds and removes again.

  net = PeftModel(Transformer(cfg), [LoraConfig(target="attention", rank=8)])
  params = net.init(rng, tokens)["params"]          # base + lora_a_default/lora_b_default
  logits = net.apply({"params": params}, tokens)
  model, merged = net.merged(params)                # LoRA folded into the kernels

`merged` returns the plain `Transformer` when every method folds (LoRA, DoRA); adapters
and soft prompts cannot, so then it returns a `PeftModel` of those, which decodes
through the KV cache like the plain model (`llmjax.decode`) and is hashable for `jit`.

Two configs change the base rather than add an adapter (`llmjax.quant`): `QatConfig`
fake-quantizes the base's layers (QAT: the weights train through a straight-through
gradient; `merged` keeps it, the network was trained quantized), and `QloraConfig` stores
the frozen base quantized (QLoRA: `init` makes codes and scales, `apply` computes from
them through `QuantizedBase`, the LoRA adapters on top; `merged` leaves the adapters
unmerged, since folding them re-quantizes: `llmjax.peft.qlora.merge` does that on
request and reports the error it adds).
"""

import contextlib
import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from llmjax.errors import UserError
from llmjax.layers.embed import Embed
from llmjax.layers.intercept import intercept
from llmjax.layers.linear import Einsum
from llmjax.models.transformer import Transformer
from llmjax.peft import adapters as adapters_lib
from llmjax.peft import lora as lora_lib
from llmjax.peft import prompt_tuning as prompt_lib
from llmjax.quant import qat as qat_lib
from llmjax.quant import qlora as qbase_lib
from llmjax.quant.model import QuantizedModel

# Checkpoint metadata names (`meta['peft'][i]['method']`) of the config classes.
METHODS = {"lora": lora_lib.LoraConfig, "adapter": adapters_lib.AdapterConfig,
           "prompt_tuning": prompt_lib.PromptTuningConfig, "qat": qat_lib.QatConfig,
           "qlora": qbase_lib.QloraConfig}
_INTERCEPTORS = {lora_lib.LoraConfig: lora_lib.Lora, adapters_lib.AdapterConfig:
                 adapters_lib.Adapter, prompt_lib.PromptTuningConfig: prompt_lib.PromptTuning,
                 qat_lib.QatConfig: qat_lib.FakeQuant}
_BASE = (qat_lib.QatConfig, qbase_lib.QloraConfig)  # change the base: not adapters


def _method(config):
  for cls, interceptor in _INTERCEPTORS.items():
    if isinstance(config, cls):
      return interceptor(config)
  raise UserError(f"unknown PEFT method config {config!r}; use a LoraConfig, "
                  "AdapterConfig or PromptTuningConfig.")


def is_adapter(config) -> bool:
  """Whether a config adds an adapter (with a `name` and parameters of its own), rather
  than changing the base (QAT, QLoRA's quantized base)."""
  return not isinstance(config, _BASE)


def qlora_config(configs: Sequence):
  """The `QloraConfig` among `configs` (None: the base is float)."""
  found = [c for c in configs if isinstance(c, qbase_lib.QloraConfig)]
  if len(found) > 1:
    raise UserError(f"{len(found)} QloraConfigs; the base is stored one way.")
  return found[0] if found else None


def _check_bases(configs: Sequence, quant) -> None:
  if quant is None:
    return
  if any(isinstance(c, qat_lib.QatConfig) for c in configs):
    raise UserError("QatConfig with QloraConfig: a QLoRA base is quantized already and "
                    "frozen, there is nothing to fake-quantize; drop one of them.")
  other = [type(c).__name__ for c in configs if is_adapter(c)
           and not isinstance(c, lora_lib.LoraConfig)]
  if other:
    raise UserError(f"QloraConfig goes with LoraConfigs only, not {', '.join(other)}; "
                    "use gin_configs/peft/qlora.gin's LoRA settings.")


def mergeable(config) -> bool:
  """Whether `merged` folds the config's adapter into the kernels (LoRA, DoRA)."""
  return isinstance(config, lora_lib.LoraConfig)


class PeftModel:
  """`base` with `configs`' adapters (see the module docstring)."""

  def __init__(self, base: Transformer, configs: Sequence):
    self.base = base
    self.configs = tuple(configs)
    self._quant = qlora_config(self.configs)
    _check_bases(self.configs, self._quant)
    self._methods = [_method(c) for c in self.configs
                     if not isinstance(c, qbase_lib.QloraConfig)]
    prompts = [m for m in self._methods if isinstance(m, prompt_lib.PromptTuning)]
    if len(prompts) > 1:
      raise UserError(f"{len(prompts)} PromptTuningConfigs; one soft prompt per model "
                      "(make it longer with PromptTuningConfig.length).")
    self._prompt = prompts[0] if prompts else None

  @property
  def config(self):
    return self.base.config

  @property
  def soft_prompt(self) -> int:
    """The length of the soft prompt every row gets before it (prompt tuning; 0: none)."""
    return sum(c.length for c in self.configs if isinstance(c, prompt_lib.PromptTuningConfig))

  @property
  def network(self):
    """What the interceptors wrap: the base `Transformer`, or a QLoRA base computed from
    its quantized arrays (`QuantizedBase`, whose interceptor is entered inside theirs)."""
    if self._quant is None:
      return self.base
    return qbase_lib.QuantizedBase(self.base, self._quant.quant)

  def _active(self, stack: contextlib.ExitStack):
    # Entered first = called first: bottleneck adapters wrap LoRA on the same layer, so
    # they see the LoRA-adapted output, as they do once LoRA is merged into the kernel;
    # fake quantization (QAT) comes last, next to the layer: everything above sees the
    # quantized product, as it will once the weights are packed.
    for method in sorted(self._methods, key=_order):
      if hasattr(method, "selection"):
        stack.enter_context(intercept(method, **method.selection))
      elif method is self._prompt:  # the token lookup only ('token_type_embed' is another)
        stack.enter_context(intercept(method, path="embed", layers=(Embed,),
                                      methods=("__call__",)))
      else:
        stack.enter_context(intercept(method, path=method.config.selects, layers=(Einsum,),
                                      methods=("__call__",)))

  def init(self, *args, **kwargs):
    if self._quant is not None and not any(is_adapter(c) for c in self.configs):
      raise UserError("QloraConfig without a LoraConfig: the quantized base is frozen, so "
                      "nothing would train; add LoRA (gin_configs/peft/qlora.gin does).")
    seen = {}
    with contextlib.ExitStack() as stack:
      stack.enter_context(intercept(_recorder(seen), layers=(Einsum,), methods=("__call__",)))
      self._active(stack)
      variables = self.network.init(*args, **kwargs)
    for cfg in self.configs:
      if hasattr(cfg, "selects") and not any(cfg.selects(path) for path in seen):
        field = "placement" if hasattr(cfg, "placement") else "target"
        raise UserError(f"{type(cfg).__name__}.{field}={getattr(cfg, field)!r} (regex "
                        f"{cfg.pattern!r}) matches no layer; the dense layers are: "
                        f"{sorted(seen)}.")
    return variables

  def apply(self, variables, *args, method=None, **kwargs):
    with contextlib.ExitStack() as stack:
      self._active(stack)
      if self._prompt is not None:  # k more input slots, their outputs dropped again
        return self._prompt.apply(self.network, variables, args, kwargs, method)
      return self.network.apply(variables, *args, method=method, **kwargs)

  def equations(self, *init_args, **init_kwargs) -> dict[str, str]:
    """`{layer key: Einsum equation}` of every dense layer (traced, nothing computed)."""
    return equations(self.base, *init_args, **init_kwargs)

  def merged(self, params, equations_: dict[str, str] | None = None):
    """`(model, params)` with every mergeable adapter (LoRA, DoRA) folded in and removed:
    model is the base Transformer, or a PeftModel of the rest (adapters, soft prompts),
    whose parameters stay. For decoding and export. QAT stays (module docstring); on a
    QLoRA base nothing is folded and `(self, params)` comes back."""
    if self._quant is not None:
      return self, params
    rest = [cfg for cfg in self.configs if not mergeable(cfg)]
    if len(rest) < len(self.configs):
      eqs = equations_ or equations(self.base)
      for cfg in self.configs:
        if mergeable(cfg):
          params = lora_lib.merge(params, cfg, eqs)
    return (PeftModel(self.base, rest) if rest else self.base), params

  def without_adapters(self, params):
    """`(base network, params less every adapter's)`: the model with its adapters
    switched off, computed from the same arrays (no second copy; a DPO reference). The
    base is the plain `Transformer`, QAT's `PeftModel`, or QLoRA's `QuantizedModel`."""
    params = drop_adapters(params, self.configs)
    if self._quant is not None:
      return QuantizedModel(self.base, self._quant.quant), params
    bases = [c for c in self.configs if not is_adapter(c)]
    return (PeftModel(self.base, bases) if bases else self.base), params

  def clone(self, **updates):
    """The same adapters on `base.clone(**updates)` (e.g. the unscanned decoding layout)."""
    return PeftModel(self.base.clone(**updates), self.configs)

  def __eq__(self, other):  # jit takes the model as a static argument
    return (isinstance(other, PeftModel) and self.base == other.base
            and self.configs == other.configs)

  def __hash__(self):
    return hash((self.base, self.configs))

  def __getattr__(self, name):  # everything else is the base model's
    if name in ("base", "configs", "_methods", "_prompt", "_quant"):
      raise AttributeError(name)
    return getattr(self.base, name)


def _order(method) -> int:
  """`_active`'s order: bottleneck adapters, then LoRA and soft prompts, then QAT."""
  if isinstance(method, adapters_lib.Adapter):
    return 0
  return 2 if isinstance(method, qat_lib.FakeQuant) else 1


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
  """The configs as checkpoint metadata (`meta['peft']`): `{"method": ..., **fields}`, or
  `{"method": ..., "config": fields}` for a config with a `method` field of its own (QAT,
  a QLoRA base: their quantization method)."""
  names = {cls: name for name, cls in METHODS.items()}
  out = []
  for cfg in configs:
    if type(cfg) not in names:
      raise UserError(f"unknown PEFT method config {cfg!r}; use one of "
                      f"{', '.join(c.__name__ for c in METHODS.values())}.")
    fields = dataclasses.asdict(cfg)
    nested = "method" in fields
    out.append({"method": names[type(cfg)], **({"config": fields} if nested else fields)})
  return out


def from_meta(entries) -> list:
  out = []
  for entry in entries or ():
    entry = dict(entry)
    method = entry.pop("method", None)
    if method not in METHODS:
      raise UserError(f"unknown PEFT method {method!r} in checkpoint metadata {entry}; "
                      f"this llmjax knows {sorted(METHODS)} (a newer version wrote it?).")
    out.append(METHODS[method](**entry.get("config", entry)))
  return out


def merged_params(model: Transformer, params, meta: dict):
  """`params` of a checkpoint with its mergeable adapters (`meta['peft']`) folded in;
  unmergeable ones (adapters, soft prompts) keep their parameters (`merged_model` gives
  the network that uses them). `params` unchanged when it has none."""
  return merged_model(model, params, meta)[1]


def merged_model(model: Transformer, params, meta: dict, adapter: str | None = None):
  """`(network, params)` to run a checkpoint with (generation): LoRA folded into
  `model`'s kernels, and a `PeftModel` when adapters or a soft prompt remain.

  A checkpoint may hold several named adapters (`llmjax peft import` adds them and
  records the newest in `meta['peft_active']`); one is active at a time: `adapter` (a
  `LoraConfig.name` etc.; 'none' for the base alone), else `meta['peft_active']`, else
  all of them (the adapters one run trained together)."""
  configs, params = select_adapter(from_meta(meta.get("peft")), params,
                                   adapter or meta.get("peft_active"))
  return PeftModel(model, configs).merged(params) if configs else (model, params)


def adapter_names(configs: Sequence) -> list[str]:
  return sorted({c.name for c in configs if is_adapter(c)})


def select_adapter(configs: Sequence, params, name: str | None):
  """`(configs named `name`, params without the other adapters' parameters)`; every
  config when `name` is None (the adapters a run trained together). QAT and a QLoRA
  base are no adapters: they stay."""
  names = adapter_names(configs)
  if name is None:
    return list(configs), params
  if name != "none" and name not in names:
    raise UserError(f"no adapter named {name!r} in this checkpoint; it holds {names} "
                    "(or pass --adapter=none for the base model).")
  keep = [c for c in configs if not is_adapter(c) or c.name == name]
  return keep, drop_adapters(params, [c for c in configs if c not in keep])


def drop_adapters(params, configs: Sequence):
  """`params` without the parameters of `configs`' adapters."""
  import re

  from flax import traverse_util
  pattern = trainable_pattern(configs)
  if pattern is None:
    return params
  regex = re.compile(pattern)
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if not regex.search("/" + "/".join(map(str, k)))})


def require_mergeable(meta: dict) -> None:
  """Raises if the checkpoint's PEFT methods cannot be folded into plain weights (an
  export of the base model alone would silently lose them). A QAT run exports its float
  weights (`llmjax quantize` packs them)."""
  configs = from_meta(meta.get("peft"))
  if qlora_config(configs) is not None:
    raise UserError("this checkpoint's base is stored quantized (QLoRA), so there is no "
                    "float model to export; `llmjax peft merge` folds the adapter into a "
                    "quantized workdir (for generate / eval), and `llmjax peft export "
                    "--to_peft` writes the adapter for the float base it was trained from.")
  rest = [type(c).__name__ for c in configs
          if not mergeable(c) and not isinstance(c, qat_lib.QatConfig)]
  if rest:
    raise UserError(f"this checkpoint was tuned with {', '.join(rest)}, which cannot be "
                    "folded into the model's weights; only plain and LoRA/DoRA checkpoints "
                    "export as one model. Sample with `llmjax generate --workdir=...`; export "
                    "a soft prompt on its own with `llmjax peft export --to_peft` (PEFT has no "
                    "format for bottleneck adapters on these models), or fine-tune with "
                    "gin_configs/peft/lora.gin for an exportable model.")


def check_data(configs: Sequence, data) -> None:
  """Refuses data the configs cannot train on (a soft prompt needs unpacked rows)."""
  if any(isinstance(c, prompt_lib.PromptTuningConfig) for c in configs) and (
      getattr(data, "packing", "none") != "none"):
    raise UserError(f"prompt tuning needs one document per row, but DataConfig.packing="
                    f"{data.packing!r} packs several; set DataConfig.packing='none' "
                    "(gin_configs/peft/prompt_tuning.gin does).")


def init_prompts(params, configs: Sequence, tokenizer, log=None):
  """`params` with the soft prompts that have an `init_text` set from its embeddings
  (a fresh run's step 0, after any warm start); a QLoRA base's storage is logged then."""
  for cfg in configs:
    if isinstance(cfg, qbase_lib.QloraConfig) and log:
      log(qbase_lib.storage_line(params, cfg))
    if isinstance(cfg, prompt_lib.PromptTuningConfig) and cfg.init_text:
      params = prompt_lib.init_from_text(params, cfg, tokenizer)
      if log:
        log(f"soft prompt {cfg.name!r}: {cfg.length} vectors from the embeddings of "
            f"{cfg.init_text!r}")
  return params


def trainable_pattern(configs: Sequence) -> str | None:
  """The `OptimizerConfig.trainable` regex of the configs' adapters (None: no adapters,
  everything trains: no configs, or QAT alone)."""
  return "|".join(f"(?:{c.trainable})" for c in configs if c.trainable) or None
