"""Pieces every pairwise preference objective shares (DPO, IPO, cDPO; `dpo.py`): the
per-pair losses, sequence log-probs of response tokens in packed rows, and the table of
precomputed reference log-probs.

Sequence log-probs. A pair is two rows, `chosen_*` and `rejected_*`, packed side by
side: grain's packers put all features of one example into the same bin under the same
segment id, so segment s of the chosen row and segment s of the rejected row are one
pair, whatever their lengths. `segment_sums` adds token log-probs per segment
(`[B, L]` -> `[B, L]`, slot s-1 = segment s), which gives up to L pairs per row and
empty slots where a row has fewer; a slot is a pair when both sides score at least one
response token. Position t of a row scores log p(token t+1 | tokens ≤ t) where t+1 is
in t's segment and in the row's mask, in both layouts:

  decoder-only     `{side}_tokens`    [bos] prompt response [eos], `{side}_mask`
  encoder-decoder  `{side}_response`  [start] response [eos], `{side}_response_mask`;
                   `inputs` (the prompt) goes to the encoder, and the decoder of segment
                   s cross-attends to segment s of `inputs` only (the same segment ids)

The encoder-decoder rows of both sides read the same `inputs`, so the [chosen;
rejected] batch encodes them twice (as `reward.py` does): simple, and the encoder is
the cheaper half of a long-response pair.

Precomputed reference. `log π_ref(y|x)` of a pair never changes, so one pass over the
data (`DPO.reference_table`; `llmjax.train.dpo_reference` runs it from a workdir) can
replace the frozen reference model: the table maps `pair_key(record)` to the two sums.
The pipeline carries only int32 features, so the f32 value travels bit-cast into an
int32 (`to_bits` / `from_bits`: exact) at the first position of a row-length feature
(`chosen_ref`, `rejected_ref`, one token per pair), which packs with its pair and adds up
per segment under its own segment ids like the log-probs.
"""

import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.errors import UserError
from llmjax.objectives.lm import shift_targets
from llmjax.objectives.protocol import dropout_rngs
from llmjax.objectives.sft import response_logits

SIDES = ("chosen", "rejected")
LOSSES = ("sigmoid", "ipo")


def preference_loss(delta, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0):
  """Per-pair loss of Δ = (log π_c − log ref_c) − (log π_r − log ref_r), any shape.

  sigmoid (DPO, Rafailov et al. 2023, eq. 7; cDPO, Mitchell 2023, for ε > 0):
      −(1−ε) log σ(βΔ) − ε log σ(−βΔ)
  ipo (Azar et al. 2023, eq. 17, τ = β):  (Δ − 1/(2β))²
  β multiplies Δ once (MaxText's DPO applies it twice, an effective β²).
  """
  delta = delta.astype(jnp.float32)
  if loss == "ipo":
    return jnp.square(delta - 1.0 / (2.0 * beta))
  logits = beta * delta
  return (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits)
          - label_smoothing * jax.nn.log_sigmoid(-logits))


def token_logps(logits, targets, weights):
  """log p(target) in f32 where `weights` is 1, else 0: [B, L, V], [B, L], [B, L] -> [B, L]."""
  logits = logits.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, L]
  logp = target_logit - jax.nn.logsumexp(logits, axis=-1)
  return jnp.where(weights > 0, logp, 0.0)


def segment_sums(values, segment_ids):
  """Sums of `values [B, L]` per packed segment: `[B, L]`, slot s-1 = segment s (ids
  run 1..L; 0, padding, is dropped). Row by row, so a batch-sharded input stays so."""
  num = values.shape[1] + 1
  sums = jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=num))(
      values, segment_ids)  # [B, L + 1]
  return sums[:, 1:]


def is_encoder_decoder(batch) -> bool:
  """Whether `batch` has the encoder-decoder layout (module docstring): it has `inputs`."""
  return "inputs" in batch


def row_key(batch, side) -> str:
  """The key of one side's decoder row: `{side}_response` or `{side}_tokens`."""
  return f"{side}_response" if is_encoder_decoder(batch) else f"{side}_tokens"


def mask_key(batch, side) -> str:
  """The key of one side's response mask: `{side}_response_mask` or `{side}_mask`."""
  return f"{side}_response_mask" if is_encoder_decoder(batch) else f"{side}_mask"


def check_layout(model, batch, name: str = "DPO") -> bool:
  """True for an encoder-decoder batch on an encoder-decoder model, False for a
  decoder-only one on a decoder-only model; else a UserError naming the keys to pack."""
  arch, enc_dec = model.config.arch, is_encoder_decoder(batch)
  if arch == "encoder_only":
    raise UserError(f"{name} scores responses by their log-probs, which an encoder-only "
                    "model does not give: start from a decoder-only or encoder-decoder "
                    "checkpoint.")
  if enc_dec != (arch == "encoder_decoder"):
    want = ("{'inputs': S, 'chosen_response': L, 'chosen_response_mask': L, "
            "'rejected_response': L, 'rejected_response_mask': L}" if arch == "encoder_decoder"
            else "{'chosen_tokens': L, 'chosen_mask': L, 'rejected_tokens': L, "
            "'rejected_mask': L}")
    raise UserError(f"the model is {arch} but the batch has {sorted(batch)}: set "
                    f"DataConfig.feature_lengths to {want} ({name}'s module docstring has "
                    "both layouts).")
  return enc_dec


def _ones_if_none(value, like):
  return jnp.ones_like(like) if value is None else value


def _segments(batch, side):
  key = row_key(batch, side)
  return _ones_if_none(batch.get(f"{key}_segment_ids"), batch[key])


def _side_rows(batch, side) -> dict:
  """One side of the pairs in the layout `_response_logits` reads (`sft.response_logits`'s,
  plus the encoder's `inputs` for an encoder-decoder batch)."""
  key = row_key(batch, side)
  rows = {"tokens": batch[key], "tokens_segment_ids": _segments(batch, side),
          "response_mask": batch[mask_key(batch, side)]}
  if batch.get(f"{key}_positions") is not None:
    rows["tokens_positions"] = batch[f"{key}_positions"]
  if is_encoder_decoder(batch):
    rows["inputs"] = batch["inputs"]
    rows["inputs_segment_ids"] = _ones_if_none(batch.get("inputs_segment_ids"),
                                               batch["inputs"])
    if batch.get("inputs_positions") is not None:
      rows["inputs_positions"] = batch["inputs_positions"]
  return rows


def _response_logits(model, params, rows, *, rng=None, deterministic=True):
  """Logits [B, L, V], targets [B, L] and weights [B, L] (1 where position t's target
  t+1 is a masked token of t's segment) of decoder-only or encoder-decoder rows. The
  decoder row starts with its start token, so it is its own (shifted) decoder input."""
  if "inputs" not in rows:
    return response_logits(model, params, rows, rng=rng, deterministic=deterministic)
  tokens, segment_ids = rows["tokens"], rows["tokens_segment_ids"]
  logits = model.apply(
      {"params": params}, tokens, segment_ids=segment_ids,
      positions=rows.get("tokens_positions"), encoder_tokens=rows["inputs"],
      encoder_segment_ids=rows["inputs_segment_ids"],
      encoder_positions=rows.get("inputs_positions"), deterministic=deterministic,
      rngs=dropout_rngs(rng, deterministic))  # [B, L, V]
  targets, same_segment = shift_targets(tokens, segment_ids)
  mask = rows["response_mask"]
  next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)  # [B, L]
  return logits, targets, same_segment * (next_mask > 0)


def sequence_logps(model, params, batch, *, rng=None, deterministic=True):
  """`{side: (log-prob sums, response-token counts)}`, each `[B, L]` per segment slot:
  log p(response | prompt) of every pair's chosen and rejected row, response tokens
  only (a position counts when its target is in the row's response mask and segment).
  Rows of one length go through the model as one batch [chosen; rejected]; for an
  encoder-decoder batch the prompt (`inputs`) is only conditioned on, never scored."""
  rows = [_side_rows(batch, side) for side in SIDES]
  if rows[0]["tokens"].shape == rows[1]["tokens"].shape and rows[0].keys() == rows[1].keys():
    joint = {k: jnp.concatenate([rows[0][k], rows[1][k]], axis=0) for k in rows[0]}  # [2B, L]
    logits, targets, weights = _response_logits(model, params, joint, rng=rng,
                                                deterministic=deterministic)
    logp = token_logps(logits, targets, weights)
    half = rows[0]["tokens"].shape[0]
    parts = [(logp[:half], weights[:half]), (logp[half:], weights[half:])]
  else:
    parts = []
    for i, side_rows in enumerate(rows):
      side_rng = None if rng is None else jax.random.fold_in(rng, i)
      logits, targets, weights = _response_logits(model, params, side_rows, rng=side_rng,
                                                  deterministic=deterministic)
      parts.append((token_logps(logits, targets, weights), weights))
  return {side: (segment_sums(lp, row["tokens_segment_ids"]),
                 segment_sums(w.astype(jnp.float32), row["tokens_segment_ids"]))
          for side, row, (lp, w) in zip(SIDES, rows, parts)}


def precomputed_logps(batch) -> dict:
  """`{side: reference log-prob sums [B, L]}` from the `chosen_ref` / `rejected_ref`
  features (bit-cast f32, one value per pair), added up under their own segment ids
  (segment s = pair s of the row, whatever the feature's length; none: one pair)."""
  out = {}
  for side in SIDES:
    ref = batch[f"{side}_ref"]
    out[side] = segment_sums(from_bits(ref), _ones_if_none(
        batch.get(f"{side}_ref_segment_ids"), ref))
  return out


def to_bits(value: float) -> np.int32:
  """An f32 as the int32 with the same bits (the pipeline carries int32 only)."""
  return np.asarray(value, np.float32).view(np.int32)


def from_bits(bits):
  return jax.lax.bitcast_convert_type(jnp.asarray(bits, jnp.int32), jnp.float32)


def pair_key(example) -> str:
  """A record's key in the reference table: a hash of its prompt, chosen and rejected."""
  text = json.dumps([example["prompt"], example["chosen"], example["rejected"]])
  return hashlib.sha256(text.encode()).hexdigest()[:24]


def tokenizer_fingerprint(tokenizer) -> str | None:
  """A hash of the tokenizer's serialized model (None if it has none to hash)."""
  serialized = getattr(tokenizer, "serialized", None)
  return hashlib.sha256(serialized()).hexdigest()[:16] if serialized else None


def write_table(path: str, logps: dict, meta: dict) -> str:
  """Writes `{"meta": meta, "logps": {key: [chosen, rejected]}}` as JSON (atomically)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump({"meta": meta, "logps": logps}, f)
  os.replace(path + ".tmp", path)
  load_table.cache_clear()
  return path


@functools.lru_cache(maxsize=4)
def load_table(path: str) -> tuple[dict, dict]:
  """`(meta, {key: [chosen, rejected]})` of a table `write_table` wrote (read once)."""
  if not os.path.exists(path):
    raise UserError(f"DPO.precomputed_reference={path!r} does not exist: write it first with "
                    "llmjax.train.dpo_reference.precompute (README: alignment).")
  with open(path) as f:
    table = json.load(f)
  return table["meta"], table["logps"]
