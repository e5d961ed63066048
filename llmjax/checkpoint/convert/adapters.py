"""LoRA and DoRA adapters in and out of Hugging Face PEFT's folder format.

PEFT saves an adapter as `adapter_config.json` (`peft_type: LORA`, `r`, `lora_alpha`,
`target_modules`, `use_rslora`, `use_dora`, ...) and `adapter_model.safetensors` with,
for every adapted torch module `M`:

  base_model.model.M.lora_A.weight          [r, in]     PEFT computes
  base_model.model.M.lora_B.weight          [out, r]      y = W x + s B A x
  base_model.model.M.lora_magnitude_vector  [out]       (DoRA: ||W + s B A||_row = m)

llmjax's adapter of a kernel `[in..., out...]` is `A [in..., r]`, `B [r, out...]`, so the
PEFT factors are the same numbers laid out like the converter lays out the kernel. Rather
than a second table of names and layouts per architecture, the layout is *measured*: every
targeted kernel is filled with distinct integer codes and passed through the
architecture's own `params_to_hf`; where each code lands says which torch module holds the
kernel, which of its input and output features each kernel entry became, and whether
the torch weight is `[out, in]` (nn.Linear) or `[in, out]` (GPT-2's Conv1D,
`fan_in_fan_out`). GPT-2's fused `c_attn` holds q, k and v side by side: adapters on
several of them become one PEFT adapter of the summed rank (A stacked, B block-diagonal;
`rank_pattern`/`alpha_pattern` keep the scale), and an imported `c_attn` adapter becomes
q/k/v adapters sharing A. The arithmetic is exact either way.

  export_adapter(dir, cfg, params, lora_config, model_type)   # -> PEFT folder
  lora_config, params = import_adapter(dir, cfg, params, model_type)
"""

import json
import math
import os
import re

import jax
import numpy as np

from llmjax.checkpoint.convert import hf_io
from llmjax.errors import UserError
from llmjax.models.config import TransformerConfig
from llmjax.models.stack import stack_layers, unstack_layers
from llmjax.peft import lora as lora_lib

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_TASK = {"decoder_only": "CAUSAL_LM", "encoder_decoder": "SEQ_2_SEQ_LM",
         "encoder_only": None}
# adapter_config.json options that change the math in ways llmjax does not model
_REFUSED = {"bias": "none", "lora_bias": False, "use_qalora": False, "modules_to_save": None,
            "layer_replication": None, "target_parameters": None,
            "trainable_token_indices": None, "use_bdlora": None}


def _converter(model_type):
  from llmjax.checkpoint import convert
  return convert._converter(model_type)


class _Slot:
  """Where one llmjax kernel lives inside one torch weight (see the module docstring)."""

  def __init__(self, module, in_index, out_rows, out_index, conv1d, hf_shape):
    self.module, self.conv1d, self.hf_shape = module, conv1d, hf_shape  # hf: (out, in)
    self.in_index = in_index      # [in_hf]: the kernel's flat input index of each feature
    self.out_rows = out_rows      # the torch output features this kernel fills
    self.out_index = out_index    # the kernel's flat output index of each of those


def _flat_sizes(kernel_shape, equation):
  _, letters, _, contracted, kept = lora_lib.split_equation(equation)
  dims = dict(zip(letters, kernel_shape))
  return math.prod(dims[c] for c in contracted), math.prod(dims[c] for c in kept)


def _codes(shape, equation, offset):
  """Kernel-shaped float64 codes `offset + i * O + o + 1` (i, o: flat in/out index)."""
  _, letters, _, contracted, kept = lora_lib.split_equation(equation)
  dims = dict(zip(letters, shape))
  n_in, n_out = _flat_sizes(shape, equation)
  flat = offset + 1 + np.arange(n_in * n_out, dtype=np.float64)
  grid = flat.reshape([dims[c] for c in contracted] + [dims[c] for c in kept])
  return np.einsum(f"{contracted}{kept}->{letters}", grid)


def _locate(name, tensor, offset, n_in, n_out) -> _Slot:
  """Reads where the codes of one kernel landed in the torch weight `name`."""
  hit = (tensor > offset) & (tensor <= offset + n_in * n_out)
  code = np.where(hit, tensor - offset - 1, 0).astype(np.int64)
  for conv1d in (False, True) if tensor.ndim == 2 else ():
    c, h = (code.T, hit.T) if conv1d else (code, hit)  # [out, in]
    rows = np.nonzero(h.any(1))[0]
    if (len(rows) == n_out and h.shape[1] == n_in and h[rows].all()
        and np.all(c[rows] // n_out == c[rows[:1]] // n_out)):
      return _Slot(name.removesuffix(".weight"), c[rows[0]] // n_out, rows,
                   c[rows, 0] % n_out, conv1d, h.shape)
  raise UserError(f"the torch weight {name} is not a plain linear map of one llmjax "
                  "kernel; PEFT interop does not support this layer.")


def _slots(cfg, params, model_type, equations, paths, strict=True) -> dict[str, _Slot]:
  """`{kernel path: _Slot}` for the kernels at `paths` of unscanned `params` (not
  `strict`: kernels the export does not write are left out)."""
  tree = jax.tree.map(lambda a: np.zeros(np.shape(a), np.float64), params)
  offsets, offset = {}, 0.0
  for path in paths:
    node = _node(tree, path)
    eq = equations[lora_lib.layer_key(path)]
    node["kernel"] = _codes(node["kernel"].shape, eq, offset)
    offsets[path] = (offset, *_flat_sizes(node["kernel"].shape, eq))
    offset += node["kernel"].size
  hf = _converter(model_type).params_to_hf(tree, cfg)
  slots = {}
  for path, (off, n_in, n_out) in offsets.items():
    found = [n for n, t in hf.items() if n.endswith(".weight") and np.any(
        (t > off) & (t <= off + n_in * n_out))]
    if not found and not strict:
      continue
    if len(found) != 1:
      raise UserError(f"llmjax layer {path} maps to {found or 'no'} torch weights of "
                      f"{model_type}; PEFT interop needs exactly one.")
    slots[path] = _locate(found[0], np.asarray(hf[found[0]]), off, n_in, n_out)
  return slots


def _node(tree, path):
  for part in path.split("/"):
    tree = tree[part]
  return tree


def _unscanned(cfg, params):
  params = jax.tree.map(np.asarray, jax.device_get(params))
  return unstack_layers(params) if cfg.scan_layers else params


def _equations(cfg):
  from llmjax.models.transformer import Transformer
  from llmjax.peft.model import equations
  return equations(Transformer(cfg))


def _adapter_paths(params, config):
  return sorted(lora_lib.adapter_params(params, config))


def export_adapter(out_dir: str, cfg: TransformerConfig, params, config: lora_lib.LoraConfig,
                   *, model_type: str, base_model_name_or_path: str | None = None) -> None:
  """Writes adapter `config.name` of `params` as a PEFT folder for the `model_type`
  export of the same base (`llmjax convert --to_hf`)."""
  p, eqs = _unscanned(cfg, params), _equations(cfg)
  paths = _adapter_paths(p, config)
  if not paths:
    raise UserError(f"these parameters hold no LoRA adapter {config.name!r} (merged "
                    "already, or trained under another LoraConfig.name).")
  slots = _slots(cfg, p, model_type, eqs, paths)
  modules: dict[str, list[str]] = {}
  for path in paths:
    modules.setdefault(slots[path].module, []).append(path)
  base = _converter(model_type).params_to_hf(p, cfg) if config.dora else None
  tensors, ranks = {}, {}
  for module, members in modules.items():
    ranks[module] = config.rank * len(members)
    tensors.update(_export_module(module, members, slots, p, config, eqs, base))
  write_peft_dir(out_dir, _config_json(cfg, config, ranks, slots, base_model_name_or_path),
                 tensors)


def _export_module(module, members, slots, p, config, eqs, base):
  """PEFT tensors of one torch module holding the kernels `members` (several: fused)."""
  r, (name_a, name_b, name_m) = config.rank, config.names()
  out_hf, in_hf = slots[members[0]].hf_shape
  a_hf = np.zeros((r * len(members), in_hf), np.float32)
  b_hf = np.zeros((out_hf, r * len(members)), np.float32)
  for j, path in enumerate(members):  # A stacked, B block-diagonal
    slot, node = slots[path], _node(p, path)
    a_hf[j * r:(j + 1) * r] = node[name_a].reshape(-1, r)[slot.in_index].T
    b_hf[slot.out_rows, j * r:(j + 1) * r] = node[name_b].reshape(r, -1)[:, slot.out_index].T
  key = PREFIX + module
  out = {f"{key}.lora_A.weight": a_hf, f"{key}.lora_B.weight": b_hf}
  if config.dora:  # PEFT's magnitude is the whole norm: ||W|| of every row, ours replaced
    weight = np.asarray(base[module + ".weight"], np.float64)
    magnitude = np.linalg.norm(weight.T if slots[members[0]].conv1d else weight, axis=1)
    for path in members:
      slot, node = slots[path], _node(p, path)
      eq = eqs[lora_lib.layer_key(path)]
      norm = np.asarray(lora_lib.column_norm(node["kernel"], eq)) + node[name_m]
      magnitude[slot.out_rows] = norm.reshape(-1)[slot.out_index]
    out[f"{key}.lora_magnitude_vector"] = magnitude.astype(np.float32)
  return out


def _config_json(cfg, config, ranks, slots, base_name):
  """adapter_config.json: fused modules of a larger rank keep the scale by pattern."""
  def alpha(rank):
    return config.scale * (math.sqrt(rank) if config.rslora else rank)
  special = {m: k for m, k in ranks.items() if k != config.rank}
  return {"peft_type": "LORA", "task_type": _TASK[cfg.arch], "r": config.rank,
          "lora_alpha": config.alpha, "target_modules": sorted(ranks),
          "lora_dropout": config.dropout, "use_rslora": config.rslora,
          "use_dora": config.dora, "bias": "none",
          "fan_in_fan_out": any(s.conv1d for s in slots.values()),
          "rank_pattern": {re.escape(m): k for m, k in special.items()},
          "alpha_pattern": {re.escape(m): alpha(k) for m, k in special.items()},
          "base_model_name_or_path": base_name, "inference_mode": True,
          "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
          "revision": None}


def write_peft_dir(out_dir, config_json, tensors):
  os.makedirs(out_dir, exist_ok=True)
  hf_io.write_safetensors(os.path.join(out_dir, WEIGHTS), tensors)
  with open(os.path.join(out_dir, CONFIG), "w") as f:
    json.dump(config_json, f, indent=2, sort_keys=True)


def peft_type(adapter_dir: str) -> str | None:
  """`peft_type` of the folder's adapter_config.json (None when there is none)."""
  path = os.path.join(adapter_dir, CONFIG)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f).get("peft_type")


def read_peft_dir(adapter_dir: str, peft_type: str = "LORA") -> tuple[dict, dict]:
  """(adapter_config.json, tensors) of a PEFT folder of `peft_type`, refusing what llmjax
  cannot represent."""
  paths = [os.path.join(adapter_dir, n) for n in (CONFIG, WEIGHTS)]
  for path in paths:
    if not os.path.isfile(path):
      raise UserError(f"{path} is missing: pass a folder written by PEFT's "
                      "save_pretrained (adapter_config.json + adapter_model.safetensors).")
  with open(paths[0]) as f:
    conf = json.load(f)
  if conf.get("peft_type") != peft_type:
    raise UserError(f"{paths[0]}: peft_type={conf.get('peft_type')!r}; llmjax imports "
                    "LORA (LoRA, rsLoRA, DoRA) and PROMPT_TUNING folders only.")
  for key, want in _REFUSED.items():
    if conf.get(key, want) not in (want, [], {}):
      raise UserError(f"{paths[0]}: {key}={conf[key]!r} is not supported (needs "
                      f"{want!r}); train the adapter without it.")
  return conf, hf_io.read_safetensors(paths[1])


def _module_scale(conf, module, rank):
  def pattern(kind, default):
    for key, value in (conf.get(kind) or {}).items():
      if re.match(rf"(.*\.)?({key})$", module):
        return value
    return default
  alpha = pattern("alpha_pattern", conf["lora_alpha"])
  return alpha / (math.sqrt(rank) if conf.get("use_rslora") else rank)


def import_adapter(adapter_dir: str, cfg: TransformerConfig, params, *, model_type: str,
                   name: str = "default"):
  """`(LoraConfig, params with the adapter)` from a PEFT folder trained on the
  `model_type` model whose llmjax import is `params` (base only).

  One rank and scale serve every layer in llmjax: modules of a smaller rank are padded
  with zeros, and a module's own scale (`rank_pattern`/`alpha_pattern`) is folded into
  its B when they differ. Layers of a scanned stack the adapter leaves out get zeros.
  """
  conf, tensors = read_peft_dir(adapter_dir)
  keys = [k[len(PREFIX):] for k in tensors if k.startswith(PREFIX)]
  modules = sorted({k.rsplit(".lora_", 1)[0] for k in keys})
  p, eqs = _unscanned(cfg, params), _equations(cfg)
  kernels = [path for path, _ in _kernel_nodes(p) if lora_lib.layer_key(path) in eqs]
  slots = _slots(cfg, p, model_type, eqs, kernels, strict=False)
  by_module: dict[str, list[str]] = {}
  for path, slot in slots.items():
    by_module.setdefault(slot.module, []).append(path)
  unknown = [m for m in modules if m not in by_module]
  if unknown or not modules:
    raise UserError(f"the adapter in {adapter_dir} was trained on another base: it adapts "
                    f"{unknown or 'nothing'}, which this {model_type} model does not have "
                    f"(its layers: {sorted(by_module)[:6]}...).")
  ranks = {m: tensors[f"{PREFIX}{m}.lora_A.weight"].shape[0] for m in modules}
  scales = {m: _module_scale(conf, m, ranks[m]) for m in modules}
  rank, rslora = max(ranks.values()), bool(conf.get("use_rslora"))
  if len(set(scales.values())) == 1 and len(set(ranks.values())) == 1:
    scale = scales[modules[0]]
  else:
    scale, rslora = 1.0, False
  config = lora_lib.LoraConfig(
      target=_pattern(path for m in modules for path in by_module[m]), rank=rank,
      alpha=scale * (math.sqrt(rank) if rslora else rank),
      dropout=float(conf.get("lora_dropout") or 0.0), rslora=rslora,
      dora=bool(conf.get("use_dora")), name=name)
  for m in modules:
    for path in by_module[m]:
      _import_kernel(_node(p, path), slots[path], tensors, f"{PREFIX}{m}", config,
                     eqs[lora_lib.layer_key(path)], scales[m] / scale)
  _zero_fill(p, config)
  return config, (stack_layers(p) if cfg.scan_layers else p)


def _import_kernel(node, slot, tensors, key, config, eq, factor):
  r, (name_a, name_b, name_m) = config.rank, config.names()
  _, letters, _, contracted, kept = lora_lib.split_equation(eq)
  dims = dict(zip(letters, node["kernel"].shape))
  in_shape, out_shape = [dims[c] for c in contracted], [dims[c] for c in kept]
  a_hf, b_hf = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
  a = np.zeros((math.prod(in_shape), r), np.float32)
  b = np.zeros((r, math.prod(out_shape)), np.float32)
  a[slot.in_index, :a_hf.shape[0]] = a_hf.T
  b[:b_hf.shape[1], slot.out_index] = b_hf[slot.out_rows].T * factor
  node[name_a], node[name_b] = a.reshape(*in_shape, r), b.reshape(r, *out_shape)
  if config.dora:
    magnitude = np.zeros(math.prod(out_shape), np.float32)
    magnitude[slot.out_index] = tensors[f"{key}.lora_magnitude_vector"][slot.out_rows]
    norm = np.asarray(lora_lib.column_norm(node["kernel"], eq))
    node[name_m] = magnitude.reshape(out_shape) - norm


def _kernel_nodes(tree, prefix=""):
  if isinstance(tree, dict):
    if "kernel" in tree:
      yield prefix, tree
    for key, value in tree.items():
      yield from _kernel_nodes(value, f"{prefix}/{key}" if prefix else key)


def _zero_fill(p, config):
  """Zero adapters on the layers of a stack the PEFT adapter leaves out (scanning needs
  every layer of a stack to have the same parameters)."""
  name_a, name_b, name_m = config.names()
  keys = {lora_lib.layer_key(path) for path, node in _kernel_nodes(p) if name_a in node}
  for path, node in _kernel_nodes(p):
    if lora_lib.layer_key(path) in keys and name_a not in node:
      ref = next(n for q, n in _kernel_nodes(p)
                 if lora_lib.layer_key(q) == lora_lib.layer_key(path) and name_a in n)
      for n in (name_a, name_b, name_m):
        if n in ref:
          node[n] = np.zeros_like(ref[n])


def _pattern(paths) -> str:
  """A LoraConfig.target regex selecting exactly these layers (scanned or not)."""
  keys = sorted({lora_lib.layer_key(p) for p in paths})
  return "^(?:" + "|".join(re.escape(k).replace("/layers/", r"/layers(?:_\d+)?/")
                           for k in keys) + ")$"
