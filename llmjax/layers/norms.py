"""LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019).

Statistics are always computed in float32, whatever the compute dtype: bfloat16 has
8 bits of mantissa, too few for a mean of squares over thousands of features.
Parameters: `scale` (ones) and, for LayerNorm with `use_bias`, `bias` (zeros), both with
logical axis NORM (replicated by every rule set).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.sharding.axes import NORM


class LayerNorm(nn.Module):
  """y = (x - mean) / sqrt(var + eps) * scale + bias over the last axis."""

  eps: float = 1e-5
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (NORM,)),
                       (features,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (NORM,)),
                        (features,), self.param_dtype)
      y = y + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nn.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale over the last axis (LLaMA, T5)."""

  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (NORM,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    ms = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(ms + self.eps) * scale.astype(jnp.float32)
    return y.astype(self.dtype)


def make_norm(config, name: str | None = None) -> nn.Module:
  """The norm `config.norm` names ('layernorm' | 'rmsnorm'), with the config's dtypes."""
  kwargs = {"eps": config.norm_eps, "dtype": config.compute_dtype,
            "param_dtype": config.params_dtype, "name": name}
  if config.norm == "rmsnorm":
    return RMSNorm(**kwargs)
  return LayerNorm(use_bias=config.use_bias, **kwargs)
