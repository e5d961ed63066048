"""`llmjax sweep`: plan, run and fit a scaling-law sweep (gin_configs/sweeps/).

  llmjax sweep plan --gin_file=sweeps/shakespeare_isoflop.gin --sweep_dir=S [--gin_param=...]
      S/manifest.json: one row per run (shape, N, D, C, bindings, workdir) and the sweep's
      one tokenizer (trained once into S). Prints the table.
  llmjax sweep run --sweep_dir=S [--executor=local|ray|slurm] [--parallel=K]
                   [--ray_address=ADDR] [--only=ID,ID] [--index=I]
      Each run an ordinary `llmjax train` in S/runs/<id>; finished runs are skipped and
      killed ones resume from their checkpoints. `slurm` writes S/sweep.sbatch instead.
  llmjax sweep status --sweep_dir=S
  llmjax sweep fit --sweep_dir=S [--sweep_dir=S2] [--params=total|non_embedding]
                   [--loss=eval_loss|bits_per_byte] [--bootstrap=B] [--holdout] [--output=DIR]
      Approaches 1-3 of Hoffmann et al. (2022) with bootstrap intervals, the compute-optimal
      allocation, a hold-out check and PNG plots; writes DIR/fit.json (default S/fit).
"""

import os
import sys


def register(subparsers, name, help_text):
  import argparse
  p = subparsers.add_parser(name, help=help_text, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
  plan = actions.add_parser("plan", help="write the manifest of a sweep gin file")
  plan.add_argument("--gin_file", action="append", default=[], required=True)
  plan.add_argument("--gin_param", action="append", default=[])
  run = actions.add_parser("run", help="train the manifest's runs (resumable)")
  run.add_argument("--executor", choices=("local", "ray", "slurm"), default="local")
  run.add_argument("--parallel", type=int, default=1, help="local: runs at a time")
  run.add_argument("--ray_address", default=None, help="ray: the cluster (default: local)")
  run.add_argument("--cpus_per_run", type=float, default=1.0, help="ray: CPUs per task")
  run.add_argument("--only", default=None, help="comma-separated run ids")
  run.add_argument("--index", type=int, default=None, help="one row, by position (SLURM)")
  run.add_argument("--slurm_partition", default=None)
  run.add_argument("--slurm_time", default="04:00:00")
  status = actions.add_parser("status", help="which runs are done, partial or pending")
  fit = actions.add_parser("fit", help="fit scaling laws to the finished runs")
  fit.add_argument("--params", choices=("total", "non_embedding"), default="non_embedding")
  fit.add_argument("--loss", choices=("eval_loss", "bits_per_byte"), default="eval_loss")
  fit.add_argument("--bootstrap", type=int, default=200)
  fit.add_argument("--holdout", action="store_true",
                   help="also fit without the largest budget and predict its best loss")
  fit.add_argument("--output", default=None, help="where fit.json and plots go")
  fit.add_argument("--partial", action="store_true",
                   help="fit the finished runs only (default: refuse while runs are unfinished)")
  for sub in (plan, run, status):
    sub.add_argument("--sweep_dir", required=True)
  fit.add_argument("--sweep_dir", action="append", required=True,
                   help="a sweep directory (repeatable: sweeps are fitted together)")
  p.set_defaults(func=_dispatch)


def _dispatch(args):
  return {"plan": plan, "run": run, "status": show_status, "fit": fit}[args.action](args)


def plan(args):
  import gin

  from llmjax.scaling import sweep as sweep_lib
  from llmjax.train import inputs, main

  main.parse_gin(args.gin_file, args.gin_param)
  sweep = gin.get_configurable("llmjax.SweepConfig")()
  model, data = main.bound("model"), main.bound("data")
  config, tokenizer = main.bound("config"), main.bound("tokenizer")
  os.makedirs(args.sweep_dir, exist_ok=True)
  tok = inputs.resolve_tokenizer(tokenizer, args.sweep_dir, data.dataset, data.data_dir,
                                 data.text_key, input_dir=data.input_dir)
  multiple = config.pad_vocab_to_multiple if config else 1
  base = model.replace(vocab_size=-(-tok.vocab_size // multiple) * multiple)
  rows = sweep_lib.plan_rows(sweep, base, data.seq_len, data.batch_size)
  manifest = {"gin_files": [os.path.abspath(f) if os.path.exists(f) else f
                            for f in args.gin_file],
              "gin_params": list(args.gin_param), "mode": sweep.mode,
              "seq_len": data.seq_len, "batch_size": data.batch_size,
              "arch": base.arch, "vocab_size": base.vocab_size,
              "tokenizer": inputs.TOKENIZER_FILE,
              "tokenizer_sha": sweep_lib.file_sha(os.path.join(args.sweep_dir,
                                                               inputs.TOKENIZER_FILE)),
              "bytes_per_token": _bytes_per_token(data, tok), "rows": rows}
  path = sweep_lib.write_manifest(args.sweep_dir, manifest)
  _print_rows(rows, {r["id"]: "planned" for r in rows})
  print(f"{len(rows)} runs, {sum(r['flops'] for r in rows):.3g} FLOPs in all -> {path}")
  return 0


def _bytes_per_token(data, tok):
  from llmjax.data import datasets
  from llmjax.scaling import sweep as sweep_lib

  kwargs = {"input_dir": data.input_dir} if data.input_dir else {}
  texts = datasets.iter_texts(data.dataset, "validation", data_dir=data.data_dir,
                              text_key=data.text_key, **kwargs)
  return sweep_lib.bytes_per_token(texts, tok)


def _select(manifest, args):
  from llmjax.errors import UserError

  rows = manifest["rows"]
  if args.index is not None:
    if not 0 <= args.index < len(rows):
      raise UserError(f"--index={args.index} is outside the manifest's {len(rows)} rows.")
    return [rows[args.index]]
  if args.only:
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = sorted(set(wanted) - {r["id"] for r in rows})
    if unknown:
      raise UserError(f"--only names runs not in the manifest: {unknown}; see "
                      "`llmjax sweep status`.")
    return [r for r in rows if r["id"] in wanted]
  return rows


def run(args, env=None):
  from llmjax.scaling import executors
  from llmjax.scaling import sweep as sweep_lib

  manifest = sweep_lib.read_manifest(args.sweep_dir)
  _validate(manifest)
  rows = _select(manifest, args)
  sweep_dir = os.path.abspath(args.sweep_dir)
  if args.executor == "slurm":
    path = executors.write_slurm(sweep_dir, manifest["rows"], partition=args.slurm_partition,
                                 time_limit=args.slurm_time)
    print(f"wrote {path}; submit it with: sbatch {path}")
    return 0
  todo = [r for r in rows if sweep_lib.status(sweep_dir, r) != "done"]
  print(f"{len(rows) - len(todo)} of {len(rows)} runs already done; running {len(todo)} "
        f"({args.executor})", flush=True)
  if args.executor == "ray":
    results = executors.run_ray(sweep_dir, manifest, todo, args.ray_address,
                                args.cpus_per_run, env)
  else:
    results = executors.run_local(sweep_dir, manifest, todo, args.parallel, env)
  failed = [r for r in results if not r["status"].startswith(("done", "skipped"))]
  show_status(args)
  for r in failed:
    print(f"{r['id']}: {r['status']}; its log: {r['log']}", file=sys.stderr)
  return 1 if failed else 0


def _validate(manifest):
  """Checks every row against the base model and the configured mesh before any run."""
  import jax

  from llmjax.scaling import sweep as sweep_lib
  from llmjax.sharding import mesh as mesh_lib
  from llmjax.train import main

  main.parse_gin(manifest["gin_files"], manifest["gin_params"])
  model, config = main.bound("model"), main.bound("config")
  mesh = mesh_lib.resolve_mesh_shape(jax.device_count(), config.mesh_data, config.mesh_fsdp,
                                     config.mesh_tensor)
  sweep_lib.validate_rows(manifest, model, dict(zip(mesh_lib.MESH_AXES, mesh)))


def show_status(args):
  from llmjax.scaling import sweep as sweep_lib

  manifest = sweep_lib.read_manifest(args.sweep_dir)
  records = sweep_lib.collect(args.sweep_dir, manifest)
  states = {r["id"]: sweep_lib.status(args.sweep_dir, r) for r in manifest["rows"]}
  _print_rows(records, states)
  done = sum(s == "done" for s in states.values())
  print(f"{done} of {len(states)} runs done")
  return 0


def _print_rows(rows, states):
  print(f"{'run':28} {'N (non-emb)':>12} {'N (total)':>11} {'D tokens':>10} {'C FLOPs':>9} "
        f"{'steps':>6} {'eval loss':>9}  status")
  for r in rows:
    loss = r.get("eval_loss")
    print(f"{r['id']:28} {r['non_embedding_params']:12,} {r['params']:11,} {r['tokens']:10.3g} "
          f"{r['flops']:9.3g} {r['num_steps']:6} {'' if loss is None else f'{loss:9.4f}':>9}  "
          f"{states[r['id']]}")


def fit(args):
  from llmjax.scaling import report

  return report.fit_command(args)
