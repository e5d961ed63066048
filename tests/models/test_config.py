"""TransformerConfig: derived defaults, replace(), validation errors that name the fix."""

import dataclasses

import jax.numpy as jnp
import pytest

from llmjax.errors import UserError
from llmjax.models.config import TransformerConfig


def test_derived_defaults_and_dtypes():
  cfg = TransformerConfig(embed_dim=96, num_heads=6, dropout_rate=0.1, num_layers=3,
                          dtype="bfloat16")
  assert (cfg.head_dim, cfg.num_kv_heads, cfg.attention_dropout_rate) == (16, 6, 0.1)
  assert cfg.num_encoder_layers == 3
  assert cfg.compute_dtype == jnp.bfloat16 and cfg.params_dtype == jnp.float32
  assert cfg.output_dtype == jnp.float32
  assert not cfg.gated and cfg.replace(activation="swiglu").gated


def test_replace_rederives_defaulted_fields_only():
  cfg = TransformerConfig(embed_dim=64, num_heads=4)
  assert cfg.replace(embed_dim=128).head_dim == 32        # derived again
  pinned = TransformerConfig(embed_dim=64, num_heads=4, head_dim=8)
  assert pinned.replace(embed_dim=128).head_dim == 8      # set by the user: kept
  assert cfg.replace(num_heads=8).num_kv_heads == 8
  assert cfg.replace(embed_dim=128) == TransformerConfig(embed_dim=128, num_heads=4)
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.embed_dim = 3
  with pytest.raises(UserError, match="no field"):
    cfg.replace(hidden_size=3)


@pytest.mark.parametrize("kwargs,match", [
    ({"arch": "gpt"}, "arch"),
    ({"position": "alibi"}, "position"),
    ({"norm": "batchnorm"}, "norm"),
    ({"activation": "tanh"}, "activation"),
    ({"remat": "some"}, "remat"),
    ({"dtype": "fp8"}, "dtype"),
    ({"num_heads": 4, "num_kv_heads": 3}, "num_kv_heads"),
    ({"embed_dim": 65, "num_heads": 4}, "head_dim"),
    ({"num_layers": 0}, "num_layers"),
    ({"position": "rope", "embed_dim": 60, "num_heads": 4}, "even head_dim"),
    ({"dropout_rate": 1.0}, "dropout_rate"),
])
def test_bad_values_raise_user_error_naming_the_field(kwargs, match):
  with pytest.raises(UserError, match=match):
    TransformerConfig(**kwargs)
