"""Adapters as files of their own, and the workdir operations of `llmjax peft`.

A fine-tuning run's checkpoint holds the base parameters and its adapters together
(`meta['peft']` names the adapter configs). Besides that full checkpoint:

  save_adapter(workdir, dir)        an adapter-only Orbax checkpoint: the adapter leaves
                                    (kilobytes), their configs, and the base's identity --
                                    its model config and a fingerprint (SHA-256 over every
                                    base array's path, shape, dtype and bytes)
  apply_adapter(dir, base, out)     a new workdir: `base`'s parameters + the adapter, after
                                    checking the base is the one the adapter was trained on
  merge_workdir(workdir, out)       a new workdir with every mergeable adapter folded into
                                    the kernels: a plain model for decoding and export
  export_peft(workdir, dir)         a LoRA/DoRA adapter as a Hugging Face PEFT folder
  import_peft(dir, base, out)       such a folder onto an imported base (`convert --from_hf`)

New workdirs look like converted ones (`checkpoints/0`, no optimizer state, the
tokenizer files copied), so `llmjax generate`, `convert --to_hf` and
`TrainConfig.init_from` read them.
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil

import jax
import numpy as np
from flax import traverse_util

from llmjax.checkpoint import manager as ckpt_lib
from llmjax.errors import UserError
from llmjax.models.config import TransformerConfig

_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
_TOKENIZER_DIRS = ("hf_tokenizer",)


def _restore(workdir: str, step: int | None = None):
  ckpt = ckpt_lib.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"))
  try:
    params, meta = ckpt.restore_params(step)
  finally:
    ckpt.close()
  if meta.get("quantization"):
    raise UserError(f"{workdir} is quantized ({meta['quantization'].get('method')}); "
                    "adapters merge into and export from float weights: use the float "
                    f"workdir ({meta.get('quantized_from', 'it was quantized from')}).")
  return jax.tree.map(np.asarray, jax.device_get(params)), meta


def _write(out: str, params, meta: dict, source_workdir: str, log):
  out = os.path.abspath(out)
  ckpt_dir = os.path.join(out, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise UserError(f"{out} already holds checkpoints; pass a new --output (nothing was "
                    "written).")
  os.makedirs(out, exist_ok=True)
  ckpt = ckpt_lib.CheckpointManager(ckpt_dir, async_save=False)
  ckpt.save(0, {"params": params}, {}, meta, force=True)
  ckpt.close()
  for name in _TOKENIZER_FILES:
    if os.path.isfile(os.path.join(source_workdir, name)):
      shutil.copyfile(os.path.join(source_workdir, name), os.path.join(out, name))
  for name in _TOKENIZER_DIRS:
    if os.path.isdir(os.path.join(source_workdir, name)):
      shutil.copytree(os.path.join(source_workdir, name), os.path.join(out, name),
                      dirs_exist_ok=True)
  log(f"wrote {out}")


def _configs(meta):
  from llmjax.peft import model as peft_model
  configs = peft_model.from_meta(meta.get("peft"))
  if not any(peft_model.is_adapter(c) for c in configs):
    raise UserError("this checkpoint has no adapters (meta['peft'] names none; a QAT run "
                    "trains the weights themselves: `llmjax quantize` packs them): train "
                    "with gin_configs/peft/*.gin, or pass the fine-tuned run's --workdir.")
  return configs


def split_adapters(params, configs) -> tuple[dict, dict]:
  """`(base params, adapter params)`: the leaves the configs' trainable regex selects."""
  from llmjax.peft import model as peft_model
  regex = re.compile(peft_model.trainable_pattern(configs))
  flat = traverse_util.flatten_dict(params)
  adapter = {k: v for k, v in flat.items() if regex.search("/" + "/".join(k))}
  base = {k: v for k, v in flat.items() if k not in adapter}
  return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapter)


def fingerprint(params) -> str:
  """SHA-256 over every array's path, shape, dtype and bytes (sorted by path)."""
  digest = hashlib.sha256()
  for key, value in sorted(traverse_util.flatten_dict(params).items()):
    value = np.ascontiguousarray(value)
    digest.update(f"{'/'.join(key)}:{value.shape}:{value.dtype};".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def save_adapter(workdir: str, out: str, *, step: int | None = None, log=print) -> int:
  """Writes the adapters of `workdir`'s checkpoint as an adapter-only checkpoint in `out`;
  returns its size in bytes."""
  params, meta = _restore(workdir, step)
  configs = _configs(meta)
  base, adapter = split_adapters(params, configs)
  cfg = dataclasses.asdict(TransformerConfig(**meta["model_config"]))
  adapter_meta = {"peft": meta["peft"], "base_model_config": json.loads(json.dumps(cfg)),
                  "base_fingerprint": fingerprint(base),
                  "base_workdir": meta.get("init_from") or os.path.abspath(workdir),
                  "adapter_only": True}
  ckpt = ckpt_lib.CheckpointManager(os.path.abspath(out), async_save=False)
  if ckpt.latest_step() is not None:
    ckpt.close()
    raise UserError(f"{out} already holds a checkpoint; pass a new --output.")
  ckpt.save(0, {"params": adapter}, {}, adapter_meta, force=True)
  ckpt.close()
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
  log(f"wrote the adapters {[c.name for c in configs]} ({size / 1024:.1f} KiB) to {out}")
  return size


def load_adapter(adapter_dir: str, base_params, base_config: TransformerConfig,
                 base_name: str = "the base"):
  """`(params with the adapters, meta['peft'])`; a UserError naming both bases when
  `base_params` is not the base the adapter was trained on."""
  adapter, meta = _restore_adapter(adapter_dir)
  got = fingerprint(base_params)
  same_config = meta["base_model_config"] == json.loads(json.dumps(
      dataclasses.asdict(base_config)))
  if not same_config or got != meta["base_fingerprint"]:
    raise UserError(
        f"the adapter in {adapter_dir} was trained on the base {meta.get('base_workdir')} "
        f"(fingerprint {meta['base_fingerprint'][:12]}), not on {base_name} (fingerprint "
        f"{got[:12]}{'' if same_config else ', another model config'}); apply it to the "
        "base it was trained on.")
  flat = {**traverse_util.flatten_dict(base_params), **traverse_util.flatten_dict(adapter)}
  return traverse_util.unflatten_dict(flat), meta["peft"]


def _restore_adapter(adapter_dir):
  ckpt = ckpt_lib.CheckpointManager(os.path.abspath(adapter_dir))
  try:
    if ckpt.latest_step() is None:
      raise UserError(f"{adapter_dir} holds no adapter checkpoint; pass the --output of "
                      "`llmjax peft export --to_adapter`.")
    adapter, meta = ckpt.restore_params()
  finally:
    ckpt.close()
  if not meta.get("adapter_only"):
    raise UserError(f"{adapter_dir} is a full checkpoint, not an adapter-only one; pass "
                    "its workdir to --workdir instead.")
  return jax.tree.map(np.asarray, jax.device_get(adapter)), meta


def _base_and_adapters(workdir):
  """(base params, its adapters' params, their configs, meta) of `workdir`'s latest step."""
  params, meta = _restore(workdir)
  configs = _configs(meta) if meta.get("peft") else []
  base, existing = split_adapters(params, configs) if configs else (params, {})
  return base, existing, configs, meta


def _add(out, base, existing, configs, new_params, new_configs, meta, source, added_from,
         log):
  """Writes `out`: the base, the adapters it had and the new ones (the new one active)."""
  from llmjax.peft import model as peft_model
  clash = set(peft_model.adapter_names(configs)) & set(peft_model.adapter_names(new_configs))
  if clash:
    raise UserError(f"{source} already has an adapter named {sorted(clash)}; import under "
                    "another name (--name for PEFT folders; LoraConfig.name when training) "
                    "(nothing was written).")
  flat = {**traverse_util.flatten_dict(base), **traverse_util.flatten_dict(existing),
          **traverse_util.flatten_dict(new_params)}
  _write(out, traverse_util.unflatten_dict(flat),
         {**meta, "peft": peft_model.to_meta([*configs, *new_configs]),
          "peft_active": new_configs[0].name, "adapter_from": os.path.abspath(added_from)},
         source, log)


def apply_adapter(adapter_dir: str, base_workdir: str, out: str, *, log=print):
  """A new workdir `out`: `base_workdir`'s parameters with the adapters of `adapter_dir`
  added (beside any it has: one checkpoint, several named adapters, the new one active)."""
  from llmjax.peft import model as peft_model
  base, existing, configs, meta = _base_and_adapters(base_workdir)
  cfg = TransformerConfig(**meta["model_config"])
  params, peft = load_adapter(adapter_dir, base, cfg, os.path.abspath(base_workdir))
  _, new = split_adapters(params, peft_model.from_meta(peft))
  _add(out, base, existing, configs, new, peft_model.from_meta(peft), meta, base_workdir,
       adapter_dir, log)


def merge_workdir(workdir: str, out: str, *, step: int | None = None,
                  adapter: str | None = None, log=print):
  """A new workdir `out` with `workdir`'s (active, or `adapter`) adapters folded into the
  kernels; the other named adapters are left out. A QLoRA run's adapters fold into its
  de-quantized base, which is re-quantized: `out` is a quantized workdir, and the error
  that adds is printed and kept in `meta['quantization']['merge']` (`llmjax.peft.qlora`)."""
  from llmjax.models.transformer import Transformer
  from llmjax.peft import model as peft_model
  params, meta = _restore(workdir, step)
  configs, params = peft_model.select_adapter(_configs(meta), params,
                                              adapter or meta.get("peft_active"))
  cfg = TransformerConfig(**meta["model_config"])
  dropped = ("peft", "peft_active", "log")
  if peft_model.qlora_config(configs) is not None:  # into the 4-bit base: re-quantized
    from llmjax.peft import qlora
    qparams, info = qlora.merge(Transformer(cfg), params, configs)
    log(qlora.report(info))
    _write(out, qparams, {**{k: v for k, v in meta.items() if k not in dropped},
                          "quantization": info, "quantized_from": os.path.abspath(workdir)},
           workdir, log)
    return
  merged = peft_model.merged_params(Transformer(cfg), params,
                                    {"peft": peft_model.to_meta(configs)})
  # Bottleneck adapters and soft prompts do not fold: they stay, and so do their configs.
  rest = [c for c in configs if not peft_model.mergeable(c)]
  kept = {"peft": peft_model.to_meta(rest)} if rest else {}
  _write(out, merged, {**{k: v for k, v in meta.items() if k not in dropped}, **kept},
         workdir, log)


def _model_type(meta, cfg, model_type):
  from llmjax.checkpoint.convert import infer_model_type
  return model_type or meta.get("hf_model_type") or infer_model_type(cfg)


def export_peft(workdir: str, out: str, *, step: int | None = None, name: str | None = None,
                model_type: str | None = None, log=print):
  """The LoRA/DoRA adapter or soft prompt `name` (default: the only one) as a PEFT folder
  `out`, for the `convert --to_hf` export of the run's base."""
  from llmjax.checkpoint.convert import adapters, prompts
  from llmjax.peft.lora import LoraConfig
  from llmjax.peft.prompt_tuning import PromptTuningConfig
  params, meta = _restore(workdir, step)
  name = name or meta.get("peft_active")
  kinds = (LoraConfig, PromptTuningConfig)
  found = [c for c in _configs(meta) if isinstance(c, kinds) and name in (None, c.name)]
  if len(found) != 1:
    raise UserError(f"{workdir} has the adapters {[c.name for c in _configs(meta)]}; pass "
                    "--name=<one of them> (PEFT folders hold one LoRA/DoRA adapter or one "
                    "soft prompt; bottleneck adapters have no PEFT format).")
  cfg = TransformerConfig(**meta["model_config"])
  source = meta.get("converted_from")
  if isinstance(found[0], PromptTuningConfig):
    prompts.export_prompt(out, cfg, params, found[0], base_model_name_or_path=source)
  else:
    adapters.export_adapter(out, cfg, params, found[0],
                            model_type=_model_type(meta, cfg, model_type),
                            base_model_name_or_path=source)
  log(f"exported {type(found[0]).__name__} {found[0].name!r} of {workdir} as a PEFT folder "
      f"in {out}")


def import_peft(adapter_dir: str, base_workdir: str, out: str, *, name: str = "default",
                model_type: str | None = None, log=print):
  """A new workdir `out`: `base_workdir` (an imported HF model, with any adapters it
  has) + a PEFT LoRA or PROMPT_TUNING folder as adapter `name`, active."""
  from llmjax.checkpoint.convert import adapters
  base, existing, configs, meta = _base_and_adapters(base_workdir)
  cfg = TransformerConfig(**meta["model_config"])
  if adapters.peft_type(adapter_dir) == "PROMPT_TUNING":
    from llmjax.checkpoint.convert import prompts
    config, params = prompts.import_prompt(adapter_dir, cfg, base, name=name)
  else:
    config, params = adapters.import_adapter(adapter_dir, cfg, base, name=name,
                                             model_type=_model_type(meta, cfg, model_type))
  _, new = split_adapters(params, [config])
  _add(out, base, existing, configs, new, [config], meta, base_workdir, adapter_dir, log)
