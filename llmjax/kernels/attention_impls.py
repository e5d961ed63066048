"""The attention implementations behind `layers.attention.dot_product_attention`.

  'einsum'     the layer's own `reference_attention`, except that for L > 1 without
               dropout or a score bias it runs `einsum_attention.attention` (the same
               core with a hand-written backward pass), and with `causal_chunks` the
               chunked forms in `einsum_attention`;
  'jax'        `jax.nn.dot_product_attention` (XLA's), per causal chunk;
  'cudnn'      the same with `implementation='cudnn'`: cuDNN's fused flash attention
               (NVIDIA GPUs, bfloat16/float16; `causal` skips the hidden key blocks);
  'cpu_flash'  `cpu_attention.flash_attention`: FlashAttention in C++ for XLA:CPU
               (float32 inside, L > 1, no bias, dropout drawn in the kernel from an
               `AttentionDropout`; a query that sees no key gets zeros).

One config runs everywhere: where an implementation cannot take a call it falls back
to 'einsum' with one warning (none for one-token decode steps); 'jax' and 'cudnn' have
no dropout. Which is fastest where: benchmarks/README.md.
"""

import dataclasses
import functools
import itertools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.errors import UserError
from llmjax.kernels import cpu_attention, einsum_attention
from llmjax.kernels.einsum_attention import block


@dataclasses.dataclass(frozen=True)
class AttentionDropout:
  """Attention-probability dropout as data (a rate and a PRNG key), so that
  `attention_impl='cpu_flash'` can draw it inside its kernel. Called on probabilities it
  applies ordinary dropout (`nn.Dropout`'s rule) for the paths that fall back to einsum;
  the key is folded with the probabilities' shape, so the chunks of one layer draw apart."""
  rate: float
  rng: jax.Array

  def __call__(self, probs: jax.Array) -> jax.Array:
    rng = jax.random.fold_in(self.rng, hash(probs.shape) & 0x7FFFFFFF)
    keep = jax.random.bernoulli(rng, 1.0 - self.rate, probs.shape)
    return jnp.where(keep, probs / (1.0 - self.rate), 0.0).astype(probs.dtype)


def attention(impl: str, q, k, v, mask, full_mask, dropout_fn, bias, scale: float,
              causal: bool, causal_chunks: int):
  """`impl`'s output `[B, L, N, H]`, or None where the einsum reference is what runs.

  `mask` hides padding/segments only (with `causal`), `full_mask` is it combined with
  the causal mask; the other arguments are `dot_product_attention`'s (scale resolved).
  """
  l = q.shape[1]
  impl = _usable_impl(impl, l, dropout_fn, bias)
  if impl == "cudnn":
    return _cudnn_attention(q, k, v, mask, bias, scale, causal)
  if impl == "cpu_flash":
    rate, rng = (dropout_fn.rate, dropout_fn.rng) if dropout_fn is not None else (0.0, None)
    return cpu_attention.flash_attention(q, k, v, mask, scale, causal, rate,
                                         rng).astype(q.dtype)
  bounds = tuple(int(x) for x in np.linspace(0, l, min(causal_chunks, l) + 1).round())
  if impl == "jax":  # it wants one dtype throughout
    bias = None if bias is None else bias.astype(q.dtype)
    return jnp.concatenate([jax.nn.dot_product_attention(
        q[:, start:end], k[:, :end], v[:, :end], bias=block(bias, start, end, end),
        mask=block(full_mask, start, end, end), scale=scale)
        for start, end in itertools.pairwise(bounds)], axis=1)
  if dropout_fn is None and bias is None and l > 1:
    return einsum_attention.attention(q, k, v, full_mask, scale, bounds, len(bounds) > 2)
  if len(bounds) > 2:
    return einsum_attention.chunked_attention(q, k, v, full_mask, bias, dropout_fn, scale,
                                              bounds)
  return None


def _usable_impl(impl: str, l: int, dropout_fn, bias) -> str:
  """`impl`, or 'einsum' where it cannot take this call (with one warning)."""
  if impl in ("jax", "cudnn") and dropout_fn is not None:
    return "einsum"
  if impl == "cudnn" and jax.default_backend() != "gpu":
    _warn_once(f"attention_impl='cudnn' needs an NVIDIA GPU; jax runs on "
               f"{jax.default_backend()!r} here, so attention uses 'einsum' (same result).")
    return "einsum"
  if impl == "cpu_flash":
    reason = _cpu_flash_unsupported(l, dropout_fn, bias)
    if reason is not None:
      if l > 1:
        _warn_once(f"attention_impl='cpu_flash' {reason}; attention uses 'einsum' here.")
      return "einsum"
  return impl


def _cpu_flash_unsupported(l, dropout_fn, bias) -> str | None:
  """Why the CPU kernel cannot take this call (None: it can)."""
  if l == 1:
    return "is for L > 1 (one-token decode steps read the KV cache)"
  if dropout_fn is not None and not isinstance(dropout_fn, AttentionDropout):
    return "draws dropout itself (pass an AttentionDropout, not a function)"
  if bias is not None:
    return "takes no score bias (T5's relative positions)"
  if not cpu_attention.available():
    return f"needs the CPU backend and a C++ compiler (jax runs on {jax.default_backend()!r})"
  return None


@functools.cache
def _warn_once(message: str):
  logging.getLogger(__name__).warning(message)


def _cudnn_attention(q, k, v, mask, bias, scale, causal):
  """`jax.nn.dot_product_attention(implementation='cudnn')`: one fused kernel per pass
  (the `[B, N, L, S]` scores never reach memory); `causal` is cuDNN's own causal mask,
  and `mask` (padding, segments) goes in as an additive bias."""
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise UserError(f"attention_impl='cudnn' needs bfloat16 or float16 activations, got "
                    f"{q.dtype}; set dtype='bfloat16' or use attention_impl='einsum'.")
  bias = None if bias is None else bias.astype(q.dtype)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                      is_causal=causal, implementation="cudnn")


