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
`unstack_layers` / `stack_layers` convert parameter trees between the two layouts.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.layers.norms import make_norm
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
  """A block with the `(carry, _) -> (carry, None)` signature `nn.scan` wants."""

  def __call__(self, x, *args):  # pylint: disable=arguments-differ
    return super().__call__(x, *args), None


class TransformerStack(nn.Module):
  """Blocks and final norm: `[B, L, D] -> [B, L, D]`."""

  config: TransformerConfig
  num_layers: int
  cross_attention: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               positions: jax.Array | None = None, encoded: jax.Array | None = None,
               cross_mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    """Same arguments as `TransformerBlock.__call__`."""
    cfg = self.config
    args = (mask, positions, encoded, cross_mask, deterministic)
    block_cls = _ScannedBlock if cfg.scan_layers else TransformerBlock
    if cfg.remat != "none":
      # Inside scan, CSE cannot undo the remat, so its prevention is only overhead.
      block_cls = nn.remat(block_cls, policy=_REMAT_POLICIES[cfg.remat],
                           prevent_cse=not cfg.scan_layers,
                           static_argnums=(_DETERMINISTIC_ARGNUM,))
    if cfg.scan_layers:
      scanned = nn.scan(block_cls, variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast,) * len(args), length=self.num_layers,
                        metadata_params={nn.PARTITION_NAME: LAYERS})
      x, _ = scanned(cfg, self.cross_attention, name="layers")(x, *args)
    else:
      for i in range(self.num_layers):
        x = block_cls(cfg, self.cross_attention, name=f"layers_{i}")(x, *args)
    if cfg.final_norm:
      x = make_norm(cfg, name="final_norm")(x)
    return x


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
