"""T5 relative position buckets and bias, and the bias/scale options of attention."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.layers.attention import dot_product_attention
from llmjax.layers.position import RelativePositionBias, relative_position_bucket


def _naive_bucket(rel, bidirectional, num_buckets, max_distance):
  """The T5 paper's bucketing, one Python int at a time."""
  bucket = 0
  if bidirectional:
    num_buckets //= 2
    bucket += num_buckets if rel > 0 else 0
    n = abs(rel)
  else:
    n = max(-rel, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return bucket + n
  large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact)
                          * (num_buckets - max_exact))
  return bucket + min(large, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 12)])
def test_buckets_match_naive_and_hf(bidirectional, num_buckets, max_distance):
  rel = np.arange(-300, 301)
  got = np.asarray(relative_position_bucket(jnp.asarray(rel), bidirectional, num_buckets,
                                            max_distance))
  naive = [_naive_bucket(int(r), bidirectional, num_buckets, max_distance) for r in rel]
  np.testing.assert_array_equal(got, naive)
  assert got.min() >= 0 and got.max() == num_buckets - 1
  torch = pytest.importorskip("torch")
  t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
  hf = t5.T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional,
                                                num_buckets, max_distance)
  np.testing.assert_array_equal(got, hf.numpy())


def test_bias_module_looks_up_table_per_head():
  module = RelativePositionBias(num_buckets=8, max_distance=12, num_heads=3, bidirectional=True)
  q = jnp.array([[0, 1, 2, 3]])
  k = jnp.array([[0, 1, 2, 3, 4, 9]])
  params = module.init(jax.random.PRNGKey(0), q, k)
  bias = np.asarray(module.apply(params, q, k))
  table = np.asarray(nn.meta.unbox(params)["params"]["embedding"])
  assert bias.shape == (1, 3, 4, 6)
  for i, qp in enumerate(q[0]):
    for j, kp in enumerate(k[0]):
      b = _naive_bucket(int(kp - qp), True, 8, 12)
      np.testing.assert_allclose(bias[0, :, i, j], table[b], rtol=0, atol=0)


def test_attention_bias_and_scale_match_naive():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)     # [B, L, N, H]
  k = rng.normal(size=(2, 5, 2, 8)).astype(np.float32)     # [B, S, K, H] (GQA)
  v = rng.normal(size=(2, 5, 2, 8)).astype(np.float32)
  bias = rng.normal(size=(2, 4, 3, 5)).astype(np.float32)  # [B, N, L, S]
  out = np.asarray(dot_product_attention(q, k, v, bias=bias, scale=1.0))
  kk, vv = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)
  scores = np.einsum("blnh,bsnh->bnls", q, kk) + bias
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(out, np.einsum("bnls,bsnh->blnh", probs, vv), atol=1e-5)
  default = np.asarray(dot_product_attention(q / math.sqrt(8), k, v, scale=1.0))
  np.testing.assert_allclose(np.asarray(dot_product_attention(q, k, v)), default, atol=1e-6)
