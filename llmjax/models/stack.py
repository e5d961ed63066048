"""`TransformerStack`: `num_layers` blocks, scanned or looped, with rematerialization.

Scanned (`scan_layers=True`, the default): one `TransformerBlock` under `nn.scan`, its
parameters stacked along a leading LAYERS axis (`layers/...`, shape `[num_layers, ...]`).
Compile time stays flat in depth. Unscanned: a Python loop over `layers_0`,
`layers_1`, ...; easier to inspect and to give layers different shapes later.

Remat (`config.remat`; Chen et al. 2016, gradient checkpointing):
  'none' keeps all activations for the backward pass;
  'full' keeps only each block's input and recomputes the block;
  'dots' keeps the outputs of the weight matmuls (dots without batch dimensions) and
         recomputes the rest, attention scores included.

The stack ends with the final norm of pre-norm models (`final_norm`, name `final_norm`).
With `position='t5_relative'` it owns T5's relative bias table (`relpos_bias/embedding
[buckets, N]`), computed once and added in every layer's self-attention (as HF T5 does).
`unstack_layers` / `stack_layers` convert parameter trees between the two layouts.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.layers.norms import make_norm
from llmjax.layers.position import RelativePositionBias
from llmjax.models.block import TransformerBlock
from llmjax.models.config import TransformerConfig
from llmjax.sharding.axes import LAYERS

_REMAT_POLICIES = {
    "full": None,  # save nothing
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# `deterministic` is the 6th positional argument of TransformerBlock.__call__ (self = 0).
_DETERMINISTIC_ARGNUM = 6


class _ScannedBlock(TransformerBlock):
  """A block with the `(carry, xs) -> (carry, ys)` signature `nn.scan` wants.

  ys is None, or the layer's new KV cache when decoding with one (xs = its old cache).
  """

  def __call__(self, x, *args):  # pylint: disable=arguments-differ
    out = super().__call__(x, *args)
    return out if isinstance(out, tuple) else (out, None)


class TransformerStack(nn.Module):
  """Blocks and final norm: `[B, L, D] -> [B, L, D]`."""

  config: TransformerConfig
  num_layers: int
  cross_attention: bool = False
  # Encoders: bidirectional attention and relative position buckets for both directions;
  # decoders (False): causal self-attention.
  bidirectional: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               positions: jax.Array | None = None, encoded: jax.Array | None = None,
               cross_mask: jax.Array | None = None, deterministic: bool = True,
               cache: dict | None = None, cache_index: jax.Array | None = None):
    """Same arguments as `TransformerBlock.__call__`.

    Decoding: `cache` is a tuple with one cache per layer (separate buffers, so an
    unscanned stack updates each in place); then the stack returns `(x, new cache)`.
    A scanned stack stacks them for `nn.scan` and splits them again (correct, but it
    copies every step: `llmjax.decode` decodes with the unscanned layout).
    """
    cfg = self.config
    bias = None
    if cfg.position == "t5_relative":
      bias = self._relative_bias(x, positions, cache, cache_index)
    args = (mask, positions, encoded, cross_mask, deterministic, bias)
    in_axes = (nn.broadcast,) * len(args)
    if cache is not None:
      args, in_axes = args + (cache, cache_index), in_axes + (0, nn.broadcast)
    block_cls = _ScannedBlock if cfg.scan_layers else TransformerBlock
    causal = not self.bidirectional  # decoder self-attention
    if cfg.remat != "none":
      # Inside scan, CSE cannot undo the remat, so its prevention is only overhead.
      block_cls = nn.remat(block_cls, policy=_REMAT_POLICIES[cfg.remat],
                           prevent_cse=not cfg.scan_layers,
                           static_argnums=(_DETERMINISTIC_ARGNUM,))
    if cfg.scan_layers:
      scanned = nn.scan(block_cls, variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=in_axes, length=self.num_layers,
                        metadata_params={nn.PARTITION_NAME: LAYERS})
      if cache is not None:
        args = args[:-2] + (jax.tree.map(lambda *a: jnp.stack(a), *cache), cache_index)
      x, stacked = scanned(cfg, self.cross_attention, causal, name="layers")(x, *args)
      if cache is not None:
        cache = tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(len(cache)))
    else:
      new_cache = []
      for i in range(self.num_layers):
        layer_args = args if cache is None else args[:-2] + (cache[i], cache_index)
        x = block_cls(cfg, self.cross_attention, causal, name=f"layers_{i}")(x, *layer_args)
        if cache is not None:
          x, new = x
          new_cache.append(new)
      cache = None if cache is None else tuple(new_cache)
    if cfg.final_norm:
      x = make_norm(cfg, name="final_norm")(x)
    return x if cache is None else (x, cache)

  def _relative_bias(self, x, positions, cache, cache_index):
    """T5's relative position bias `[B, N, L, S]`, computed once for every layer."""
    cfg = self.config
    # T5: one bias for every layer. Cached decoding: the keys are the T cache slots;
    # slot j of a row holds position j - (cache_index - positions[:, 0]) (left padding).
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    k_positions = positions
    if cache is not None:
      slots = jnp.arange(cache[0]["self"]["key"].shape[2])              # [T]
      k_positions = slots[None, :] - (cache_index - positions[:, :1])     # [B, T]
    return RelativePositionBias(
        cfg.relative_buckets, cfg.relative_max_distance, cfg.num_heads,
        bidirectional=self.bidirectional, init_std=cfg.init_std,
        param_dtype=cfg.params_dtype, name="relpos_bias")(positions, k_positions)


def unstack_layers(tree):
  """Scanned params (`layers`, leading LAYERS axis) -> unscanned (`layers_0`, ...)."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for key, value in tree.items():
    if key == "layers":
      for i in range(jax.tree.leaves(value)[0].shape[0]):
        out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], value)
    else:
      out[key] = unstack_layers(value)
  return out


def stack_layers(tree):
  """Unscanned params (`layers_0`, `layers_1`, ...) -> scanned (`layers`, stacked)."""
  if not isinstance(tree, dict):
    return tree
  out = {k: stack_layers(v) for k, v in tree.items() if not k.startswith("layers_")}
  layers = [tree[f"layers_{i}"] for i in range(len(tree)) if f"layers_{i}" in tree]
  if layers:
    out["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
  return out
