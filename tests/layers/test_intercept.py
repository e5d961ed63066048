"""`layers.intercept`: an interceptor sees (and can change) every product with a weight,
for all three architectures, in training, prefill and cached decoding, with fused q/k/v
on and off."""

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.decode import cache as cache_lib
from llmjax.decode import generate
from llmjax.layers import intercept
from llmjax.models.transformer import Transformer
from llmjax.testing import reference

PRESETS = ("tiny", "tiny-llama", "bert-tiny", "t5-tiny")


def _module_paths(params, leaf):
  """Paths of the modules in `params` that hold a parameter named `leaf`."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  names = ["/".join(str(k.key) for k in path) for path, _ in flat]
  return {n.rsplit("/", 1)[0] for n in names if n.endswith("/" + leaf)}


def _products(params, cfg):
  """Every (path, method) that computes with a weight in a full forward pass."""
  want = {(p, "__call__") for p in _module_paths(params, "kernel")}
  want -= {(p, "__call__") for p in ("pooler", "classifier")}  # classify() only
  want.add(("embed", "attend" if cfg.tie_embeddings else "__call__"))
  return want


def _counting():
  seen = collections.Counter()

  def count(call):
    seen[(call.path, call.method)] += 1
    return call.proceed()

  return seen, count


def _inputs(cfg):
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 100, (2, 8)), jnp.int32)
  kw = {"encoder_tokens": tokens[:, :6]} if cfg.arch == "encoder_decoder" else {}
  return tokens, kw


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", PRESETS)
def test_counter_sees_every_product_in_training(name, fused):
  model, params = reference.preset_model(name, std=0.1)
  model = Transformer(model.config.replace(fused_qkv=fused, dropout_rate=0.1))
  tokens, kw = _inputs(model.config)
  seen, count = _counting()

  def loss(p):
    with intercept.intercept(count):
      logits = model.apply({"params": p}, tokens, deterministic=False,
                           rngs={"dropout": jax.random.key(1)}, **kw)
    return jnp.sum(logits)

  jax.eval_shape(jax.grad(loss), params)
  want = _products(params, model.config)
  assert want <= set(seen), sorted(want - set(seen))
  # q, k and v are each seen once per traced layer, fused or not
  queries = [k for k in seen if k[0].endswith("attention/query")]
  assert queries and all(seen[q] == seen[(q[0][:-5] + "key", q[1])] for q in queries)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", ["tiny", "tiny-llama", "t5-tiny"])
def test_counter_sees_every_product_in_prefill_and_cached_steps(name, fused):
  model, params = reference.preset_model(name, std=0.1)
  model, params = generate.decoding_model(
      Transformer(model.config.replace(fused_qkv=fused)), params)
  cfg = model.config
  tokens, valid, positions = cache_lib.left_pad([[5, 6, 7], [8, 9]])
  encoded = encoder_valid = None
  if cfg.arch == "encoder_decoder":
    encoded, encoder_valid = generate.encode_inputs(model, params, [[4, 5, 6], [7, 8]])
  decoder = {p for p in _products(params, cfg) if not p[0].startswith("encoder")}

  seen, count = _counting()
  with intercept.intercept(count):
    jax.eval_shape(lambda p: generate.prefill(model, p, tokens, valid, positions, 8, encoded,
                                              encoder_valid), params)
  assert decoder <= set(seen), sorted(decoder - set(seen))

  _, cache = generate.prefill(model, params, tokens, valid, positions, 8, encoded,
                              encoder_valid)
  seen, count = _counting()
  with intercept.intercept(count):
    jax.eval_shape(lambda p, c: model.apply({"params": p}, tokens[:, :1], positions[:, -1:] + 1,
                                            c, method=Transformer.decode_cached), params, cache)
  # a step reads the cross-attention keys/values from the cache: no key/value products
  step = {p for p in decoder if not p[0].endswith(("cross_attention/key",
                                                   "cross_attention/value"))}
  assert step <= set(seen), sorted(step - set(seen))
  assert not {p for p in seen if p[0].endswith("cross_attention/key")}


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_interceptors_change_fused_and_separate_projections_alike(name):
  """A layer-level change (input scaled, kernel rounded, output shifted) gives the same
  logits whether q/k/v are fused or not, and differs from the plain model."""
  model, params = reference.preset_model(name, std=0.1)
  tokens, _ = _inputs(model.config)

  def scale_input(call):
    return call.proceed(call.args[0] * 2.0, *call.args[1:], **call.kwargs)

  def round_kernel(call):
    kernel, bias = call.proceed()
    return jnp.round(kernel * 8) / 8, bias

  def shift_output(call):
    return call.proceed() + 0.5

  plain = model.apply({"params": params}, tokens)
  for fn, methods in ((scale_input, ("__call__",)), (round_kernel, ("weights",)),
                      (shift_output, ("__call__",))):
    outs = []
    for fused in (True, False):
      m = Transformer(model.config.replace(fused_qkv=fused))
      with intercept.intercept(fn, path="*/attention/value", methods=methods):
        outs.append(np.asarray(m.apply({"params": params}, tokens)))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert np.abs(outs[0] - np.asarray(plain)).max() > 1e-3, fn.__name__


def test_interceptor_adds_parameters_and_path_selection():
  """A LoRA-shaped interceptor creates its own parameters beside each selected kernel
  (zero-initialized B: the output is unchanged until they train); a regex selects."""
  import re
  model, _ = reference.preset_model("tiny", std=0.1)
  tokens, _ = _inputs(model.config)

  def lora(call):
    kernel = call.module.kernel
    d_in, d_out = kernel.shape[0], int(np.prod(kernel.shape[1:]))
    a = call.module.param("lora_a", nn.initializers.normal(1.0), (d_in, 2))
    b = call.module.param("lora_b", nn.initializers.zeros, (2, d_out))
    x = call.args[0]
    delta = (x @ a @ b).reshape(call.proceed().shape)
    return call.proceed() + delta

  with intercept.intercept(lora, path=re.compile(r"attention/(query|value)$")):
    variables = model.init(jax.random.key(0), tokens)
    out = model.apply({"params": variables["params"]}, tokens)
  got = _module_paths(nn.meta.unbox(variables["params"]), "lora_a")
  assert got == {"decoder/layers/attention/query", "decoder/layers/attention/value"}
  without = jax.tree.map(lambda a: a, nn.meta.unbox(variables["params"]))
  for name in ("query", "value"):
    for leaf in ("lora_a", "lora_b"):
      del without["decoder"]["layers"]["attention"][name][leaf]
  np.testing.assert_allclose(np.asarray(out),
                             np.asarray(model.apply({"params": without}, tokens)), atol=1e-6)
