"""`llmjax quantize --workdir=W --method=int8|int4|nf4|w8a8 --output=W2 [--step=N]
[--group_size=128] [--block_size=64] [--double_quant] [--include_embed] [--include_head]
[--algorithm=rtn|gptq|awq [--calibration_samples=128] [--calibration_split=train]
[--calibration_dataset=NAME] [--data_dir=DIR] [--calibration_window=L] [--damp=0.01]]`

Post-training quantization of a trained workdir (`llmjax/quant/ptq.py`). W2 is a new
workdir whose checkpoint (`checkpoints/0`) stores every dense layer's packed integer
codes and float32 scales, never de-quantized floats, with the method recorded in its
metadata; `llmjax generate --workdir=W2` and `llmjax eval --workdir=W2` run from it
directly (`llmjax/quant/model.py`). It cannot be trained from: fine-tune W, then
quantize again.

  int8   weight-only, symmetric, per output channel (float32 accumulation).
  int4   weight-only, symmetric, groups of --group_size input elements (default 128; a
         layer whose input is narrower uses its whole width; the size must divide it).
  nf4    4-bit NormalFloat, blocks of --block_size (64); --double_quant stores the block
         scales in int8 (QLoRA).
  w8a8   int8 weights and dynamic per-token int8 activations, int32 accumulation.

--algorithm=gptq (int4): the codes are chosen by GPTQ (`llmjax/quant/gptq.py`) for the
layers' outputs on calibration data, --calibration_samples windows of the run's
sequence length cut in order from the --calibration_split of the run's own dataset
(its operative_config.gin; --calibration_dataset, --data_dir and --calibration_window
override them), tokenized with the run's tokenizer. The stored format is
int4's, so everything that reads an int4 workdir reads it. --algorithm=awq (int4): AWQ (`llmjax/quant/awq.py`) scales each
layer's salient input channels up before rounding, with the exponent searched per layer
on the same calibration data; it stores the factors beside the codes.

The embedding table and the untied output head stay float unless --include_embed /
--include_head (a tied model's head is its embedding table: --include_embed). LoRA is
folded into the kernels first; other adapters and soft prompts cannot be quantized.

A QAT workdir (gin_configs/quant/qat_*.gin) records its QatConfig: --method and the
sizes default to it (int8 with activations: w8a8), and then the packed weights are
exactly the ones its forward pass used. A QLoRA workdir's base is quantized already:
`llmjax peft merge` folds its adapter in and re-quantizes.
"""

import dataclasses
import os
import shutil

_COPIED = ("tokenizer.model", "tokenizer.json", "operative_config.gin")


def register(subparsers, name, help_text):
  import argparse

  from llmjax.quant.ptq import METHODS
  p = subparsers.add_parser(name, help=help_text, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="the trained (float) workdir")
  p.add_argument("--output", required=True, help="the new, quantized workdir to write")
  p.add_argument("--method", default=None,
                 help=f"one of {', '.join(METHODS)} (default: a QAT run's own)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--group_size", type=int, default=None,
                 help="int4: input elements per scale (default 128)")
  p.add_argument("--block_size", type=int, default=None,
                 help="nf4: elements per block (default 64)")
  for flag, text in (("double_quant", "nf4: int8 block scales"),
                     ("include_embed", "quantize the embedding table"),
                     ("include_head", "quantize the output head")):
    p.add_argument(f"--{flag}", action="store_true", default=None, help=text)
  p.add_argument("--algorithm", default=None, help="int4: rtn (default), gptq or awq")
  p.add_argument("--calibration_samples", type=int, default=128,
                 help="gptq, awq: token windows of calibration data")
  p.add_argument("--calibration_split", default="train", help="gptq, awq: the dataset split")
  p.add_argument("--calibration_dataset", default=None,
                 help="gptq, awq: dataset (default: the run's, from its operative_config.gin)")
  p.add_argument("--data_dir", default=None, help="gptq, awq: the dataset's TFDS folder")
  p.add_argument("--calibration_window", type=int, default=None,
                 help="gptq, awq: tokens per window (default: the run's seq_len)")
  p.add_argument("--damp", type=float, default=None,
                 help="gptq: Hessian dampening, a fraction of its mean diagonal (0.01)")
  p.set_defaults(func=run)


def _check_paths(workdir: str, out: str) -> None:
  from llmjax.errors import UserError
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise UserError(f"--output={out} exists already; pass a new workdir (nothing was "
                    "written).")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir) or not os.listdir(ckpt_dir):
    raise UserError(f"{workdir} has no checkpoint (no checkpoints/ with a step in it); train "
                    "first, or point --workdir at a run that has one.")


def _load(workdir: str, step):
  """`(Transformer, float params with LoRA folded in, meta, QatConfig or None)` of the
  source checkpoint."""
  import jax
  import numpy as np

  from llmjax.checkpoint import manager as ckpt_lib
  from llmjax.errors import UserError
  from llmjax.models.config import TransformerConfig
  from llmjax.models.transformer import Transformer
  from llmjax.peft import model as peft_model
  ckpt = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"))
  try:
    params, meta = ckpt.restore_params(step)
  finally:
    ckpt.close()
  info = meta.get("quantization")
  if info:
    raise UserError(f"{workdir} is quantized already ({info.get('method')}, made from "
                    f"{meta.get('quantized_from', 'a float workdir')}); quantize the float "
                    "workdir instead.")
  configs = peft_model.from_meta(meta.get("peft"))
  if peft_model.qlora_config(configs) is not None:
    raise UserError(f"{workdir} is a QLoRA run: its base is quantized already; `llmjax "
                    "peft merge --workdir=W --output=W2` folds the adapter in and writes "
                    "the quantized workdir.")
  qat = [c for c in configs if not peft_model.is_adapter(c)]
  base = Transformer(TransformerConfig(**meta["model_config"]))
  model, params = peft_model.merged_model(  # QAT trained these float weights: pack them
      base, params, {**meta, "peft": peft_model.to_meta([c for c in configs if c not in qat])})
  if model is not base:
    raise UserError(f"{workdir} holds bottleneck adapters or a soft prompt, which cannot be "
                    "folded into the weights, so there is no plain model to quantize; "
                    "quantize the base workdir, or fine-tune with LoRA (peft/lora.gin).")
  return base, jax.tree.map(np.asarray, jax.device_get(params)), meta, (qat or [None])[0]


def _settings(method, opts: dict, qat, log):
  """`(method, opts)`: the given ones, the rest from a QAT run's config (module
  docstring), else `QuantConfig`'s defaults."""
  opts = {k: v for k, v in opts.items() if v is not None}
  if qat is None:
    if method is None:
      from llmjax.errors import UserError
      raise UserError("--method is required (int8, int4, nf4 or w8a8); only a QAT workdir "
                      "has a default, its own.")
    return method, opts
  own = {k: getattr(qat, k) for k in ("group_size", "block_size", "double_quant",
                                      "include_embed", "include_head")}
  if (method or qat.ptq_method) != qat.ptq_method or any(k in own and opts[k] != own[k] for k in opts):
    log(f"note: this workdir was trained with QAT ({qat}); these settings differ, so the "
        "packed weights are not the ones its forward pass used.")
  elif qat.activations and qat.method != "int8":
    log(f"note: QAT fake-quantized the activations too, which {qat.method} (weight-only) "
        "leaves float.")
  return method or qat.ptq_method, {**own, **opts}


def calibration_windows(workdir: str, meta: dict, samples: int, split: str = "train",
                        dataset: str | None = None, data_dir: str | None = None,
                        window: int | None = None):
  """int32 `[samples, window]`: the first `samples` windows of a dataset split (default:
  the run's own dataset and sequence length, from its operative_config.gin), each text
  tokenized with the run's tokenizer and an EOS after it, concatenated and cut in order."""
  import numpy as np

  from llmjax.checkpoint import manager as ckpt_lib
  from llmjax.data import datasets
  from llmjax.data import tokenizer as tokenizer_lib
  from llmjax.errors import UserError
  from llmjax.train import main
  text_key = None
  operative = os.path.join(workdir, "operative_config.gin")
  if os.path.exists(operative):
    main.parse_gin([operative], [])
    data = main.bound("data")
    dataset, data_dir = dataset or data.dataset, data_dir or data.data_dir
    window, text_key = window or data.seq_len, data.text_key
  if not dataset:
    raise UserError(f"{workdir} has no operative_config.gin naming its dataset, so there "
                    "is no calibration data; pass --calibration_dataset=NAME (and "
                    "--data_dir=DIR if it is not in the default TFDS folder).")
  if not meta.get("tokenizer"):
    raise UserError(f"the checkpoint in {workdir} has no tokenizer to cut calibration "
                    "windows with; quantize with --algorithm=rtn.")
  window = window or meta["model_config"].get("max_len", 256)
  tokenizer = tokenizer_lib.from_serialized(ckpt_lib.decode_bytes(meta["tokenizer"]))
  need, ids = samples * window, []
  for text in datasets.iter_texts(dataset, split, data_dir, text_key):
    ids.extend(tokenizer.encode(text, add_eos=True))
    if len(ids) >= need:
      break
  if samples <= 0 or len(ids) < need:
    raise UserError(f"calibration asked for {samples} windows of {window} tokens but "
                    f"the {split!r} split of {dataset} has {len(ids)} tokens "
                    f"({len(ids) // window} windows); pass a smaller --calibration_samples "
                    "(at least 1) or another --calibration_split.")
  return np.asarray(ids[:need], np.int32).reshape(samples, window)


def quantize_workdir(workdir: str, out: str, method: str | None = None, *, step=None,
                     log=print, calibration: dict | None = None, **opts) -> dict:
  """Writes the quantized copy of `workdir` to `out` (module docstring); returns the
  `info` recorded in its metadata (`meta['quantization']`). `opts` (`QuantConfig`'s
  sizes and flags) left None take a QAT run's or the defaults."""
  import numpy as np

  from llmjax.checkpoint import manager as ckpt_lib
  from llmjax.quant import ptq
  workdir, out = os.path.abspath(workdir), os.path.abspath(out)
  if method is not None:  # a bad method or size before any reading
    ptq.QuantConfig(method=method, **{k: v for k, v in opts.items() if v is not None})
  _check_paths(workdir, out)
  model, params, meta, qat = _load(workdir, step)
  method, opts = _settings(method, opts, qat, log)
  stats = None
  if opts.get("algorithm") in ("gptq", "awq"):
    from llmjax.quant import calibration as calibration_lib
    calibration = {"samples": 128, **(calibration or {})}
    windows = calibration_windows(workdir, meta, **calibration)
    stats = calibration_lib.collect(model, params,
                                    np.array_split(windows, -(-len(windows) // 8)))
  qparams, info = ptq.quantize_params(model, params, method, stats, **opts)
  if stats is not None:
    info["calibration"] = {**calibration, "windows": len(windows),
                           "window": int(windows.shape[1])}
  if qat is not None:  # what the run simulated, beside what was done
    info["qat"] = dataclasses.asdict(qat)
  dropped = ("peft", "peft_active", "log")
  meta = {**{k: v for k, v in meta.items() if k not in dropped}, "quantization": info,
          "quantized_from": workdir}
  os.makedirs(out, exist_ok=True)
  ckpt = ckpt_lib.CheckpointManager(os.path.join(out, "checkpoints"), async_save=False)
  ckpt.save(0, {"params": qparams}, {}, meta, force=True)
  ckpt.close()
  for name in _COPIED:
    if os.path.isfile(os.path.join(workdir, name)):
      shutil.copyfile(os.path.join(workdir, name), os.path.join(out, name))
  log(table(info))
  log(f"wrote {out}")
  return info


def table(info: dict) -> str:
  """The summary `llmjax quantize` prints."""
  double = ", double quant" if info["double_quant"] else ""
  gptq = f", {info['algorithm'].upper()}" if info.get("algorithm", "rtn") != "rtn" else ""
  sizes = {"int4": f" (group {info['group_size']}{gptq})",
           "nf4": f" (block {info['block_size']}{double})"}
  before, after = info["bytes_before"], info["bytes_after"]
  kept = ", ".join(info["float_layers"]) or "none"
  rows = [("method", info["method"] + sizes.get(info["method"], "")),
          ("layers quantized", f"{len(info['layers'])} (float: {kept})"),
          ("params quantized", f"{info['params_quantized']:,}"),
          ("weight bytes", f"{before:,} -> {after:,} ({before / after:.2f}x smaller)"),
          ("all param bytes", f"{info['all_bytes_before']:,} -> {info['all_bytes_after']:,}"),
          ("bits per parameter", f"{info['bits_per_parameter']:.3f}")]
  return "\n".join(f"{name:<20}{value}" for name, value in rows)


def run(args):
  quantize_workdir(args.workdir, args.output, args.method, step=args.step,
                   group_size=args.group_size, block_size=args.block_size,
                   double_quant=args.double_quant, include_embed=args.include_embed,
                   include_head=args.include_head, algorithm=args.algorithm, damp=args.damp,
                   calibration={"samples": args.calibration_samples,
                                "split": args.calibration_split,
                                "dataset": args.calibration_dataset,
                                "data_dir": args.data_dir, "window": args.calibration_window})
  return 0
