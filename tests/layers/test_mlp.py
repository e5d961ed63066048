"""Each MLP activation against a numpy reference on random parameters."""

import jax
import numpy as np
import pytest
from flax import linen as nn

from llmjax.layers.mlp import MLP
from llmjax.models.config import TransformerConfig
from llmjax.sharding import axes
from llmjax.testing import reference


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_exact", "silu", "swiglu", "geglu"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_mlp_matches_numpy(activation, use_bias):
  cfg = TransformerConfig(embed_dim=8, num_heads=2, mlp_dim=12, activation=activation,
                          use_bias=use_bias)
  x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
  mlp = MLP(cfg)
  p = reference.random_params(mlp, x)
  got = mlp.apply({"params": p}, x)

  def dense(name, h):
    out = np.asarray(h, np.float64) @ np.asarray(p[name]["kernel"], np.float64)
    return out + p[name]["bias"] if use_bias else out

  act = reference.ACTIVATIONS[activation]
  if cfg.gated:
    assert set(p) == {"wi_0", "wi_1", "wo"}
    hidden = act(dense("wi_0", x)) * dense("wi_1", x)
  else:
    assert set(p) == {"wi", "wo"}
    hidden = act(dense("wi", x))
  np.testing.assert_allclose(got, dense("wo", hidden), rtol=1e-5, atol=1e-5)
  specs = nn.get_partition_spec(jax.eval_shape(mlp.init, jax.random.key(0), x))["params"]
  assert tuple(specs["wo"]["kernel"]) == (axes.MLP, axes.EMBED)


def test_gelu_variants_differ():
  # 'gelu' (tanh, GPT-2) and 'gelu_exact' (erf) must be distinguishable for HF parity.
  x = np.linspace(-3, 3, 13)
  assert np.abs(reference.gelu_tanh(x) - reference.gelu_exact(x)).max() > 1e-4
