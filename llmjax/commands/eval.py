"""`llmjax eval --workdir=W [--step=N] [--dataset=D] [--split=S] [--context=C] [--stride=S]
[--batch_size=B] [--max_docs=N] [--add_eos] [--gin_file=F] [--gin_param=EvalConfig.k=v]
[--output=PATH]`: perplexity of a checkpoint, written to W/eval/<timestamp>.json.

By default the run's own dataset (its operative config's DataConfig) and its validation
split. Causal LMs: strided sliding windows (context: the model's max_len, stride: half);
masked LMs: pseudo-perplexity; encoder-decoder: target perplexity of the run's Seq2Seq
pairs. Per-byte and per-character figures compare runs with different tokenizers. The JSON
holds the operative eval config, the checkpoint step and the metrics with standard errors;
the figures also go to W/tensorboard as `eval/<dataset>/<metric>` at the checkpoint's step.
"""

import dataclasses
import datetime
import json
import os

_FLAGS = ("dataset", "split", "data_dir", "context", "stride", "batch_size", "max_docs")


def register(subparsers, name, help_text):
  import argparse
  p = subparsers.add_parser(name, help=help_text, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--gin_file", action="append", default=[])
  p.add_argument("--gin_param", action="append", default=[])
  for flag in _FLAGS:
    p.add_argument(f"--{flag}", default=None,
                   type=int if flag in ("context", "stride", "batch_size", "max_docs") else str)
  p.add_argument("--add_eos", action="store_true")
  p.add_argument("--decontaminate", action="store_true",
                 help="count examples sharing a 13-gram with the training split; score the rest")
  p.add_argument("--output", default=None, help="the results file (default: W/eval/<time>.json)")
  p.set_defaults(func=run)


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
  main.parse_gin(files, list(args.gin_param) + overrides)
  cfg = gin.get_configurable("llmjax.EvalConfig")()
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
  dataset = cfg.dataset or (run_data and run_data.dataset)
  if not dataset:
    raise UserError(f"{args.workdir} has no operative_config.gin naming its dataset; pass "
                    "--dataset=NAME.")
  data_dir = cfg.data_dir or (run_data and run_data.data_dir)
  text_key = run_data.text_key if run_data and dataset == run_data.dataset else None
  model, params, tokenizer = load_workdir(args.workdir, step=args.step)
  arch = perplexity._config(model).arch
  if arch == "encoder_decoder":
    if objective is None or not hasattr(objective, "inputs_key"):
      raise UserError("an encoder-decoder run is scored on its Seq2Seq pairs, but this "
                      "workdir's operative config names no Seq2Seq objective.")
    items = _pairs(cfg, dataset, data_dir, objective, cfg.max_docs)
    score = lambda xs: perplexity.pair_perplexity(
        model, params, tokenizer, xs, start_id=objective.decoder_start_id,
        batch_size=cfg.batch_size)
    as_text = lambda pair: " ".join(pair)
  else:
    items = _texts(cfg, dataset, data_dir, text_key, cfg.max_docs)
    score = lambda xs: perplexity.text_perplexity(
        model, params, tokenizer, xs, context=cfg.context, stride=cfg.stride,
        batch_size=cfg.batch_size, add_eos=cfg.add_eos)
    as_text = lambda text: text
  metrics = score(items)
  if cfg.decontaminate:
    metrics.update(_decontaminated(items, as_text, score, run_data, dataset))
  return {"workdir": os.path.abspath(args.workdir), "step": _step(args),
          "config": dataclasses.asdict(cfg) | {"dataset": dataset, "data_dir": data_dir},
          "arch": arch, "tasks": {f"perplexity/{dataset}/{cfg.split}": metrics}}


def _decontaminated(items, as_text, score, run_data, dataset) -> dict:
  """How many examples share a 13-gram with the run's training split; metrics without them."""
  from llmjax.data import datasets
  from llmjax.errors import UserError
  from llmjax.eval import decontaminate

  if run_data is None:
    raise UserError("--decontaminate compares with the run's training split, but the "
                    "workdir has no operative_config.gin naming it.")
  kwargs = {"input_dir": run_data.input_dir} if run_data.input_dir else {}
  train = datasets.iter_texts(run_data.dataset, "train", data_dir=run_data.data_dir,
                              text_key=run_data.text_key, **kwargs)
  flags = decontaminate.overlaps([as_text(x) for x in items], train)
  clean = [x for x, dirty in zip(items, flags) if not dirty]
  out = {"contaminated": int(flags.sum()), "examples": len(items),
         "train_dataset": run_data.dataset}
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
  print(f"{'task':40} {'tokens':>9} {'loss':>8} {'± se':>7} {'ppl':>9} {'bits/byte':>9} "
        f"{'bits/char':>9}")
  for task, m in result["tasks"].items():
    print(f"{task:40} {m['tokens']:9d} {m['loss']:8.4f} {m['loss_stderr']:7.4f} "
          f"{m['perplexity']:9.3f} {m.get('bits_per_byte', float('nan')):9.4f} "
          f"{m.get('bits_per_char', float('nan')):9.4f}")
    if "contaminated" in m:
      clean = (f"; without them: loss {m['clean_loss']:.4f}, perplexity "
               f"{m['clean_perplexity']:.3f}" if "clean_loss" in m else "")
      print(f"  {m['contaminated']} of {m['examples']} examples share a 13-gram with "
            f"{m['train_dataset']}'s training split{clean}")
