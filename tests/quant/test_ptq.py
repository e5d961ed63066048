"""Post-training quantization of whole models (`llmjax.quant.ptq`, `QuantizedModel`,
`llmjax quantize`): a quantized model computes what the float model with
dequantize(quantize(w)) kernels computes, W8A8 equals a numpy reference, scanned and
unscanned layouts agree, all three architectures run and decode, the checkpoint holds
only codes and scales and restores bit for bit, and generate / eval run from it."""

import functools
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import cli
from llmjax.checkpoint import manager as ckpt_lib
from llmjax.checkpoint.workdir import load_workdir
from llmjax.decode import generate as gen
from llmjax.decode.sampling import SamplingConfig
from llmjax.errors import UserError
from llmjax.layers.linear import Einsum
from llmjax.models.stack import unstack_layers
from llmjax.quant import model as quant_model
from llmjax.quant import ptq
from llmjax.quant.model import QuantizedModel
from llmjax.testing import reference, runs

GREEDY = SamplingConfig(temperature=0.0)
# RMS error of the logits relative to their RMS, quantized vs float (random N(0, 0.05)
# weights; measured 0.013-0.017 int8, 0.019-0.024 w8a8, 0.20-0.28 int4/nf4).
FLOAT_ERROR = {"int8": 0.04, "w8a8": 0.05, "int4": 0.4, "nf4": 0.4}


@functools.cache
def _model(preset, scan=True, std=0.05, **overrides):
  return reference.preset_model(preset, std=std, scan_layers=scan, **overrides)


def _inputs(cfg):
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 100, (2, 8)), jnp.int32)
  return tokens, ({"encoder_tokens": tokens[:, :6]} if cfg.arch == "encoder_decoder" else {})


@functools.partial(jax.jit, static_argnames=("net", "method"))
def _logits(net, params, tokens, kw, method=None):
  return net.apply({"params": params}, tokens, method=method, **kw)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean())


def _check_model(model, params, method, **opts):
  """Quantized logits == the dequantized float model's (float rounding), close to the
  float model's; returns (QuantizedModel, qparams)."""
  qparams, info = ptq.quantize_params(model, params, method, **opts)
  net = QuantizedModel(model, ptq.config_from_info(info))
  tokens, kw = _inputs(model.config)
  got = np.asarray(_logits(net, qparams, tokens, kw))
  deq = np.asarray(_logits(model, ptq.dequantized_params(model, qparams), tokens, kw))
  ref = np.asarray(_logits(model, params, tokens, kw))
  if method == "w8a8":  # the activations are quantized too: close, not equal
    assert _rel(got, deq) < 0.03
  else:
    np.testing.assert_allclose(got, deq, rtol=1e-5, atol=2e-6 * np.abs(deq).max())
  assert _rel(got, ref) < FLOAT_ERROR[method]
  assert _rel(deq, ref) > 1e-4  # the quantization did change the weights
  return net, qparams, info


@pytest.mark.parametrize("method,opts", [
    ("int8", {}), ("int4", {"group_size": 32}), ("nf4", {"double_quant": True}),
    ("w8a8", {})])
def test_untied_decoder_all_layers(method, opts):
  model, params = _model("tiny-llama")
  _, qparams, info = _check_model(model, params, method, include_embed=True,
                                  include_head=True, **opts)
  assert info["float_layers"] == [] and "lm_head" in info["layers"]
  assert "embedding" not in qparams["embed"] and "kernel" not in qparams["lm_head"]


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_tied_unscanned_decoder_keeps_embedding_float_by_default(method):
  model, params = _model("tiny", scan=False)
  _, qparams, info = _check_model(model, params, method)
  assert info["float_layers"] == ["embed"] and len(info["layers"]) == 12  # 2 x (4 + 2)
  np.testing.assert_array_equal(qparams["embed"]["embedding"], params["embed"]["embedding"])
  _check_model(model, params, method, include_embed=True)  # lookup and tied logits


def test_w8a8_layer_equals_a_numpy_reference():
  eq, shape = "BLNH,NHD->BLD", (3, 8, 24)  # the output projection: two contracted axes
  rng = np.random.default_rng(0)
  w = (rng.normal(size=shape) * 0.1).astype(np.float32)
  bias = rng.normal(size=(24,)).astype(np.float32)
  x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
  cfg = ptq.QuantConfig("w8a8")
  arrays = ptq.quantize_layer(w, ptq.Layer("out", "kernel", shape, (0, 1), eq), cfg)
  assert arrays["kernel_q"].dtype == np.int8 and arrays["kernel_scale"].shape == (1, 1, 24)
  net = QuantizedModel(Einsum(eq, shape, (None,) * 3, use_bias=True), cfg)
  got = jax.jit(net.apply)({"params": {**arrays, "bias": bias}}, x)
  # numpy: per-token scale over (N, H) in float32 as the quantizer, exact int64 sums.
  xs = np.abs(x).max(axis=(2, 3), keepdims=True) / np.float32(127)
  xq = np.clip(np.round(x / xs), -127, 127).astype(np.int64)
  acc = np.einsum("blnh,nhd->bld", xq, arrays["kernel_q"].astype(np.int64))
  want = acc * xs[..., 0, 0][..., None].astype(np.float64) * arrays["kernel_scale"].reshape(
      -1).astype(np.float64) + bias
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
  float_y = np.einsum("blnh,nhd->bld", x.astype(np.float64), w) + bias
  assert _rel(got, float_y) < 0.02


def test_scanned_quantization_unstacks_into_the_unscanned_one():
  model, params = _model("tiny-llama")
  flat_model = model.clone(config=model.config.replace(scan_layers=False))
  # NF4 flattens each layer's kernel into blocks (per-layer padding, a per-layer mean of
  # the double-quantized scales): the format most sensitive to the layout.
  stacked, _ = ptq.quantize_params(model, params, "nf4", block_size=48, double_quant=True)
  flat, info = ptq.quantize_params(flat_model, unstack_layers(params), "nf4", block_size=48,
                                   double_quant=True)
  got, want = runs.param_leaves(unstack_layers(stacked)), runs.param_leaves(flat)
  assert set(got) == set(want)
  assert "['decoder']['layers_1']['mlp']['wo']['kernel_absmax_mean']" in got
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  tokens, kw = _inputs(model.config)
  cfg = ptq.config_from_info(info)
  np.testing.assert_allclose(_logits(QuantizedModel(model, cfg), stacked, tokens, kw),
                             _logits(QuantizedModel(flat_model, cfg), flat, tokens, kw),
                             rtol=1e-5, atol=1e-6)


def _greedy(net, params, **kw):
  return gen.generate(net, params, [[5, 17, 99, 3], [7, 8]], max_new_tokens=5,
                      sampling=GREEDY, **kw).tokens


@pytest.mark.parametrize("preset,method", [("t5-tiny", "int8"), ("tiny", "int4")])
def test_cached_decoding_equals_the_dequantized_model(preset, method):
  model, params = _model(preset, std=0.5)
  qparams, info = ptq.quantize_params(model, params, method, group_size=16)
  net = QuantizedModel(model, ptq.config_from_info(info))
  kw = {"encoder_inputs": [[4, 9, 11], [12, 6, 3, 20]]} if preset == "t5-tiny" else {}
  tokens = _greedy(net, qparams, **kw)
  np.testing.assert_array_equal(tokens, _greedy(*quant_model.dequantized_model(net, qparams),
                                                **kw))


def test_encoder_only_with_a_classifier():
  model, params = _model("bert-tiny", num_classes=3)
  head = reference.random_params(model, np.ones((1, 8), np.int32), std=0.05, seed=1,
                                 method="classify")  # pooler and classifier too
  params = {**head, **params}
  layers = ptq.dense_layers(model)
  assert {"pooler", "classifier", "encoder/layers/mlp/wo"} <= set(layers)
  assert layers["encoder/layers/attention/out"].axes == (0, 1)  # 'BLNH,NHD->BLD'
  net, qparams, _ = _check_model(model, params, "int4", group_size=16, include_embed=True)
  tokens, kw = _inputs(model.config)
  got = _logits(net, qparams, tokens, kw, method="classify")
  deq = _logits(model, ptq.dequantized_params(model, qparams), tokens, kw, method="classify")
  np.testing.assert_allclose(got, deq, rtol=1e-5, atol=1e-6)


def _restored(workdir):
  ckpt = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"))
  params, meta = ckpt.restore_params()
  ckpt.close()
  return jax.tree.map(np.asarray, params), meta


@pytest.mark.parametrize("method,flags", [("int4", ["--group_size=8"]),
                                          ("nf4", ["--double_quant", "--block_size=32"])])
def test_checkpoint_holds_codes_and_scales_and_restores_bitwise(method, flags, fixture_run,
                                                                 tmp_path, capsys):
  out = str(tmp_path / method)
  assert cli.main(["quantize", f"--workdir={fixture_run}", f"--method={method}",
                   f"--output={out}", *flags]) == 0
  printed = capsys.readouterr().out
  assert "bits per parameter" in printed and "float: embed" in printed
  source, _ = _restored(fixture_run)
  qparams, meta = _restored(out)
  model, float_params, _ = load_workdir(fixture_run)
  opts = ({"group_size": 8} if method == "int4"
          else {"double_quant": True, "block_size": 32})
  want, info = ptq.quantize_params(model, float_params, method, **opts)
  assert meta["quantization"] == json.loads(json.dumps(info))
  assert meta["quantized_from"] == os.path.abspath(fixture_run)
  got, want = runs.param_leaves(qparams), runs.param_leaves(want)
  assert set(got) == set(want)
  for key, value in want.items():
    assert got[key].dtype == value.dtype, key
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  # Quantized layers hold uint8/int8 codes and float32 scales only (and their bias), and
  # no float array anywhere has a quantized kernel's shape.
  kernel_shapes = set()
  for path in info["layers"]:
    node = ptq.node_at(qparams, path)
    kernel_shapes.add(ptq.node_at(source, path)["kernel"].shape)
    for name, value in node.items():
      if name.endswith(("_q", "_packed")):
        assert value.dtype in (np.int8, np.uint8), (path, name)
      else:
        assert value.dtype == np.float32 and name.startswith(("kernel_", "bias")), (path, name)
  assert all(not (np.issubdtype(v.dtype, np.floating) and v.shape in kernel_shapes)
             for v in got.values())
  net, params, _ = load_workdir(out)
  assert isinstance(net, QuantizedModel) and net.quant.method == method
  tokens, kw = _inputs(net.config)
  np.testing.assert_allclose(_logits(net, params, tokens, kw),
                             _logits(*quant_model.dequantized_model(net, params), tokens, kw),
                             rtol=1e-5, atol=1e-6)


def test_quantize_then_generate_and_eval(fixture_run, data_dir, tmp_path, capsys):
  from llmjax.data import datasets
  from llmjax.eval import perplexity
  out = str(tmp_path / "int8")
  assert cli.main(["quantize", f"--workdir={fixture_run}", "--method=int8",
                   f"--output={out}"]) == 0
  assert "int8" in capsys.readouterr().out
  assert cli.main(["generate", f"--workdir={out}", "--prompt=ROMEO:", "--max_new_tokens=6",
                   "--temperature=0"]) == 0
  assert capsys.readouterr().out.startswith("ROMEO:")
  result = str(tmp_path / "eval.json")
  assert cli.main(["eval", f"--workdir={out}", "--dataset=shakespeare",
                   f"--data_dir={data_dir}", "--max_docs=2", "--context=16", "--stride=8",
                   f"--output={result}"]) == 0
  with open(result) as f:
    loss = json.load(f)["tasks"]["perplexity/shakespeare/validation"]["loss"]
  model, params, tok = load_workdir(fixture_run)
  texts = list(datasets.iter_texts("shakespeare", "validation", data_dir=data_dir))[:2]
  float_loss = perplexity.text_perplexity(model, params, tok, texts, context=16,
                                          stride=8)["loss"]
  assert loss == pytest.approx(float_loss, rel=0.02) and loss != float_loss


def _fails(argv, capsys, *fragments):
  capsys.readouterr()
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  for fragment in fragments:
    assert fragment in err, err


def test_bad_requests_are_one_message(fixture_run, tmp_path, capsys):
  q = ["quantize", f"--workdir={fixture_run}"]
  out = f"--output={tmp_path / 'q'}"
  _fails([*q, "--method=fp8", out], capsys, "unknown quantization method 'fp8'",
         "int8, int4, nf4, w8a8")
  _fails([*q, "--method=int4", "--group_size=12", out], capsys, "--group_size=12",
         "input width 16 of layer decoder/layers/attention/key", "[2, 4, 8, 16]")
  _fails([*q, "--method=int8", "--include_head", out], capsys, "ties its embeddings",
         "--include_embed")
  _fails([*q, "--method=int8", f"--output={fixture_run}"], capsys, "exists already")
  _fails(["quantize", f"--workdir={tmp_path}", "--method=int8", out], capsys,
         "has no checkpoint")
  assert not (tmp_path / "q").exists()
  assert cli.main([*q, "--method=int8", out]) == 0
  _fails(["quantize", f"--workdir={tmp_path / 'q'}", "--method=int4",
          f"--output={tmp_path / 'q2'}"], capsys, "is quantized already (int8")
  _fails(["generate", f"--workdir={tmp_path / 'q'}", "--adapter=default"], capsys,
         "drop --adapter")
  _fails(["convert", f"--workdir={tmp_path / 'q'}", f"--to_hf={tmp_path / 'hf'}"], capsys,
         "is quantized (int8)", "--to_hf writes float weights")
  _fails(["peft", "export", f"--workdir={tmp_path / 'q'}", f"--to_adapter={tmp_path / 'a'}"],
         capsys, "is quantized (int8)", "use the float workdir")
  assert not (tmp_path / "hf").exists() and not (tmp_path / "a").exists()
  # The reverse: a float checkpoint is not loaded as a quantized model.
  model, params, _ = load_workdir(fixture_run)
  with pytest.raises(UserError, match="this checkpoint is float"):
    quant_model.from_checkpoint(model, params, {"model_config": {}})
  with pytest.raises(UserError, match="says layer .* is quantized"):
    quant_model.from_checkpoint(model, params, {"quantization": {"method": "int8",
                                                                 "layers": ["lm_head"]}})
  net, qparams, _ = load_workdir(str(tmp_path / "q"))
  with pytest.raises(UserError, match="is quantized already"):
    ptq.quantize_params(model, qparams, "int4")
  with pytest.raises(UserError, match="for inference"):
    net.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))


def test_training_from_a_quantized_workdir_is_refused(fixture_run, data_dir, tmp_path, capsys):
  q = str(tmp_path / "q")
  assert cli.main(["quantize", f"--workdir={fixture_run}", "--method=nf4",
                   f"--output={q}"]) == 0
  capsys.readouterr()
  assert runs.warm_start_train(str(tmp_path / "tuned"), data_dir, q) == 2
  err = capsys.readouterr().err
  assert f"TrainConfig.init_from={q} is quantized (nf4)" in err and fixture_run in err
  assert runs.debug_train(q, data_dir, *runs.FIXTURE_SHAPE) == 2  # resuming it
  assert "is quantized (nf4); quantized checkpoints are for inference" in (
      capsys.readouterr().err)
  assert glob.glob(os.path.join(q, "checkpoints", "*")) == [os.path.join(q, "checkpoints", "0")]
