"""`llmjax scaling plan`: the compute-optimal model and data for a budget, and what it costs.

  llmjax scaling plan --flops=5.76e23 [--law=chinchilla|epoch|S/fit/fit.json]
                      [--family=gpt2|llama] [--vocab_size=V] [--seq_len=2048]
                      [--batch_size=256] [--devices=8] [--device=h100|a100|v5e|...|cpu]
                      [--peak_flops=F] [--mfu=0.4] [--device_memory=80GiB]
  (or --params=N, or --tokens=D, instead of --flops)

Prints N_opt, D_opt, tokens per parameter and the law's loss; the family's shape closest
to N_opt; and for dp, zero1, fsdp and fsdp_tp on the devices the memory per device (the
estimator of `llmjax memory`), whether it fits, and the wall time at the MFU.
"""

MIB = 1024**2


def register(subparsers, name, help_text):
  import argparse
  p = subparsers.add_parser(name, help=help_text, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
  plan = actions.add_parser("plan", help="the compute-optimal N and D, a shape, memory, time")
  plan.add_argument("--flops", type=float, default=None, help="training FLOPs C")
  plan.add_argument("--params", type=float, default=None, help="or: the model size N")
  plan.add_argument("--tokens", type=float, default=None, help="or: the training tokens D")
  plan.add_argument("--law", default="chinchilla",
                    help="chinchilla (Hoffmann 2022), epoch (Besiroglu 2024) or a fit.json")
  plan.add_argument("--family", default="gpt2", help="gpt2 | llama: the shape's preset family")
  plan.add_argument("--vocab_size", type=int, default=None)
  plan.add_argument("--seq_len", type=int, default=2048)
  plan.add_argument("--batch_size", type=int, default=256, help="global rows per step")
  plan.add_argument("--devices", type=int, default=8)
  plan.add_argument("--device", default="h100", help="peak FLOP/s preset (see --peak_flops)")
  plan.add_argument("--peak_flops", type=float, default=None, help="per device; overrides")
  plan.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation")
  plan.add_argument("--device_memory", default="80GiB")
  p.set_defaults(func=run)


def run(args):
  from llmjax.errors import UserError
  from llmjax.scaling import memory, planner

  if args.peak_flops is None and args.device not in planner.DEVICE_FLOPS:
    raise UserError(f"unknown --device={args.device!r}; choose one of "
                    f"{sorted(planner.DEVICE_FLOPS)} or give --peak_flops.")
  if not 0 < args.mfu <= 1:
    raise UserError(f"--mfu={args.mfu} must be in (0, 1].")
  peak = args.peak_flops or planner.DEVICE_FLOPS[args.device]
  law, convention = planner.load_law(args.law)
  plan = planner.make_plan(law, convention, flops=args.flops, params=args.params,
                           tokens=args.tokens, family=args.family, vocab_size=args.vocab_size,
                           seq_len=args.seq_len, batch_size=args.batch_size,
                           devices=args.devices, peak_flops=peak, mfu=args.mfu)
  budget = memory.parse_bytes(args.device_memory)
  m = plan.model
  print(f"law: {args.law} (E={law.E:.4g} A={law.A:.4g} B={law.B:.4g} alpha={law.alpha:.4g} "
        f"beta={law.beta:.4g}; a={law.a:.3f} b={law.b:.3f}; N counts {convention} params)")
  print(f"C = {plan.flops:.3e} FLOPs -> N_opt = {plan.params:.3e} params, D_opt = "
        f"{plan.tokens:.3e} tokens ({plan.tokens / plan.params:.1f} tokens/param), "
        f"predicted loss {plan.loss:.4f}")
  print(f"shape ({args.family}): {m.num_layers} layers x {m.embed_dim}, {m.num_heads} heads"
        f"{f' ({m.num_kv_heads} kv)' if m.num_kv_heads else ''}, mlp {m.mlp_dim}, vocab "
        f"{m.vocab_size}: {plan.model_params['total']:,} params "
        f"({plan.model_params['non_embedding']:,} non-embedding)")
  print(f"{plan.steps:,} steps of {args.batch_size} x {args.seq_len} tokens; "
        f"{plan.hours:,.1f} h on {args.devices} x {args.device if not args.peak_flops else ''}"
        f" at {peak:.3g} FLOP/s and MFU {args.mfu:.0%}")
  print(f"\n{'strategy':9} {'mesh (d,f,t)':13} {'weights':>10} {'optimizer':>10} "
        f"{'activ.':>10} {'total MiB':>10}  fits in {args.device_memory}")
  for rule_set, mesh, est in plan.memory:
    shape = ",".join(str(v) for v in mesh.values())
    if isinstance(est, str):
      print(f"{rule_set:9} {shape:13} {est}")
      continue
    print(f"{rule_set:9} {shape:13} {est.weights / MIB:10.1f} {est.optimizer / MIB:10.1f} "
          f"{est.activations / MIB:10.1f} {est.total / MIB:10.1f}  "
          f"{'yes' if est.total <= budget else 'NO'}")
  return 0
