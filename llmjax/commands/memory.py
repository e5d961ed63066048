"""`llmjax memory --gin_file=F [--gin_param=K=V] [--devices=N] [--device_memory=16GiB]
[--compile]`: training memory per device for every sharding strategy, and whether it fits.

Reads the model, DataConfig.batch_size / seq_len and TrainConfig (mesh, rule set) from the
gin files, then prints weights, gradients, optimizer state, activations and working
buffers per device for dp, zero1, fsdp and fsdp_tp on N devices (default: this host's),
plus the ZeRO bytes-per-parameter tables (the configured parameter dtype, and mixed
precision: bfloat16 weights with a float32 master copy), and the bytes of the model's
weights alone in each storage format (float32, bfloat16, int8, int4, NF4: what
inference or a frozen QLoRA base needs; `llmjax quantize` writes them). `--compile` also asks XLA (memory_analysis of
the jitted step; needs N devices here, e.g. XLA_FLAGS=--xla_force_host_platform_device_count=8).
The model's vocab_size is the configured one; a run's tokenizer may change it.
"""

import sys

MIB = 1024**2


def register(subparsers, name, help_text):
  p = subparsers.add_parser(name, help=help_text, description=__doc__)
  p.add_argument("--gin_file", action="append", default=[], required=True,
                 help="gin config file (repeatable), as for `llmjax train`")
  p.add_argument("--gin_param", action="append", default=[], help="a single binding")
  p.add_argument("--devices", type=int, default=None, help="devices (default: jax's count)")
  p.add_argument("--device_memory", default="16GiB", help="memory of one device")
  p.add_argument("--compile", action="store_true",
                 help="also compile each step and print XLA's memory_analysis()")
  p.set_defaults(func=run)


def strategy_meshes(num_devices: int, configured: dict, configured_rules: str) -> list:
  """(rule set, mesh shape) rows: each strategy on all devices, then the configured run."""
  from llmjax.sharding import mesh as mesh_lib

  tensor = configured["tensor"] if configured["tensor"] > 1 else 2
  rows = [("dp", (num_devices, 1, 1)), ("zero1", (num_devices, 1, 1)),
          ("fsdp", (1, num_devices, 1))]
  if num_devices % tensor == 0:
    rows.append(("fsdp_tp", (1, num_devices // tensor, tensor)))
  mine = mesh_lib.resolve_mesh_shape(num_devices, configured["data"], configured["fsdp"],
                                     configured["tensor"])
  if (configured_rules, mine) not in rows:
    rows.append((configured_rules, mine))
  return [(r, dict(zip(mesh_lib.MESH_AXES, m))) for r, m in rows]


def _fmt(n):
  return f"{n / MIB:10.1f}"


def run(args):
  import jax

  from llmjax.scaling import memory
  from llmjax.sharding import mesh as mesh_lib
  from llmjax.train import main, xla_memory

  main.parse_gin(args.gin_file, args.gin_param)
  model, data, cfg = main.bound("model"), main.bound("data"), main.bound("config")
  devices = args.devices or jax.device_count()
  budget = memory.parse_bytes(args.device_memory)
  configured = {"data": cfg.mesh_data, "fsdp": cfg.mesh_fsdp, "tensor": cfg.mesh_tensor}
  out = sys.stdout
  out.write(f"{model.num_layers} layers x {model.embed_dim}, vocab {model.vocab_size}; "
            f"global batch {data.batch_size} x {data.seq_len}; remat={model.remat}; "
            f"{devices} devices of {budget / 2**30:.1f} GiB\n")
  head = (f"{'strategy':9} {'mesh (d,f,t)':13} {'weights':>10} {'grads':>10} {'optimizer':>10} "
          f"{'activ.':>10} {'working':>10} {'total MiB':>10}  fits")
  if args.compile:
    head += "   XLA MiB"
  out.write(head + "\n")
  for rule_set, mesh_shape in strategy_meshes(devices, configured, cfg.rules):
    est = memory.estimate(model, rule_set, mesh_shape, data.batch_size, data.seq_len)
    shape = ",".join(str(v) for v in mesh_shape.values())
    line = (f"{rule_set:9} {shape:13} {_fmt(est.weights)} {_fmt(est.gradients)} "
            f"{_fmt(est.optimizer)} {_fmt(est.activations)} {_fmt(est.working)} "
            f"{_fmt(est.total)}  {'yes' if est.total <= budget else 'NO'}")
    if args.compile:
      mesh = mesh_lib.make_mesh(*mesh_shape.values(), devices=jax.devices()[:devices])
      line += _fmt(xla_memory.compiled(model, rule_set, mesh, data.batch_size,
                                   data.seq_len)["total"])
    out.write(line + "\n")
  out.write(f"\nZeRO bytes per parameter on {devices} devices (weights, grads, optimizer; "
            f"{model.param_dtype} AdamW):\n")
  itemsize = jax.numpy.dtype(model.param_dtype).itemsize
  for stage, terms in memory.zero_table(devices, itemsize).items():
    out.write(f"  {stage:6} {terms[0]:6.2f} {terms[1]:6.2f} {terms[2]:6.2f}  = "
              f"{sum(terms):6.2f}\n")
  out.write("Mixed precision (bfloat16 weights and grads; float32 master + moments):\n")
  for stage, terms in memory.mixed_precision_table(devices).items():
    out.write(f"  {stage:6} {terms[0]:6.2f} {terms[1]:6.2f} {terms[2]:6.2f}  = "
              f"{sum(terms):6.2f}\n")
  out.write(f"\nWeights alone by storage format (inference, or a frozen QLoRA base; dense "
            f"layers quantized, embedding and norms float):\n"
            f"  {'format':10} {'bytes/param':>11} {'MiB':>10} {'MiB/device fsdp':>16}\n")
  for fmt, (size, per_param) in memory.weight_formats(model).items():
    out.write(f"  {fmt:10} {per_param:11.3f} {_fmt(size)} {_fmt(size / devices):>16}\n")
  return 0
