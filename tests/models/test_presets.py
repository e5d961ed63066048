"""Presets: exact parameter counts at full size (via jax.eval_shape, free) and logical
axis names on every parameter."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.errors import UserError
from llmjax.models.presets import PRESETS, get_preset
from llmjax.models.transformer import Transformer
from llmjax.sharding import axes

AXIS_NAMES = {axes.BATCH, axes.LENGTH, axes.EMBED, axes.HEADS, axes.KV_HEADS, axes.HEAD_DIM,
              axes.MLP, axes.VOCAB, axes.LAYERS, axes.NORM}


def _abstract_variables(cfg, length=8):
  tokens = jnp.zeros((1, length), jnp.int32)
  kw = {"encoder_tokens": tokens} if cfg.arch == "encoder_decoder" else {}
  return jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), tokens, **kw))


def _count(cfg):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(_abstract_variables(cfg))))


def _gpt2_formula(vocab, d, layers, max_len):
  """Per layer 12 D^2 + 13 D (qkv, out, 4D MLP, biases, two LayerNorms); tied embedding."""
  return layers * (12 * d * d + 13 * d) + vocab * d + max_len * d + 2 * d


@pytest.mark.parametrize("name,want", [
    ("nanogpt-char", 10_770_816),
    ("gpt2-124m", 124_439_808),
    ("gpt2-350m", 354_823_168),
    ("llama-style-small", 124_668_672),
])
def test_full_size_parameter_counts(name, want):
  assert _count(PRESETS[name]) == want


def test_gpt2_counts_match_the_formula():
  for name, (vocab, d, layers, max_len) in {"nanogpt-char": (65, 384, 6, 256),
                                            "gpt2-124m": (50257, 768, 12, 1024),
                                            "gpt2-350m": (50257, 1024, 24, 1024)}.items():
    assert _count(PRESETS[name]) == _gpt2_formula(vocab, d, layers, max_len)


def test_llama_count_matches_the_formula():
  cfg = PRESETS["llama-style-small"]
  d, kv = cfg.embed_dim, cfg.num_kv_heads * cfg.head_dim
  per_layer = 2 * d * d + 2 * d * kv + 3 * d * cfg.mlp_dim + 2 * d
  assert _count(cfg) == cfg.num_layers * per_layer + 2 * cfg.vocab_size * d + d


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("scan", [True, False])
def test_every_parameter_has_logical_axis_names(name, scan):
  cfg = get_preset(name, scan_layers=scan, num_layers=2, num_encoder_layers=2)
  variables = _abstract_variables(cfg)
  boxed = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert boxed and all(isinstance(b, nn.LogicallyPartitioned) for b in boxed)
  for box in boxed:
    assert len(box.names) == box.value.ndim and set(box.names) <= AXIS_NAMES, box
    if axes.LAYERS in box.names:
      assert scan and box.names[0] == axes.LAYERS
  assert any(axes.LAYERS in box.names for box in boxed) == scan
  specs = jax.tree.leaves(nn.get_partition_spec(variables))
  assert len(specs) == len(boxed)


def test_get_preset_overrides_and_unknown_names():
  cfg = get_preset("gpt2-124m", embed_dim=1024, num_heads=16)
  assert cfg.head_dim == 64 and PRESETS["gpt2-124m"].embed_dim == 768
  with pytest.raises(UserError, match="gpt2-124m"):
    get_preset("gpt-5")
