"""The position-wise feed-forward block: plain (ReLU, GELU) or gated (SwiGLU, GeGLU).

Plain:  y = wo(act(wi(x)))                       (Vaswani et al. 2017; GPT-2)
Gated:  y = wo(act(wi_0(x)) * wi_1(x))           (Shazeer 2020, "GLU Variants")

Parameter names follow T5X / T5 v1.1: `wi` for the plain input projection, `wi_0` (the
activated gate, LLaMA's `gate_proj`) and `wi_1` (the linear branch, `up_proj`) when
gated, `wo` for the output projection (`down_proj`). Kernels: (EMBED, MLP) and
(MLP, EMBED). The hidden activation is constrained to (BATCH, LENGTH, MLP).
"""

import math

import flax.linen as nn
import jax

from llmjax.layers.linear import Einsum
from llmjax.sharding.axes import BATCH, EMBED, LENGTH
from llmjax.sharding.axes import MLP as MLP_AXIS

_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),     # GPT-2 "gelu_new"
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "swiglu": jax.nn.silu,                                   # gate activation
    "geglu": lambda x: jax.nn.gelu(x, approximate=True),    # T5 v1.1 "gated-gelu"
}


def activation_fn(name: str):
  """The elementwise function behind an activation name (the gate's, if gated)."""
  return _ACTIVATIONS[name]


class MLP(nn.Module):
  """Feed-forward block of a `TransformerConfig`: `[B, L, D] -> [B, L, D]`."""

  config: "TransformerConfig"  # noqa: F821 (llmjax.models.config; avoids an import cycle)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    dense = {"use_bias": cfg.use_bias, "dtype": cfg.compute_dtype,
             "param_dtype": cfg.params_dtype,
             "kernel_init": nn.initializers.normal(cfg.init_std)}
    act = activation_fn(cfg.activation)
    if cfg.gated:
      gate = Einsum("BLD,DF->BLF", (cfg.embed_dim, cfg.mlp_dim), (EMBED, MLP_AXIS),
                    name="wi_0", **dense)(x)
      up = Einsum("BLD,DF->BLF", (cfg.embed_dim, cfg.mlp_dim), (EMBED, MLP_AXIS),
                  name="wi_1", **dense)(x)
      h = act(gate) * up
    else:
      h = act(Einsum("BLD,DF->BLF", (cfg.embed_dim, cfg.mlp_dim), (EMBED, MLP_AXIS),
                     name="wi", **dense)(x))
    h = nn.with_logical_constraint(h, (BATCH, LENGTH, MLP_AXIS))              # [B, L, F]
    # GPT-2: residual output projections start smaller, by 1/sqrt(2 * num_layers).
    dense["kernel_init"] = nn.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.num_layers))
    return Einsum("BLF,FD->BLD", (cfg.mlp_dim, cfg.embed_dim), (MLP_AXIS, EMBED),
                  name="wo", **dense)(h)
