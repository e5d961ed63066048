"""`Transformer`: the one network for decoder-only, encoder-only and encoder-decoder models.

  decoder_only     GPT-2 (Radford et al. 2019), LLaMA (Touvron et al. 2023): `decode`.
  encoder_only     BERT (Devlin et al. 2019): `encode`, then logits over the vocabulary.
  encoder_decoder  T5 (Raffel et al. 2020): `encode` the inputs, `decode` the targets
                   with cross-attention to the encoder output.

Submodules (checkpoint API): `embed` (token table `embedding [V, D]`, shared by encoder
and decoder), `pos_embed` (learned positions only), `embed_norm` (if `embed_norm`),
`encoder` / `decoder` (`TransformerStack`), `lm_head` (`kernel [D, V]`, untied only).
BERT's parts, each behind a config field: `token_type_embed` (`embedding [T, D]`,
`num_token_types`), `mlm_transform` (`kernel [D, D]`, `bias [D]`) + `mlm_norm`
(`mlm_head`), top-level `logits_bias [V]` (`logits_bias`), and the pooled classifier
`pooler` (`[D, D]`, tanh) + `classifier` (`[D, C]`) used by `classify` (`num_classes`).
A reward model's scalar head `reward_head` (`kernel [D, 1]`, `bias [1]`) is made by
`reward` (the one `nn.compact` method) alone, so no other method's tree has it.

Packed rows: `segment_ids` int32 `[B, L]` (1, 2, ... per document, 0 = padding) and
`positions` int32 `[B, L]` (restarting at 0 per document). When None, every token is in
segment 1 and positions are arange(L). No token attends across documents.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.errors import UserError
from llmjax.layers import masks
from llmjax.layers.embed import Embed
from llmjax.layers.linear import Einsum
from llmjax.layers.mlp import activation_fn
from llmjax.layers.norms import make_norm
from llmjax.layers.position import LearnedPositions, sinusoidal_positions
from llmjax.models.config import TransformerConfig
from llmjax.models.stack import TransformerStack
from llmjax.sharding.axes import BATCH, EMBED, LENGTH, VOCAB


def _default_positions(tokens: jax.Array, positions: jax.Array | None) -> jax.Array:
  if positions is None:
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return positions


class Transformer(nn.Module):
  """See the module docstring. Call `init`/`apply` with `method=` for encode/decode."""

  config: TransformerConfig

  def setup(self):
    cfg = self.config
    kw = {"dtype": cfg.compute_dtype, "param_dtype": cfg.params_dtype}
    self.embed = Embed(cfg.vocab_size, cfg.embed_dim, init_std=cfg.init_std, **kw)
    if cfg.position == "learned":
      self.pos_embed = LearnedPositions(cfg.max_len, cfg.embed_dim, init_std=cfg.init_std, **kw)
    if cfg.embed_norm:
      self.embed_norm = make_norm(cfg)
    self.embed_dropout = nn.Dropout(rate=cfg.dropout_rate)
    if cfg.num_token_types or cfg.mlm_head or cfg.logits_bias or cfg.num_classes:
      self._bert_parts(cfg, kw)
    if cfg.arch in ("encoder_only", "encoder_decoder"):
      encoder_layers = cfg.num_encoder_layers if cfg.arch == "encoder_decoder" else cfg.num_layers
      self.encoder = TransformerStack(cfg, encoder_layers, cross_attention=False,
                                      bidirectional=True)
    if cfg.arch in ("decoder_only", "encoder_decoder"):
      self.decoder = TransformerStack(cfg, cfg.num_layers,
                                      cross_attention=cfg.arch == "encoder_decoder")
    if not cfg.tie_embeddings:
      self.lm_head = Einsum("BLD,DV->BLV", (cfg.embed_dim, cfg.vocab_size), (EMBED, VOCAB),
                            kernel_init=nn.initializers.normal(cfg.init_std),
                            pad_last_to=cfg.logits_pad_to, **kw)

  def _bert_parts(self, cfg, kw):
    """BERT's token types, MLM head, logits bias and pooled classifier (each optional)."""
    if cfg.num_token_types:
      self.token_type_embed = Embed(cfg.num_token_types, cfg.embed_dim,
                                    init_std=cfg.init_std, **kw)
    if cfg.mlm_head:
      self.mlm_transform = Einsum("BLD,DE->BLE", (cfg.embed_dim, cfg.embed_dim), (EMBED, None),
                                  use_bias=True, kernel_init=nn.initializers.normal(cfg.init_std),
                                  **kw)
      self.mlm_norm = make_norm(cfg)
    if cfg.logits_bias:
      self.logits_bias = self.param(
          "logits_bias", nn.with_logical_partitioning(nn.initializers.zeros, (VOCAB,)),
          (cfg.vocab_size,), cfg.params_dtype)
    if cfg.num_classes:
      init = nn.initializers.normal(cfg.init_std)
      self.pooler = Einsum("BD,DE->BE", (cfg.embed_dim, cfg.embed_dim), (EMBED, None),
                           use_bias=True, kernel_init=init, **kw)
      self.classifier = Einsum("BD,DC->BC", (cfg.embed_dim, cfg.num_classes), (EMBED, None),
                               use_bias=True, kernel_init=init, **kw)

  def embed_tokens(self, tokens: jax.Array, positions: jax.Array,
                   deterministic: bool = True,
                   token_type_ids: jax.Array | None = None) -> jax.Array:
    """Token (+ absolute position, + token type) embeddings, `[B, L] -> [B, L, D]`."""
    cfg = self.config
    if cfg.position == "learned" and tokens.shape[1] > cfg.max_len:
      raise UserError(f"Sequence length {tokens.shape[1]} exceeds max_len={cfg.max_len} of "
                      "the learned position table; raise max_len or shorten the inputs.")
    x = self.embed(tokens)
    if cfg.scale_embeddings:
      x = x * jnp.asarray(math.sqrt(cfg.embed_dim), x.dtype)
    if cfg.position == "learned":
      x = x + self.pos_embed(positions)
    elif cfg.position == "sinusoidal":
      x = x + sinusoidal_positions(positions, cfg.embed_dim).astype(x.dtype)
    if cfg.num_token_types:
      types = jnp.zeros_like(tokens) if token_type_ids is None else token_type_ids
      x = x + self.token_type_embed(types)
    if cfg.embed_norm:
      x = self.embed_norm(x)
    x = self.embed_dropout(x, deterministic=deterministic)
    return nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED))

  def logits(self, x: jax.Array) -> jax.Array:
    """`[B, L, D]` -> logits `[B, L, V]` in `logits_dtype` (tied or `lm_head`)."""
    cfg = self.config
    if cfg.logits_scale != 1.0:
      x = x * jnp.asarray(cfg.logits_scale, x.dtype)
    y = self.embed.attend(x, cfg.logits_pad_to) if cfg.tie_embeddings else self.lm_head(x)
    if cfg.logits_bias:
      y = y + self.logits_bias.astype(y.dtype)
    return nn.with_logical_constraint(y.astype(cfg.output_dtype), (BATCH, LENGTH, VOCAB))

  def mlm_logits(self, x: jax.Array) -> jax.Array:
    """Encoder output `[B, L, D]` -> logits, through BERT's head if `mlm_head`."""
    cfg = self.config
    if cfg.mlm_head:
      x = activation_fn(cfg.activation)(self.mlm_transform(x))  # [B, L, D]
      x = self.mlm_norm(x)
    return self.logits(x)

  def encode(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
             positions: jax.Array | None = None, deterministic: bool = True,
             token_type_ids: jax.Array | None = None) -> jax.Array:
    """Bidirectional encoder: int `tokens [B, L]` -> `[B, L, D]`.

    `token_type_ids [B, L]` (BERT's sentence A/B ids; default zeros) are used when
    `num_token_types > 0`.
    """
    if self.config.arch == "decoder_only":
      raise UserError("encode() needs arch='encoder_only' or 'encoder_decoder'; this "
                      "config is decoder_only (use decode()).")
    positions = _default_positions(tokens, positions)
    mask = None if segment_ids is None else masks.segment_mask(segment_ids, segment_ids)
    x = self.embed_tokens(tokens, positions, deterministic, token_type_ids)
    return self.encoder(x, mask, positions, None, None, deterministic)

  def classify(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, token_type_ids: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    """BERT's pooled head: the first token's encoding -> tanh dense -> class logits `[B, C]`."""
    cfg = self.config
    if not cfg.num_classes:
      raise UserError("classify() needs TransformerConfig.num_classes > 0; set it to the "
                      "number of labels.")
    x = self.encode(tokens, segment_ids, positions, deterministic, token_type_ids)
    pooled = jnp.tanh(self.pooler(x[:, 0]))  # [B, D]
    pooled = self.embed_dropout(pooled, deterministic=deterministic)
    return self.classifier(pooled).astype(cfg.output_dtype)  # [B, C]

  def decode(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
             positions: jax.Array | None = None, encoded: jax.Array | None = None,
             encoder_segment_ids: jax.Array | None = None,
             deterministic: bool = True) -> jax.Array:
    """Causal decoder: int `tokens [B, L]` -> logits `[B, L, V]`.

    With `encoded [B, S, D]` (encoder_decoder) every block cross-attends to it, masked
    by `encoder_segment_ids [B, S]` (0 = encoder padding; packed rows must use matching
    document ids on both sides).
    """
    return self.logits(self.decode_hidden(tokens, segment_ids, positions, encoded,
                                          encoder_segment_ids, deterministic))

  def decode_hidden(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
                    positions: jax.Array | None = None, encoded: jax.Array | None = None,
                    encoder_segment_ids: jax.Array | None = None,
                    deterministic: bool = True) -> jax.Array:
    """`decode` before the LM head: the final hidden states `[B, L, D]`."""
    cfg = self.config
    if cfg.arch == "encoder_only":
      raise UserError("decode() needs arch='decoder_only' or 'encoder_decoder'; this "
                      "config is encoder_only (use encode()).")
    if (encoded is None) != (cfg.arch == "decoder_only"):
      raise UserError("decode(): pass `encoded` (the encoder output) exactly when "
                      f"arch='encoder_decoder'; this config has arch={cfg.arch!r}.")
    positions = _default_positions(tokens, positions)
    # The decoder's blocks are causal (they add the causal mask themselves, which lets
    # attention_impl='cudnn' skip the hidden blocks); `mask` only separates documents.
    mask = None if segment_ids is None else masks.segment_mask(segment_ids, segment_ids)
    if cfg.sliding_window:
      mask = masks.combine_masks(mask, masks.sliding_window_mask(tokens.shape[1],
                                                                 cfg.sliding_window))
    cross_mask = None
    if encoded is not None and (segment_ids is not None or encoder_segment_ids is not None):
      q_seg = jnp.ones_like(tokens) if segment_ids is None else segment_ids
      k_seg = (jnp.ones(encoded.shape[:2], jnp.int32) if encoder_segment_ids is None
               else encoder_segment_ids)
      cross_mask = masks.segment_mask(q_seg, k_seg)
    x = self.embed_tokens(tokens, positions, deterministic)
    return self.decoder(x, mask, positions, encoded, cross_mask, deterministic)

  @nn.compact  # `reward_head` is made here, so no other method's parameter tree has it
  def reward(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
             positions: jax.Array | None = None, *,
             encoder_tokens: jax.Array | None = None,
             encoder_segment_ids: jax.Array | None = None,
             encoder_positions: jax.Array | None = None,
             deterministic: bool = True) -> jax.Array:
    """A scalar per position, f32 `[B, L]`: `reward_head` on the final hidden states.

    The reward model (`llmjax.objectives.reward`; Ouyang et al. 2022, §3.5) reads it at
    each sequence's last real token, the one position of a causal decoder that has seen
    the whole sequence. Arguments as `__call__`'s: decoder_only reads `tokens`
    (prompt + response), encoder_decoder encodes `encoder_tokens` (the prompt) and
    decodes `tokens` (the response), encoder_only encodes `tokens`. At init it also
    runs the LM head, so a reward model's parameters are its LM's plus `reward_head`:
    it warm-starts from a language model, and its checkpoint still loads as one.
    """
    cfg = self.config
    if cfg.arch == "encoder_only":
      x, head = self.encode(tokens, segment_ids, positions, deterministic), self.mlm_logits
    else:
      encoded = None
      if cfg.arch == "encoder_decoder":
        if encoder_tokens is None:
          raise UserError("reward() of an encoder_decoder model needs `encoder_tokens` "
                          "(the prompt) as well as `tokens` (the response); pass both.")
        encoded = self.encode(encoder_tokens, encoder_segment_ids, encoder_positions,
                              deterministic)
      x = self.decode_hidden(tokens, segment_ids, positions, encoded, encoder_segment_ids,
                             deterministic)
      head = self.logits
    if self.is_initializing():
      head(x[:, :1])  # creates the LM head's parameters (see above)
    reward_head = Einsum("BLD,DO->BLO", (cfg.embed_dim, 1), (EMBED, None), use_bias=True,
                         kernel_init=nn.initializers.normal(cfg.init_std),
                         dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                         name="reward_head")
    return reward_head(x)[..., 0].astype(jnp.float32)  # [B, L, 1] -> [B, L]

  def decode_cached(self, tokens: jax.Array, positions: jax.Array, cache: dict,
                    valid: jax.Array | None = None,
                    encoded: jax.Array | None = None,
                    last_only: bool = False) -> tuple[jax.Array, dict]:
    """Causal decoding with a KV cache (`llmjax.decode.cache`): `(logits [B, L, V], cache)`.

    `tokens [B, L]` fill cache slots `index ... index + L - 1` (L > 1 prefills a prompt,
    L = 1 is one decoding step). `positions [B, L]` are absolute per row (they are not
    slot numbers when rows are left-padded). `valid [B, L]` marks real tokens (False =
    padding, never attended). encoder_decoder: pass `encoded [B, S, D]` at prefill to
    fill the cross-attention cache; later steps reuse it. `last_only`: logits of the last
    position only, `[B, 1, V]` (a prefill needs no others; the head is skipped for them).
    """
    if self.config.arch != "decoder_only" and (
        self.config.arch != "encoder_decoder" or "encoder_valid" not in cache):
      raise UserError("decode_cached() needs a decoder_only model, or an encoder_decoder "
                      "one with a cache made by llmjax.decode.cache.init_cache(encoder_len=S).")
    index, length = cache["index"], tokens.shape[1]
    valid = jnp.ones(tokens.shape, bool) if valid is None else valid
    key_valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], valid, index, axis=1)
    slots = jnp.arange(key_valid.shape[1])                                # [T]
    query_slots = index + jnp.arange(length)[:, None]                     # [L, 1]
    causal = slots[None, :] <= query_slots                                # [L, T]
    if self.config.sliding_window:  # slot distance = position distance (padding is left)
      causal = causal & (query_slots - slots[None, :] < self.config.sliding_window)
    mask = jnp.logical_and(causal[None, None], key_valid[:, None, None, :])  # [B, 1, L, T]
    cross_mask = cache["encoder_valid"][:, None, None, :] if "encoder_valid" in cache else None
    x = self.embed_tokens(tokens, positions)
    x, layers = self.decoder(x, mask, positions, encoded, cross_mask, True,
                             cache["layers"], index)
    new_cache = dict(cache, index=index + length, valid=key_valid, layers=layers)
    return self.logits(x[:, -1:] if last_only else x), new_cache

  def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, *,
               encoder_tokens: jax.Array | None = None,
               encoder_segment_ids: jax.Array | None = None,
               encoder_positions: jax.Array | None = None,
               token_type_ids: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    """Logits `[B, L, V]` for `config.arch`.

    decoder_only: causal LM over `tokens`. encoder_only: bidirectional encoder over
    `tokens` (and `token_type_ids`), then logits (MLM). encoder_decoder: `encoder_tokens [B, S]` are encoded
    and `tokens` (the shifted targets) decoded with cross-attention.
    """
    cfg = self.config
    if cfg.arch == "decoder_only":
      return self.logits(self.decode_hidden(tokens, segment_ids, positions,
                                            deterministic=deterministic))
    if cfg.arch == "encoder_only":
      return self.mlm_logits(self.encode(tokens, segment_ids, positions, deterministic,
                                         token_type_ids))
    if encoder_tokens is None:
      raise UserError("arch='encoder_decoder' needs `encoder_tokens` (the inputs) as well "
                      "as `tokens` (the decoder inputs); pass both.")
    encoded = self.encode(encoder_tokens, encoder_segment_ids, encoder_positions, deterministic)
    return self.decode(tokens, segment_ids, positions, encoded, encoder_segment_ids,
                       deterministic)
