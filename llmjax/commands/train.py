"""`llmjax train --gin_file=F [--gin_file=...] [--gin_param=K=V ...] --workdir=W`."""

import sys

from llmjax.train import distributed


def register(subparsers, name, help_text):
  p = subparsers.add_parser(name, help=help_text, description=__doc__)
  p.add_argument("--gin_file", action="append", default=[], required=True,
                 help="gin config file (repeatable; later files override earlier ones)")
  p.add_argument("--gin_param", action="append", default=[],
                 help="a single binding, e.g. TrainConfig.num_steps=100 (repeatable)")
  p.add_argument("--workdir", required=True, help="where checkpoints, logs and plots go")
  p.add_argument("--no_sample", action="store_true", help="skip the sample at the end")
  distributed.add_flags(p)
  p.set_defaults(func=run)


def run(args):
  from llmjax.train import main

  distributed.initialize_from_flags(args)  # no-op on one host without cluster settings
  result = main.run(args.gin_file, args.gin_param, args.workdir)
  if args.no_sample or not result.objective.can_sample:
    return 0  # MLM, span corruption, seq2seq: no causal-LM prompt to continue
  from llmjax.commands import generate
  rt = result.runtime
  print(f"\n--- sample (prompt {rt.sample_prompt!r}, {rt.sample_tokens} tokens) ---")
  from llmjax.objectives.ppo import VALUE_MODEL
  model = result.model
  params = {k: v for k, v in result.state.params.items() if k not in VALUE_MODEL}
  if hasattr(model, "merged"):  # a PeftModel: sample from the base with adapters folded in
    model, params = model.merged(params)
  generate.sample_and_print(model, params, result.tokenizer, rt.sample_prompt,
                            max_new_tokens=rt.sample_tokens, temperature=rt.sample_temperature,
                            seed=result.config.seed, stream=sys.stdout)
  return 0
