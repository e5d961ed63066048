"""Orbax checkpoints that resume exactly.

A checkpoint step directory holds three items:
  state  the TrainState (params, optimizer state, step, RNG) as sharded arrays,
  data   the data iterator's state (JSON), so a resumed run sees the same batches,
  meta   JSON: the model config, the operative gin config and the serialized tokenizer
         (base64), so a checkpoint always knows how to rebuild its model and its text.
Saves are asynchronous; nothing is ever loaded through pickle.
"""

import base64
import logging
import os

import jax
import orbax.checkpoint as ocp
from etils import epath

from llmjax.errors import UserError

ITEMS = ("state", "data", "meta")
_log = logging.getLogger(__name__)


class CheckpointManager:
  """Thin wrapper over `ocp.CheckpointManager` with llmjax's three items."""

  def __init__(self, directory, *, save_every: int = 1000, keep: int = 3,
               async_save: bool = True):
    self.directory = epath.Path(os.path.abspath(directory))  # orbax needs absolute paths
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_every, create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def latest_step(self):
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_state, meta, *, force: bool = False) -> bool:
    """Starts an async save if `step` is on the cadence (or `force`). Returns whether it did."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta))
    return self._manager.save(step, args=args, force=force)

  def restore(self, abstract_state, step: int | None = None):
    """Restores (state, data_state, meta) at `step` (default: the newest that loads).

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings, so arrays come
    back already placed on the mesh. A step that fails to load is reported and skipped in
    favour of the next older one; a missing step is an error.
    """
    steps = sorted(self.all_steps(), reverse=True) if step is None else [step]
    if not steps:
      raise UserError(f"no checkpoint in {self.directory}; train first or point --workdir "
                      "at a run that has one.")
    errors = []
    for s in steps:
      try:
        restored = self._manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        if errors:
          _log.warning("restored step %d after skipping unreadable steps: %s", s, errors)
        return restored.state, restored.data, restored.meta
      except Exception as e:  # noqa: BLE001 - report and fall back to an older step
        errors.append(f"step {s}: {type(e).__name__}: {str(e)[:300]}")
        _log.warning("checkpoint step %d in %s could not be restored: %s", s,
                        self.directory, e)
    raise UserError(f"no checkpoint in {self.directory} could be restored:\n  "
                    + "\n  ".join(errors) + "\nIf the model config changed, use a new "
                    "--workdir; otherwise delete the broken step directories.")

  def restore_meta(self, step: int | None = None):
    """Only the JSON metadata (cheap: no arrays), e.g. to rebuild the model for generate."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f"no checkpoint in {self.directory}; train first or point --workdir "
                      "at a run that has one.")
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored.meta

  def restore_params(self, step: int | None = None):
    """(params, meta) at `step` (default latest) on the default device, without needing the
    optimizer or mesh that wrote them: for generation and evaluation."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f"no checkpoint in {self.directory}; train first or point --workdir "
                      "at a run that has one.")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    return restored.state["params"], restored.meta

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def encode_bytes(data: bytes) -> str:
  return base64.b64encode(data).decode("ascii")


def decode_bytes(text: str) -> bytes:
  return base64.b64decode(text.encode("ascii"))


def abstract_like(tree, shardings):
  """ShapeDtypeStructs with shardings for restoring `tree`'s structure onto the mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
