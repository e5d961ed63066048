"""`llmjax.quant` storage formats against float64 numpy references written here: int8
per channel, int4 group-wise, NF4 (+ double quantization, + bitsandbytes parity when it
is installed), the int8 products; all quantizers run under `jax.jit`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import quant
from llmjax.errors import UserError
from llmjax.quant.formats import pack_nibbles, unpack_nibbles

# QLoRA appendix E / bitsandbytes `get_4bit_type('nf4')`.
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
             0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def _normal(*shape, seed=0, std=1.0):
  return (np.random.default_rng(seed).normal(size=shape) * std).astype(np.float32)


def _jit(fn, **static):
  return jax.jit(functools.partial(fn, **static))


def _assert_rounded(codes, exact, tol=1e-4):
  """`codes == round-half-even(exact)` (float64 `exact`) wherever `exact` is not within
  `tol` of a rounding boundary, where float32 arithmetic may fairly differ; few are."""
  unclear = np.abs(np.abs(exact - np.floor(exact)) - 0.5) < tol
  assert unclear.mean() < 1e-2
  np.testing.assert_array_equal(np.asarray(codes)[~unclear], np.round(exact)[~unclear])


def _rows(w, axes):
  """numpy `[M, K]`: kept axes flattened into rows, contracted axes into columns."""
  keep = [a for a in range(w.ndim) if a not in axes]
  return np.transpose(w, keep + list(axes)).reshape(int(np.prod([w.shape[a] for a in keep])), -1)


@pytest.mark.parametrize("shape,axis", [((48, 24), 0), ((40, 3, 5), 0), ((3, 5, 40), (0, 1)),
                                        ((6, 40), -1)])
def test_int8_per_channel(shape, axis):
  w = _normal(*shape, std=0.3)
  t = _jit(quant.quantize_int8, axis=axis)(w)
  axes = (axis,) if isinstance(axis, int) else axis
  ref_scale = np.max(np.abs(w.astype(np.float64)), axis=axes, keepdims=True) / 127
  assert t.q.dtype == jnp.int8 and t.scale.dtype == jnp.float32
  assert t.q.shape == shape and t.scale.shape == ref_scale.shape
  np.testing.assert_allclose(t.scale, ref_scale, rtol=1e-7)
  scale = np.asarray(t.scale, np.float64)
  _assert_rounded(t.q, w / scale)
  err = np.abs(w - np.asarray(quant.dequantize(t), np.float64))
  assert np.all(err <= scale / 2 * (1 + 1e-6) + 1e-7 * np.abs(w))
  np.testing.assert_array_equal(_jit(quant.dequantize)(t), quant.dequantize(t))


def test_int8_rounds_half_to_even_and_keeps_zero_channels():
  # absmax 127 -> scale exactly 1, so w / scale are exact halves.
  col = np.array([127, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -127], np.float32)
  w = np.stack([col, np.zeros_like(col)], axis=1)  # [8, 2]; channel 1 is all zero
  t = _jit(quant.quantize_int8, axis=0)(w)
  np.testing.assert_array_equal(t.q[:, 0], [127, 0, 2, 2, 0, -2, 4, -127])
  np.testing.assert_array_equal(t.scale, [[1.0, 0.0]])
  np.testing.assert_array_equal(quant.dequantize(t)[:, 1], np.zeros(8))
  # int4 the same way: absmax 7 -> scale 1 (the first group), a zero second group.
  group = np.array([7, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -6.5], np.float32)
  t4 = _jit(quant.quantize_int4, axis=0, group_size=8)(np.concatenate([group, np.zeros(8)]))
  np.testing.assert_array_equal(t4.codes(), [[7, 0, 2, 2, 0, -2, 4, -6] + [0] * 8])
  np.testing.assert_array_equal(t4.scale, [[1.0, 0.0]])


def test_nibble_packing_is_lossless():
  codes = np.tile(np.arange(16, dtype=np.uint8), 4)  # every value in both nibbles
  codes = np.concatenate([codes, np.repeat(np.arange(16, dtype=np.uint8), 2)[::-1]])
  packed = jax.jit(pack_nibbles)(codes)
  assert packed.dtype == jnp.uint8 and packed.shape == (codes.size // 2,)
  np.testing.assert_array_equal(packed, codes[::2].astype(np.int64) * 16 + codes[1::2])
  np.testing.assert_array_equal(jax.jit(unpack_nibbles)(packed), codes)
  every_byte = np.arange(256, dtype=np.uint8)
  np.testing.assert_array_equal(pack_nibbles(unpack_nibbles(every_byte)), every_byte)


@pytest.mark.parametrize("shape,axis,group", [((64, 6), 0, 16), ((4, 8, 5), (0, 1), 8),
                                              ((5, 4, 8), (1, 2), 32)])
def test_int4_group_wise(shape, axis, group):
  w = _normal(*shape, seed=1)
  t = _jit(quant.quantize_int4, axis=axis, group_size=group)(w)
  axes = (axis,) if isinstance(axis, int) else axis
  rows = _rows(w.astype(np.float64), axes)  # [M, K]
  m, k = rows.shape
  groups = rows.reshape(m, k // group, group)
  ref_scale = np.max(np.abs(groups), axis=-1) / 7
  assert t.packed.dtype == jnp.uint8 and t.packed.shape == (m, k // 2)
  np.testing.assert_allclose(t.scale, ref_scale, rtol=1e-7)
  scale = np.asarray(t.scale, np.float64)[..., None]
  codes = np.asarray(t.codes()).reshape(m, k // group, group)
  assert codes.min() >= -7 and codes.max() <= 7
  _assert_rounded(codes, groups / scale)
  deq = np.asarray(quant.dequantize(t), np.float64)
  assert deq.shape == shape
  err = np.abs(groups - _rows(deq, axes).reshape(groups.shape))
  assert np.all(err <= scale / 2 * (1 + 1e-6) + 1e-7 * np.abs(groups))


@pytest.mark.parametrize("group", [64, 7, 0, 192])
def test_int4_bad_group_size_names_width_and_divisors(group):
  with pytest.raises(UserError, match=r"input width 96.*\[2, 4, 6, 8, 12, 16, 24, 32, 48, 96\]"):
    quant.quantize_int4(np.ones((32, 3, 4), np.float32), axis=(0, 1), group_size=group)


def test_bad_axes_and_mismatched_shapes_are_user_errors():
  w = np.ones((8, 4), np.float32)
  for axis in [2, (0, 0), (), (0, -2)]:
    with pytest.raises(UserError, match="contracted"):
      quant.quantize_int8(w, axis=axis)
  with pytest.raises(UserError, match=r"do not end with the weight's contracted dims \(8,\)"):
    quant.int8_weight_matmul(np.ones((2, 4), np.float32), quant.quantize_int8(w, axis=0))
  with pytest.raises(UserError, match="block_size=63"):
    quant.quantize_nf4(w, block_size=63)


def test_nf4_code_table_is_the_papers():
  np.testing.assert_array_equal(quant.NF4_CODE, np.array(PAPER_NF4, np.float32))
  assert quant.NF4_CODE.dtype == np.float32


def test_nf4_midpoints_take_the_lower_code():
  # absmax 1, so x * (1 / absmax) is exactly each float32 midpoint between two codes.
  table = np.array(PAPER_NF4, np.float32)
  mids = ((table[:-1] + table[1:]) / np.float32(2)).astype(np.float32)
  block = np.concatenate([[1.0], mids, np.zeros(64 - 16)]).astype(np.float32)
  codes = np.asarray(_jit(quant.quantize_nf4)(block).codes())
  np.testing.assert_array_equal(codes[1:16], np.arange(15))


def _nf4_reference_codes(flat, block):
  """Nearest NF4 index to x / absmax per block (float64 argmin), and where the two
  nearest codes are too close to call in float32."""
  blocks = np.pad(flat.astype(np.float64), (0, -flat.size % block)).reshape(-1, block)
  absmax = np.abs(blocks).max(axis=1, keepdims=True)
  x = blocks / np.where(absmax == 0, 1, absmax)
  dist = np.abs(x[..., None] - np.array(PAPER_NF4)[None, None, :])
  two = np.sort(dist, axis=-1)[..., :2]
  return np.argmin(dist, axis=-1).reshape(-1), (two[..., 1] - two[..., 0] < 1e-6).reshape(-1)


@pytest.mark.parametrize("shape,axis", [((32, 96), None), ((10, 13), None), ((96, 4, 8), 0)])
def test_nf4_codes_are_nearest(shape, axis):
  w = _normal(*shape, seed=2) * np.linspace(0.1, 3, shape[-1], dtype=np.float32)
  w[:2] = 0  # (32, 96): three all-zero blocks
  t = _jit(quant.quantize_nf4, block_size=64, axis=axis)(w)
  flat = (w if axis is None else _rows(w, (axis,))).reshape(-1)
  ref, unclear = _nf4_reference_codes(flat, 64)
  assert unclear.sum() <= 2
  codes = np.asarray(t.codes())
  assert codes.shape == ref.shape and t.packed.shape == (ref.size // 2,)
  np.testing.assert_array_equal(codes[~unclear], ref[~unclear])
  blocks = np.pad(flat, (0, -flat.size % 64)).reshape(-1, 64)
  np.testing.assert_array_equal(t.absmax, np.abs(blocks).max(axis=1))
  deq = np.asarray(quant.dequantize(t))
  assert deq.shape == shape
  expect = (np.array(PAPER_NF4, np.float32)[ref] * np.repeat(np.abs(blocks).max(axis=1), 64))
  expect = expect[:flat.size].reshape(-1)
  got = deq.reshape(-1) if axis is None else _rows(deq, (axis,)).reshape(-1)
  np.testing.assert_allclose(got[~unclear[:flat.size]], expect[~unclear[:flat.size]], rtol=1e-6)


def test_nf4_error_on_a_normal_matrix_matches_bitsandbytes_figure():
  w = _normal(1024, 1024, seed=3)
  err = np.abs(np.asarray(quant.dequantize(_jit(quant.quantize_nf4)(w)), np.float64) - w).mean()
  print(f"NF4 b=64 mean abs error on N(0,1) 1024x1024: {err:.6f}")
  assert abs(err - 0.0728) <= 2e-4  # bitsandbytes test_4bit_quant: 0.072798


def test_nf4_double_quantization():
  w = _normal(300 * 64, seed=4)  # 300 blocks: two second-level blocks, the last ragged
  plain = _jit(quant.quantize_nf4)(w)
  dq = _jit(quant.quantize_nf4, double_quant=True)(w)
  np.testing.assert_array_equal(dq.packed, plain.packed)  # codes chosen before compressing
  s = dq.absmax
  assert s.q.dtype == jnp.int8 and s.q.shape == (300,) and s.scale.shape == (2,)
  absmax = np.asarray(plain.absmax, np.float64)
  mean = absmax.mean()
  np.testing.assert_allclose(s.mean, mean, rtol=1e-6)
  centred = np.pad(absmax - mean, (0, 512 - 300)).reshape(2, 256)
  np.testing.assert_allclose(s.scale, np.abs(centred).max(axis=1) / 127, rtol=1e-6)
  step = np.repeat(np.asarray(s.scale, np.float64), 256)[:300]
  assert np.all(np.abs(np.asarray(dq.block_absmax(), np.float64) - absmax) <= step / 2 + 1e-6)


def test_bits_and_bytes_per_parameter():
  n = 1024 * 1024
  w = jax.ShapeDtypeStruct((1024, 1024), jnp.float32)
  plain = jax.eval_shape(quant.quantize_nf4, w)
  dq = jax.eval_shape(functools.partial(quant.quantize_nf4, double_quant=True), w)
  assert quant.bits_per_parameter(plain) == 4 + 32 / 64
  assert quant.bits_per_parameter(dq) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / n,
                                                       rel=1e-12)
  assert round(quant.bits_per_parameter(dq), 3) == 4.127
  i8 = jax.eval_shape(functools.partial(quant.quantize_int8, axis=0), w)
  assert quant.packed_bytes(i8) == n + 1024 * 4
  i4 = jax.eval_shape(functools.partial(quant.quantize_int4, axis=0, group_size=128), w)
  assert quant.packed_bytes(i4) == n // 2 + (n // 128) * 4
  assert quant.bits_per_parameter(i4) == 4 + 32 / 128


@pytest.mark.parametrize("x_shape,w_shape,axis,equation", [
    ((2, 3, 64), (64, 4, 8), 0, "bld,dnh->blnh"),
    ((2, 3, 4, 8), (4, 8, 16), (0, 1), "blnh,nhd->bld")])
def test_int8_weight_matmul_equals_dequantized_product(x_shape, w_shape, axis, equation):
  x, w = _normal(*x_shape, seed=5), _normal(*w_shape, seed=6, std=0.05)
  t = quant.quantize_int8(w, axis=axis)
  y = jax.jit(quant.int8_weight_matmul)(x, t)
  ref = np.einsum(equation, x.astype(np.float64), np.asarray(quant.dequantize(t), np.float64))
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_w8a8_int8_matmul():
  k = 4097  # an all-127 row sums to 127 * 127 * 4097 > 2**24: float32 could not hold it
  x, w = _normal(3, 5, k, seed=7), _normal(k, 6, seed=8, std=0.02)
  x[0, 0], w[:, 0] = 1.0, 0.02
  xq, xs = jax.jit(quant.quantize_activations)(x)
  assert xq.dtype == jnp.int8 and xs.shape == (3, 5, 1)
  np.testing.assert_allclose(xs, np.abs(x.astype(np.float64)).max(-1, keepdims=True) / 127,
                             rtol=1e-7)
  t = quant.quantize_int8(w, axis=0)
  acc = jax.jit(quant.int8_dot)(xq, t.q)
  ref = np.einsum("abk,kn->abn", np.asarray(xq, np.int64), np.asarray(t.q, np.int64))
  assert acc.dtype == jnp.int32 and ref[0, 0, 0] == 127 * 127 * k
  np.testing.assert_array_equal(acc, ref)
  y = jax.jit(quant.int8_matmul)(xq, xs, t.q, t.scale)
  expect = ref * np.asarray(xs, np.float64) * np.asarray(t.scale, np.float64)
  np.testing.assert_allclose(y, expect, rtol=1e-6)


@pytest.mark.parametrize("width", [128, 96])
def test_nf4_matches_bitsandbytes(width):
  torch = pytest.importorskip("torch")
  functional = pytest.importorskip("bitsandbytes.functional")
  w = _normal(width, 320, seed=9)  # [in, out]; bitsandbytes sees the torch [out, in] layout
  w[:, :2] = 0  # two zero rows of the [out, in] matrix: zero blocks
  packed, state = functional.quantize_4bit(torch.from_numpy(np.ascontiguousarray(w.T)),
                                           blocksize=64, quant_type="nf4")
  t = _jit(quant.quantize_nf4, block_size=64, axis=0)(w)
  np.testing.assert_array_equal(t.packed, packed.numpy().reshape(-1))
  np.testing.assert_array_equal(t.absmax, state.absmax.numpy())
  if width % 64 == 0:  # bitsandbytes 0.50.2's CPU de-quantizer assumes blocks within rows
    theirs = functional.dequantize_4bit(packed, state).numpy()
    np.testing.assert_array_equal(quant.dequantize(t), theirs.T)
