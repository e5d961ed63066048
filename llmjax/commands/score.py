"""`llmjax score --workdir=W --text=TEXT [--text=...] [--prompt=P --response=R [--response=...]]`

Prints the reward a trained reward model (`runs/reward_model.gin`,
`llmjax/objectives/reward.py`) gives each text, one line each, highest first when
`--sort`. `--text` scores a whole text (an empty prompt); `--prompt` with `--response`
(repeatable) scores each response after the prompt, encoded as training encodes a
preference pair (prompt and response tokenized separately). The reward is read at the
EOS after the text, as in training; texts longer than the model's `max_len` lose the
start of their prompt.
"""

from collections.abc import Mapping


def register(subparsers, name, help_text):
  p = subparsers.add_parser(name, help=help_text, description=__doc__)
  p.add_argument("--workdir", required=True, help="a reward model's training workdir")
  p.add_argument("--text", action="append", default=[], help="a text to score (repeatable)")
  p.add_argument("--prompt", default="", help="the prompt the --response texts answer")
  p.add_argument("--response", action="append", default=[],
                 help="a response to --prompt to score (repeatable)")
  p.add_argument("--sort", action="store_true", help="print the highest reward first")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.set_defaults(func=run)


def run(args):
  from llmjax.checkpoint.workdir import load_workdir
  from llmjax.errors import UserError
  from llmjax.objectives.reward import RewardModel

  pairs = [("", text) for text in args.text] + [(args.prompt, r) for r in args.response]
  if not pairs:
    raise UserError("nothing to score: pass --text=TEXT, or --prompt=P with --response=R "
                    "(each repeatable).")
  model, params, tokenizer = load_workdir(args.workdir, args.step)
  if not isinstance(params, Mapping) or "reward_head" not in params:
    raise UserError(f"{args.workdir} is not a reward model: its checkpoint has no "
                    "'reward_head' parameters. Train one with --gin_file=runs/reward_model.gin "
                    "(TrainConfig.init_from = a language model's workdir) and score that.")
  rewards = RewardModel(max_len=model.config.max_len).score(model, params, tokenizer, pairs)
  rows = list(zip(rewards.tolist(), pairs))
  if args.sort:
    rows.sort(key=lambda row: -row[0])
  for reward, (prompt, text) in rows:
    print(f"{reward:12.4f}  {text!r}" + (f"  (prompt {prompt[-40:]!r})" if prompt else ""))
  return 0
