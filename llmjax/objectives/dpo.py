"""Direct preference optimization with a frozen reference: DPO (Rafailov et al. 2023,
"Direct Preference Optimization: Your Language Model is Secretly a Reward Model"), its
conservative variant cDPO (Mitchell 2023, "A note on DPO with noisy preferences") and
IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
Human Preferences").

Records carry `prompt`, `chosen` and `rejected` strings (`shakespeare_preferences`,
`local_preferences`). For a pair, with sequence log-probs of the response tokens only,

  Δ = (log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))
  sigmoid (DPO / cDPO):  −(1−ε) log σ(βΔ) − ε log σ(−βΔ)    (ε = label_smoothing)
  ipo:                   (Δ − 1/(2β))²

and the implicit rewards r = β (log π − log π_ref) give the metrics: `reward_accuracy`
(r_c > r_r), `reward_margin` (r_c − r_r), `rewards_chosen` / `rewards_rejected`, and
`logps_chosen` / `logps_rejected` (the policy's; both often fall while the margin grows,
trl#800). `weight` is the number of pairs, so every metric is a mean over pairs and
gradient accumulation and data parallelism stay exact. At step 0 (policy = reference)
Δ = 0 and the DPO loss is log 2.

RPO (`rpo_alpha` = α > 0; Pang et al. 2024, "Iterative Reasoning Preference
Optimization", TRL's `rpo_alpha`) adds α times the chosen response's negative
log-likelihood per token to each pair's loss: the remedy tried here for the fall of the
chosen log-probs (experiments/alignment.py), since plain DPO only pushes the difference.

IPO on sums or means. Azar et al. define IPO on sequence log-likelihoods; TRL averages
per token for IPO (a long pair otherwise dwarfs the 1/(2β) target). Here `loss='ipo'`
follows the paper, and `length_normalize=True` divides each sequence log-prob by its
response length (for either loss) where TRL's behaviour is wanted.

The reference, `reference=`:
  'frozen'  a copy of the policy's starting parameters (the `init_from` checkpoint:
            DPO's π_ref is the SFT model), held in `TrainState.frozen['reference']`,
            sharded like the parameters and saved with checkpoints;
  'base'    with PEFT only: the policy with its adapters switched off
            (`PeftModel.without_adapters`), computed from the same arrays: no second
            copy (TRL's reference under PEFT). At step 0 LoRA's B = 0, so it is the start.
`precomputed_reference=PATH` reads per-pair reference log-probs from a table written in
one pass (`reference_table`; `llmjax.train.dpo_reference.precompute`) and holds no
reference at all (trl#624); the rows then carry `chosen_ref` / `rejected_ref`.

Rows: prompt and response are encoded separately (as in SFT: a subword model merges
across a joint boundary), and the feature function writes both layouts; the pipeline
packs the one `DataConfig.feature_lengths` names (the layout must be the model's arch,
else a UserError names the keys to pack):

  decoder-only    chosen_tokens           [bos] tok(prompt) tok(chosen) [eos]
                  chosen_mask               0     0 ... 0     1 ... 1     1
                  (rejected_tokens, rejected_mask alike)
                  feature_lengths = {'chosen_tokens': L, 'chosen_mask': L,
                                     'rejected_tokens': L, 'rejected_mask': L}
  encoder-decoder inputs                  tok(prompt) [eos]           -> the encoder
                  chosen_response         [start] tok(chosen) [eos]   -> the decoder
                  chosen_response_mask       0     1 ... 1     1
                  (rejected_response, rejected_response_mask alike)
                  feature_lengths = {'inputs': S, 'chosen_response': L,
                                     'chosen_response_mask': L, 'rejected_response': L,
                                     'rejected_response_mask': L}

(`reward.py`'s layouts, with masks.) Either way log π(y|x) sums log p(token t+1 | ...)
over the masked tokens, the response and its EOS: never a prompt token, which in the
encoder-decoder layout is only conditioned on through cross-attention. With
`precomputed_reference` each layout adds `'chosen_ref': L, 'rejected_ref': L`. Both
responses keep the SAME prompt: with `max_len` each response is cut at its end to fit
and the prompt loses its start until the longer side fits (decoder-only), or the
decoder rows keep `max_len` tokens and the encoder the prompt's last `max_len - 1` and
its EOS (encoder-decoder: S and L at least `max_len`). Any packing mode that keeps an
example's features in one bin works ('first_fit', 'best_fit', 'none'; preference.py),
'concat' does not. Every option (losses, cDPO, `length_normalize`, both references,
`precomputed_reference`) works for both layouts; encoder-only models have no
log π(y|x) and are refused. The policy runs without dropout unless `dropout` (TRL's
default too: dropout would make π differ from π_ref at step 0 and the rewards noisy).
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.data import packing
from llmjax.data import tokenizer as tokenizer_lib
from llmjax.errors import UserError
from llmjax.objectives import preference
from llmjax.objectives.protocol import TokenObjective

KEYS = ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask")  # decoder-only
ENCODER_DECODER_KEYS = ("inputs", "chosen_response", "chosen_response_mask",
                        "rejected_response", "rejected_response_mask")
REF_KEYS = ("chosen_ref", "rejected_ref")
REFERENCES = ("frozen", "base")
METRICS = ("reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected",
           "logps_chosen", "logps_rejected")


@dataclasses.dataclass(frozen=True)
class DPO(TokenObjective):
  """Pairwise preference loss against a frozen reference (see the module docstring)."""

  beta: float = 0.1
  loss: str = "sigmoid"             # sigmoid (DPO, cDPO) | ipo
  label_smoothing: float = 0.0      # cDPO's ε: the chance a label is flipped
  reference: str = "frozen"         # frozen | base (PEFT: the adapters switched off)
  max_len: int | None = None        # the row length: longer pairs lose their prompt's start
  length_normalize: bool = False    # mean instead of sum of token log-probs (TRL's IPO)
  precomputed_reference: str | None = None  # a table of reference log-probs (one pass)
  dropout: bool = False             # the policy's dropout while training
  decoder_start_id: int = tokenizer_lib.BOS_ID  # encoder-decoder only: the decoder's start
  rpo_alpha: float = 0.0            # RPO: + α · the chosen response's per-token NLL

  can_sample: ClassVar[bool] = False

  def __post_init__(self):
    if self.loss not in preference.LOSSES:
      raise UserError(f"DPO.loss={self.loss!r}: use one of {preference.LOSSES}.")
    if self.reference not in REFERENCES:
      raise UserError(f"DPO.reference={self.reference!r}: use one of {REFERENCES}.")
    if not self.beta > 0:
      raise UserError(f"DPO.beta={self.beta} must be positive (typically 0.01 to 0.5).")
    if not 0.0 <= self.label_smoothing < 0.5:
      raise UserError(f"DPO.label_smoothing={self.label_smoothing} must be in [0, 0.5) (the "
                      "assumed chance that a preference label is flipped).")
    if self.loss == "ipo" and self.label_smoothing:
      raise UserError("DPO.label_smoothing is cDPO's, for loss='sigmoid'; IPO has no "
                      "label smoothing: set it to 0.")
    if not self.rpo_alpha >= 0:
      raise UserError(f"DPO.rpo_alpha={self.rpo_alpha} must be >= 0 (0: plain DPO; Pang et "
                      "al. use 1).")
    if self.precomputed_reference and not self.max_len:
      raise UserError("DPO.precomputed_reference needs DPO.max_len (the table's rows were "
                      "cut at a fixed length): set it to the row length.")

  # --- features ---------------------------------------------------------------------

  def encode(self, example, tokenizer) -> tuple[list[int], list[int], list[int]]:
    """tok(prompt), tok(chosen) + [eos], tok(rejected) + [eos]: encoded apart."""
    for key in ("prompt", "chosen", "rejected"):
      if not isinstance(example.get(key), str):
        raise UserError(f"DPO reads string fields 'prompt', 'chosen' and 'rejected', but a "
                        f"record has fields {sorted(example)}: use a preference dataset "
                        "(shakespeare_preferences, local_preferences).")
    if tokenizer.eos_id is None:
      raise UserError("the tokenizer has no EOS token, which DPO appends to every response: "
                      "use a tokenizer with one.")
    for key in ("chosen", "rejected"):
      if not example[key].strip():
        raise UserError(f"a record has an empty {key} response (prompt: "
                        f"{example['prompt'][:80]!r}); remove the record from the data.")
    eos = [tokenizer.eos_id]
    return (tokenizer.encode(example["prompt"]), tokenizer.encode(example["chosen"]) + eos,
            tokenizer.encode(example["rejected"]) + eos)

  def pair_rows(self, example, tokenizer) -> dict[str, np.ndarray]:
    """The row features of one pair in both layouts (module docstring): the pipeline
    packs those `DataConfig.feature_lengths` names and drops the others."""
    prompt, chosen, rejected = self.encode(example, tokenizer)
    return {**self._decoder_rows(prompt, chosen, rejected, tokenizer),
            **self._encoder_decoder_rows(prompt, chosen, rejected, tokenizer)}

  def _decoder_rows(self, prompt, chosen, rejected, tokenizer) -> dict[str, np.ndarray]:
    """`{side}_tokens` / `{side}_mask`: both rows on the same (kept) prompt."""
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    if self.max_len:
      room = max(self.max_len - len(bos), 0)
      chosen, rejected = chosen[:room], rejected[:room]
      keep = room - max(len(chosen), len(rejected))
      prompt = prompt[max(len(prompt) - keep, 0):] if keep > 0 else []
    rows = {}
    for side, response in (("chosen", chosen), ("rejected", rejected)):
      rows[f"{side}_tokens"] = np.asarray(bos + prompt + response, np.int32)
      rows[f"{side}_mask"] = np.asarray([0] * (len(bos) + len(prompt)) + [1] * len(response),
                                        np.int32)
    return rows

  def _encoder_decoder_rows(self, prompt, chosen, rejected, tokenizer) -> dict[str, np.ndarray]:
    """`inputs` (tok(prompt) + [eos], the prompt's end kept) and `{side}_response` /
    `{side}_response_mask` ([start] + the response and EOS, cut at the end)."""
    if self.max_len:
      prompt = prompt[max(len(prompt) - self.max_len + 1, 0):]  # + [eos]: max_len
      room = max(self.max_len - 1, 0)  # [start] + room
      chosen, rejected = chosen[:room], rejected[:room]
    rows = {"inputs": np.asarray(prompt + [tokenizer.eos_id], np.int32)}
    for side, response in (("chosen", chosen), ("rejected", rejected)):
      rows[f"{side}_response"] = np.asarray([self.decoder_start_id] + response, np.int32)
      rows[f"{side}_response_mask"] = np.asarray([0] + [1] * len(response), np.int32)
    return rows

  def feature_fn(self, example, tokenizer):
    """`pair_rows`, plus `chosen_ref` / `rejected_ref` with a precomputed reference: one
    token each, the f32 bits (it packs beside either layout and adds up per segment)."""
    rows = self.pair_rows(example, tokenizer)
    if self.precomputed_reference:
      logps = self._table_entry(example, tokenizer)
      for side, value in zip(preference.SIDES, logps):
        rows[f"{side}_ref"] = np.asarray([preference.to_bits(value)], np.int32)
    return rows

  def _table_entry(self, example, tokenizer) -> list[float]:
    meta, logps = preference.load_table(self.precomputed_reference)
    fingerprint = preference.tokenizer_fingerprint(tokenizer)
    if meta.get("tokenizer") and fingerprint and meta["tokenizer"] != fingerprint:
      raise UserError(f"the reference log-probs in {self.precomputed_reference} were computed "
                      f"with another tokenizer (reference {meta.get('reference')}) than this "
                      "run's: precompute them with a reference that shares the policy's "
                      "tokenizer.")
    if meta.get("max_len") != self.max_len:
      raise UserError(f"the reference log-probs in {self.precomputed_reference} were computed "
                      f"with max_len={meta.get('max_len')}, but DPO.max_len={self.max_len}: "
                      "precompute them again at this length (or set DPO.max_len to it).")
    key = preference.pair_key(example)
    if key not in logps:
      raise UserError(f"a pair (prompt {example['prompt'][:60]!r}) is not in the reference "
                      f"table {self.precomputed_reference} ({len(logps)} pairs): precompute "
                      "it over every split this run reads.")
    return logps[key]

  def _layout(self, lengths) -> bool:
    """True when `lengths` name the encoder-decoder layout, False for decoder-only (one
    length for each side's keys); else a UserError showing both."""
    refs = REF_KEYS if self.precomputed_reference else ()
    for enc_dec, keys in ((False, KEYS), (True, ENCODER_DECODER_KEYS)):
      row = "_response" if enc_dec else "_tokens"
      if set(lengths) == set(keys + refs) and all(
          lengths[k] == lengths[k.split("_")[0] + row] for k in keys + refs if k != "inputs"):
        return enc_dec
    layouts = [{k: "S" if k == "inputs" else "L" for k in keys + refs}
               for keys in (KEYS, ENCODER_DECODER_KEYS)]
    raise UserError(f"DPO packs {layouts[0]} (decoder-only) or {layouts[1]} "
                    "(encoder-decoder), one L for each side's keys, but "
                    f"DataConfig.feature_lengths is {dict(lengths)}: set it to one of these.")

  def init_inputs(self, lengths):
    enc_dec = self._layout(lengths)
    if self.max_len and min(lengths.values()) < self.max_len:
      raise UserError(f"DPO.max_len={self.max_len} is longer than the rows "
                      f"({dict(lengths)}): the pipeline would cut pairs; make them equal.")
    if self.precomputed_reference:
      arch = preference.load_table(self.precomputed_reference)[0].get("arch")
      if arch and (arch == "encoder_decoder") != enc_dec:
        raise UserError(f"the reference log-probs in {self.precomputed_reference} come from "
                        f"a {arch} model, but DataConfig.feature_lengths packs the "
                        f"{'encoder-decoder' if enc_dec else 'decoder-only'} layout: "
                        "precompute them with the policy's starting checkpoint.")
    if enc_dec:
      return {"tokens": jnp.zeros((1, lengths["chosen_response"]), jnp.int32),
              "encoder_tokens": jnp.zeros((1, lengths["inputs"]), jnp.int32)}
    return {"tokens": jnp.zeros((1, lengths["chosen_tokens"]), jnp.int32)}

  # --- loss ---------------------------------------------------------------------------

  def frozen_trees(self, params):
    """`{'reference': a copy of params}` for reference='frozen' (a copy, so that donating
    the train state never hands the reference's buffers to the update); else none.
    The trainer also calls it on abstract parameters (shapes only), for the shardings."""
    if self.reference == "base" or self.precomputed_reference:
      return {}
    copy = lambda x: jnp.copy(x) if isinstance(x, (jax.Array, np.ndarray)) else x
    return {"reference": jax.tree.map(copy, params)}

  def reference_logps(self, model, params, batch, frozen) -> dict:
    """`{side: reference log-prob sums [B, L]}` (no gradient flows into them)."""
    if self.precomputed_reference:
      return preference.precomputed_logps(batch)
    if self.reference == "base":
      if not hasattr(model, "without_adapters"):
        raise UserError("DPO.reference='base' is the policy with its PEFT adapters switched "
                        "off, but this run has none: add train.peft (gin_configs/peft/"
                        "lora.gin) or set DPO.reference='frozen'.")
      model, params = model.without_adapters(jax.lax.stop_gradient(params))
    else:
      if not frozen or "reference" not in frozen:
        raise UserError("DPO.reference='frozen' reads frozen['reference'] (the train state's "
                        "copy of the starting parameters), which is missing: build the state "
                        "with the objective's frozen_trees.")
      params = jax.lax.stop_gradient(frozen["reference"])
    logps = preference.sequence_logps(model, params, batch)
    return {side: sums for side, (sums, _) in logps.items()}

  def loss_sums(self, model, params, batch, *, rng=None, deterministic=True, frozen=None):
    """Summed per-pair loss and metrics of `batch` (module docstring); `weight` = pairs."""
    preference.check_layout(model, batch)
    policy = preference.sequence_logps(
        model, params, batch, rng=rng, deterministic=deterministic or not self.dropout)
    ref = self.reference_logps(model, params, batch, frozen)
    (pi_c, n_c), (pi_r, n_r) = policy["chosen"], policy["rejected"]
    ref_c, ref_r = ref["chosen"], ref["rejected"]
    nll_chosen = -pi_c / jnp.maximum(n_c, 1)  # per token, before any length normalization
    if self.length_normalize:
      pi_c, ref_c = pi_c / jnp.maximum(n_c, 1), ref_c / jnp.maximum(n_c, 1)
      pi_r, ref_r = pi_r / jnp.maximum(n_r, 1), ref_r / jnp.maximum(n_r, 1)
    pairs = (n_c > 0) & (n_r > 0)  # [B, L] slots holding a pair
    delta = (pi_c - ref_c) - (pi_r - ref_r)
    loss = preference.preference_loss(delta, self.beta, self.loss, self.label_smoothing)
    if self.rpo_alpha:
      loss = loss + self.rpo_alpha * nll_chosen
    reward_c, reward_r = self.beta * (pi_c - ref_c), self.beta * (pi_r - ref_r)
    per_pair = {"loss": loss, "reward_accuracy": (reward_c > reward_r).astype(jnp.float32),
                "reward_margin": reward_c - reward_r, "rewards_chosen": reward_c,
                "rewards_rejected": reward_r, "logps_chosen": pi_c, "logps_rejected": pi_r}
    sums = {k: jnp.sum(jnp.where(pairs, v, 0.0)) for k, v in per_pair.items()}
    sums["weight"] = jnp.sum(pairs.astype(jnp.float32))
    return sums

  def summarize(self, sums):
    """Means over pairs, and `pairs`, their number."""
    weight = jnp.maximum(sums["weight"], 1.0)
    out = {k: sums[k] / weight for k in ("loss",) + METRICS}
    out["pairs"] = sums["weight"]
    return out

  # --- the reference in one pass --------------------------------------------------------

  def reference_table(self, model, params, records, tokenizer, batch_size: int = 8) -> dict:
    """`{pair_key: [log π_ref(chosen), log π_ref(rejected)]}` of `records` under
    `(model, params)`, unpacked rows of `max_len`, `batch_size` pairs per call (one
    compile: the last batch is padded), in the layout of the model's arch.
    `preference.write_table` stores it."""
    if not self.max_len:
      raise UserError("DPO.reference_table needs DPO.max_len (the row length).")
    enc_dec = model.config.arch == "encoder_decoder"
    lengths = {k: self.max_len for k in (ENCODER_DECODER_KEYS if enc_dec else KEYS)}
    fn = jax.jit(lambda p, b: {s: v for s, (v, _) in
                               preference.sequence_logps(model, p, b).items()})
    table, records = {}, list(records)
    for start in range(0, len(records), batch_size):
      chunk = records[start:start + batch_size]
      rows = [packing.pad_unpacked(self.pair_rows(r, tokenizer), lengths) for r in chunk]
      rows += [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (batch_size - len(rows))
      batch = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
      preference.check_layout(model, batch)
      logps = jax.device_get(fn(params, batch))
      for i, record in enumerate(chunk):  # one pair per row: slot 0 (segment id 1)
        table[preference.pair_key(record)] = [float(logps[s][i, 0]) for s in preference.SIDES]
    return table
