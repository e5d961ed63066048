"""Naive numpy references for the layers, written independently of `llmjax.layers`.

Loops and float64 where clarity beats speed: these exist to be obviously right.
`random_params` fills a module's parameters from numpy without compiling its `init`
(threefry sampling compiles slowly on CPU, once per shape).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn


def attention(q, k, v, mask=None):
  """softmax(q k^T / sqrt(H)) v per head; K/V heads repeated to N (HF `repeat_kv` order).

  q [B, L, N, H], k/v [B, S, K, H], mask bool broadcastable to [B, 1, L, S].
  """
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, l, n, h = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  k = np.repeat(k, n // kv_heads, axis=2)
  v = np.repeat(v, n // kv_heads, axis=2)
  mask = np.ones((b, 1, l, s), bool) if mask is None else np.broadcast_to(mask, (b, 1, l, s))
  out = np.zeros((b, l, n, h))
  for bi in range(b):
    for ni in range(n):
      scores = q[bi, :, ni] @ k[bi, :, ni].T / math.sqrt(h)             # [L, S]
      scores = np.where(mask[bi, 0], scores, -1e30)
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      out[bi, :, ni] = probs @ v[bi, :, ni]
  return out


def layer_norm(x, scale, bias=None, eps=1e-5):
  x = np.asarray(x, np.float64)
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  y = (x - mu) / np.sqrt(var + eps) * scale
  return y if bias is None else y + bias


def rms_norm(x, scale, eps=1e-5):
  x = np.asarray(x, np.float64)
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * scale


def gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def gelu_exact(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def silu(x):
  return x / (1 + np.exp(-x))


ACTIVATIONS = {"relu": lambda x: np.maximum(x, 0), "gelu": gelu_tanh,
               "gelu_exact": gelu_exact, "silu": silu, "swiglu": silu, "geglu": gelu_tanh}


def rope(x, positions, theta=10_000.0):
  """Rotary embedding via complex numbers: feature i pairs with i + H/2 (rotate-half).

  x [B, L, N, H], positions [B, L].
  """
  x = np.asarray(x, np.float64)
  half = x.shape[-1] // 2
  freqs = theta ** (-np.arange(half) * 2.0 / x.shape[-1])                 # [H/2]
  rot = np.exp(1j * np.asarray(positions)[..., None, None] * freqs)        # [B, L, 1, H/2]
  z = (x[..., :half] + 1j * x[..., half:]) * rot
  return np.concatenate([z.real, z.imag], axis=-1)


def random_params(module: nn.Module, *args, seed: int = 0, std: float = 0.3, **kwargs):
  """Random `params` for `module.init(key, *args, **kwargs)`: normal(0, std) everywhere,
  except norm `scale`s, which are 1 + normal(0, std). Non-zero biases catch more bugs."""
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  rng = np.random.default_rng(seed)

  def sample(path, leaf):
    noise = rng.normal(0.0, std, leaf.shape)
    if getattr(path[-1], "key", None) == "scale":
      noise = noise + 1.0
    return jnp.asarray(noise, leaf.dtype)

  return jax.tree_util.tree_map_with_path(sample, nn.unbox(abstract)["params"])


def preset_model(name: str, *, std: float = 0.3, seed: int = 0, **overrides):
  """`(Transformer, random params)` of preset `name` (with config `overrides`).

  Params come from `random_params` on a `[1, 8]` token batch (plus a `[1, 6]` encoder
  batch for encoder-decoder presets).
  """
  from llmjax.models.presets import get_preset
  from llmjax.models.transformer import Transformer
  cfg = get_preset(name, **overrides)
  kw = {"encoder_tokens": np.ones((1, 6), np.int32)} if cfg.arch == "encoder_decoder" else {}
  model = Transformer(cfg)
  return model, random_params(model, np.ones((1, 8), np.int32), seed=seed, std=std, **kw)
