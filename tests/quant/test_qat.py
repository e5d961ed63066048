"""Quantization-aware training (`llmjax.quant.qat`): the forward pass is the model with
PTQ's dequantize(quantize(w)) weights, the backward pass the straight-through estimator
(the float model's gradient at the fake-quantized weights), a QAT run's loss falls, and
`llmjax quantize` of the QAT workdir packs exactly the weights its forward pass used."""

import dataclasses
import functools

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import cli
from llmjax.checkpoint import manager as ckpt_lib
from llmjax.checkpoint.workdir import load_workdir
from llmjax.errors import UserError
from llmjax.peft.model import PeftModel
from llmjax.quant import ptq, qat
from llmjax.quant.matmul import quantize_activations
from llmjax.quant.model import QuantizedModel
from llmjax.quant.qlora import QloraConfig
from llmjax.testing import reference, runs
from llmjax.train import metrics

CONFIGS = [qat.QatConfig("int8"), qat.QatConfig("int4", group_size=16),
           qat.QatConfig("nf4", double_quant=True),
           qat.QatConfig("int8", include_embed=True, include_head=True)]


@functools.cache
def _model(preset="tiny-llama"):
  return reference.preset_model(preset, std=0.05)


def _tokens():
  return jnp.asarray(np.random.default_rng(0).integers(3, 100, (2, 8)), jnp.int32)


def _fake_quantized_params(model, params, cfg: qat.QatConfig):
  """The float tree whose weights are PTQ's dequantize(quantize(w)) (what QAT computes)."""
  q = cfg.quant
  qparams, _ = ptq.quantize_params(model, params, q.method, group_size=q.group_size,
                                   block_size=q.block_size, double_quant=q.double_quant,
                                   include_embed=q.include_embed, include_head=q.include_head)
  return ptq.dequantized_params(model, qparams)


def _loss(net, params, tokens):
  logits = net.apply({"params": params}, tokens)
  weights = jnp.sin(jnp.arange(logits.size, dtype=jnp.float32)).reshape(logits.shape)
  return jnp.sum(logits * weights)  # every logit with its own weight


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.method}-{c.include_embed}")
def test_forward_equals_the_dequantized_model(cfg):
  model, params = _model()
  tokens = _tokens()
  got = jax.jit(PeftModel(model, [cfg]).apply)({"params": params}, tokens)
  fq = _fake_quantized_params(model, params, cfg)
  want = jax.jit(model.apply)({"params": fq}, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(jnp.abs(want).max()))
  ref = jax.jit(model.apply)({"params": params}, tokens)
  assert float(jnp.abs(got - ref).max()) > 1e-4  # the fake quantization does change it


@pytest.mark.parametrize("cfg", CONFIGS[1:], ids=lambda c: f"{c.method}-{c.include_embed}")
def test_backward_is_the_straight_through_estimator(cfg):
  """dL/dw of the QAT model == dL/dw_q of the float model run at w_q = fq(w)."""
  model, params = _model()
  tokens = _tokens()
  got = jax.jit(jax.grad(functools.partial(_loss, PeftModel(model, [cfg]))))(params, tokens)
  fq = _fake_quantized_params(model, params, cfg)
  want = jax.jit(jax.grad(functools.partial(_loss, model)))(fq, tokens)
  at_float = jax.jit(jax.grad(functools.partial(_loss, model)))(params, tokens)
  got, want, at_float = (runs.param_leaves(t) for t in (got, want, at_float))
  assert set(got) == set(want)
  for key in want:
    scale = np.abs(want[key]).max()
    np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5 * scale, err_msg=key)
  kernel = "['decoder']['layers']['mlp']['wi_0']['kernel']"
  assert np.abs(at_float[kernel] - want[kernel]).max() > 1e-3 * np.abs(want[kernel]).max()


def test_straight_through_is_exact_forward_and_identity_backward():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 16)), jnp.float32)
  fq = qat.fake_quantize_input(x, (1,))
  xq, xs = quantize_activations(x, (1,))  # W8A8's per-token int8
  np.testing.assert_array_equal(fq, xq.astype(jnp.float32) * xs)  # bit for bit
  c = jnp.arange(48.0).reshape(3, 16)
  g = jax.grad(lambda v: jnp.sum(qat.fake_quantize_input(v, (1,)) * c))(x)
  np.testing.assert_array_equal(g, c)  # nothing clipped: the identity's gradient


def test_w8a8_qat_matches_the_packed_w8a8_model():
  model, params = _model()
  tokens = _tokens()
  cfg = qat.QatConfig("int8", activations=True)
  got = jax.jit(PeftModel(model, [cfg]).apply)({"params": params}, tokens)
  qparams, info = ptq.quantize_params(model, params, cfg.ptq_method)
  packed = jax.jit(QuantizedModel(model, ptq.config_from_info(info)).apply)(
      {"params": qparams}, tokens)
  np.testing.assert_allclose(got, packed, rtol=1e-4, atol=1e-5 * float(jnp.abs(packed).max()))


def test_bad_configs_are_one_message():
  with pytest.raises(UserError, match="W8A8 is method='int8' with activations=True"):
    qat.QatConfig("w8a8")
  with pytest.raises(UserError, match="must be positive"):
    qat.QatConfig("int4", group_size=0)
  model, params = _model()
  with pytest.raises(UserError, match="group_size=24"):
    PeftModel(model, [qat.QatConfig("int4", group_size=24)]).apply({"params": params},
                                                                  _tokens())


@pytest.mark.slow
def test_qat_run_then_quantize_packs_the_weights_its_forward_used(fixture_run, data_dir,
                                                                  tmp_path, capsys):
  work, out = str(tmp_path / "qat"), str(tmp_path / "packed")
  assert runs.warm_start_train(work, data_dir, fixture_run, "quant/qat_int4.gin", params=[
      "TrainConfig.num_steps=12", "TrainConfig.log_every=1", "TrainConfig.eval_every=12",
      "TrainConfig.checkpoint_every=12", "OptimizerConfig.peak_lr=0.01",
      "QatConfig.group_size=8"]) == 0
  losses = [r["loss"] for r in metrics.read_metrics(work) if "loss" in r]
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05, losses
  meta = ckpt_lib.CheckpointManager(f"{work}/checkpoints").read(12)[2]
  assert meta["peft"] == [{"method": "qat",
                           "config": dataclasses.asdict(qat.QatConfig("int4", group_size=8))}]

  capsys.readouterr()
  assert cli.main(["quantize", f"--workdir={work}", f"--output={out}"]) == 0  # QAT's method
  assert "int4 (group 8)" in capsys.readouterr().out
  net, params, tok = load_workdir(work)  # the QAT network: fake-quantized, as trained
  packed, qparams, _ = load_workdir(out)
  assert isinstance(packed, QuantizedModel) and packed.quant.group_size == 8
  tokens = jnp.asarray([tok.encode("ROMEO: and JULIET")[:16]], jnp.int32)
  want = jax.jit(net.apply)({"params": params}, tokens)
  got = jax.jit(packed.apply)({"params": qparams}, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
  base = jax.jit(net.base.apply)({"params": params}, tokens)  # the float shadow weights
  assert float(jnp.abs(base - want).max()) > 1e-4
  assert cli.main(["generate", f"--workdir={work}", "--prompt=ROMEO:", "--max_new_tokens=4",
                   "--temperature=0"]) == 0  # cached decoding through the fake quantization


@pytest.mark.parametrize("name", ["quant/qat_int8.gin", "quant/qat_int4.gin",
                                  "quant/qat_nf4.gin", "peft/qlora.gin"])
def test_gin_files_parse_and_build(name):
  from llmjax.models.transformer import Transformer
  from llmjax.train import main
  main.parse_gin(["runs/debug.gin", name], [])
  configs = [ref.scoped_configurable_fn() for ref in gin.query_parameter("train.peft")]
  assert any(isinstance(c, (qat.QatConfig, QloraConfig)) for c in configs)
  model = main.bound("model").replace(vocab_size=64)
  net = PeftModel(Transformer(model), configs)
  shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32))
  assert jax.tree.leaves(shapes)
