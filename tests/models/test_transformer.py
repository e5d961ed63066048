"""The Transformer end to end at tiny size: causality, packing, scan/remat equivalence,
mixed precision, encoder bidirectionality and cross-attention padding."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.errors import UserError
from llmjax.layers.position import sinusoidal_positions
from llmjax.models.presets import get_preset
from llmjax.models.stack import unstack_layers
from llmjax.models.transformer import Transformer
from llmjax.testing import reference


def _tokens(shape, seed=0, vocab=128):
  return np.random.default_rng(seed).integers(1, vocab, size=shape).astype(np.int32)


def _setup(name, length=12, std=0.1, **overrides):
  cfg = get_preset(name, **overrides)
  tokens = _tokens((2, length))
  kw = {"encoder_tokens": _tokens((2, length + 2), seed=1)} if cfg.arch == "encoder_decoder" else {}
  return cfg, tokens, reference.random_params(Transformer(cfg), tokens, std=std, **kw)


@functools.cache
def _forward(cfg, method):
  """One jitted forward per (config, method): tests call it with the same shapes often."""
  model = Transformer(cfg)
  return jax.jit(lambda p, *a, **kw: model.apply({"params": p}, *a, method=method, **kw))


def _apply(cfg, params, *args, method=None, **kw):
  return np.asarray(_forward(cfg, method)(params, *args, **kw))


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_future_tokens_never_change_earlier_logits(name):
  cfg, tokens, params = _setup(name)
  changed = tokens.copy()
  changed[:, 7] = (changed[:, 7] + 1) % cfg.vocab_size
  a, b = _apply(cfg, params, tokens), _apply(cfg, params, changed)
  assert a.shape == (2, 12, cfg.vocab_size) and a.dtype == np.float32
  np.testing.assert_allclose(a[:, :7], b[:, :7], rtol=1e-6, atol=1e-6)
  assert np.abs(a[:, 7:] - b[:, 7:]).max() > 1e-3


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_packed_documents_do_not_attend_across_segments(name):
  cfg, _, params = _setup(name)
  doc1, doc2 = _tokens((1, 5), seed=2), _tokens((1, 7), seed=3)
  packed = np.concatenate([doc1, doc2, np.zeros((1, 4), np.int32)], axis=1)   # [1, 16]
  segment_ids = np.array([[1] * 5 + [2] * 7 + [0] * 4], np.int32)
  positions = np.array([list(range(5)) + list(range(7)) + [0] * 4], np.int32)
  got = _apply(cfg, params, packed, segment_ids, positions)
  np.testing.assert_allclose(got[:, 5:12], _apply(cfg, params, doc2), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[:, :5], _apply(cfg, params, doc1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "t5-tiny"])
def test_scanned_and_unscanned_layers_agree(name):
  cfg, tokens, params = _setup(name)
  kw = {"encoder_tokens": _tokens((2, 14), seed=1)} if cfg.arch == "encoder_decoder" else {}
  unscanned = cfg.replace(scan_layers=False)
  converted = unstack_layers(params)
  abstract = jax.eval_shape(lambda: Transformer(unscanned).init(jax.random.key(0), tokens, **kw))
  assert jax.tree.structure(nn.unbox(abstract)["params"]) == jax.tree.structure(converted)
  np.testing.assert_allclose(_apply(cfg, params, tokens, **kw),
                             _apply(unscanned, converted, tokens, **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_bf16_compute_close_to_f32_and_params_stay_f32(name):
  cfg, tokens, params = _setup(name)
  bf16 = cfg.replace(dtype="bfloat16")
  abstract = jax.eval_shape(lambda: Transformer(bf16).init(jax.random.key(0), tokens))
  assert {l.dtype for l in jax.tree.leaves(nn.unbox(abstract))} == {jnp.dtype("float32")}
  want = _apply(cfg, params, tokens)
  got = _apply(bf16, params, tokens)
  assert got.dtype == np.float32  # logits_dtype
  assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
  assert np.abs(got - want).max() > 0  # bf16 really was used


def test_encoder_only_is_bidirectional_and_ignores_padding():
  cfg, tokens, params = _setup("bert-tiny")
  segment_ids = np.array([[1] * 9 + [0] * 3, [1] * 12], np.int32)
  enc = _apply(cfg, params, tokens, segment_ids, method=Transformer.encode)
  assert enc.shape == (2, 12, cfg.embed_dim)
  changed = tokens.copy()
  changed[:, 8] = (changed[:, 8] + 1) % cfg.vocab_size      # a later, real token
  enc2 = _apply(cfg, params, changed, segment_ids, method=Transformer.encode)
  assert np.abs(enc2[:, :8] - enc[:, :8]).max(axis=(1, 2)).min() > 1e-4
  changed = tokens.copy()
  changed[0, 10] = (changed[0, 10] + 1) % cfg.vocab_size    # padding of row 0
  enc3 = _apply(cfg, params, changed, segment_ids, method=Transformer.encode)
  np.testing.assert_allclose(enc3[0, :9], enc[0, :9], rtol=1e-5, atol=1e-5)
  logits = _apply(cfg, params, tokens, segment_ids)
  assert logits.shape == (2, 12, cfg.vocab_size)


def test_encoder_decoder_cross_attention_respects_encoder_padding():
  cfg, tokens, params = _setup("t5-tiny")
  inputs = _tokens((2, 14), seed=1)
  enc_seg = np.array([[1] * 10 + [0] * 4, [1] * 14], np.int32)
  logits = _apply(cfg, params, tokens, encoder_tokens=inputs, encoder_segment_ids=enc_seg)
  assert logits.shape == (2, 12, cfg.vocab_size)
  # Padding of the encoder input is invisible to the decoder...
  padded = inputs.copy()
  padded[0, 11] = (padded[0, 11] + 1) % cfg.vocab_size
  same = _apply(cfg, params, tokens, encoder_tokens=padded, encoder_segment_ids=enc_seg)
  np.testing.assert_allclose(same[0], logits[0], rtol=1e-5, atol=1e-5)
  # ...while the last real input token reaches every decoder position (cross-attention),
  # and reaches earlier encoder positions (a bidirectional encoder).
  changed = inputs.copy()
  changed[:, 9] = (changed[:, 9] + 1) % cfg.vocab_size
  diff = _apply(cfg, params, tokens, encoder_tokens=changed, encoder_segment_ids=enc_seg)
  assert np.abs(diff - logits).max(axis=-1).min() > 1e-4
  enc = _apply(cfg, params, inputs, enc_seg, method=Transformer.encode)
  enc_changed = _apply(cfg, params, changed, enc_seg, method=Transformer.encode)
  assert np.abs(enc_changed[:, :9] - enc[:, :9]).max(axis=-1).min() > 1e-5


def test_user_errors():
  cfg, tokens, params = _setup("tiny")
  with pytest.raises(UserError, match="encoder_only"):
    _apply(cfg, params, tokens, method=Transformer.encode)
  with pytest.raises(UserError, match="max_len"):
    _apply(cfg, params, _tokens((1, cfg.max_len + 1)))
  t5, tokens, t5_params = _setup("t5-tiny")
  with pytest.raises(UserError, match="encoder_tokens"):
    _apply(t5, t5_params, tokens)


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "none"])
def test_embeddings_scale_and_positions(position):
  cfg, tokens, params = _setup("tiny", position=position, scale_embeddings=True)
  positions = np.array([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]] * 2, np.int32)
  got = _apply(cfg, params, tokens, positions, method=Transformer.embed_tokens)
  want = np.asarray(params["embed"]["embedding"])[tokens] * np.sqrt(cfg.embed_dim)
  if position == "learned":
    want = want + np.asarray(params["pos_embed"]["embedding"])[positions]
  elif position == "sinusoidal":
    want = want + np.asarray(sinusoidal_positions(positions, cfg.embed_dim))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert ("pos_embed" in params) == (position == "learned")


@pytest.mark.parametrize("name", ["tiny", "t5-tiny"])
def test_causal_chunks_leave_logits_unchanged(name):
  cfg, tokens, params = _setup(name)
  kw = {"encoder_tokens": _tokens((2, 14), seed=1)} if cfg.arch == "encoder_decoder" else {}
  want = _apply(cfg, params, tokens, **kw)
  np.testing.assert_allclose(_apply(cfg.replace(causal_chunks=3), params, tokens, **kw), want,
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(UserError, match="causal_chunks"):
    cfg.replace(causal_chunks=0)


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])  # tied table; untied lm_head
def test_padded_logits_product_changes_nothing(name):
  cfg = get_preset(name, vocab_size=100)                   # 100 = no multiple of 64
  tokens = _tokens((2, 12), vocab=100)
  params = reference.random_params(Transformer(cfg), tokens, std=0.1)
  padded = cfg.replace(logits_pad_to=64)                   # the product runs over 128
  shapes = lambda c: jax.tree.map(jnp.shape, nn.meta.unbox(jax.eval_shape(
      Transformer(c).init, jax.random.PRNGKey(0), tokens)["params"]))
  assert shapes(padded) == shapes(cfg)                     # same parameters, same checkpoints
  want, got = _apply(cfg, params, tokens), _apply(padded, params, tokens)
  assert got.shape == (2, 12, 100)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  def loss(c, p):
    logits = Transformer(c).apply({"params": p}, tokens)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 3])
  grads = [jax.grad(functools.partial(loss, c))(params) for c in (cfg, padded)]
  # float32 sums in another order (the tied table adds lookup and logits gradients)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), *grads)
  with pytest.raises(UserError, match="logits_pad_to"):
    cfg.replace(logits_pad_to=0)
