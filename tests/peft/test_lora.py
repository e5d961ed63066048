"""LoRA and DoRA (`llmjax.peft`): the math against a float64 numpy formula, step 0 equal
to the base model, merge == unmerged, merge/unmerge inverses, and the bad configs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llmjax.errors import UserError
from llmjax.layers.linear import Einsum
from llmjax.peft import lora as lora_lib
from llmjax.peft.model import PeftModel
from llmjax.testing import reference

PRESETS = ("tiny", "tiny-llama", "bert-tiny", "t5-tiny")


def _numpy_layer(x, w, bias, a, b, m, scale, contract):
  """y for an `Einsum` with a LoRA/DoRA adapter, float64, kernels flattened to 2-D:
  `W [in, out]`, `A [in, r]`, `B [r, out]` (DoRA: the magnitude is ||W||_col + m)."""
  x, w, a, b = (np.asarray(t, np.float64) for t in (x, w, a, b))
  fan_in = int(np.prod(w.shape[:contract]))
  x2, w2 = x.reshape(-1, fan_in), w.reshape(fan_in, -1)
  a2, b2 = a.reshape(fan_in, -1), b.reshape(b.shape[0], -1)
  adapted = w2 + scale * a2 @ b2
  y = x2 @ adapted
  if m is not None:
    norm = lambda k: np.sqrt((k ** 2).sum(0))
    y = y * (norm(w2) + np.asarray(m, np.float64).reshape(-1)) / norm(adapted)
  if bias is not None:
    y = y + np.asarray(bias, np.float64).reshape(-1)
  return y.reshape(x.shape[:-contract] + w.shape[contract:])


@pytest.mark.parametrize("equation,shape,dora,rslora", [
    ("BLD,DNH->BLNH", (12, 3, 4), False, False),    # a query projection
    ("BLNH,NHD->BLD", (3, 4, 10), True, False),      # the output projection (2 dims in)
    ("BLD,DF->BLF", (12, 16), True, True)])          # an MLP layer
def test_layer_math_matches_numpy(equation, shape, dora, rslora):
  cfg = lora_lib.LoraConfig(target=".*", rank=3, alpha=5.0, dora=dora, rslora=rslora)
  layer = Einsum(equation, shape, (None,) * len(shape), use_bias=True)
  contract = len(lora_lib.split_equation(equation)[3])
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5) + shape[:contract]),
                  jnp.float32)
  net = PeftModel(layer, [cfg])
  params = nn.meta.unbox(net.init(jax.random.PRNGKey(0), x)["params"])
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  got = net.apply({"params": params}, x)
  a, b, m = (params.get(n) for n in cfg.names())
  want = _numpy_layer(x, params["kernel"], params["bias"], a, b, m, cfg.scale, contract)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  assert cfg.scale == (5.0 / np.sqrt(3) if rslora else 5.0 / 3)


@functools.cache
def _model(preset, scan):
  return reference.preset_model(preset, std=0.05, scan_layers=scan)


def _inputs(cfg):
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 100, (2, 8)), jnp.int32)
  return tokens, ({"encoder_tokens": tokens[:, :6]} if cfg.arch == "encoder_decoder" else {})


def _with_adapter(preset, config, scan=True, b_value=0.0):
  """(PeftModel, base params, params with the base's weights and a fresh adapter)."""
  model, base = _model(preset, scan)
  tokens, kw = _inputs(model.config)
  net = PeftModel(model, [config])
  shapes = nn.meta.unbox(jax.eval_shape(
      lambda: net.init(jax.random.PRNGKey(1), tokens, **kw))["params"])
  rng = np.random.default_rng(2)

  def adapter(name, shape):  # A random, B and DoRA's m zeros plus b_value noise
    scale = 0.3 if name.startswith("lora_a") else b_value
    return jnp.asarray(scale * rng.normal(size=shape.shape), jnp.float32)

  def fill(tree, ref):
    return {k: fill(v, ref[k]) if isinstance(v, dict) else ref[k] if k in ref else
            adapter(k, v) for k, v in tree.items()}
  return net, base, fill(shapes, base)


CASES = [(p, False) for p in PRESETS] + [("tiny-llama", True), ("bert-tiny", True)]


@pytest.mark.parametrize("preset,dora", CASES)
def test_fresh_adapter_is_the_base_model(preset, dora):
  # Unscanned: bitwise (scanned layers compile the body as one XLA computation, whose
  # fusion may round the unchanged product differently: within 1e-5 there).
  config = lora_lib.LoraConfig(target="all_linear", rank=4, dora=dora)
  net, base, params = _with_adapter(preset, config, scan=False)
  tokens, kw = _inputs(net.config)
  names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert sum("lora_a_default" in n for n in names) >= 2 * net.config.num_layers
  np.testing.assert_array_equal(net.apply({"params": params}, tokens, **kw),
                                net.base.apply({"params": base}, tokens, **kw))


@pytest.mark.parametrize("preset,dora", CASES[:3] + [("t5-tiny", True), ("tiny", True)])
def test_merged_equals_unmerged_and_unmerge_inverts(preset, dora):
  config = lora_lib.LoraConfig(target="all_linear", rank=4, alpha=8.0, dora=dora)
  net, base, params = _with_adapter(preset, config, b_value=0.05)
  tokens, kw = _inputs(net.config)
  unmerged = net.apply({"params": params}, tokens, **kw)
  model, merged = net.merged(params)
  assert not any("lora" in jax.tree_util.keystr(p)
                 for p, _ in jax.tree_util.tree_flatten_with_path(merged)[0])
  got = model.apply({"params": merged}, tokens, **kw)
  changed = float(jnp.abs(unmerged - model.apply({"params": base}, tokens, **kw)).max())
  assert changed > 1e-2                                        # the adapter does something
  np.testing.assert_allclose(got, unmerged, rtol=1e-5, atol=1e-5 * float(jnp.abs(got).max()))
  eqs = net.equations(tokens, **kw)
  with pytest.raises(UserError, match="already merged"):
    lora_lib.merge(merged, config, eqs)
  if dora:
    with pytest.raises(UserError, match="cannot be unmerged"):
      lora_lib.unmerge(merged, lora_lib.adapter_params(params, config), config, eqs)
    return
  back = lora_lib.unmerge(merged, lora_lib.adapter_params(params, config), config, eqs)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), back, params)


def test_bad_configs_are_user_errors():
  with pytest.raises(UserError, match="rank=0 must be a positive"):
    lora_lib.LoraConfig(rank=0)
  with pytest.raises(UserError, match="not a preset"):
    lora_lib.LoraConfig(target="attention/(query")
  model, _ = _model("tiny", True)
  tokens, _ = _inputs(model.config)
  with pytest.raises(UserError, match=r"matches no layer; the dense layers are: .*attention/query"):
    PeftModel(model, [lora_lib.LoraConfig(target="attn/q_proj")]).init(
        jax.random.PRNGKey(0), tokens)
  with pytest.raises(UserError, match="exceeds the layer"):
    PeftModel(model, [lora_lib.LoraConfig(rank=10_000)]).init(jax.random.PRNGKey(0), tokens)
