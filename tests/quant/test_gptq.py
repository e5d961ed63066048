"""GPTQ (`llmjax.quant.gptq`): the Cholesky form equals Optimal Brain Surgeon's greedy
elimination written out with an explicit inverse Hessian (numpy, float64); with
uncorrelated inputs it is round-to-nearest exactly; on correlated inputs it lowers the
layer's output error; calibration statistics are X^T X of each layer's real inputs in
either layer layout; `llmjax quantize --algorithm=gptq` writes an int4 workdir that runs."""

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
from llmjax.quant import formats, gptq, ptq
from llmjax.quant.model import QuantizedModel
from llmjax.testing import reference


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


def test_hessians_are_each_layers_input_gram_in_both_layouts():
  model, params = reference.preset_model("tiny", std=0.05, scan_layers=True)
  tokens = np.random.default_rng(3).integers(3, 100, (2, 2, 8))
  got = gptq.hessians(model, params, tokens)
  flat_model, flat_params = gptq.calibration_model(model), unstack_layers(params)
  flat = gptq.hessians(flat_model, flat_params, tokens)
  assert len(flat) == len(got) + (model.config.num_layers - 1) * sum(
      v.ndim == 3 for v in got.values())
  for path, h in got.items():
    if h.ndim == 3:
      for i in range(model.config.num_layers):
        np.testing.assert_allclose(h[i], flat[path.replace("layers/", f"layers_{i}/")],
                                   rtol=1e-5, atol=1e-6)
  # The same sums by hand from each layer's inputs, kept whole.
  seen = {}

  def keep(call):
    seen.setdefault(call.path, []).append(np.asarray(
        gptq.input_rows(call.args[0], call.module.equation)))
    return call.proceed()

  with intercept(keep, layers=(Einsum,), methods=("__call__",)):
    for batch in tokens:
      flat_model.apply({"params": flat_params}, jnp.asarray(batch))
  for path, xs in seen.items():
    x = np.concatenate(xs).astype(np.float64)
    np.testing.assert_allclose(flat[path], x.T @ x / tokens.size, rtol=1e-4, atol=1e-6)


def test_quantize_params_gptq_lowers_each_layers_error(tmp_path):
  model, params = reference.preset_model("tiny", std=0.05, scan_layers=True)
  tokens = np.random.default_rng(4).integers(3, 100, (2, 4, 16))
  hessians = gptq.hessians(model, params, tokens)
  q_gptq, info = ptq.quantize_params(model, params, "int4", hessians, group_size=8,
                                     algorithm="gptq")
  q_rtn, _ = ptq.quantize_params(model, params, "int4", group_size=8)
  assert info["algorithm"] == "gptq" and set(info["layers"]) <= set(hessians)
  wins = 0
  for path, layer in ptq.dense_layers(model).items():
    if path not in info["layers"]:
      continue
    float_w = ptq.node_at(params, path)["kernel"]
    errors = []
    for qp in (q_gptq, q_rtn):
      deq = ptq.dequantize_layer(ptq.layer_arrays(ptq.node_at(qp, path), "kernel"), layer)
      errors.append(sum(
          gptq.output_error(formats.to_rows(float_w[i], layer.axes),
                            formats.to_rows(deq[i], layer.axes), hessians[path][i])
          for i in range(model.config.num_layers)))
    wins += errors[0] < errors[1]
  assert wins == len(info["layers"])
  with pytest.raises(UserError, match="no calibration statistics"):
    ptq.quantize_params(model, params, "int4", {}, group_size=8, algorithm="gptq")
  with pytest.raises(UserError, match="--method=int4 with --algorithm=gptq"):
    ptq.QuantConfig(method="nf4", algorithm="gptq")


def test_cli_writes_an_int4_workdir_that_generates(fixture_run, data_dir, tmp_path, capsys):
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
  assert cli.main(["generate", f"--workdir={out}", "--prompt=ROMEO:", "--max_new_tokens=4",
                   "--temperature=0"]) == 0
  assert capsys.readouterr().out.startswith("ROMEO:")
