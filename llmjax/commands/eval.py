"""`llmjax eval --workdir=W [--step=N] [--dataset=D] [--split=S] [--context=C] [--stride=S]
[--batch_size=B] [--devices=N] [--max_docs=N] [--add_eos] [--tasks=T1,T2 [--limit=N] [--num_fewshot=K]
[--include_path=DIR] [--no_perplexity]] [--decontaminate] [--gin_file=F]
[--gin_param=EvalConfig.k=v] [--output=PATH]`: perplexity and lm-eval tasks of a
checkpoint, written to W/eval/<timestamp>.json.

Perplexity: by default the run's own dataset (its operative config's DataConfig) and its
validation split. Causal LMs: strided sliding windows (context: the model's max_len,
stride: half); masked LMs: pseudo-perplexity; encoder-decoder: target perplexity of the
run's Seq2Seq pairs. Per-byte and per-character figures compare runs with different
tokenizers.

lm-eval tasks (`--tasks`, decoder-only models): each runs through the `llmjax` lm-eval
backend on the same loaded checkpoint (`llmjax/eval/lm_eval_run.py`), on its first
`--limit` examples with `--num_fewshot` shots (default: the task's own). llmjax's offline
tasks are built into W/lm_eval_tasks from the run's data; `--include_path=DIR` adds your
own task YAMLs; `--no_perplexity` runs the tasks alone.

`--decontaminate`: for the perplexity split and for each task, how many examples share a
13-gram with the run's training split, and the metrics without them (`clean_<metric>`).

The JSON holds the operative eval config, the checkpoint step and, under "tasks",
`perplexity/<dataset>/<split>` and `lm_eval/<task>` metrics with standard errors; the
figures also go to W/tensorboard as `eval/<task>/<metric>` at the checkpoint's step.
"""

import dataclasses
import datetime
import json
import os

_FLAGS = ("dataset", "split", "data_dir", "context", "stride", "batch_size", "max_docs",
          "limit", "num_fewshot", "include_path", "devices")
_INTS = ("context", "stride", "batch_size", "max_docs", "limit", "num_fewshot", "devices")
_HELP = {"limit": "examples per lm-eval task (default: all)",
         "num_fewshot": "few-shot examples per lm-eval prompt (default: the task's own)",
         "include_path": "a folder of your own lm-eval task YAMLs, for --tasks",
         "devices": "split each batch over N devices, data-parallel (default: all)"}


def register(subparsers, name, help_text):
  import argparse
  p = subparsers.add_parser(name, help=help_text, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--gin_file", action="append", default=[])
  p.add_argument("--gin_param", action="append", default=[])
  for flag in _FLAGS:
    p.add_argument(f"--{flag}", default=None, type=int if flag in _INTS else str,
                   help=_HELP.get(flag))
  p.add_argument("--tasks", default=None,
                 help="lm-eval tasks to run, comma-separated (decoder-only models), e.g. "
                      "shakespeare_speaker,num2words_en_fr")
  p.add_argument("--no_perplexity", action="store_true", help="run only the --tasks")
  p.add_argument("--add_eos", action="store_true")
  p.add_argument("--decontaminate", action="store_true",
                 help="count examples sharing a 13-gram with the training split; score the rest")
  p.add_argument("--output", default=None, help="the results file (default: W/eval/<time>.json)")
  p.set_defaults(func=run)


def _names(tasks) -> tuple:
  """'a,b' (or a list) -> ('a', 'b')."""
  items = tasks.split(",") if isinstance(tasks, str) else tasks or ()
  return tuple(t.strip() for t in items if t.strip())


def _configs(args):
  """(EvalConfig, the run's DataConfig or None, the run's objective or None)."""
  import gin

  from llmjax.train import main

  operative = os.path.join(args.workdir, "operative_config.gin")
  files = ([operative] if os.path.exists(operative) else []) + list(args.gin_file)
  overrides = [f"EvalConfig.{f}={getattr(args, f)!r}" for f in _FLAGS
               if getattr(args, f) is not None]
  for flag in ("add_eos", "decontaminate"):
    if getattr(args, flag):
      overrides.append(f"EvalConfig.{flag}=True")
  if args.tasks is not None:
    overrides.append(f"EvalConfig.tasks={_names(args.tasks)!r}")
  if args.no_perplexity:
    overrides.append("EvalConfig.perplexity=False")
  main.parse_gin(files, list(args.gin_param) + overrides)
  cfg = gin.get_configurable("llmjax.EvalConfig")()
  cfg = dataclasses.replace(cfg, tasks=_names(cfg.tasks))
  run_data = run_objective = None
  if os.path.exists(operative):
    run_data = main.bound("data")
    run_objective = main.bound("objective")
  return cfg, run_data, run_objective


def _texts(cfg, dataset, data_dir, text_key, limit):
  from llmjax.data import datasets

  texts = datasets.iter_texts(dataset, cfg.split, data_dir=data_dir, text_key=text_key)
  return [t for _, t in zip(range(limit or 10**12), texts)]


def _pairs(cfg, dataset, data_dir, objective, limit):
  from llmjax.data import datasets

  source = datasets.get_source(dataset, cfg.split, data_dir)
  n = min(len(source), limit or len(source))
  pairs = []
  for i in range(n):
    ex = source[i]
    pairs.append((objective.inputs_prefix + datasets.example_text(ex, objective.inputs_key),
                  datasets.example_text(ex, objective.targets_key)))
  return pairs


def measure(args) -> dict:
  from llmjax.checkpoint.workdir import load_workdir
  from llmjax.errors import UserError
  from llmjax.eval import perplexity

  cfg, run_data, objective = _configs(args)
  if not cfg.perplexity and not cfg.tasks:
    raise UserError("--no_perplexity leaves nothing to evaluate; name lm-eval tasks with "
                    "--tasks=T1,T2 (or drop --no_perplexity).")
  dataset = cfg.dataset or (run_data and run_data.dataset)
  if cfg.perplexity and not dataset:
    raise UserError(f"{args.workdir} has no operative_config.gin naming its dataset; pass "
                    "--dataset=NAME (or --no_perplexity to run only --tasks).")
  data_dir = cfg.data_dir or (run_data and run_data.data_dir)
  loaded = load_workdir(args.workdir, step=args.step)
  arch = perplexity._config(loaded[0]).arch
  # Every check before any work: the tasks' names and the model's kind, the training split.
  manager = _task_manager(args.workdir, cfg, arch, data_dir) if cfg.tasks else None
  train = _train_texts(run_data) if cfg.decontaminate else None
  tasks = {}
  if cfg.perplexity:
    tasks.update(_perplexity(cfg, run_data, objective, loaded, dataset, data_dir, train))
  if cfg.tasks:
    tasks.update(_lm_eval(args.workdir, cfg, manager, loaded, train, run_data))
  return {"workdir": os.path.abspath(args.workdir), "step": _step(args),
          "config": dataclasses.asdict(cfg) | {"dataset": dataset, "data_dir": data_dir},
          "arch": arch, "tasks": tasks}


def _perplexity(cfg, run_data, objective, loaded, dataset, data_dir, train) -> dict:
  """{'perplexity/<dataset>/<split>': metrics}, with the clean subset's given `train`."""
  from llmjax.errors import UserError
  from llmjax.eval import perplexity

  model, params, tokenizer = loaded
  text_key = run_data.text_key if run_data and dataset == run_data.dataset else None
  if perplexity._config(model).arch == "encoder_decoder":
    if objective is None or not hasattr(objective, "inputs_key"):
      raise UserError("an encoder-decoder run is scored on its Seq2Seq pairs, but this "
                      "workdir's operative config names no Seq2Seq objective.")
    items = _pairs(cfg, dataset, data_dir, objective, cfg.max_docs)
    score = lambda xs: perplexity.pair_perplexity(
        model, params, tokenizer, xs, start_id=objective.decoder_start_id,
        batch_size=cfg.batch_size, devices=_devices(cfg))
    as_text = lambda pair: " ".join(pair)
  else:
    items = _texts(cfg, dataset, data_dir, text_key, cfg.max_docs)
    score = lambda xs: perplexity.text_perplexity(
        model, params, tokenizer, xs, context=cfg.context, stride=cfg.stride,
        batch_size=cfg.batch_size, add_eos=cfg.add_eos, devices=_devices(cfg))
    as_text = lambda text: text
  metrics = score(items)
  if train is not None:
    metrics.update(_decontaminated(items, as_text, score, train, run_data.dataset))
  return {f"perplexity/{dataset}/{cfg.split}": metrics}


def _devices(cfg) -> int:
  import jax

  return cfg.devices or jax.device_count()


def _task_manager(workdir, cfg, arch, data_dir):
  """lm-eval's task manager for `cfg.tasks` (offline tasks built into W/lm_eval_tasks), or
  a UserError when the model or a task name cannot run."""
  from llmjax.errors import UserError
  from llmjax.eval import lm_eval_run

  if arch != "decoder_only":
    raise UserError(f"--tasks runs lm-eval tasks, which llmjax scores on decoder-only models; "
                    f"{workdir} is {arch}. Drop --tasks (its perplexity still runs) or "
                    "evaluate a decoder-only run.")
  try:
    import lm_eval  # noqa: F401
  except ImportError:
    raise UserError("--tasks needs lm-eval: pip install 'llmjax[eval]' (or pip install "
                    "lm-eval==0.4.13).") from None
  return lm_eval_run.task_manager(cfg.tasks, folder=os.path.join(workdir, "lm_eval_tasks"),
                                  data_dir=data_dir, include_path=cfg.include_path)


def _lm_eval(workdir, cfg, manager, loaded, train, run_data) -> dict:
  """{'lm_eval/<task>': metrics} of each of `cfg.tasks` on the loaded checkpoint."""
  from llmjax.eval import lm_eval_run

  model, params, tokenizer = loaded
  out = lm_eval_run.run_tasks(model, params, tokenizer, cfg.tasks,
                              folder=os.path.join(workdir, "lm_eval_tasks"), limit=cfg.limit,
                              num_fewshot=cfg.num_fewshot, decontaminate_against=train,
                              batch_size=cfg.batch_size, devices=_devices(cfg),
                              manager=manager)
  for metrics in out.values():
    if "contaminated" in metrics:
      metrics["train_dataset"] = run_data.dataset
  return {f"lm_eval/{task}": metrics for task, metrics in out.items()}


def _train_texts(run_data) -> list:
  """The run's training split (its own DataConfig), for --decontaminate."""
  from llmjax.data import datasets
  from llmjax.errors import UserError

  if run_data is None:
    raise UserError("--decontaminate compares with the run's training split, but the "
                    "workdir has no operative_config.gin naming it.")
  kwargs = {"input_dir": run_data.input_dir} if run_data.input_dir else {}
  return list(datasets.iter_texts(run_data.dataset, "train", data_dir=run_data.data_dir,
                                  text_key=run_data.text_key, **kwargs))


def _decontaminated(items, as_text, score, train, train_dataset) -> dict:
  """How many examples share a 13-gram with the training texts; metrics without them."""
  from llmjax.eval import decontaminate

  flags = decontaminate.overlaps([as_text(x) for x in items], train)
  clean = [x for x, dirty in zip(items, flags) if not dirty]
  out = {"contaminated": int(flags.sum()), "examples": len(items),
         "train_dataset": train_dataset}
  if clean:
    out.update({f"clean_{k}": v for k, v in score(clean).items()})
  return out


def _step(args):
  from llmjax.checkpoint import manager as ckpt_lib

  ckpt = ckpt_lib.CheckpointManager(os.path.join(args.workdir, "checkpoints"))
  step = args.step if args.step is not None else ckpt.latest_step()
  ckpt.close()
  return step


def run(args):
  from llmjax.errors import UserError

  if not os.path.isdir(os.path.join(args.workdir, "checkpoints")):
    raise UserError(f"{args.workdir} has no checkpoints/; point --workdir at a trained run "
                    "(or one written by `llmjax convert --from_hf`).")
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  output = args.output or os.path.join(args.workdir, "eval", f"{stamp}.json")
  try:  # fail before the work, not after it
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output + ".tmp", "w", encoding="utf-8"):
      pass
    os.remove(output + ".tmp")
  except OSError as e:
    raise UserError(f"cannot write the results to {output} ({e.strerror}); pass a writable "
                    "--output=PATH.") from None
  result = measure(args)
  with open(output, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  _tensorboard(args.workdir, result)
  _print_table(result)
  print(f"-> {output}")
  return 0


def _tensorboard(workdir, result):
  from tensorboardX import SummaryWriter

  writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
  for task, metrics in result["tasks"].items():
    for name, value in metrics.items():
      if isinstance(value, (int, float)):
        writer.add_scalar(f"eval/{task}/{name}", value, result["step"] or 0)
  writer.close()


def _print_table(result):
  """Perplexity rows (tokens, loss, perplexity, bits), then lm-eval rows (one per metric)."""
  rows = result["tasks"]
  ppl = {k: m for k, m in rows.items() if k.startswith("perplexity/")}
  if ppl:
    print(f"{'task':40} {'tokens':>9} {'loss':>8} {'± se':>7} {'ppl':>9} {'bits/byte':>9} "
          f"{'bits/char':>9}")
  for task, m in ppl.items():
    print(f"{task:40} {m['tokens']:9d} {m['loss']:8.4f} {m['loss_stderr']:7.4f} "
          f"{m['perplexity']:9.3f} {m.get('bits_per_byte', float('nan')):9.4f} "
          f"{m.get('bits_per_char', float('nan')):9.4f}")
    _print_contamination(m, ("loss", "perplexity"))
  lm_eval = {k: m for k, m in rows.items() if k not in ppl}
  if lm_eval:
    print(f"{'task':40} {'examples':>9} {'metric':16} {'value':>12} {'± se':>10}")
  for task, m in lm_eval.items():
    names = [k for k, v in m.items() if isinstance(v, float) and not k.endswith("_stderr")
             and not k.startswith("clean_")]
    for i, name in enumerate(names):
      head = f"{task:40} {m.get('examples', ''):>9}" if i == 0 else " " * 50
      stderr = m.get(f"{name}_stderr")
      print(f"{head} {name:16} {m[name]:12.6g} "
            f"{'' if stderr is None else format(stderr, '10.4g'):>10}")
    _print_contamination(m, names)


def _print_contamination(m, names):
  if "contaminated" not in m:
    return
  clean = ", ".join(f"{name} {m[f'clean_{name}']:.6g}" for name in names
                    if f"clean_{name}" in m)
  print(f"  {m['contaminated']} of {m['examples']} examples share a 13-gram with "
        f"{m['train_dataset']}'s training split" + (f"; without them: {clean}" if clean else ""))
