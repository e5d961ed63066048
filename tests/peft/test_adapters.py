"""Bottleneck adapters (`llmjax.peft.adapters`): the sublayer math against a float64 numpy
formula, step 0 equal to the base model on every architecture, placement, merging next
to LoRA, cached greedy decoding through the interceptors, metadata and bad configs."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llmjax import cli
from llmjax.checkpoint import manager as ckpt_lib
from llmjax.decode.generate import generate
from llmjax.decode.sampling import SamplingConfig
from llmjax.errors import UserError
from llmjax.layers.intercept import intercept
from llmjax.layers.linear import Einsum
from llmjax.peft import model as peft_lib
from llmjax.peft.adapters import AdapterConfig
from llmjax.peft.lora import LoraConfig
from llmjax.peft.model import PeftModel
from llmjax.testing import reference, runs

PRESETS = ("tiny", "tiny-llama", "bert-tiny", "t5-tiny")


@functools.cache
def _model(preset, scan):
  return reference.preset_model(preset, std=0.05, scan_layers=scan)


def _inputs(cfg):
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 100, (2, 8)), jnp.int32)
  return tokens, ({"encoder_tokens": tokens[:, :6]} if cfg.arch == "encoder_decoder" else {})


def _with_adapters(preset, configs, scan=False, up_value=0.0):
  """(PeftModel, base params, params: the base's weights, down kernels random, biases and
  up-projections `up_value` noise (0: the fresh adapter))."""
  model, base = _model(preset, scan)
  tokens, kw = _inputs(model.config)
  net = PeftModel(model, configs)
  shapes = nn.meta.unbox(jax.eval_shape(
      lambda: net.init(jax.random.PRNGKey(1), tokens, **kw))["params"])
  rng = np.random.default_rng(2)

  def new(name, shape):
    scale = 0.3 if name.startswith(("adapter_down_", "lora_a")) else up_value
    if name.startswith("adapter_down_bias"):
      scale = 0.1
    return jnp.asarray(scale * rng.normal(size=shape.shape), jnp.float32)

  def fill(tree, ref):
    return {k: fill(v, ref[k]) if isinstance(v, dict) else ref[k] if k in ref else
            new(k, v) for k, v in tree.items()}
  return net, base, fill(shapes, base)


def _names(params):
  return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}


def _numpy_adapter(y, down, down_bias, up, up_bias, activation):
  y, down, up = (np.asarray(t, np.float64) for t in (y, down, up))
  h = reference.ACTIVATIONS[activation](y @ down + np.asarray(down_bias, np.float64))
  return y + h @ up + np.asarray(up_bias, np.float64)


@pytest.mark.parametrize("preset,layer,activation", [
    ("tiny", "decoder/layers_1/mlp/wo", "gelu"),
    ("bert-tiny", "encoder/layers_0/attention/out", "relu"),           # post-norm
    ("t5-tiny", "decoder/layers_0/cross_attention/out", "silu")])
def test_sublayer_output_matches_numpy(preset, layer, activation):
  cfg = AdapterConfig(size=5, activation=activation)
  net, _, params = _with_adapters(preset, [cfg], up_value=0.2)
  tokens, kw = _inputs(net.config)
  seen = {}

  def record(call):  # entered outside PeftModel's interceptors: sees the adapted output
    seen["x"], seen["out"] = call.args[0], call.proceed()
    return seen["out"]

  with intercept(record, path=layer, layers=(Einsum,), methods=("__call__",)):
    net.apply({"params": params}, tokens, **kw)
  node = functools.reduce(lambda t, k: t[k], layer.split("/"), params)
  x, w = np.asarray(seen["x"], np.float64), np.asarray(node["kernel"], np.float64)
  y = np.tensordot(x, w, axes=w.ndim - 1) + np.asarray(node.get("bias", 0.0), np.float64)
  want = _numpy_adapter(y, *(node[n] for n in cfg.names()), activation)
  np.testing.assert_allclose(seen["out"], want, rtol=2e-5, atol=2e-5)
  assert np.abs(want - y).max() > 1e-2  # the adapter does something


@pytest.mark.parametrize("preset,placement", [(p, "both") for p in PRESETS] +
                         [("tiny-llama", "mlp"), ("t5-tiny", "attention")])
def test_fresh_adapter_is_the_base_model(preset, placement):
  # Unscanned: bitwise (see tests/peft/test_lora.py for why scanned is not).
  net, base, params = _with_adapters(preset, [AdapterConfig(placement=placement, size=4)])
  tokens, kw = _inputs(net.config)
  names = _names(params)
  cfg = net.config
  layers = cfg.num_layers + (cfg.num_encoder_layers if cfg.arch == "encoder_decoder" else 0)
  cross = cfg.num_layers if cfg.arch == "encoder_decoder" else 0
  expected = {"both": 2 * layers + cross, "mlp": layers, "attention": layers + cross}
  assert sum("adapter_up_default'" in n for n in names) == expected[placement]
  on_mlp = sum("mlp']['wo']['adapter_up_default'" in n for n in names)
  assert on_mlp == (layers if placement != "attention" else 0)
  np.testing.assert_array_equal(net.apply({"params": params}, tokens, **kw),
                                net.base.apply({"params": base}, tokens, **kw))


def test_merged_folds_lora_and_keeps_the_adapter():
  lora, adapter = LoraConfig(target="attention", rank=2), AdapterConfig(size=4, name="ad")
  net, _, params = _with_adapters("tiny-llama", [lora, adapter], scan=True, up_value=0.1)
  tokens, kw = _inputs(net.config)
  model, merged = net.merged(params)
  assert isinstance(model, PeftModel) and model.configs == (adapter,)
  names = _names(merged)
  assert not any("lora_" in n for n in names) and any("adapter_up_ad" in n for n in names)
  want = net.apply({"params": params}, tokens, **kw)
  np.testing.assert_allclose(model.apply({"params": merged}, tokens, **kw), want,
                             rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
  meta = {"peft": peft_lib.to_meta([lora, adapter])}
  assert [e["method"] for e in meta["peft"]] == ["lora", "adapter"]
  assert peft_lib.from_meta(meta["peft"]) == [lora, adapter]
  again, again_params = peft_lib.merged_model(net.base, params, meta)
  assert again == model and _names(again_params) == names
  with pytest.raises(UserError, match="AdapterConfig, which cannot be folded"):
    peft_lib.require_mergeable(meta)
  peft_lib.require_mergeable({"peft": peft_lib.to_meta([lora])})  # LoRA alone exports


def greedy_by_full_forward(net, params, prompts, steps):
  """Greedy continuations without a cache: the whole (right-padded) rows every step."""
  total = max(len(p) for p in prompts) + steps
  forward = jax.jit(lambda p, t: net.apply({"params": p}, t))
  rows = [list(p) for p in prompts]
  for _ in range(steps):
    logits = forward(params, jnp.asarray([r + [0] * (total - len(r)) for r in rows]))
    for i, row in enumerate(rows):
      row.append(int(jnp.argmax(logits[i, len(row) - 1])))
  return [r[len(p):] for r, p in zip(rows, prompts)]


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny"])
def test_cached_greedy_decoding_equals_full_forward(preset):
  net, base, params = _with_adapters(preset, [AdapterConfig(size=8)], scan=True, up_value=0.3)
  prompts = [[5, 9, 23, 7, 11], [42, 8]]                 # different lengths: left padding
  out = generate(net, params, prompts, max_new_tokens=6, sampling=SamplingConfig(0.0))
  assert out.rows() == greedy_by_full_forward(net, params, prompts, 6)
  tokens = jnp.asarray([prompts[0]])
  changed = net.apply({"params": params}, tokens) - net.base.apply({"params": base}, tokens)
  assert float(jnp.abs(changed).max()) > 0.1  # the adapter matters to these logits


def test_bad_configs_are_user_errors():
  with pytest.raises(UserError, match="size=0 must be a positive"):
    AdapterConfig(size=0)
  with pytest.raises(UserError, match="activation='tanh'"):
    AdapterConfig(activation="tanh")
  with pytest.raises(UserError, match="not one of"):
    AdapterConfig(placement="mlp/(wo")
  model, _ = _model("tiny", True)
  tokens, _ = _inputs(model.config)
  with pytest.raises(UserError, match=r"placement='ffn/down' .* matches no layer"):
    PeftModel(model, [AdapterConfig(placement="ffn/down")]).init(jax.random.PRNGKey(0), tokens)
  with pytest.raises(UserError, match="does not end in one feature axis"):
    PeftModel(model, [AdapterConfig(placement="attention/query")]).init(
        jax.random.PRNGKey(0), tokens)
  with pytest.raises(UserError, match="unknown PEFT method 'ia3'"):
    peft_lib.from_meta([{"method": "ia3"}])


def test_adapter_run_from_a_checkpoint(tmp_path, data_dir, capsys, fixture_run):
  """`--gin_file=peft/adapters.gin` on a warm start: the base stays bitwise the source's,
  only the adapters have optimizer state, generate runs them, convert --to_hf refuses."""
  source, work = fixture_run, str(tmp_path / "adapters")
  assert runs.warm_start_train(work, data_dir, source, "peft/adapters.gin", params=[
            "TrainConfig.num_steps=6", "TrainConfig.checkpoint_every=6",
            "OptimizerConfig.peak_lr=0.05", "AdapterConfig.size=4"]) == 0
  base = runs.param_leaves(
      ckpt_lib.CheckpointManager(os.path.join(source, "checkpoints")).read()[0]["params"])
  state, _, meta = ckpt_lib.CheckpointManager(os.path.join(work, "checkpoints")).read(6)
  tuned = runs.param_leaves(state["params"])
  adapter = {k: v for k, v in tuned.items() if "adapter_" in k}
  assert set(tuned) - set(adapter) == set(base)
  for key, value in base.items():  # the base: bitwise the source's after 6 steps
    np.testing.assert_array_equal(tuned[key], value, err_msg=key)
  assert len(adapter) == 8  # 4 parameters after attention/out and mlp/wo (scanned)
  assert all(np.abs(v).max() > 0 for k, v in adapter.items() if "adapter_up_" in k)
  moments = [x for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0]
  assert sum(np.size(x) for x in moments) == 2 * sum(v.size for v in adapter.values())
  assert meta["peft"] == [{"method": "adapter", "placement": "both", "size": 4,
                           "activation": "gelu", "name": "default"}]

  capsys.readouterr()
  args = ["--prompt=ROMEO:", "--max_new_tokens=8", "--temperature=0"]
  assert cli.main(["generate", f"--workdir={work}", *args]) == 0
  tuned_text = capsys.readouterr().out
  assert cli.main(["generate", f"--workdir={source}", *args]) == 0
  assert tuned_text.startswith("ROMEO:") and tuned_text != capsys.readouterr().out
  assert cli.main(["convert", f"--workdir={work}", f"--to_hf={tmp_path / 'hf'}"]) == 2
  assert "AdapterConfig, which cannot be folded" in capsys.readouterr().err
  assert not (tmp_path / "hf").exists()
