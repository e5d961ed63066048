"""Calibrated int4 (`llmjax.quant.gptq`, `awq`, `calibration`). GPTQ's Cholesky form equals
Optimal Brain Surgeon's greedy elimination written out with an explicit inverse Hessian
(numpy, float64); with uncorrelated inputs it is round-to-nearest exactly; on correlated
inputs it lowers the layer's output error. AWQ at alpha 0 is RTN and its search never
does worse, and much better where a few input features dominate. Calibration statistics
are those of each layer's real inputs in either layer layout; `llmjax quantize
--algorithm=gptq|awq` writes int4 workdirs that run."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import cli
from llmjax.checkpoint import manager as ckpt_lib
from llmjax.checkpoint.workdir import load_workdir
from llmjax.errors import UserError
from llmjax.layers.intercept import intercept
from llmjax.layers.linear import Einsum
from llmjax.models.stack import unstack_layers
from llmjax.quant import awq, calibration, formats, gptq, ptq
from llmjax.quant import model as quant_model
from llmjax.quant.model import QuantizedModel
from llmjax.testing import reference


def model_apply(net, params, tokens):
  return net.apply({"params": params}, tokens)


def _obs_reference(w, hessian, group, damp=gptq.DAMP):
  """GPTQ's column order with OBS's update and an explicit inverse Hessian that loses one
  row and column per quantized column (Frantar & Alistarh 2022, eq. 3-4), float64."""
  w = np.array(w, np.float64)
  h = np.array(hessian, np.float64)
  h += damp * np.mean(np.diag(h)) * np.eye(len(h))
  h_inv = np.linalg.inv(h)
  m, k = w.shape
  codes, scales = np.zeros((m, k), np.int8), np.zeros((m, k // group))
  for i in range(k):
    if i % group == 0:
      s = np.abs(w[:, i:i + group]).max(axis=1) / 7
      scales[:, i // group] = s
    q = np.clip(np.round(w[:, i] / np.where(s == 0, 1, s)), -7, 7)
    codes[:, i] = q
    err = (w[:, i] - q * s) / h_inv[i, i]
    w[:, i + 1:] -= np.outer(err, h_inv[i, i + 1:])
    h_inv = h_inv - np.outer(h_inv[:, i], h_inv[i, :]) / h_inv[i, i]  # eliminate input i
  return codes, scales


def _correlated(rng, tokens, k):
  """Inputs with strongly correlated features (a random mixing of a few factors)."""
  base = rng.normal(size=(tokens, k // 4)) @ rng.normal(size=(k // 4, k))
  return base + 0.1 * rng.normal(size=(tokens, k))


def test_cholesky_form_equals_obs_with_an_explicit_inverse():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(12, 32)).astype(np.float32)
  x = _correlated(rng, 256, 32)
  h = (x.T @ x / len(x)).astype(np.float32)
  codes, scales = jax.device_get(gptq.gptq_rows(jnp.asarray(w), jnp.asarray(h), 16))
  want_codes, want_scales = _obs_reference(w, h, 16)
  np.testing.assert_array_equal(codes, want_codes)  # float32 vs float64: no code flips here
  np.testing.assert_allclose(scales, want_scales, rtol=1e-5)


def test_uncorrelated_inputs_give_round_to_nearest_exactly():
  w = np.random.default_rng(1).normal(size=(8, 64)).astype(np.float32)
  codes, scales = gptq.gptq_rows(jnp.asarray(w), 3.0 * jnp.eye(64), 16)
  rtn = formats.quantize_int4(w.T, axis=0, group_size=16)  # [K, M] kernel: rows are w
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(rtn.codes()))
  np.testing.assert_array_equal(np.asarray(scales), np.asarray(rtn.scale))


def test_lower_output_error_than_round_to_nearest():
  rng = np.random.default_rng(2)
  w = rng.normal(size=(32, 128)).astype(np.float32)
  x = _correlated(rng, 1024, 128)
  h = jnp.asarray(x.T @ x / len(x), jnp.float32)
  arrays = gptq.gptq_arrays(jnp.asarray(w), h, 32)
  got = ptq.from_arrays(arrays, (128, 32), (0,)).dequantize().T
  rtn = formats.quantize_int4(w.T, axis=0, group_size=32).dequantize().T
  assert gptq.output_error(w, got, h) < 0.7 * gptq.output_error(w, rtn, h)


def test_statistics_are_each_layers_inputs_in_both_layouts():
  model, params = reference.preset_model("tiny", std=0.05, scan_layers=True)
  tokens = np.random.default_rng(3).integers(3, 100, (2, 2, 8))
  got = calibration.collect(model, params, tokens)
  flat_model, flat_params = calibration.calibration_model(model), unstack_layers(params)
  flat = calibration.collect(flat_model, flat_params, tokens)
  assert len(flat) == len(got) + (model.config.num_layers - 1) * sum(
      v["hessian"].ndim == 3 for v in got.values())
  for path, stats in got.items():
    if stats["hessian"].ndim == 3:
      for i in range(model.config.num_layers):
        for key, value in stats.items():
          np.testing.assert_allclose(
              value[i], flat[path.replace("layers/", f"layers_{i}/")][key],
              rtol=1e-5, atol=1e-6)
  # The same sums by hand from each layer's inputs, kept whole.
  seen = {}

  def keep(call):
    seen.setdefault(call.path, []).append(np.asarray(
        calibration.input_rows(call.args[0], call.module.equation)))
    return call.proceed()

  with intercept(keep, layers=(Einsum,), methods=("__call__",)):
    for batch in tokens:
      flat_model.apply({"params": flat_params}, jnp.asarray(batch))
  for path, xs in seen.items():
    x = np.concatenate(xs).astype(np.float64)
    np.testing.assert_allclose(flat[path]["hessian"], x.T @ x / len(x), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(flat[path]["abs_mean"], np.abs(x).mean(0), rtol=1e-4,
                               atol=1e-6)


def test_awq_alpha_zero_is_round_to_nearest_and_its_search_never_worse():
  rng = np.random.default_rng(5)
  w = jnp.asarray(rng.normal(size=(16, 64)), jnp.float32)
  x = rng.normal(size=(512, 64)) * np.where(np.arange(64) % 16 == 3, 20.0, 1.0)  # salient
  h = jnp.asarray(x.T @ x / len(x), jnp.float32)
  abs_mean = jnp.asarray(np.abs(x).mean(0), jnp.float32)
  np.testing.assert_array_equal(awq.smooth_factors(abs_mean, 0.0), np.ones(64))
  rtn = formats.quantize_int4(w.T, axis=0, group_size=16).dequantize().T
  rtn_error = gptq.output_error(w, rtn, h)
  assert float(awq.output_error(w, h, abs_mean, 16, 0.0)) == pytest.approx(rtn_error, rel=1e-5)
  arrays = awq.awq_arrays(w, h, abs_mean, 16)
  t = ptq.from_arrays(arrays, (64, 16), (0,))
  assert t.smooth is not None and formats.packed_bytes(t) == 16 * 32 + 16 * 4 * 4 + 64 * 4
  got = t.dequantize().T
  # The smooth factors divide back exactly: the weight is codes * scale / s.
  manual = (t.codes().astype(np.float32).reshape(16, 4, 16) * np.asarray(t.scale)[..., None]
            ).reshape(16, 64) / np.asarray(arrays["smooth"])[None, :]
  np.testing.assert_allclose(got, manual, rtol=1e-6)
  assert gptq.output_error(w, got, h) < 0.8 * rtn_error


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_quantize_params_lowers_each_layers_output_error(algorithm):
  model, params = reference.preset_model("tiny", std=0.05, scan_layers=True)
  tokens = np.random.default_rng(4).integers(3, 100, (2, 4, 16))
  stats = calibration.collect(model, params, tokens)
  q_cal, info = ptq.quantize_params(model, params, "int4", stats, group_size=8,
                                    algorithm=algorithm)
  q_rtn, _ = ptq.quantize_params(model, params, "int4", group_size=8)
  assert info["algorithm"] == algorithm and set(info["layers"]) <= set(stats)
  wins = 0
  for path, layer in ptq.dense_layers(model).items():
    if path not in info["layers"]:
      continue
    float_w = ptq.node_at(params, path)["kernel"]
    errors = []
    for qp in (q_cal, q_rtn):
      deq = ptq.dequantize_layer(ptq.layer_arrays(ptq.node_at(qp, path), "kernel"), layer)
      errors.append(sum(
          gptq.output_error(formats.to_rows(float_w[i], layer.axes),
                            formats.to_rows(deq[i], layer.axes), stats[path]["hessian"][i])
          for i in range(model.config.num_layers)))
    wins += errors[0] <= errors[1]
  assert wins == len(info["layers"])
  with pytest.raises(UserError, match="no calibration statistics"):
    ptq.quantize_params(model, params, "int4", {}, group_size=8, algorithm=algorithm)
  with pytest.raises(UserError, match=f"--method=int4 with --algorithm={algorithm}"):
    ptq.QuantConfig(method="nf4", algorithm=algorithm)


def test_cli_writes_int4_workdirs_that_run(fixture_run, data_dir, tmp_path, capsys):
  out = str(tmp_path / "gptq")
  base = ["quantize", f"--workdir={fixture_run}", "--method=int4", "--group_size=8",
          "--algorithm=gptq", f"--data_dir={data_dir}"]
  capsys.readouterr()
  assert cli.main([*base, f"--output={out}"]) == 2  # no operative config: name a dataset
  assert "--calibration_dataset=NAME" in capsys.readouterr().err
  assert cli.main([*base, "--calibration_dataset=shakespeare", "--calibration_samples=99999",
                   f"--output={out}"]) == 2
  assert "pass a smaller --calibration_samples" in capsys.readouterr().err
  assert not os.path.exists(out)
  assert cli.main([*base, "--calibration_dataset=shakespeare", "--calibration_samples=4",
                   "--calibration_window=32", f"--output={out}"]) == 0
  assert "GPTQ" in capsys.readouterr().out
  net, _, _ = load_workdir(out)
  assert isinstance(net, QuantizedModel) and net.quant.method == "int4"
  ckpt = ckpt_lib.CheckpointManager(os.path.join(out, "checkpoints"))
  _, meta = ckpt.restore_params()
  ckpt.close()
  info = meta["quantization"]
  assert info["algorithm"] == "gptq" and info["calibration"]["windows"] == 4
  assert info["calibration"]["window"] == 32
  awq_out = str(tmp_path / "awq")
  assert cli.main([*base[:4], "--algorithm=awq", f"--data_dir={data_dir}",
                   "--calibration_dataset=shakespeare", "--calibration_samples=4",
                   "--calibration_window=32", f"--output={awq_out}"]) == 0
  assert "AWQ" in capsys.readouterr().out
  net, params, _ = load_workdir(awq_out)
  smooth = ptq.node_at(params, "decoder/layers/mlp/wi")["kernel_smooth"]
  assert smooth.shape == (net.config.num_layers, net.config.embed_dim)
  tokens = jnp.asarray([[5, 6, 7, 8]])
  np.testing.assert_allclose(net.apply({"params": params}, tokens),
                             model_apply(*quant_model.dequantized_model(net, params), tokens),
                             rtol=1e-5, atol=1e-6)
