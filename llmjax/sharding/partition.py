"""From logical axis names to placed arrays: shardings of boxed trees, global batches.

Trees boxed with their logical axes (`jax.eval_shape` of a linen init) -> logical
PartitionSpecs -> mesh PartitionSpecs through a rule set -> `NamedSharding`s; the sharded
init of the train state built on these is `llmjax.train.state.init_train_state`.

A mesh axis that does not divide a dimension (GPT-2's vocabulary 50257 over 'tensor', a
bias of 3 over 'fsdp') is dropped for that array, which is then replicated along it:
uneven shards are not allowed by `jit`, and a config should not fail for an odd size.
"""

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from llmjax.sharding import axes


def _fit_entry(entry, size: int, mesh_shape) -> str | tuple[str, ...] | None:
  """The longest prefix of the mesh axes in `entry` whose product divides `size`."""
  if entry is None:
    return None
  names = (entry,) if isinstance(entry, str) else tuple(entry)
  kept, product = [], 1
  for name in names:
    if size % (product * mesh_shape[name]):
      break
    kept.append(name)
    product *= mesh_shape[name]
  if not kept:
    return None
  return kept[0] if len(kept) == 1 else tuple(kept)


def fit_spec(spec: PartitionSpec, shape, mesh_shape) -> PartitionSpec:
  """`spec` with every mesh axis that does not divide its dimension dropped.

  `mesh_shape` maps axis names to sizes (`mesh.shape`)."""
  entries = tuple(spec) + (None,) * (len(shape) - len(spec))
  return PartitionSpec(*(_fit_entry(e, n, mesh_shape) for e, n in zip(entries, shape)))


def mesh_specs(boxed_abstract, mesh_shape, rules):
  """A tree with `nn.Partitioned` leaves (from eval_shape) -> mesh PartitionSpecs.

  Leaves without logical axes (optimizer counts, scalars) are replicated.
  """
  logical = nn.logical_to_mesh(nn.get_partition_spec(boxed_abstract), rules)
  return jax.tree.map(lambda spec, x: fit_spec(spec, x.shape, mesh_shape), logical,
                      nn.meta.unbox(boxed_abstract),
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def logical_to_shardings(boxed_abstract, mesh, rules):
  """A tree with `nn.Partitioned` leaves -> a tree of NamedShardings on `mesh`."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                      mesh_specs(boxed_abstract, mesh.shape, rules),
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh, rules) -> NamedSharding:
  """Rows over the data-parallel mesh axes, the rest of each array whole."""
  return nn.logical_to_mesh_sharding(PartitionSpec(axes.BATCH), mesh, rules)


def global_batch(local_batch, sharding: NamedSharding):
  """This host's rows `{k: [B / processes, ...]}` -> global jax.Arrays `[B, ...]`.

  Each process passes its own contiguous slice of the global batch (what the data
  pipeline yields); jax stitches the slices into one array over all hosts' devices.
  """
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def spec_table(shardings) -> dict[str, tuple]:
  """{'path/to/leaf': mesh axes per dimension} of a tree of NamedShardings (for printing
  and for golden tests)."""
  flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(s.spec)
          for path, s in flat}
