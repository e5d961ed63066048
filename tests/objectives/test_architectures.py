"""The three architectures on the one Transformer: attention directions, cross-attention,
and BERT's parts (token types, MLM head, logits bias, pooled classifier)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.models import presets
from llmjax.models.transformer import Transformer

B, L = 2, 8


def _tokens(seed=0, length=L):
  return jax.random.randint(jax.random.PRNGKey(seed), (B, length), 5, 128, jnp.int32)


def _init(model, *args, **kwargs):
  return flax.linen.meta.unbox(model.init(jax.random.PRNGKey(1), *args, **kwargs)["params"])


def _flat(params):
  return {k: v.shape for k, v in flax.traverse_util.flatten_dict(params, sep="/").items()}


def test_encoder_is_bidirectional_and_decoder_causal():
  tokens = _tokens()
  changed = tokens.at[:, -1].set((tokens[:, -1] + 1) % 128)
  enc = Transformer(presets.get_preset("bert-tiny", scan_layers=False))
  p = _init(enc, tokens)
  a = enc.apply({"params": p}, tokens, method="encode")
  b = enc.apply({"params": p}, changed, method="encode")
  # Every earlier position of the encoder sees the last token.
  assert np.all(np.abs(np.asarray(a - b))[:, :-1].max(axis=-1) > 1e-6)

  dec = Transformer(presets.get_preset("tiny", scan_layers=False))
  p = _init(dec, tokens)
  a, b = dec.apply({"params": p}, tokens), dec.apply({"params": p}, changed)
  np.testing.assert_array_equal(np.asarray(a[:, :-1]), np.asarray(b[:, :-1]))
  assert np.abs(np.asarray(a[:, -1] - b[:, -1])).max() > 1e-6


def test_encoder_decoder_cross_attention_and_causal_decoder():
  model = Transformer(presets.get_preset("t5-tiny", scan_layers=False))
  inputs, targets = _tokens(0, 6), _tokens(1)
  p = _init(model, targets, encoder_tokens=inputs)
  base = model.apply({"params": p}, targets, encoder_tokens=inputs)
  other_inputs = inputs.at[:, -1].set((inputs[:, -1] + 1) % 128)
  moved = model.apply({"params": p}, targets, encoder_tokens=other_inputs)
  # Changing the last encoder token changes every decoder position (cross-attention).
  assert np.all(np.abs(np.asarray(base - moved)).max(axis=-1) > 1e-6)
  later = targets.at[:, -1].set((targets[:, -1] + 1) % 128)
  after = model.apply({"params": p}, later, encoder_tokens=inputs)
  np.testing.assert_array_equal(np.asarray(base[:, :-1]), np.asarray(after[:, :-1]))
  # Encoder padding (segment 0) is invisible to cross-attention.
  seg = jnp.ones_like(inputs).at[:, -1].set(0)
  a = model.apply({"params": p}, targets, encoder_tokens=inputs, encoder_segment_ids=seg)
  b = model.apply({"params": p}, targets, encoder_tokens=other_inputs, encoder_segment_ids=seg)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_bert_parts_param_names_and_shapes():
  cfg = presets.get_preset("bert-tiny", scan_layers=False, num_token_types=2,
                           mlm_head=True, logits_bias=True, num_classes=3)
  model = Transformer(cfg)
  tokens = _tokens()
  shapes = _flat(_init(model, tokens))
  D, V = cfg.embed_dim, cfg.vocab_size
  expected = {"token_type_embed/embedding": (2, D), "mlm_transform/kernel": (D, D),
              "mlm_transform/bias": (D,), "mlm_norm/scale": (D,), "mlm_norm/bias": (D,),
              "logits_bias": (V,)}
  assert {k: shapes[k] for k in expected} == expected
  cls_shapes = _flat(_init(model, tokens, method="classify"))
  assert {k: v for k, v in cls_shapes.items() if k.startswith(("pooler", "classifier"))} == {
      "pooler/kernel": (D, D), "pooler/bias": (D,), "classifier/kernel": (D, 3),
      "classifier/bias": (3,)}
  # Defaults build none of them (checkpoint API of existing configs is unchanged).
  plain = _flat(_init(Transformer(presets.get_preset("bert-tiny", scan_layers=False)), tokens))
  assert not [k for k in plain if k.split("/")[0] in (
      "token_type_embed", "mlm_transform", "mlm_norm", "logits_bias", "pooler", "classifier")]


def test_bert_parts_compute_what_they_say():
  cfg = presets.get_preset("bert-tiny", scan_layers=False, num_token_types=2,
                           mlm_head=True, logits_bias=True, num_classes=3)
  model = Transformer(cfg)
  tokens = _tokens()
  params = _init(model, tokens)
  params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(2), x.shape),
                        params)
  zeros = model.apply({"params": params}, tokens)
  explicit = model.apply({"params": params}, tokens, token_type_ids=jnp.zeros_like(tokens))
  ones = model.apply({"params": params}, tokens, token_type_ids=jnp.ones_like(tokens))
  np.testing.assert_array_equal(np.asarray(zeros), np.asarray(explicit))
  assert np.abs(np.asarray(zeros - ones)).max() > 1e-4

  # The MLM head: dense -> gelu (exact) -> LayerNorm -> tied logits + bias.
  x = model.apply({"params": params}, tokens, method="encode")
  h = jax.nn.gelu(x @ params["mlm_transform"]["kernel"] + params["mlm_transform"]["bias"],
                  approximate=False)
  mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
  h = (h - mu) / jnp.sqrt(var + cfg.norm_eps) * params["mlm_norm"]["scale"] + (
      params["mlm_norm"]["bias"])
  want = h @ params["embed"]["embedding"].T + params["logits_bias"]
  np.testing.assert_allclose(np.asarray(zeros), np.asarray(want), atol=2e-4, rtol=2e-4)

  cls_params = {**params, **{k: v for k, v in _init(model, tokens, method="classify").items()
                             if k in ("pooler", "classifier")}}
  logits = model.apply({"params": cls_params}, tokens, method="classify")
  pooled = jnp.tanh(x[:, 0] @ cls_params["pooler"]["kernel"] + cls_params["pooler"]["bias"])
  want = pooled @ cls_params["classifier"]["kernel"] + cls_params["classifier"]["bias"]
  assert logits.shape == (B, 3)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_classify_needs_num_classes():
  from llmjax.errors import UserError
  model = Transformer(presets.get_preset("bert-tiny", scan_layers=False))
  with pytest.raises(UserError, match="num_classes"):
    model.init(jax.random.PRNGKey(0), _tokens(), method="classify")
