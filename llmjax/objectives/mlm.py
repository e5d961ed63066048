"""Masked language modelling (BERT; Devlin et al. 2019, "BERT: Pre-training of Deep
Bidirectional Transformers for Language Understanding", §3.1 and appendix A.1).

The pipeline packs documents exactly as for causal LM (`[bos] + ids + [eos]` rows with
segment ids and positions); the masking happens here, inside the jitted step, with the
step's random key. So every epoch sees a fresh mask (RoBERTa's "dynamic masking", Liu et
al. 2019), and a resumed run draws exactly the masks of an uninterrupted one.

Each real token (not padding, bos or eos) is chosen with probability `mask_rate` (15%);
a chosen token becomes `<mask>` with probability 0.8, a uniformly random token with 0.1
and stays itself with 0.1. The loss is the cross-entropy over the chosen positions only.
The encoder is bidirectional and attends within its document (segment ids). With
`TransformerConfig.tie_embeddings` the prediction head is the embedding table; with
`mlm_head` / `logits_bias` it is BERT's dense + norm + bias in front of it.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from llmjax.data import packing
from llmjax.data import tokenizer as tokenizer_lib
from llmjax.errors import UserError
from llmjax.objectives import losses
from llmjax.objectives.protocol import TokenObjective

# Tokens never chosen for masking: padding and the document markers.
_SPECIAL_IDS = (tokenizer_lib.PAD_ID, tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID)

# The fixed key of evaluation masks: eval losses compare across steps and runs.
_EVAL_SEED = 1234


def mlm_mask(rng, tokens, maskable, vocab_size: int, *, mask_id: int = tokenizer_lib.MASK_ID,
             mask_rate: float = 0.15, mask_token_frac: float = 0.8,
             random_token_frac: float = 0.1):
  """BERT's 80/10/10 corruption.

  Args:
    rng: a jax random key.
    tokens: int [B, L] original ids.
    maskable: bool [B, L], the positions that may be chosen.
    vocab_size: random replacements are drawn from [mask_id + 1, vocab_size).
  Returns:
    (inputs [B, L] with the chosen positions corrupted, weights float32 [B, L] with 1
    on the chosen positions).
  """
  choose_rng, branch_rng, random_rng = jax.random.split(rng, 3)
  chosen = maskable & jax.random.bernoulli(choose_rng, mask_rate, tokens.shape)
  branch = jax.random.uniform(branch_rng, tokens.shape)  # which of the three replacements
  random_tokens = jax.random.randint(random_rng, tokens.shape, mask_id + 1, vocab_size,
                                     dtype=tokens.dtype)
  inputs = jnp.where(chosen & (branch < mask_token_frac), mask_id, tokens)
  use_random = (branch >= mask_token_frac) & (branch < mask_token_frac + random_token_frac)
  inputs = jnp.where(chosen & use_random, random_tokens, inputs)
  return inputs, chosen.astype(jnp.float32)


def maskable_positions(tokens, segment_ids):
  """Real tokens of a packed row: not padding and not bos/eos."""
  special = jnp.isin(tokens, jnp.asarray(_SPECIAL_IDS, tokens.dtype))
  return (segment_ids > 0) & ~special


@dataclasses.dataclass(frozen=True)
class MaskedLM(TokenObjective):
  """Encoder-only pre-training objective (see the module docstring)."""

  mask_rate: float = 0.15
  mask_token_frac: float = 0.8
  random_token_frac: float = 0.1
  z_loss: float = 0.0

  can_sample: ClassVar[bool] = False  # a bidirectional encoder does not generate text

  def __post_init__(self):
    fracs = (self.mask_rate, self.mask_token_frac, self.random_token_frac)
    if not all(0.0 <= f <= 1.0 for f in fracs) or sum(fracs[1:]) > 1.0:
      raise UserError(f"MaskedLM rates {fracs} must lie in [0, 1] with mask_token_frac + "
                      "random_token_frac <= 1; fix the MaskedLM bindings.")

  def feature_fn(self, example, tokenizer):
    """`{'tokens': [bos] + ids + [eos]}`, as for causal LM."""
    return packing.lm_features(example, tokenizer)

  def corrupt(self, tokens, segment_ids, rng, vocab_size: int):
    """`mlm_mask` with this objective's rates: (inputs [B, L], weights [B, L])."""
    return mlm_mask(rng, tokens, maskable_positions(tokens, segment_ids), vocab_size,
                    mask_rate=self.mask_rate, mask_token_frac=self.mask_token_frac,
                    random_token_frac=self.random_token_frac)

  def loss_sums(self, model, params, batch, *, rng=None, deterministic=True, frozen=None):
    """Summed cross-entropy over the masked positions of one batch."""
    tokens = batch["tokens"]
    segment_ids = batch.get("tokens_segment_ids")
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    if rng is None:
      rng = jax.random.PRNGKey(_EVAL_SEED)
    mask_rng, dropout_rng = jax.random.split(rng)
    inputs, weights = self.corrupt(tokens, segment_ids, mask_rng, model.config.vocab_size)
    logits = model.apply(
        {"params": params}, inputs, segment_ids=segment_ids,
        positions=batch.get("tokens_positions"), deterministic=deterministic,
        rngs=None if deterministic else {"dropout": dropout_rng})
    return losses.cross_entropy_sums(logits, tokens, weights, self.z_loss)
