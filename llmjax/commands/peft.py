"""`llmjax peft`: adapters of a fine-tuning run (gin_configs/peft/*.gin) on their own.

  llmjax peft merge --workdir=W --output=W2 [--step=N] [--name=A]
      W2: W's parameters with the adapter folded into the kernels (a plain model:
      fastest decoding, `convert --to_hf` of the fine-tuned model). A checkpoint with
      several named adapters merges the active one (the last imported) or --name. A
      QLoRA run (peft/qlora.gin) merges into its de-quantized base, re-quantized: W2 is
      a quantized workdir, and the error re-quantizing added is printed.
  llmjax peft export --workdir=W --to_adapter=DIR [--step=N]
      DIR: an adapter-only Orbax checkpoint (kilobytes) recording the base's config and a
      fingerprint of its parameters.
  llmjax peft export --workdir=W --to_peft=DIR [--name=A] [--model_type=T]
      DIR: the LoRA/DoRA adapter (or a decoder-only model's soft prompt) as a Hugging
      Face PEFT folder (adapter_config.json + adapter_model.safetensors) that
      `peft.PeftModel.from_pretrained` loads onto the `llmjax convert --to_hf` export of
      the base.
  llmjax peft import --from_adapter=DIR --workdir=BASE --output=W2
  llmjax peft import --from_peft=DIR --workdir=BASE --output=W2 [--name=A]
      W2: BASE's parameters with the adapter (checked to belong to BASE) beside any
      adapters BASE has: several named adapters in one checkpoint, the new one active
      (`llmjax generate --workdir=W2 --adapter=NAME` picks another, `none` the base).
"""


def register(subparsers, name, help_text):
  import argparse
  p = subparsers.add_parser(name, help=help_text, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
  merge = actions.add_parser("merge", help="fold the adapters into the kernels")
  export = actions.add_parser("export", help="write the adapters on their own")
  where = export.add_mutually_exclusive_group(required=True)
  where.add_argument("--to_adapter", metavar="DIR", help="an adapter-only Orbax checkpoint")
  where.add_argument("--to_peft", metavar="DIR", help="a Hugging Face PEFT folder")
  imp = actions.add_parser("import", help="put an adapter onto a base workdir")
  source = imp.add_mutually_exclusive_group(required=True)
  source.add_argument("--from_adapter", metavar="DIR",
                      help="an adapter-only checkpoint from `export --to_adapter`")
  source.add_argument("--from_peft", metavar="DIR", help="a Hugging Face PEFT folder")
  for sub in (merge, export, imp):
    sub.add_argument("--workdir", required=True,
                     help="the fine-tuned run (merge, export) or the base (import)")
  for sub in (merge, imp):
    sub.add_argument("--output", required=True, help="the new workdir to write")
  for sub in (merge, export):
    sub.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  for sub in (merge, export, imp):
    sub.add_argument("--name", default=None, help="the adapter's name (LoraConfig.name)")
  for sub in (export, imp):
    sub.add_argument("--model_type", default=None,
                     help="the HF model_type of the base (PEFT folders; default: inferred)")
  p.set_defaults(func=run)


def run(args):
  from llmjax.checkpoint import adapters
  if args.action == "merge":
    adapters.merge_workdir(args.workdir, args.output, step=args.step, adapter=args.name)
  elif args.action == "export" and args.to_adapter:
    adapters.save_adapter(args.workdir, args.to_adapter, step=args.step)
  elif args.action == "export":
    adapters.export_peft(args.workdir, args.to_peft, step=args.step, name=args.name,
                         model_type=args.model_type)
  elif args.from_adapter:
    adapters.apply_adapter(args.from_adapter, args.workdir, args.output)
  else:
    adapters.import_peft(args.from_peft, args.workdir, args.output,
                         name=args.name or "default", model_type=args.model_type)
  return 0
