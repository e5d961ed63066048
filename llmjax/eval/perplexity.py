"""Perplexity for all three architectures, with per-byte figures that compare tokenizers.

Causal LMs: documents longer than the window are scored with strided sliding windows, the
loop of Hugging Face's "Perplexity of fixed-length models" guide: windows of `context`
tokens start every `stride` tokens, and each scores only the tokens the previous window
did not reach, so every token after the first is scored once, with at least
`context - stride` tokens of left context (stride = context: disjoint windows, the
"non-overlapping" figure, where each window's first token has no prediction and goes
unscored, as in the guide). Sums are kept exact: the guide averages per-window means,
which over-weights short windows (transformers#34138). A prefix token (BOS) is prepended to
every document, so its first text token is scored too (lm-eval's rolling log-likelihood
uses EOT the same way).

Masked LMs: pseudo-perplexity (Salazar et al. 2020, "Masked Language Model Scoring"):
every token masked in turn, scored by the model's probability of the original token;
documents longer than the context are cut into disjoint chunks.

Encoder-decoder: target perplexity, teacher-forced log-likelihood of each target + EOS
given its input (the seq2seq training loss, without z-loss or label smoothing).

Sharding: with `devices=n` (n > 1) every batch (rounded up to a multiple of n rows) is split
row-wise over a 1-D 'data' mesh of the first n devices, params replicated, so each device
scores its share of the windows and the sums equal one device's (each row is computed alone).

Per-byte figures: bits per byte = loss per token x tokens / UTF-8 bytes / ln 2 (and per
character likewise): exact when every token is scored (stride < context), the mean loss
extrapolated to the unscored window starts otherwise.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.errors import UserError
from llmjax.eval.harness import _token_log_probs


@dataclasses.dataclass
class Sums:
  """Summed negative log-likelihood (nats) over `tokens` scored, and what they cover."""
  nll: float = 0.0
  tokens: int = 0          # tokens scored
  all_tokens: int = 0      # tokens in the scored texts (scored or not; no prefix token)
  bytes: int = 0
  chars: int = 0
  documents: int = 0
  squares: float = 0.0     # sum of per-token nll^2, for the standard error

  def add(self, token_nll: np.ndarray):
    self.nll += float(token_nll.sum())
    self.squares += float((token_nll ** 2).sum())
    self.tokens += int(token_nll.size)

  def metrics(self) -> dict:
    if not self.tokens:
      raise UserError("nothing was scored: the texts are empty or shorter than two tokens.")
    loss = self.nll / self.tokens
    var = max(self.squares / self.tokens - loss * loss, 0.0)
    per_text_token = loss * self.all_tokens
    out = {"loss": loss, "loss_stderr": math.sqrt(var / self.tokens),
           "perplexity": math.exp(loss), "tokens": self.tokens, "documents": self.documents}
    if self.bytes:
      out["bits_per_byte"] = per_text_token / self.bytes / math.log(2)
      out["byte_perplexity"] = 2 ** out["bits_per_byte"]
    if self.chars:
      out["bits_per_char"] = per_text_token / self.chars / math.log(2)
    return out


def windows(num_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
  """(begin, end, first): the window is tokens[begin:end]; it scores tokens[first:end]."""
  if not 1 <= stride <= context:
    raise UserError(f"stride={stride} must lie in [1, context={context}].")
  out, prev_end = [], 1  # token 0 (the prefix) is never predicted
  for begin in range(0, max(num_tokens - 1, 1), stride):
    end = min(begin + context, num_tokens)
    first = max(prev_end, begin + 1)
    if first < end:
      out.append((begin, end, first))
    prev_end = end
    if end == num_tokens:
      break
  return out


class _Placement:
  """Where the batches run: one device (`devices` None or 1: the plain jitted path), or
  rows split over a 1-D 'data' mesh of the first `devices` devices (as lm_eval_backend's
  `_scorer`), the batch rounded up so every device gets the same number of rows."""

  def __init__(self, devices: int | None, batch_size: int):
    n = 1 if devices is None else int(devices)
    if n < 1:
      raise UserError(f"devices={devices}; pass a positive device count (or None for one).")
    if n > jax.device_count():
      raise UserError(f"devices={n} but only {jax.device_count()} device(s) are available; "
                      f"pass devices<={jax.device_count()} (on CPU, simulate more with "
                      f"XLA_FLAGS=--xla_force_host_platform_device_count={n}, set before "
                      "jax starts).")
    self.batch_size = -(-batch_size // n) * n
    self.mesh = None if n == 1 else jax.make_mesh(
        (n,), ("data",), devices=jax.devices()[:n], axis_types=(jax.sharding.AxisType.Auto,))

  def _put(self, tree, spec):
    if self.mesh is None:
      return tree
    return jax.device_put(tree, jax.sharding.NamedSharding(self.mesh, spec))

  def params(self, params):
    """Params replicated on every device of the mesh (committed, so jit runs there)."""
    return self._put(params, jax.sharding.PartitionSpec())

  def rows(self, *arrays):
    """`[B, ...]` arrays split row-wise over the 'data' axis."""
    return tuple(self._put(a, jax.sharding.PartitionSpec("data")) for a in arrays)


def _batches(rows, batch_size: int, width: int):
  """Fixed [batch_size, width] arrays: tokens, targets, weights and the valid positions
  (zero rows pad the last batch, so every batch has one shape: one compile)."""
  for i in range(0, len(rows), batch_size):
    chunk = rows[i:i + batch_size]
    tokens = np.zeros((batch_size, width), np.int32)
    targets = np.zeros((batch_size, width), np.int32)
    weights = np.zeros((batch_size, width), np.float32)
    valid = np.zeros((batch_size, width), np.int32)
    for j, (t, tg, w) in enumerate(chunk):
      tokens[j, :len(t)], targets[j, :len(tg)], weights[j, :len(w)] = t, tg, w
      valid[j, :len(t)] = 1
    yield tokens, targets, weights, valid


def causal_sums(model, params, docs, *, context: int, stride: int, batch_size: int = 8,
                sums: Sums | None = None, devices: int | None = None) -> Sums:
  """Strided sliding-window NLL of each token list in `docs` (each starts with its prefix);
  `devices` > 1 splits each batch over that many devices (see `_Placement`)."""
  sums, place = sums or Sums(), _Placement(devices, batch_size)
  params = place.params(params)
  rows = []
  for doc in docs:
    doc = np.asarray(doc, np.int32)
    for begin, end, first in windows(len(doc), context, stride):
      inputs = doc[begin:end]
      targets = np.append(doc[begin + 1:end], 0)             # position p predicts p + 1
      scored = np.arange(begin + 1, end + 1) >= first
      scored[-1] = False                                      # predicts past the window
      rows.append((inputs, targets, scored.astype(np.float32)))
  for tokens, targets, weights, _ in _batches(rows, place.batch_size, context):
    log_probs = np.asarray(_token_log_probs(model, params, *place.rows(tokens, targets)),
                           np.float64)
    sums.add(-log_probs[weights > 0])
  return sums


def masked_sums(model, params, docs, *, mask_id: int, context: int, batch_size: int = 8,
                skip_ids=(), sums: Sums | None = None, devices: int | None = None) -> Sums:
  """Pseudo-log-likelihood: each scored token masked once, in its `context` chunk;
  `devices` > 1 splits each batch over that many devices."""
  sums, place = sums or Sums(), _Placement(devices, batch_size)
  params = place.params(params)
  rows = []
  for doc in docs:
    doc = np.asarray(doc, np.int32)
    for start in range(0, len(doc), context):
      chunk = doc[start:start + context]
      for i in np.flatnonzero(~np.isin(chunk, skip_ids)):
        masked = chunk.copy()
        masked[i] = mask_id
        weight = np.zeros(len(chunk), np.float32)
        weight[i] = 1
        rows.append((masked, chunk, weight))
  for tokens, targets, weights, valid in _batches(rows, place.batch_size, context):
    log_probs = np.asarray(_masked_log_probs(model, params, *place.rows(tokens, valid, targets)),
                           np.float64)
    sums.add(-log_probs[weights > 0])
  return sums


@functools.partial(jax.jit, static_argnames="model")
def _masked_log_probs(model, params, tokens, valid, targets):
  """log P(targets[b, t]) at every position of a bidirectional encoder `[B, L]`."""
  logits = model.apply({"params": params}, tokens, valid)                       # [B, L, V]
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def target_sums(model, params, pairs, *, start_id: int, batch_size: int = 8,
                sums: Sums | None = None, devices: int | None = None) -> Sums:
  """Teacher-forced NLL of each (input ids, target ids) pair's targets (EOS included);
  `devices` > 1 splits each batch over that many devices."""
  sums, place = sums or Sums(), _Placement(devices, batch_size)
  params, batch_size = place.params(params), place.batch_size
  enc_len = max(len(i) for i, _ in pairs)
  dec_len = max(len(t) for _, t in pairs)
  for b in range(0, len(pairs), batch_size):
    chunk = pairs[b:b + batch_size]
    enc = np.zeros((batch_size, enc_len), np.int32)
    dec = np.zeros((batch_size, dec_len), np.int32)
    targets = np.zeros((batch_size, dec_len), np.int32)
    weights = np.zeros((batch_size, dec_len), bool)
    for j, (inp, tgt) in enumerate(chunk):
      enc[j, :len(inp)] = inp
      dec[j, :len(tgt)] = [start_id, *tgt[:-1]]
      targets[j, :len(tgt)], weights[j, :len(tgt)] = tgt, True
    dec, targets, enc, enc_valid = place.rows(dec, targets, enc, enc != 0)
    log_probs = _token_log_probs(model, params, dec, targets, encoder_tokens=enc,
                                 encoder_valid=enc_valid)
    sums.add(-np.asarray(log_probs, np.float64)[weights])
  return sums


def _config(model):
  return model.config if hasattr(model, "config") else model.base.config


def _text_sizes(sums: Sums, texts, ids, extra: int):
  for text, doc in zip(texts, ids):
    sums.bytes += len(text.encode("utf-8"))
    sums.chars += len(text)
    sums.all_tokens += len(doc) + extra
    sums.documents += 1


def text_perplexity(model, params, tokenizer, texts, *, context: int | None = None,
                    stride: int | None = None, batch_size: int = 8,
                    add_eos: bool = False, devices: int | None = None) -> dict:
  """Perplexity, bits per byte and per character of `texts`: strided sliding windows for a
  causal LM (context: the model's max_len; stride: half of it), pseudo-perplexity for a
  masked LM. `add_eos` also scores the end of each document (as training does); `devices`
  > 1 splits each batch over that many devices (same figures, data-parallel)."""
  cfg = _config(model)
  texts = [t for t in texts if t]
  ids = [tokenizer.encode(t) for t in texts]
  context = context or cfg.max_len
  sums = Sums()
  if cfg.arch == "decoder_only":
    prefix = tokenizer.bos_id if tokenizer.bos_id is not None and tokenizer.bos_id >= 0 \
        else tokenizer.eos_id
    docs = [[prefix, *doc, *([tokenizer.eos_id] if add_eos else [])] for doc in ids]
    causal_sums(model, params, docs, context=context,
                stride=stride or max(1, context // 2), batch_size=batch_size, sums=sums,
                devices=devices)
  elif cfg.arch == "encoder_only":
    docs = [[tokenizer.bos_id, *doc, tokenizer.eos_id] for doc in ids]
    masked_sums(model, params, docs, mask_id=tokenizer.mask_id, context=context,
                batch_size=batch_size, sums=sums, devices=devices,
                skip_ids=(tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id))
  else:
    raise UserError("an encoder-decoder model has no text perplexity; score (input, "
                    "target) pairs with `pair_perplexity` (llmjax eval reads them from the "
                    "run's Seq2Seq dataset).")
  _text_sizes(sums, texts, ids, 1 if add_eos else 0)
  return sums.metrics()


def pair_perplexity(model, params, tokenizer, pairs, *, start_id: int,
                    batch_size: int = 8, devices: int | None = None) -> dict:
  """Target perplexity of an encoder-decoder over (input text, target text) pairs; the
  per-byte figures count the targets' bytes; `devices` > 1 splits each batch."""
  encoded = [([*tokenizer.encode(src), tokenizer.eos_id], [*tokenizer.encode(tgt),
                                                          tokenizer.eos_id])
             for src, tgt in pairs]
  sums = target_sums(model, params, encoded, start_id=start_id, batch_size=batch_size,
                     devices=devices)
  _text_sizes(sums, [t for _, t in pairs], [t for _, t in encoded], 0)
  return sums.metrics()
