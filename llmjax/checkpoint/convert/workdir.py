"""Hugging Face folder <-> llmjax workdir (what `llmjax convert` runs).

A converted workdir looks like a training run's: `checkpoints/0/` with the `state` item
`{'params': ...}` (no optimizer state: the checkpoint starts a run, it does not resume
one), an empty `data` item, and `meta` holding the model config, the serialized
tokenizer (base64) and the imported `config.json` (`hf_model_type`, `hf_config`, so an
export writes the same token ids and architecture back). The tokenizer found beside the
checkpoint is stored as `tokenizer.model` (SentencePiece: LLaMA, T5) or
`tokenizer.json` (`tokenizers`: GPT-2, BERT), and every HF tokenizer file is kept in
`hf_tokenizer/` for the export. Exporting a run trained here writes its SentencePiece
model as HF tokenizer files (`llmjax.data.spm_to_hf`) and its bos/eos/pad ids into
`config.json`, so transformers' `generate` continues a prompt as `llmjax generate` does.
"""

import dataclasses
import os
import shutil
import tempfile

import jax
import numpy as np

from llmjax.checkpoint import manager as ckpt_lib
from llmjax.checkpoint.convert import expected_shapes, export_hf, import_hf, infer_model_type
from llmjax.errors import UserError
from llmjax.models.config import TransformerConfig

SENTENCEPIECE_FILES = ("tokenizer.model", "spiece.model")
JSON_FILE = "tokenizer.json"
HF_TOKENIZER_DIR = "hf_tokenizer"
# Files a HF tokenizer (and its generation defaults) may consist of; copied as they are.
_TOKENIZER_FILES = SENTENCEPIECE_FILES + (
    JSON_FILE, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "generation_config.json")


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def _find_tokenizer(hf_dir: str):
  """(file name in the workdir, bytes) of the tokenizer beside the checkpoint, or None."""
  for name in SENTENCEPIECE_FILES:
    if os.path.isfile(os.path.join(hf_dir, name)):
      return "tokenizer.model", _read(os.path.join(hf_dir, name))
  if os.path.isfile(os.path.join(hf_dir, JSON_FILE)):
    return JSON_FILE, _read(os.path.join(hf_dir, JSON_FILE))
  return None


def _copy_atomic(data: bytes, path: str):
  with open(path + ".tmp", "wb") as f:
    f.write(data)
  os.replace(path + ".tmp", path)


def hf_to_workdir(hf_dir: str, workdir: str, *, scan_layers: bool = True, force: bool = False,
                  log=print):
  """Imports `hf_dir` into a new workdir that `llmjax generate` / fine-tuning read.

  Returns the TransformerConfig. Refuses a workdir that already has checkpoints, unless
  `force` (then they are replaced, once the import has succeeded).
  """
  from llmjax.data import tokenizer as tokenizer_lib

  workdir = os.path.abspath(workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir) and not force:
    raise UserError(f"{workdir} already holds checkpoints; convert into a new --workdir, "
                    "or pass --force to replace them (nothing was written).")
  cfg, params, hf_config = import_hf(hf_dir, scan_layers=scan_layers)
  found = _find_tokenizer(hf_dir)
  meta = {"model_config": dataclasses.asdict(cfg), "operative_config": "",
          "num_params": int(sum(np.size(a) for a in jax.tree.leaves(params))),
          "hf_model_type": hf_config["model_type"], "hf_config": hf_config,
          "converted_from": os.path.abspath(hf_dir)}
  if found:
    tokenizer = tokenizer_lib.from_serialized(found[1])  # fails early on a broken file
    if tokenizer.vocab_size > cfg.vocab_size:
      raise UserError(f"the tokenizer in {hf_dir} has {tokenizer.vocab_size} tokens but the "
                      f"model only {cfg.vocab_size} embeddings; pass the matching tokenizer.")
    meta["tokenizer"] = ckpt_lib.encode_bytes(found[1])
  else:
    log(f"no tokenizer ({', '.join(SENTENCEPIECE_FILES + (JSON_FILE,))}) in {hf_dir}: the "
        "workdir has none: pass `llmjax generate --tokenizer=PATH`, or copy one into the "
        "folder and convert again with --force.")
  os.makedirs(workdir, exist_ok=True)
  if force and os.path.isdir(ckpt_dir):  # the import worked: now replace the old steps
    shutil.rmtree(ckpt_dir)
  ckpt = ckpt_lib.CheckpointManager(ckpt_dir, async_save=False)
  ckpt.save(0, {"params": params}, {}, meta, force=True)
  ckpt.close()
  if found:
    _copy_atomic(found[1], os.path.join(workdir, found[0]))
  _save_hf_tokenizer_files(hf_dir, workdir)
  log(f"imported {hf_config['model_type']} ({meta['num_params']:,} parameters) from {hf_dir} "
      f"into {workdir}")
  return cfg


def _save_hf_tokenizer_files(hf_dir, workdir):
  names = [n for n in _TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, n))]
  if not names:
    return
  target = os.path.join(workdir, HF_TOKENIZER_DIR)
  tmp = tempfile.mkdtemp(dir=workdir, prefix=HF_TOKENIZER_DIR + ".tmp")
  for name in names:
    shutil.copyfile(os.path.join(hf_dir, name), os.path.join(tmp, name))
  shutil.rmtree(target, ignore_errors=True)
  os.replace(tmp, target)


def workdir_to_hf(workdir: str, hf_dir: str, *, step: int | None = None,
                  model_type: str | None = None, max_shard_bytes: int | None = None, log=print):
  """Exports the params of `workdir`'s checkpoint (default: latest) to a HF folder."""
  ckpt = ckpt_lib.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"))
  params, meta = ckpt.restore_params(step)
  ckpt.close()
  cfg = TransformerConfig(**meta["model_config"])
  from llmjax.models.transformer import Transformer
  from llmjax.peft import model as peft_model
  _require_float(meta, workdir)
  peft_model.require_mergeable(meta)  # bottleneck adapters, soft prompts: no HF format
  params = language_model_params(cfg, params, log)
  params = peft_model.merged_params(Transformer(cfg), params, meta)  # adapters folded in
  model_type = model_type or meta.get("hf_model_type") or infer_model_type(cfg)
  extra, ids = _tokenizer_files(workdir, meta, cfg)
  base = meta.get("hf_config") if meta.get("hf_model_type") == model_type else None
  export_hf(hf_dir, cfg, params, model_type=model_type, base_config={**ids, **(base or {})},
            max_shard_bytes=max_shard_bytes, extra_files=extra)
  log(f"exported {model_type} from {workdir} to {hf_dir}")
  return cfg


def workdir_to_gguf(workdir: str, path: str, *, gguf_type: str = "f32",
                    step: int | None = None, log=print) -> dict:
  """Writes `workdir`'s checkpoint (LoRA folded in) and tokenizer to the GGUF file `path`
  (`gguf_file.export_gguf`); returns `{tensor: type}`."""
  from llmjax.checkpoint.convert import gguf_file
  from llmjax.data import tokenizer as tokenizer_lib
  from llmjax.models.transformer import Transformer
  from llmjax.peft import model as peft_model
  if gguf_type not in gguf_file.TYPES:  # before any reading
    raise UserError(f"unknown --gguf_type={gguf_type!r}; use one of "
                    f"{', '.join(gguf_file.TYPES)}.")
  if os.path.exists(path):
    raise UserError(f"--to_gguf={path} exists already; pass a new file name.")
  ckpt = ckpt_lib.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"))
  params, meta = ckpt.restore_params(step)
  ckpt.close()
  cfg = TransformerConfig(**meta["model_config"])
  _require_float(meta, workdir, "--to_gguf")
  gguf_file.check_exportable(cfg)
  peft_model.require_mergeable(meta)
  params = peft_model.merged_params(Transformer(cfg), language_model_params(cfg, params, log),
                                    meta)
  if not meta.get("tokenizer"):
    raise UserError(f"the checkpoint in {workdir} has no SentencePiece tokenizer to put in "
                    "the GGUF file (an imported Hugging Face tokenizer cannot go there).")
  tokenizer = tokenizer_lib.from_serialized(ckpt_lib.decode_bytes(meta["tokenizer"]))
  written = gguf_file.export_gguf(path, cfg, params, tokenizer, gguf_type)
  kinds = sorted(set(written.values()))
  log(f"wrote {path}: {len(written)} tensors ({', '.join(kinds)}), "
      f"{os.path.getsize(path):,} bytes")
  return written


def language_model_params(cfg: TransformerConfig, params, log=print):
  """`params` without the top-level trees an objective added beside the language model
  (PPO's `value_head` and separate `critic`, a reward model's `reward_head`), which no
  language-model format holds; says what it leaves out."""
  keys = {path.split("/")[0] for path in expected_shapes(cfg)}
  extra = sorted(set(params) - keys)
  if extra:
    log(f"left out {extra}: the training objective's parameters (a value head, a critic, "
        "a reward head), not the language model's")
  return {k: v for k, v in params.items() if k in keys}


def _require_float(meta: dict, workdir: str, flag: str = "--to_hf") -> None:
  """A quantized workdir (`llmjax quantize`) has no float weights to export."""
  if meta.get("quantization"):
    source = meta.get("quantized_from", "the float workdir it was made from")
    raise UserError(f"{workdir} is quantized ({meta['quantization'].get('method')}); "
                    f"{flag} writes float weights: export {source} instead.")


def _tokenizer_files(workdir: str, meta: dict, cfg: TransformerConfig):
  """(HF tokenizer files, token ids for config.json) for an export of `workdir`.

  An imported run gives back the files it came with; a run trained here converts its
  SentencePiece model (`llmjax.data.spm_to_hf`) and names its bos/eos/pad ids."""
  from llmjax.data import hf_tokenizer, spm_to_hf
  hf_tok = os.path.join(workdir, HF_TOKENIZER_DIR)
  if os.path.isdir(hf_tok):
    return {n: _read(os.path.join(hf_tok, n)) for n in sorted(os.listdir(hf_tok))}, {}
  if os.path.isfile(os.path.join(workdir, JSON_FILE)):
    return {JSON_FILE: _read(os.path.join(workdir, JSON_FILE))}, {}
  data = ckpt_lib.decode_bytes(meta["tokenizer"]) if meta.get("tokenizer") else None
  if data is None or hf_tokenizer.is_tokenizer_json(data):
    return ({JSON_FILE: data} if data else {}), {}
  return spm_to_hf.hf_tokenizer_files(data, cfg.max_len), spm_to_hf.special_ids(data)
