"""An lm-evaluation-harness model backend: `lm_eval ... --model llmjax --model_args workdir=W`.

lm-eval 0.4.13 loads no third-party model by entry point, so importing this module is what
registers `llmjax` (`llmjax lm-eval ...` does it, then hands its command line to lm-eval's
own CLI); in Python, `lm_eval.simple_evaluate(model=LlmjaxLM(workdir=W), tasks=[...])`.

`LlmjaxLM` is a `TemplateLM`: lm-eval tokenizes and splits context/continuation, and this
class implements the three request types on jitted forward passes:
- `loglikelihood`: context + continuation truncated from the left to max_length + 1 tokens
  (as lm-eval's `hf` backend does), the continuation's summed log-probability and whether
  greedy decoding would produce it;
- `loglikelihood_rolling`: lm-eval's disjoint rolling windows (a prefix token, then windows
  of max_length predictions, one token of context carried over), summed;
- `generate_until`: the KV-cache generator (`decode/generate.py`), greedy unless the task
  asks for sampling, stopped at the task's stop strings (one-character ones such as
  "\n" on the device, longer ones by a host callback) or `max_gen_toks`; the requests
  split into batches of equal size, at most `batch_size`; the tokens a batch's prompts
  start with (a few-shot prefix, a task's instruction) are prefilled once per batch,
  not once per row (`share_contexts` other than false).
Requests are sorted longest first and batched in rows padded to a few fixed lengths (one
compile per length bucket); with several devices each batch is split over a 'data' mesh
axis, so a sharded evaluation computes what one device does. When requests share their
contexts (a multiple-choice question asks one per choice), each context is run once, its
continuations after it in the same row under a mask that lets each see the context and
itself only, and several such questions are packed into one row (`share_contexts=auto`,
the default, does so when contexts repeat; lm-eval's `hf` backend shares only
single-token continuations).
"""

import jax
import jax.numpy as jnp

# lm-eval's own models: its registry loads them only while it is empty, so registering
# `llmjax` first would hide `hf` and the rest.
import lm_eval.models  # noqa: F401
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from llmjax.errors import UserError


def _bucket(n: int) -> int:
  """Row lengths padded to 16, 32, 64, ...: few shapes, few compiles."""
  return max(16, 1 << (max(n, 1) - 1).bit_length())


def _scorer(model, mesh):
  """jit: (tokens [B, L], targets [B, L]) -> (log p(targets) [B, L], argmax == target)."""
  def score(params, tokens, targets):
    logits = model.apply({"params": params}, tokens).astype(jnp.float32)       # [B, L, V]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets
  if mesh is None:
    return jax.jit(score)
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  return jax.jit(score, in_shardings=(None, rows, rows))


def _tree_logits(module, tokens, positions, groups, branches, rows, cols):
  """Method of a decoder-only `Transformer` (`model.apply(..., method=_tree_logits)`):
  logits `[N, V]` at positions `(rows [N], cols [N])` of rows packing several questions.

  Each row holds questions one after another (`groups [B, L]`: 1, 2, ... per question, 0
  for padding), each its context (`branches` 0) followed by the inputs of its
  continuations (`branches` 1, 2, ...), `positions` restarting per question and every
  continuation's continuing from its context's end. A token attends causally within its
  own question to the context and to its own continuation only: what scoring each
  continuation after its context alone computes, with the context run once."""
  cfg = module.config
  same = groups[:, None, :, None] == groups[:, None, None, :]                    # [B, 1, L, L]
  visible = (branches[:, None, None, :] == 0) | (
      branches[:, None, :, None] == branches[:, None, None, :])
  mask = same & visible
  if cfg.sliding_window:  # by position: a continuation's context ends just before it
    mask &= (positions[:, None, :, None] - positions[:, None, None, :]) < cfg.sliding_window
  x = module.embed_tokens(tokens, positions, True)
  hidden = module.decoder(x, mask, positions, None, None, True)                 # [B, L, D]
  return module.logits(hidden[rows, cols][None])[0]                             # [N, V]


def _tree_scorer(model, mesh):
  """jit: packed question rows (`_tree_logits`) and the predicted positions' targets
  `[N]` -> (log p(target) [N], argmax == target [N])."""
  def score(params, tokens, positions, groups, branches, rows, cols, targets):
    logits = model.apply({"params": params}, tokens, positions, groups, branches, rows, cols,
                         method=_tree_logits).astype(jnp.float32)              # [N, V]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, targets[:, None], axis=-1)[:, 0]
    return picked, jnp.argmax(logits, axis=-1) == targets
  if mesh is None:
    return jax.jit(score)
  row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  return jax.jit(score, in_shardings=(None, row, row, row, row, None, None, None))


def _pack(sizes, width):
  """Questions of `sizes` tokens (sorted largest first) into rows of `width`: each row
  takes the largest question left, then the smallest ones while they fit. Returns
  `[[question index, ...] per row]`."""
  out, lo, hi = [], 0, len(sizes) - 1
  while lo <= hi:
    row, room = [lo], width - sizes[lo]
    lo += 1
    while lo <= hi and sizes[hi] <= room:
      row.append(hi)
      room -= sizes[hi]
      hi -= 1
    out.append(row)
  return out


@register_model("llmjax")
class LlmjaxLM(TemplateLM):
  """A causal (decoder-only) llmjax checkpoint as an lm-eval model."""

  def __init__(self, workdir: str | None = None, step: int | None = None,
               batch_size: int | str = 8, max_length: int | None = None,
               max_gen_toks: int = 256, devices: int | None = None,
               add_bos_token: bool | str = True, truncation: str = "left",
               tokenizer_path: str | None = None, share_contexts: bool | str = "auto",
               model=None, params=None, tokenizer=None, **_ignored):
    super().__init__()
    if model is None:
      if workdir is None:
        raise UserError("the llmjax lm-eval backend needs --model_args workdir=PATH.")
      from llmjax.checkpoint.workdir import load_workdir
      model, params, tokenizer = load_workdir(workdir, step=None if step is None else int(step),
                                              tokenizer_path=tokenizer_path)
    cfg = model.config if hasattr(model, "config") else model.base.config
    if tokenizer.vocab_size > cfg.vocab_size:
      raise UserError(f"tokenizer mismatch: the tokenizer has {tokenizer.vocab_size} pieces "
                      f"but the model only {cfg.vocab_size} embeddings; use the run's own "
                      "tokenizer (leave tokenizer_path unset).")
    if truncation not in ("left", "error"):
      raise UserError(f"truncation={truncation!r}; use 'left' (drop the oldest context "
                      "tokens, as lm-eval's hf backend) or 'error'.")
    self.truncation, self.truncated = truncation, 0
    if cfg.arch != "decoder_only":
      raise UserError(f"the llmjax lm-eval backend scores decoder-only models; this one is "
                      f"{cfg.arch} (use `llmjax eval` for its perplexity).")
    if hasattr(model, "clone"):  # a Transformer: unscanned once, not per generate call
      from llmjax.decode.generate import decoding_model
      model, params = decoding_model(model, params)
    self.model, self.params, self.tok = model, params, tokenizer
    prompt = getattr(model, "soft_prompt", 0)  # prompt tuning: k positions are taken
    self._max_length = int(max_length or cfg.max_len - prompt)
    if cfg.position == "learned" and self._max_length > cfg.max_len:
      raise UserError(f"max_length={self._max_length} exceeds the model's learned position "
                      f"table ({cfg.max_len}); pass max_length<={cfg.max_len}.")
    self.add_bos_token = str(add_bos_token).lower() in ("true", "1")
    self.max_gen_toks = int(max_gen_toks)
    self.batch_size = 8 if str(batch_size) == "auto" else int(str(batch_size).split(":")[0])
    n = int(devices or jax.device_count())
    self._mesh = (jax.make_mesh((n,), ("data",), devices=jax.devices()[:n],
                                axis_types=(jax.sharding.AxisType.Auto,)) if n > 1 else None)
    self._rows = self.batch_size if n == 1 else -(-self.batch_size // n) * n
    self._score = _scorer(model, self._mesh)
    self._tree = _tree_scorer(model, self._mesh)
    self._encoded = {}
    self.share_contexts = str(share_contexts).lower()
    if self.share_contexts not in ("auto", "true", "false"):
      raise UserError(f"share_contexts={share_contexts!r}; use auto (share when requests "
                      "repeat their contexts, as multiple-choice tasks do), true or false.")

  @property
  def eot_token_id(self) -> int:
    return self.tok.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

  @property
  def max_length(self) -> int:
    return self._max_length

  def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
    """The text's ids, BOS first (llmjax models train on [BOS] + text + [EOS], and the
    tokenizer.json `convert --to_hf` writes adds it too) unless lm-eval asks for no
    special tokens or the model args say add_bos_token=False."""
    bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
    return ([self.prefix_token_id] if bos else []) + self._encode(string)

  def _encode(self, string: str) -> list[int]:
    """Tokenizes once per distinct string within one batch of requests: lm-eval encodes a
    multiple-choice context once per choice, and the choices (names, labels) repeat
    across questions. (Cleared per call, so nothing is carried between evaluations.)"""
    ids = self._encoded.get(string)
    if ids is None:
      ids = self._encoded[string] = tuple(self.tok.encode(string))
    return list(ids)

  def loglikelihood(self, requests, disable_tqdm: bool = False):
    self._encoded = {}
    try:
      return super().loglikelihood(requests, disable_tqdm)
    finally:
      self._encoded = {}

  def tok_decode(self, tokens) -> str:
    return self.tok.decode(list(tokens))

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
    """[(key, context ids, continuation ids)] -> [(sum log p(continuation), is_greedy)]."""
    rows = self._truncated(requests)
    contexts = {tuple(inp[:len(inp) - n + 1]) for inp, _, n in rows}
    # Tokens run: each context once plus the continuations, against every whole request.
    saved = sum(map(len, contexts)) + sum(n for *_, n in rows)
    shared = self.share_contexts == "true" or (
        self.share_contexts == "auto" and saved <= 0.75 * sum(len(r[0]) for r in rows))
    if getattr(self.model, "soft_prompt", 0):  # it goes before each row, not question
      shared = False
    return self._score_shared(rows) if shared else self._score_whole(rows)

  def _truncated(self, requests) -> list[tuple[list[int], list[int], int]]:
    """(input ids, target ids, continuation length) per request, cut to the context."""
    rows, truncated = [], 0
    for _, context, continuation in requests:
      if not continuation:
        raise UserError("an lm-eval request has an empty continuation.")
      whole = list(context) + list(continuation)
      if len(whole) > self.max_length + 1:
        if self.truncation == "error":
          raise UserError(f"a request of {len(whole)} tokens exceeds the model's context "
                          f"({self.max_length} + 1); shorten the task's prompts (fewer "
                          "few-shot examples) or pass truncation=left.")
        truncated += 1
        whole = whole[-(self.max_length + 1):]
      rows.append((whole[:-1], whole[1:], min(len(continuation), len(whole) - 1)))
    self.truncated += truncated
    if truncated:
      import logging
      logging.getLogger("llmjax").warning(
          "%d request(s) exceeded the context of %d tokens; their oldest context tokens were "
          "dropped (truncation=left; truncation=error refuses instead).", truncated,
          self.max_length)
    return rows

  def _score_whole(self, rows):
    """One forward pass per request over its whole input."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first
    out = [None] * len(rows)
    for start in range(0, len(order), self._rows):
      chunk = order[start:start + self._rows]
      width = min(_bucket(len(rows[chunk[0]][0])), self.max_length)
      tokens = np.zeros((self._rows, width), np.int32)
      targets = np.zeros((self._rows, width), np.int32)
      for j, i in enumerate(chunk):
        inp, tgt, _ = rows[i]
        tokens[j, :len(inp)], targets[j, :len(tgt)] = inp, tgt
      picked, hits = (np.asarray(x) for x in self._score(self.params, tokens, targets))
      for j, i in enumerate(chunk):
        length, n_cont = len(rows[i][0]), rows[i][2]
        span = slice(length - n_cont, length)
        out[i] = (float(picked[j, span].astype(np.float64).sum()), bool(hits[j, span].all()))
    return out

  def _score_shared(self, rows):
    """Requests that share a context (a multiple-choice question's choices): each
    context is run once, its continuations after it in the same row, several questions
    per row (`_tree_logits`)."""
    groups = {}
    for i, (inp, _, n) in enumerate(rows):
      groups.setdefault(tuple(inp[:len(inp) - n + 1]), []).append(i)
    cap = self.max_length  # a longer question is split (its context copied): rows fit it
    questions = []           # (context, [request index])
    for context, members in groups.items():
      part, size = [], len(context)
      for i in sorted(members, key=lambda i: rows[i][2]):
        if part and size + rows[i][2] - 1 > cap:
          questions.append((context, part))
          part, size = [], len(context)
        part.append(i)
        size += rows[i][2] - 1
      questions.append((context, part))
    size = lambda q: len(q[0]) + sum(rows[i][2] - 1 for i in q[1])
    questions.sort(key=size, reverse=True)
    sizes = [size(q) for q in questions]
    width = min(self.max_length, _bucket(max(sizes[0], 128)))  # >= every question
    packed = _pack(sizes, width)
    out = [None] * len(rows)
    for start in range(0, len(packed), self._rows):
      self._tree_chunk(rows, [[questions[q] for q in row]
                              for row in packed[start:start + self._rows]], width, out)
    return out

  def _tree_chunk(self, rows, chunk, width, out):
    """One call: `chunk` (rows of questions) laid out for `_tree_logits`, scored."""
    shape = (self._rows, width)
    tokens, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    groups, branches = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    where = []               # (request, row, [column predicting each target])
    for r, row in enumerate(chunk):
      col = 0
      for g, (context, members) in enumerate(row, start=1):
        c = len(context)
        tokens[r, col:col + c], positions[r, col:col + c] = context, np.arange(c)
        groups[r, col:col + c] = g
        last, col = col + c - 1, col + c
        for b, i in enumerate(members, start=1):
          inp, _, n = rows[i]
          tokens[r, col:col + n - 1] = inp[len(inp) - n + 1:]
          positions[r, col:col + n - 1] = np.arange(c, c + n - 1)
          groups[r, col:col + n - 1], branches[r, col:col + n - 1] = g, b
          where.append((i, r, [last] + list(range(col, col + n - 1))))
          col += n - 1
    count = sum(len(cols) for *_, cols in where)
    n_pad = _bucket(count)
    flat_rows, flat_cols = np.zeros(n_pad, np.int32), np.zeros(n_pad, np.int32)
    targets = np.zeros(n_pad, np.int32)
    k = 0
    for i, r, cols in where:
      flat_rows[k:k + len(cols)], flat_cols[k:k + len(cols)] = r, cols
      targets[k:k + len(cols)] = rows[i][1][-rows[i][2]:]
      k += len(cols)
    picked, hits = (np.asarray(x) for x in self._tree(
        self.params, tokens, positions, groups, branches, flat_rows, flat_cols, targets))
    k = 0
    for i, _, cols in where:
      n = len(cols)
      out[i] = (float(picked[k:k + n].astype(np.float64).sum()), bool(hits[k:k + n].all()))
      k += n

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owners = [], []
    for index, (string,) in enumerate(req.args for req in requests):
      for context, predicted in map(lm_utils.make_disjoint_window,
                                    lm_utils.get_rolling_token_windows(
                                        token_list=self.tok_encode(string),
                                        prefix_token=self.prefix_token_id,
                                        max_seq_len=self.max_length, context_len=1)):
        windows.append((None, context, predicted))
        owners.append(index)
    totals = [0.0] * len(requests)
    for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
      totals[owner] += logprob
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    self._encoded = {}
    try:
      return self._generate_until(requests)
    finally:
      self._encoded = {}

  def _generate_until(self, requests) -> list[str]:
    from llmjax.decode import generate as gen
    from llmjax.decode.sampling import SamplingConfig

    results = [None] * len(requests)
    groups = {}
    for i, req in enumerate(requests):  # one generate call per (settings) group
      context, kwargs = req.args
      kwargs = dict(kwargs or {})
      until = kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
      until = [until] if isinstance(until, str) else list(until)
      new = min(int(kwargs.pop("max_gen_toks", self.max_gen_toks)), self.max_length - 1)
      temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) \
          else 0.0
      groups.setdefault((tuple(until), new, temperature), []).append((i, context))
    for (until, new, temperature), items in groups.items():
      items.sort(key=lambda item: -len(self.tok_encode(item[1])))
      # Batches of equal size (42 requests at batch 16: 14+14+14, not 16+16+10 padded to
      # 16 rows), so no batch computes filler rows and one shape serves the group.
      rows = -(-len(items) // -(-len(items) // self.batch_size))
      for start in range(0, len(items), rows):
        chunk = items[start:start + rows]
        keep = max(1, self.max_length - new)  # left-truncate so prompt + new fits
        prompts = [(self.tok_encode(c) or [self.prefix_token_id])[-keep:] for _, c in chunk]
        prompts += prompts[:1] * (rows - len(prompts))
        out = gen.generate(self.model, self.params, prompts, max_new_tokens=new,
                           sampling=SamplingConfig(temperature=temperature),
                           eos_id=self.eot_token_id, stop_strings=until,
                           detokenize=self.tok_decode, pad_multiple=4,
                           share_prefix=self.share_contexts != "false")
        for (i, _), text in zip(chunk, out.texts):
          results[i] = text
    return results
