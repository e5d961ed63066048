"""Attention against a naive numpy softmax(QK^T/sqrt(H))V; GQA/MQA/MHA equivalences."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.errors import UserError
from llmjax.layers import masks
from llmjax.layers.attention import Attention
from llmjax.models.config import TransformerConfig
from llmjax.testing import reference


def _cfg(**kw):
  base = {"embed_dim": 16, "num_heads": 4, "num_kv_heads": 4, "use_bias": True, "position": "none"}
  return TransformerConfig(**{**base, **kw})


def _params(cfg, x, kv=None, seed=1):
  # Random (nonzero) biases, large-ish kernels: a zero bias or tiny logits hide bugs.
  return reference.random_params(Attention(cfg), x, kv, seed=seed)


def _normal(seed, shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _naive(p, x, kv, mask, rope_positions=None):
  x, kv = np.asarray(x, np.float64), np.asarray(kv, np.float64)
  q = np.einsum("bld,dnh->blnh", x, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("bsd,dkh->bskh", kv, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("bsd,dkh->bskh", kv, p["value"]["kernel"]) + p["value"]["bias"]
  if rope_positions is not None:
    q, k = reference.rope(q, rope_positions), reference.rope(k, rope_positions)
  o = reference.attention(q, k, v, mask)
  return np.einsum("blnh,nhd->bld", o, p["out"]["kernel"]) + p["out"]["bias"]


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_self_attention_matches_naive_with_masks(num_kv_heads):
  cfg = _cfg(num_kv_heads=num_kv_heads)
  x = _normal(0, (2, 6, 16))
  p = _params(cfg, x)
  seg = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
  for mask in [None, masks.causal_mask(6),
               masks.combine_masks(masks.causal_mask(6), masks.segment_mask(seg, seg))]:
    got = Attention(cfg).apply({"params": p}, x, mask=mask)
    want = _naive(p, x, x, None if mask is None else np.asarray(mask))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_cross_attention_matches_naive_with_padding():
  cfg = _cfg(num_kv_heads=2)
  x = _normal(0, (2, 3, 16))
  kv = _normal(1, (2, 5, 16))
  p = _params(cfg, x, kv)
  mask = masks.padding_mask(np.ones((2, 3), bool), np.array([[1, 1, 1, 0, 0], [1] * 5], bool))
  got = Attention(cfg).apply({"params": p}, x, kv, mask=mask)
  np.testing.assert_allclose(got, _naive(p, x, kv, np.asarray(mask)), rtol=2e-4, atol=2e-4)


def test_rope_attention_matches_naive():
  cfg = _cfg(num_kv_heads=2, position="rope")
  x = _normal(0, (2, 5, 16))
  positions = np.array([[0, 1, 2, 0, 1], [3, 4, 5, 6, 7]])
  p = _params(cfg, x)
  got = Attention(cfg).apply({"params": p}, x, mask=masks.causal_mask(5), positions=positions)
  want = _naive(p, x, x, np.asarray(masks.causal_mask(5)), rope_positions=positions)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_gqa_equals_mha_with_repeated_kv_heads():
  gqa_cfg = _cfg(num_kv_heads=2)
  x = _normal(0, (2, 6, 16))
  p = _params(gqa_cfg, x)
  # MHA with each K/V head repeated for its group of N/K = 2 query heads.
  mha = jax.tree.map(lambda a: a, p)
  for name in ("key", "value"):
    mha[name] = {"kernel": jnp.repeat(p[name]["kernel"], 2, axis=1),
                 "bias": jnp.repeat(p[name]["bias"], 2, axis=0)}
  mask = masks.causal_mask(6)
  got = Attention(gqa_cfg).apply({"params": p}, x, mask=mask)
  want = Attention(_cfg(num_kv_heads=4)).apply({"params": mha}, x, mask=mask)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_kv_heads,use_bias,dtype", [
    (4, True, "float32"), (2, False, "float32"), (1, True, "float32"), (2, True, "bfloat16")])
def test_fused_qkv_equals_separate_projections(num_kv_heads, use_bias, dtype):
  """One `[D, K, (G+2)H]` product (the default) against three `Einsum` calls: same
  outputs and same gradients for every parameter and the input."""
  cfg = _cfg(num_kv_heads=num_kv_heads, use_bias=use_bias, dtype=dtype, position="rope")
  x, mask = _normal(0, (2, 6, 16)), masks.causal_mask(6)
  p = _params(cfg, x)

  def run(fused):
    f = lambda p, x: Attention(cfg.replace(fused_qkv=fused)).apply({"params": p}, x, mask=mask)
    loss = lambda p, x: jnp.sum(jnp.sin(f(p, x).astype(jnp.float32)))
    dots = str(jax.make_jaxpr(f)(p, x)).count("dot_general")
    return f(p, x), jax.grad(loss, argnums=(0, 1))(p, x), dots

  (fused, fused_grads, fused_dots), (sep, sep_grads, sep_dots) = run(True), run(False)
  assert fused_dots == sep_dots - 2                     # q, k, v: one product instead of three
  assert fused.dtype == sep.dtype == jnp.dtype(dtype)
  tol = 1e-5 if dtype == "float32" else 3e-2
  for a, b in zip(jax.tree.leaves((fused, fused_grads)), jax.tree.leaves((sep, sep_grads))):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())))


def test_fused_qkv_takes_boxed_params_from_init():
  """`apply` with `init`'s logically partitioned (boxed) params, as in a notebook."""
  cfg = _cfg(num_kv_heads=2)
  x = _normal(0, (2, 5, 16))
  boxed = Attention(cfg).init(jax.random.key(0), x)["params"]
  assert type(boxed["query"]["kernel"]).__name__ == "LogicallyPartitioned"
  got = Attention(cfg).apply({"params": boxed}, x)
  want = Attention(cfg.replace(fused_qkv=False)).apply({"params": boxed}, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_attention_dropout_uses_dropout_rng():
  cfg = _cfg(attention_dropout_rate=0.5)
  x = _normal(0, (1, 6, 16))
  p = _params(cfg, x)
  layer = Attention(cfg)
  clean = layer.apply({"params": p}, x)
  np.testing.assert_allclose(clean, _naive(p, x, x, None), rtol=2e-4, atol=2e-4)
  noisy = [layer.apply({"params": p}, x, deterministic=False,
                       rngs={"dropout": jax.random.key(s, impl="rbg")}) for s in (0, 0, 1)]
  np.testing.assert_array_equal(noisy[0], noisy[1])
  assert np.abs(noisy[0] - clean).max() > 1e-3
  assert np.abs(noisy[0] - noisy[2]).max() > 1e-3


def test_bf16_attention_close_to_f32():
  cfg = _cfg(num_kv_heads=2)
  x = _normal(0, (2, 6, 16))
  p = _params(cfg, x)
  want = Attention(cfg).apply({"params": p}, x, mask=masks.causal_mask(6))
  got = Attention(cfg.replace(dtype="bfloat16")).apply({"params": p}, x,
                                                       mask=masks.causal_mask(6))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0.05,
                             atol=0.05 * float(np.abs(want).max()))


@pytest.mark.parametrize("length,chunks", [(6, 2), (10, 3), (7, 4), (5, 9)])
@pytest.mark.parametrize("num_kv_heads", [4, 1])
def test_causal_chunks_equal_one_softmax_over_all_keys(length, chunks, num_kv_heads):
  from llmjax.layers.attention import dot_product_attention
  q = _normal(0, (2, length, 4, 3))
  k, v = _normal(1, (2, length, num_kv_heads, 3)), _normal(2, (2, length, num_kv_heads, 3))
  seg = np.ones((2, length), np.int32)
  seg[0, length // 2:] = 2                                      # two packed documents in row 0
  mask = masks.combine_masks(masks.causal_mask(length), masks.segment_mask(seg, seg))
  bias = _normal(3, (1, 4, length, length))                     # e.g. T5's relative bias
  for m, b in [(mask, None), (mask, bias), (masks.causal_mask(length), bias)]:
    want = dot_product_attention(q, k, v, m, bias=b)
    got = dot_product_attention(q, k, v, m, bias=b, causal_chunks=chunks)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    grad = lambda n, m=m, b=b: jax.grad(lambda q, k, v: jnp.sum(jnp.sin(dot_product_attention(
        q, k, v, m, bias=b, causal_chunks=n))), argnums=(0, 1, 2))(q, k, v)
    for a, c in zip(grad(1), grad(chunks)):
      np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="L == S"):
    dot_product_attention(q, k[:, :-1], v[:, :-1], None, causal_chunks=2)


@pytest.mark.parametrize("impl,chunks", [("einsum", 1), ("einsum", 3), ("jax", 1), ("jax", 2)])
def test_causal_flag_adds_the_causal_mask(impl, chunks):
  from llmjax.layers.attention import dot_product_attention
  length = 7
  q = _normal(0, (2, length, 4, 3))
  k, v = _normal(1, (2, length, 2, 3)), _normal(2, (2, length, 2, 3))
  seg = np.ones((2, length), np.int32)
  seg[1, 4:] = 2
  for extra in (None, masks.segment_mask(seg, seg)):
    full = masks.combine_masks(masks.causal_mask(length), extra)
    want = reference.attention(np.asarray(q, np.float64), k, v, np.asarray(full))
    got = dot_product_attention(q, k, v, extra, impl=impl, causal=True, causal_chunks=chunks)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="L == S"):
    dot_product_attention(q, k[:, :-1], v[:, :-1], None, causal=True)


def test_cudnn_attention_needs_half_precision_and_falls_back_without_a_gpu(caplog):
  with pytest.raises(UserError, match="bfloat16"):
    _cfg(attention_impl="cudnn")                         # float32 activations
  if jax.default_backend() == "gpu":
    pytest.skip("this machine has the GPU that attention_impl='cudnn' runs on")
  cfg = _cfg(attention_impl="cudnn", dtype="bfloat16")
  x = jnp.asarray(_normal(0, (2, 5, 16)), jnp.bfloat16)
  params = Attention(cfg.replace(attention_impl="einsum")).init(jax.random.PRNGKey(0), x)
  with caplog.at_level("WARNING"):
    got = Attention(cfg).apply(params, x, causal=True)
  want = Attention(cfg.replace(attention_impl="einsum")).apply(params, x, causal=True)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  assert "needs an NVIDIA GPU" in caplog.text


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
@pytest.mark.parametrize("num_kv_heads", [8, 2])
def test_cudnn_attention_matches_einsum_on_gpu(num_kv_heads):
  from llmjax.layers.attention import dot_product_attention
  b, length, h = 2, 256, 64
  q = jnp.asarray(_normal(0, (b, length, 8, h)), jnp.bfloat16)
  k = jnp.asarray(_normal(1, (b, length, num_kv_heads, h)), jnp.bfloat16)
  v = jnp.asarray(_normal(2, (b, length, num_kv_heads, h)), jnp.bfloat16)
  seg = np.ones((b, length), np.int32)
  seg[0, 100:] = 2
  for extra in (None, masks.segment_mask(seg, seg)):
    def loss(q, k, v, impl, extra=extra):
      out = dot_product_attention(q, k, v, extra, impl=impl, causal=True)
      return jnp.sum(jnp.sin(out.astype(jnp.float32))), out
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    (_, want), want_grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(*f32, "einsum")
    (_, got), got_grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True),
                                  static_argnums=3)(q, k, v, "cudnn")
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2, rtol=2e-2)
    for g, w in zip(got_grads, want_grads):
      np.testing.assert_allclose(np.asarray(g, np.float32), w,
                                 atol=3e-2 * float(jnp.abs(w).max()), rtol=3e-2)


def _naive_jnp_attention(q, k, v, mask, scale):
  """Plain jnp softmax attention with K/V heads repeated (autodiff gives its gradients)."""
  group = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  scores = jnp.einsum("blnh,bsnh->bnls", q.astype(jnp.float32) * scale, k.astype(jnp.float32))
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  return jnp.einsum("bnls,bsnh->blnh", jax.nn.softmax(scores, -1), v.astype(jnp.float32))


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("causal,chunks,kv_length", [(True, 1, 9), (True, 3, 9), (False, 1, 9),
                                                     (False, 1, 5)])
def test_hand_written_backward_matches_autodiff_of_naive_attention(num_kv_heads, causal, chunks,
                                                                   kv_length):
  """The einsum path's custom VJP (kernels/einsum_attention.py) against jax.grad of a plain
  softmax attention: causal (in chunks or not), bidirectional and cross-attention, with
  packed segments and padding queries whose every key is masked."""
  from llmjax.layers.attention import dot_product_attention
  length = 9
  q = _normal(0, (2, length, 4, 3))
  k, v = _normal(1, (2, kv_length, num_kv_heads, 3)), _normal(2, (2, kv_length, num_kv_heads, 3))
  cotangent = _normal(3, (2, length, 4, 3))
  q_seg = np.array([[1] * 4 + [2] * 3 + [0] * 2, [1] * 9], np.int32)  # row 0 ends in padding
  k_seg = q_seg if kv_length == length else np.array([[1, 1, 2, 2, 0], [1] * 5], np.int32)
  for extra in (None, masks.segment_mask(q_seg, k_seg)):
    full = masks.combine_masks(masks.causal_mask(length), extra) if causal else extra
    loss = lambda q, k, v, e=extra, c=causal, bias=None: jnp.sum(cotangent * dot_product_attention(
        q, k, v, e, bias=bias, causal=c, causal_chunks=chunks))
    want_loss = lambda q, k, v, m=full: jnp.sum(cotangent * _naive_jnp_attention(q, k, v, m, 3**-0.5))
    assert "custom_vjp_call" in str(jax.make_jaxpr(loss)(q, k, v))
    np.testing.assert_allclose(loss(q, k, v), want_loss(q, k, v), rtol=1e-5, atol=1e-5)
    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(got, jax.jit(jax.grad(want_loss, argnums=(0, 1, 2)))(q, k, v)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # A (zero) bias takes the autodiffed einsum path: same gradients, padding rows included.
    zero_bias = np.zeros((1, 4, length, kv_length), np.float32)
    autodiff = jax.jit(jax.grad(functools.partial(loss, bias=zero_bias), argnums=(0, 1, 2)))(q, k, v)
    assert "custom_vjp_call" not in str(jax.make_jaxpr(functools.partial(loss, bias=zero_bias))(q, k, v))
    for a, b in zip(got, autodiff):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_hand_written_backward_in_bfloat16_close_to_float32():
  """bfloat16 q/k/v: gradients come back in bfloat16, within bf16 rounding of float32's."""
  from llmjax.layers.attention import dot_product_attention
  q, k, v = (_normal(i, (2, 16, 4, 8)) for i in range(3))
  cotangent = _normal(3, (2, 16, 4, 8))
  grads = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    loss = lambda q, k, v: jnp.sum(cotangent * dot_product_attention(
        q, k, v, None, causal=True, causal_chunks=4).astype(jnp.float32))
    grads[dtype] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*(jnp.asarray(a, dtype) for a in (q, k, v)))
  for a, b in zip(grads[jnp.bfloat16], grads[jnp.float32]):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0.05,
                               atol=0.03 * float(np.abs(b).max()))
