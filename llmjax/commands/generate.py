"""`llmjax generate --workdir=W --prompt=TEXT --max_new_tokens=N [--temperature=T] [--top_k=K]
[--seed=S]`: loads the latest checkpoint and its tokenizer and prints the continuation."""

import os
import sys


def register(subparsers, name, help_text):
  p = subparsers.add_parser(name, help=help_text, description=__doc__)
  p.add_argument("--workdir", required=True, help="a training workdir with checkpoints")
  p.add_argument("--prompt", default="", help="text to continue")
  p.add_argument("--max_new_tokens", type=int, default=100)
  p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
  p.add_argument("--top_k", type=int, default=0, help="0 = no top-k filtering")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.set_defaults(func=run)


def sample_and_print(model, params, tokenizer, prompt, *, max_new_tokens, temperature=0.8,
                     top_k=0, seed=0, stream=sys.stdout):
  """Encodes `prompt`, streams the continuation to `stream`, returns the decoded text."""
  from llmjax.decode import sampling

  prompt_ids = tokenizer.encode(prompt, add_bos=True)
  new_ids = []
  printed = ""
  stream.write(prompt)

  def on_token(token):
    nonlocal printed
    new_ids.append(token)
    text = tokenizer.decode(new_ids)  # decode the whole tail: pieces can merge
    stream.write(text[len(printed):])
    stream.flush()
    printed = text

  sampling.generate(model, params, prompt_ids, max_new_tokens=max_new_tokens,
                    max_len=model.config.max_len, temperature=temperature, top_k=top_k,
                    seed=seed, eos_id=tokenizer.eos_id, on_token=on_token)
  stream.write("\n")
  return printed


def run(args):
  from llmjax.checkpoint import manager as ckpt_lib
  from llmjax.data.tokenizer import Tokenizer
  from llmjax.models.config import TransformerConfig
  from llmjax.models.transformer import Transformer

  ckpt = ckpt_lib.CheckpointManager(os.path.join(args.workdir, "checkpoints"))
  params, meta = ckpt.restore_params(args.step)
  model = Transformer(TransformerConfig(**meta["model_config"]))
  tokenizer = Tokenizer.from_bytes(ckpt_lib.decode_bytes(meta["tokenizer"]))
  sample_and_print(model, params, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, seed=args.seed)
  return 0
