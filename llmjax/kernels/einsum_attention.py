"""The fast einsum attention paths behind `layers.attention.dot_product_attention`.

`attention`: the einsum core with a hand-written backward pass (no dropout, no bias);
`chunked_attention`: causal query chunks with dropout or a score bias (autodiffed).

softmax(scale * q k^T, masked) v in float32 with grouped-query heads, in heads-major
layouts `[B, K, G, L, H]`, optionally in query chunks (`causal_chunks`: chunk i is scored
only against the keys up to its own end). Same result as differentiating the plain einsum
path; the backward pass is FlashAttention's (Dao et al. 2022), with the probabilities kept
from the forward pass instead of recomputed:

  dP = dO V^T,   dS = P * (dP - rowsum(dO * O)),   dQ = dS K,   dK = dS^T Q,   dV = P^T dO

rowsum(dO * O) is one float32 sum over the head dim per query (autodiff of softmax sums
dP * P over every key instead), masked scores need no backward select (their
probabilities are exactly 0), and the key/value gradients of the chunks are summed in
float32. Differentiating the einsum path in bfloat16 rounds every partial sum to bfloat16
and back; this runs a nanoGPT-char layer's attention forward + backward about 1.5x as fast
in bfloat16 and as fast in float32 (benchmarks/README.md).
"""

import functools
import itertools

import jax
import jax.numpy as jnp

from llmjax.kernels.dense import einsum_f32

F32 = jnp.float32


def _einsum(equation: str, a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.einsum(equation, a, b, preferred_element_type=F32)


def block(a: jax.Array | None, start: int, end: int, keys: int) -> jax.Array | None:
  """Query rows start:end and keys :keys of a mask or bias `[..., L, S]` (size-1 dims
  stay)."""
  if a is None:
    return None
  if a.shape[-2] > 1:
    a = a[..., start:end, :]
  return a[..., :keys] if a.shape[-1] > 1 else a


def _chunk_mask(mask, start, end, keys):
  """`block` of a mask `[B|1, 1, L, S]` as `[B|1, 1, 1, l, s]` (broadcast over K and G)."""
  return None if mask is None else block(mask, start, end, keys)[:, :, None]


def _forward(qh, kh, vh, mask, bounds, key_ends):
  """Per chunk: probabilities `[B, K, G, l, s]` (v's dtype) and the output, concatenated."""
  probs, outs = [], []
  for (start, end), keys in zip(itertools.pairwise(bounds), key_ends):
    scores = _einsum("bkglh,bksh->bkgls", qh[:, :, :, start:end], kh[:, :, :keys])
    chunk_mask = _chunk_mask(mask, start, end, keys)
    if chunk_mask is not None:  # the float32 minimum: a fully masked row stays finite
      scores = jnp.where(chunk_mask, scores, jnp.finfo(F32).min)
    p = jax.nn.softmax(scores, axis=-1).astype(vh.dtype)
    probs.append(p)
    outs.append(_einsum("bkgls,bksh->bkglh", p, vh[:, :, :keys]))
  return probs, jnp.concatenate(outs, axis=3)                           # [B, K, G, L, H]


def to_heads(q, k, v, scale):
  """`[B, L, N, H]` queries (times `scale`) and `[B, S, K, H]` keys/values -> heads-major
  `[B, K, G, L, H]` and `[B, K, S, H]` (G = N / K query heads per key/value head)."""
  b, l, n, h = q.shape
  kv_heads = k.shape[2]
  q = q * jnp.asarray(scale, q.dtype) if scale != 1.0 else q
  qh = q.reshape(b, l, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)
  return qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def from_heads(x, dtype):
  """`[B, K, G, L, H]` -> `[B, L, K*G, H]` in `dtype`."""
  b, kv_heads, group, l, h = x.shape
  return x.transpose(0, 3, 1, 2, 4).reshape(b, l, kv_heads * group, h).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
              scale: float, bounds: tuple, causal_chunks: bool) -> jax.Array:
  """softmax(scale * q k^T, masked) v: `[B, L, N, H]` in q's dtype.

  Args:
    q: `[B, L, N, H]`; k, v: `[B, S, K, H]`, N % K == 0.
    mask: boolean, broadcastable to `[B, 1, L, S]` (True = may attend), or None.
    scale: multiplies the queries.
    bounds: query chunk boundaries `(0, ..., L)`, a tuple of ints.
    causal_chunks: chunk i sees keys up to `bounds[i + 1]` only (the caller's mask
      must hide every later key); False: every chunk sees all S keys.
  """
  return _attention_fwd(q, k, v, mask, scale, bounds, causal_chunks)[0]


def _key_ends(bounds, causal_chunks, keys):
  return bounds[1:] if causal_chunks else (keys,) * (len(bounds) - 1)


def _attention_fwd(q, k, v, mask, scale, bounds, causal_chunks):
  qh, kh, vh = to_heads(q, k, v, scale)
  probs, out = _forward(qh, kh, vh, mask, bounds, _key_ends(bounds, causal_chunks, k.shape[1]))
  out = from_heads(out, q.dtype)
  return out, (qh, kh, vh, mask, probs, out)


def _attention_bwd(scale, bounds, causal_chunks, residuals, d_out):
  qh, kh, vh, mask, probs, out = residuals
  b, kv_heads, group, l, h = qh.shape
  s = kh.shape[2]
  d_oh = d_out.reshape(b, l, kv_heads, group, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, L, H]
  d_oh = d_oh.astype(vh.dtype)
  row_sums = jnp.sum(d_out.astype(F32) * out.astype(F32), axis=-1)      # [B, L, N]
  row_sums = row_sums.reshape(b, l, kv_heads, group).transpose(0, 2, 3, 1)  # [B, K, G, L]
  d_q, d_k, d_v = [], jnp.zeros((b, kv_heads, s, h), F32), jnp.zeros((b, kv_heads, s, h), F32)
  for (start, end), keys, p in zip(itertools.pairwise(bounds),
                                   _key_ends(bounds, causal_chunks, s), probs):
    d_o = d_oh[:, :, :, start:end]                                      # [B, K, G, l, H]
    d_p = _einsum("bkglh,bksh->bkgls", d_o, vh[:, :, :keys])
    d_s = p.astype(F32) * (d_p - row_sums[:, :, :, start:end, None])
    chunk_mask = _chunk_mask(mask, start, end, keys)
    if chunk_mask is not None:  # a fully masked row has uniform p; its scores got no gradient
      d_s = jnp.where(chunk_mask, d_s, 0.0)
    d_s = d_s.astype(qh.dtype)
    d_q.append(_einsum("bkgls,bksh->bkglh", d_s, kh[:, :, :keys]))
    d_k = d_k.at[:, :, :keys].add(_einsum("bkgls,bkglh->bksh", d_s, qh[:, :, :, start:end]))
    d_v = d_v.at[:, :, :keys].add(_einsum("bkgls,bkglh->bksh", p, d_o))
  d_q = from_heads(jnp.concatenate(d_q, axis=3) * scale, qh.dtype)
  d_k, d_v = d_k.transpose(0, 2, 1, 3), d_v.transpose(0, 2, 1, 3)     # [B, S, K, H]
  return d_q, d_k.astype(kh.dtype), d_v.astype(vh.dtype), None


attention.defvjp(_attention_fwd, _attention_bwd)


def chunked_attention(q, k, v, mask, bias, dropout_fn, scale: float, bounds: tuple):
  """`attention`'s causal chunks with dropout or a score bias (autodiffed): query rows
  bounds[i]:bounds[i+1] against keys :bounds[i+1], with q, k and v transposed once to
  heads-major `[B, K, (G,) L, H]`.

  Chunks are then slices of each head's rows and the chunk outputs one concatenation.
  In the backward pass each chunk's key/value gradient is padded and summed in that
  same layout; sliced from `[B, L, N, H]`, XLA:CPU transposed every chunk's gradient
  back into it inside each sum (one `[B, L, N, H]` fusion per chunk, ~10% of a
  bfloat16 nanoGPT-char step; benchmarks/README.md).

  Args: as `attention`, plus `bias` (float, broadcastable to `[B, N, L, S]`) and
  `dropout_fn` (applied to the float32 probabilities), either may be None.
  """
  qh, kh, vh = to_heads(q, k, v, scale)                                # [B, K, (G,) L, H]
  kv_heads, group = qh.shape[1:3]
  outs = []
  for start, end in itertools.pairwise(bounds):
    scores = einsum_f32("bkglh,bksh->bkgls", qh[:, :, :, start:end], kh[:, :, :end])
    chunk_bias = block(bias, start, end, end)
    if chunk_bias is not None:  # [B|1, N|1, l, s] -> [B|1, K, G, l, s]
      chunk_bias = jnp.broadcast_to(chunk_bias, chunk_bias.shape[:1] + (kv_heads * group,)
                                    + scores.shape[-2:])
      scores = scores + chunk_bias.reshape(chunk_bias.shape[:1] + (kv_heads, group)
                                           + scores.shape[-2:]).astype(F32)
    chunk_mask = _chunk_mask(mask, start, end, end)
    if chunk_mask is not None:
      scores = jnp.where(chunk_mask, scores, jnp.finfo(F32).min)
    probs = jax.nn.softmax(scores, axis=-1)                             # [B, K, G, l, s]
    if dropout_fn is not None:
      probs = dropout_fn(probs)
    outs.append(einsum_f32("bkgls,bksh->bkglh", probs.astype(vh.dtype), vh[:, :, :end]))
  return from_heads(jnp.concatenate(outs, axis=3), q.dtype)            # [B, L, N, H]
