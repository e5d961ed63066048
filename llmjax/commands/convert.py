"""`llmjax convert`: Hugging Face checkpoints in and out of llmjax workdirs.

  llmjax convert --from_hf=DIR --workdir=W [--no_scan_layers] [--force]
      DIR: a `save_pretrained` folder (config.json + *.safetensors) of GPT-2, LLaMA, BERT
      or T5 v1.1. Writes W/checkpoints/0 and the tokenizer; then `llmjax generate
      --workdir=W` samples from it. --force replaces the checkpoints of a W that has some
      (e.g. to convert again after adding a tokenizer to DIR).
  llmjax convert --to_hf=DIR --workdir=W [--step=N] [--max_shard_mb=M] [--model_type=T]
      Writes the workdir's checkpoint (default: latest) as a folder that transformers'
      `from_pretrained` loads.
  llmjax convert --to_gguf=FILE --workdir=W [--gguf_type=f32|f16|q8_0|q4_0] [--step=N]
      Writes a GPT-2- or LLaMA-shaped decoder and its tokenizer as one GGUF file for
      llama.cpp (`llmjax/checkpoint/convert/gguf_file.py`; needs the `gguf` extra).
"""


def register(subparsers, name, help_text):
  import argparse
  p = subparsers.add_parser(name, help=help_text, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  direction = p.add_mutually_exclusive_group(required=True)
  direction.add_argument("--from_hf", metavar="DIR", help="import this Hugging Face folder")
  direction.add_argument("--to_hf", metavar="DIR", help="export to this Hugging Face folder")
  direction.add_argument("--to_gguf", metavar="FILE", help="export to this GGUF file")
  p.add_argument("--gguf_type", default="f32", help="f32, f16, q8_0 or q4_0 (--to_gguf)")
  p.add_argument("--workdir", required=True, help="the llmjax workdir")
  p.add_argument("--no_scan_layers", action="store_true",
                 help="import with unscanned layers (layers_0, layers_1, ...)")
  p.add_argument("--force", action="store_true",
                 help="--from_hf into a workdir that has checkpoints: replace them")
  p.add_argument("--step", type=int, default=None, help="checkpoint step to export")
  p.add_argument("--max_shard_mb", type=float, default=None,
                 help="split the export into safetensors shards of at most this size")
  p.add_argument("--model_type", default=None,
                 help="HF model_type to export as (default: the imported one)")
  p.set_defaults(func=run)


def run(args):
  from llmjax.checkpoint.convert import workdir

  if args.to_gguf:
    workdir.workdir_to_gguf(args.workdir, args.to_gguf, gguf_type=args.gguf_type,
                            step=args.step)
  elif args.from_hf:
    workdir.hf_to_workdir(args.from_hf, args.workdir, scan_layers=not args.no_scan_layers,
                          force=args.force)
  else:
    shard = int(args.max_shard_mb * 2**20) if args.max_shard_mb else None
    workdir.workdir_to_hf(args.workdir, args.to_hf, step=args.step,
                          model_type=args.model_type, max_shard_bytes=shard)
  return 0
