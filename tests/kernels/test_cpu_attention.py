"""The C++ FlashAttention kernel for XLA:CPU against naive attention, in the model, and
its build and fallbacks."""

import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.kernels import attention_impls, cpu_attention
from llmjax.layers import attention
from llmjax.models.presets import get_preset
from llmjax.models.transformer import Transformer
from llmjax.sharding import mesh as mesh_lib
from llmjax.sharding import rules as rules_lib
from llmjax.testing import reference

pytestmark = pytest.mark.skipif(not cpu_attention.available(),
                                reason="needs the CPU backend and a C++ compiler")


def _naive(q, k, v, mask, scale, causal, keep=None, rate=0.0):
  """Plain jnp softmax attention (repeated kv heads); a query that sees no key gives 0;
  `keep` (`[B, N, L, S]`): the dropout draws, kept probabilities scaled by 1/(1-rate)."""
  b, l, n, _ = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  k, v = (jnp.repeat(a, n // kv_heads, axis=2) for a in (k, v))
  visible = jnp.ones((b, 1, l, s), bool)
  if mask is not None:
    visible = visible & mask
  if causal:
    visible = visible & jnp.tril(jnp.ones((l, s), bool))
  scores = jnp.where(visible, jnp.einsum("blnh,bsnh->bnls", q, k) * scale, -jnp.inf)
  top = jnp.max(scores, -1, keepdims=True)
  p = jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0))
  total = p.sum(-1, keepdims=True)
  p = p / jnp.where(total > 0, total, 1.0)
  if keep is not None:
    p = jnp.where(keep, p / (1.0 - rate), 0.0)
  return jnp.einsum("bnls,bsnh->blnh", p, v)


def _normal(rng, shape):
  return jnp.asarray(rng.normal(size=shape), jnp.float32)


CASES = {  # (B, L, S, N, K, H, causal, mask): L and S off the 64-wide tiles on purpose
    "mha-causal": (2, 100, 100, 4, 4, 16, True, None),
    "gqa-causal-segments": (2, 130, 130, 6, 2, 32, True, "segments"),
    "mqa-bidirectional-padding": (3, 70, 70, 4, 1, 64, False, "padding"),
    "cross-attention": (2, 37, 150, 4, 2, 8, False, "random"),
    "fully-masked-queries": (2, 65, 65, 2, 2, 16, True, "empty-rows"),
    "short": (1, 3, 3, 2, 1, 8, True, None),
}


def _mask(kind, rng, b, l, s):
  if kind is None:
    return None
  if kind == "segments":  # two packed documents per row
    seg = (np.arange(l)[None] >= rng.integers(1, l, size=(b, 1))).astype(np.int32)
    return jnp.asarray(seg[:, None, :, None] == seg[:, None, None, :])
  if kind == "padding":   # the last keys of each row are padding: [B, 1, 1, S]
    return jnp.asarray(np.arange(s)[None, None, None] < rng.integers(1, s, size=(b, 1, 1, 1)))
  if kind == "random":
    return jnp.asarray(rng.random((b, 1, l, s)) > 0.3)
  mask = np.ones((b, 1, l, s), bool)
  mask[0, 0, [0, 5, 64]] = False                          # queries that see nothing
  return jnp.asarray(mask)


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_naive_attention_and_its_gradients(case):
  b, l, s, n, kv_heads, h, causal, kind = CASES[case]
  rng = np.random.default_rng(len(case))
  q, d_out = _normal(rng, (b, l, n, h)), _normal(rng, (b, l, n, h))
  k, v = _normal(rng, (b, s, kv_heads, h)), _normal(rng, (b, s, kv_heads, h))
  mask, scale = _mask(kind, rng, b, l, s), 0.7 / np.sqrt(h)

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v, mask, scale, causal) * d_out)
  got = jax.jit(cpu_attention.flash_attention, static_argnums=(4, 5))(q, k, v, mask, scale, causal)
  want = _naive(q, k, v, mask, scale, causal)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  if kind is None and not causal or case == "mha-causal":  # and a float64 numpy reference
    np.testing.assert_allclose(
        got, reference.attention(q * scale * np.sqrt(h), k, v,
                                 jnp.tril(jnp.ones((l, s), bool)) if causal else None),
        rtol=1e-5, atol=1e-5)
  grads = jax.jit(jax.grad(functools.partial(loss, cpu_attention.flash_attention),
                           argnums=(0, 1, 2)))(q, k, v)
  want_grads = jax.grad(functools.partial(loss, _naive), argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip("qkv", grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-5, err_msg=f"d{name}")
  if kind == "empty-rows":
    assert not np.any(got[0, [0, 5, 64]]) and not np.any(grads[0][0, [0, 5, 64]])


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_matches_naive_attention_with_the_kernels_draws(rate):
  """The kernel's dropout equals naive attention with `dropout_keep_mask`'s draws (numpy,
  written apart from the C++), forward and backward; the draws keep 1 - rate."""
  b, l, n, kv_heads, h = 2, 130, 6, 2, 16
  rng = np.random.default_rng(7)
  q, d_out = _normal(rng, (b, l, n, h)), _normal(rng, (b, l, n, h))
  k, v = _normal(rng, (b, l, kv_heads, h)), _normal(rng, (b, l, kv_heads, h))
  mask, key = _mask("segments", rng, b, l, l), jax.random.key(11)
  keep = cpu_attention.dropout_keep_mask(cpu_attention.dropout_seed(key), rate, b, n, l, l)
  assert abs(keep.mean() - (1 - rate)) < 0.01
  assert 0.5 < (keep[0, 0] == keep[0, 1]).mean() < 0.95  # heads draw apart (~rate^2+...)

  def flash(q, k, v):
    return cpu_attention.flash_attention(q, k, v, mask, 0.3, True, rate, key)

  def naive(q, k, v):
    return _naive(q, k, v, mask, 0.3, True, keep, rate)
  np.testing.assert_allclose(jax.jit(flash)(q, k, v), naive(q, k, v), rtol=1e-5, atol=1e-5)
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) * d_out)
  got = jax.jit(jax.grad(loss(flash), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(naive), argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip("qkv", got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-5, err_msg=f"d{name}")
  other = cpu_attention.flash_attention(q, k, v, mask, 0.3, True, rate, jax.random.key(12))
  assert not np.allclose(other, flash(q, k, v))
  np.testing.assert_array_equal(  # rate 0: the key is ignored
      cpu_attention.flash_attention(q, k, v, mask, 0.3, True, 0.0, key),
      cpu_attention.flash_attention(q, k, v, mask, 0.3, True))
  with pytest.raises(ValueError, match="needs a dropout_rng"):
    cpu_attention.flash_attention(q, k, v, mask, 0.3, True, rate)


def test_bfloat16_inputs_are_computed_in_float32():
  rng = np.random.default_rng(0)
  q, k, v = (_normal(rng, (2, 40, 4, 16)).astype(jnp.bfloat16) for _ in range(3))
  out = cpu_attention.flash_attention(q, k, v, None, 0.25, True)
  assert out.dtype == jnp.float32
  want = _naive(*(a.astype(jnp.float32) for a in (q, k, v)), None, 0.25, True)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda q: cpu_attention.flash_attention(q, k, v, None, 0.25, True).sum())(q)
  assert grads.dtype == jnp.bfloat16


def _model_loss(cfg, params, tokens, **kw):
  logits = Transformer(cfg).apply({"params": params}, tokens, **kw)
  return jnp.sum(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 5])


@pytest.mark.parametrize("name", ["tiny", "tiny-llama", "bert-tiny", "t5-tiny"])
def test_model_with_cpu_flash_matches_einsum(name):
  """Same logits and gradients as the einsum path, and the kernel is really in the graph
  (T5 keeps einsum for its biased self-attention; its cross-attention takes the kernel)."""
  cfg = get_preset(name, max_len=128)
  rng = np.random.default_rng(1)
  tokens = rng.integers(1, 128, size=(2, 70)).astype(np.int32)
  kw = {}
  if cfg.arch == "encoder_decoder":
    kw["encoder_tokens"] = rng.integers(1, 128, size=(2, 33)).astype(np.int32)
  params = reference.random_params(Transformer(cfg), tokens, std=0.1, **kw)
  flash = cfg.replace(attention_impl="cpu_flash")
  assert "llmjax_flash_attention_fwd" in str(jax.make_jaxpr(
      functools.partial(_model_loss, flash, tokens=tokens, **kw))(params))
  for fn in (_model_loss, jax.grad(_model_loss, argnums=1)):
    want = jax.jit(functools.partial(fn, cfg, tokens=tokens, **kw))(params)
    got = jax.jit(functools.partial(fn, flash, tokens=tokens, **kw))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), got, want)


def test_model_dropout_is_drawn_in_the_kernel():
  """attention_dropout_rate with cpu_flash: the kernel draws it (in the graph, no
  fallback), the same 'dropout' key gives the same result and another key another."""
  cfg = get_preset("tiny", max_len=128, dropout_rate=0.0, attention_dropout_rate=0.2,
                   attention_impl="cpu_flash")
  tokens = np.random.default_rng(4).integers(1, 128, size=(2, 70)).astype(np.int32)
  params = reference.random_params(Transformer(cfg), tokens, std=0.1)

  def loss(params, key, deterministic=False):
    return _model_loss(cfg, params, tokens, deterministic=deterministic,
                       rngs={"dropout": key})
  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params, jax.random.key(0)))
  assert "llmjax_flash_attention_bwd" in jaxpr and "('dropout_rate', np.float32(0.2))" in jaxpr
  step = jax.jit(loss, static_argnums=2)
  first, again = step(params, jax.random.key(0)), step(params, jax.random.key(0))
  assert first == again
  assert first != step(params, jax.random.key(1))
  assert first != step(params, jax.random.key(0), True)


def test_attention_dropout_on_the_einsum_fallback():
  """Where the kernel cannot run (here: T5's biased self-attention) `AttentionDropout`
  is ordinary dropout: zeros at ~rate, kept values scaled by 1/(1-rate), chunks apart."""
  drop = attention.AttentionDropout(0.3, jax.random.key(3))
  out = np.asarray(drop(jnp.ones((4, 64, 64))))
  np.testing.assert_allclose(np.unique(out), [0.0, 1 / 0.7], rtol=1e-6)
  assert abs((out == 0).mean() - 0.3) < 0.02
  assert not np.array_equal(out[:, :32, :32] == 0, np.asarray(drop(jnp.ones((4, 32, 32)))) == 0)
  cfg = get_preset("t5-tiny", max_len=128, dropout_rate=0.0, attention_dropout_rate=0.2,
                   attention_impl="cpu_flash")
  rng = np.random.default_rng(5)
  tokens = rng.integers(1, 128, size=(2, 40)).astype(np.int32)
  kw = {"encoder_tokens": rng.integers(1, 128, size=(2, 33)).astype(np.int32)}
  params = reference.random_params(Transformer(cfg), tokens, std=0.1, **kw)
  train = _model_loss(cfg, params, tokens, deterministic=False,
                      rngs={"dropout": jax.random.key(0)}, **kw)
  assert np.isfinite(train) and train != _model_loss(cfg, params, tokens, **kw)


def test_falls_back_to_einsum_with_function_dropout_and_for_decode_steps(caplog):
  rng = np.random.default_rng(2)
  q, k, v = (_normal(rng, (2, 8, 2, 4)) for _ in range(3))
  want = attention.dot_product_attention(q, k, v, causal=True)
  with caplog.at_level(logging.WARNING):
    got = attention.dot_product_attention(q, k, v, causal=True, impl="cpu_flash",
                                          dropout_fn=lambda p: p)
  # The identity dropout splits XLA's softmax fusion differently: float32 rounding only
  # (5e-8 apart on an AVX2-only EPYC; within 1e-6 on the AVX-512 machines of earlier CI).
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert "draws dropout itself" in caplog.text
  step = jax.make_jaxpr(lambda q: attention.dot_product_attention(q, k, v, impl="cpu_flash"))
  assert "ffi_call" not in str(step(q[:, :1]))             # one query: the einsum path


def test_build_caches_the_library_and_reports_what_failed(tmp_path, monkeypatch):
  first = cpu_attention.build(tmp_path)
  stamp = first.stat().st_mtime_ns
  assert cpu_attention.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
  broken = tmp_path / "broken.cc"
  broken.write_text("this is not C++\n")
  monkeypatch.setattr(cpu_attention, "SOURCE", broken)
  with pytest.raises(RuntimeError, match="building the CPU flash-attention kernel failed"):
    cpu_attention.build(tmp_path)
  assert not list(tmp_path.glob("tmp*"))                  # no half-written library left
  monkeypatch.setattr(cpu_attention.shutil, "which", lambda name: None)
  with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
    cpu_attention.build(tmp_path)


@pytest.mark.parametrize("rule_set,mesh_shape,local", [
    ("dp", (8, 1, 1), (1, 2)),           # [B, L, N, H] shard: batch 1 of 8, kv heads 2 of 2
    ("fsdp_tp", (2, 2, 2), (2, 1)),      # batch over data x fsdp, heads over tensor
])
def test_under_a_mesh_each_device_runs_its_own_shard(rule_set, mesh_shape, local):
  """Per-shard calls give one device's values and gradients, dropout draws included (each
  shard hashes its global batch rows and heads)."""
  rng = np.random.default_rng(3)
  q, k, v = _normal(rng, (8, 40, 4, 8)), _normal(rng, (8, 40, 2, 8)), _normal(rng, (8, 40, 2, 8))
  mask = jnp.asarray(rng.random((8, 1, 40, 40)) > 0.2)
  key = jax.random.key(5)

  def grads(q, k, v):
    fn = lambda *a: cpu_attention.flash_attention(*a, mask, 0.3, True, 0.25, key)
    return jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
  want = jax.jit(grads)(q, k, v)
  with jax.set_mesh(mesh_lib.make_mesh(*mesh_shape)), \
       nn.logical_axis_rules(rules_lib.get_rules(rule_set)):
    step = jax.jit(grads)
    got = step(q, k, v)
    hlo = step.lower(q, k, v).compile().as_text()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), got, want)
  calls = [line for line in hlo.splitlines() if "custom_call_target=\"llmjax_flash" in line]
  assert len(calls) == 2
  batch, kv_heads = local
  assert all(f"f32[{batch},40,{kv_heads},8]" in line for line in calls)  # k: the local shard


def test_without_a_compiler_the_model_warns_and_uses_einsum(tmp_path, monkeypatch, caplog):
  """An empty kernel cache and no compiler: `available()` is False with the README's
  warning, and cpu_flash attention gives the einsum path's result."""
  rng = np.random.default_rng(6)
  q, k, v = (_normal(rng, (2, 16, 2, 8)) for _ in range(3))
  want = attention.dot_product_attention(q, k, v, causal=True)
  monkeypatch.setenv("LLMJAX_KERNEL_CACHE", str(tmp_path))
  monkeypatch.setattr(cpu_attention.shutil, "which", lambda name: None)
  attention_impls._warn_once.cache_clear()
  cpu_attention.available.cache_clear()
  try:
    with caplog.at_level(logging.WARNING):
      assert not cpu_attention.available()
      got = attention.dot_product_attention(q, k, v, causal=True, impl="cpu_flash")
    assert ("attention_impl='cpu_flash' is not available, using XLA's attention: no C++ "
            "compiler found") in caplog.text
    np.testing.assert_array_equal(got, want)
  finally:
    monkeypatch.undo()
    cpu_attention.available.cache_clear()
    assert cpu_attention.available()  # the cached library again, registered anew
