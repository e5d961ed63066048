"""`llmjax generate --workdir=W --prompt=TEXT --max_new_tokens=N [--temperature=T] [--top_k=K]
[--top_p=P] [--min_p=M] [--repetition_penalty=R] [--beam_size=B] [--seed=S] [--stop=STR]
[--num_shots=K --shots_file=F.jsonl] [--candidate=TEXT ...]`

Loads the latest checkpoint and its tokenizer and continues the prompt, streaming tokens
as they are produced (the KV-cache loop of `llmjax.decode`). `--beam_size>1` prints the
n best beams with their scores instead. `--num_shots=K` prepends K solved examples from
a JSON-lines file of {"input": ..., "output": ...} (the prompt becomes the query);
`--candidate` (repeatable) scores candidate continuations by log-likelihood instead of
generating."""

import json
import sys

from llmjax.checkpoint.workdir import load_workdir


def register(subparsers, name, help_text):
  p = subparsers.add_parser(name, help=help_text, description=__doc__)
  p.add_argument("--workdir", required=True, help="a training workdir with checkpoints")
  p.add_argument("--prompt", default="", help="text to continue")
  p.add_argument("--max_new_tokens", type=int, default=100,
                 help="tokens to generate after the prompt")
  p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
  p.add_argument("--top_k", type=int, default=0, help="0 = no top-k filtering")
  p.add_argument("--top_p", type=float, default=1.0, help="nucleus mass; 1 = off")
  p.add_argument("--min_p", type=float, default=0.0, help="0 = off")
  p.add_argument("--repetition_penalty", type=float, default=1.0, help="1 = off")
  p.add_argument("--beam_size", type=int, default=1, help=">1: beam search (no sampling)")
  p.add_argument("--length_penalty", type=float, default=0.6, help="GNMT alpha for beams")
  p.add_argument("--num_return", type=int, default=1, help="beams to print")
  p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
  p.add_argument("--num_shots", type=int, default=0, help="solved examples before the prompt")
  p.add_argument("--shots_file", default=None, help='JSON lines {"input": .., "output": ..}')
  p.add_argument("--shot_template", default="{input}\n{output}")
  p.add_argument("--query_template", default="{input}\n")
  p.add_argument("--candidate", action="append", default=[],
                 help="score this continuation instead of generating (repeatable)")
  p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--adapter", default=None,
                 help="with several named adapters in the checkpoint: the one to use "
                      "(default: the active one); 'none' for the base model alone")
  p.add_argument("--tokenizer", default=None,
                 help="a SentencePiece .model or tokenizer.json to use instead of the one "
                      "stored with the checkpoint (needed when it has none)")
  p.set_defaults(func=run)


def _crop(model, prompt_ids, max_new_tokens):
  """Keeps the end of the prompt that fits the learned position table."""
  from llmjax.errors import UserError

  cfg = model.config
  if cfg.position != "learned":
    return prompt_ids
  if not 1 <= max_new_tokens < cfg.max_len:
    raise UserError(f"max_new_tokens must be in [1, {cfg.max_len - 1}] for a model with "
                    f"max_len={cfg.max_len}, got {max_new_tokens}.")
  return prompt_ids[-(cfg.max_len - max_new_tokens):]


def sample_and_print(model, params, tokenizer, prompt, *, max_new_tokens, temperature=0.8,
                     top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=0,
                     stop_strings=(), stream=None):
  """Encodes `prompt`, streams the continuation to `stream` (default: the current
  sys.stdout, looked up per call), returns the decoded text."""
  from llmjax.decode.generate import generate
  from llmjax.decode.sampling import SamplingConfig
  from llmjax.errors import UserError

  stream = sys.stdout if stream is None else stream
  prompt_ids = tokenizer.encode(prompt, add_bos=True)
  if not prompt_ids:
    raise UserError("the prompt encodes to no tokens; pass a non-empty --prompt.")
  prompt_ids = _crop(model, prompt_ids, max_new_tokens)
  sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repetition_penalty)  # bad flags fail here
  new_ids, printed = [], ""
  stream.write(prompt)

  def on_tokens(tokens, active):
    nonlocal printed
    if not active[0]:
      return
    new_ids.append(int(tokens[0]))
    text = tokenizer.decode(new_ids)  # decode the whole tail: pieces can merge
    stream.write(text[len(printed):])
    stream.flush()
    printed = text

  out = generate(model, params, [prompt_ids], max_new_tokens=max_new_tokens, sampling=sampling,
                 seed=seed, eos_id=tokenizer.eos_id, stop_strings=tuple(stop_strings),
                 detokenize=tokenizer.decode, on_tokens=on_tokens)
  stream.write("\n")
  return out.texts[0]


def _few_shot_prompt(args):
  from llmjax.errors import UserError
  from llmjax.eval import harness

  if not args.num_shots:
    return args.prompt
  if not args.shots_file:
    raise UserError("--num_shots needs --shots_file (JSON lines with input/output fields).")
  with open(args.shots_file, encoding="utf-8") as f:
    examples = [json.loads(line) for line in f if line.strip()]
  template = harness.PromptTemplate(example=args.shot_template, query=args.query_template)
  return harness.build_prompt(template, {"input": args.prompt}, examples, args.num_shots)


def _beams(model, params, tokenizer, prompt, args):
  from llmjax.decode.beam import beam_search

  ids = _crop(model, tokenizer.encode(prompt, add_bos=True), args.max_new_tokens)
  out = beam_search(model, params, [ids], beam_size=args.beam_size,
                    max_new_tokens=args.max_new_tokens, eos_id=tokenizer.eos_id,
                    alpha=args.length_penalty, num_return=args.num_return)
  for j in range(args.num_return):
    text = tokenizer.decode(list(out.tokens[0, j, :out.lengths[0, j]]))
    print(f"[{j}] score {out.scores[0, j]:.4f}: {prompt}{text}")


def run(args):
  from llmjax.eval import harness

  model, params, tokenizer = load_workdir(args.workdir, args.step, args.adapter,
                                          args.tokenizer)
  prompt = _few_shot_prompt(args)
  if args.candidate:
    best, scores = harness.choose(model, params, tokenizer, prompt, args.candidate)
    for text, score in zip(args.candidate, scores):
      print(f"{score:12.4f}  {text!r}{'  <- best' if text == args.candidate[best] else ''}")
  elif args.beam_size > 1:
    _beams(model, params, tokenizer, prompt, args)
  else:
    sample_and_print(model, params, tokenizer, prompt, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                     min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                     seed=args.seed, stop_strings=args.stop)
  return 0
