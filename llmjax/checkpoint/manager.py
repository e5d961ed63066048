"""Orbax checkpoints that resume exactly.

A checkpoint step directory holds three items:
  state  the TrainState (params, optimizer state, step, RNG) as sharded arrays,
  data   the data iterator's state (JSON), so a resumed run sees the same batches,
  meta   JSON: the model config, the operative gin config and the serialized tokenizer
         (base64), so a checkpoint always knows how to rebuild its model and its text,
and `checksums.json`: the CRC-32 of every file in the step, written once the
(asynchronous) save has finished and checked before anything is read back, so a byte
changed on disk is caught instead of restored. A step whose writer was killed after
orbax committed it but before the checksums were written has none and is read as it
is (as are checkpoints from before checksums). Nothing is ever loaded through pickle.
"""

import base64
import dataclasses
import json
import logging
import os
import time
import zlib

import jax
import orbax.checkpoint as ocp
from etils import epath

from llmjax.errors import UserError

ITEMS = ("state", "data", "meta")
CHECKSUMS = "checksums.json"
_log = logging.getLogger(__name__)


class CheckpointManager:
  """Thin wrapper over `ocp.CheckpointManager` with llmjax's three items.

  `cleanup_tmp=True` (the trainer's manager) removes the temporary directories of saves
  that a killed process never finished; leave it off for readers (generate, eval), which
  must not touch the in-flight save of a run that is still training.
  """

  def __init__(self, directory, *, save_every: int = 1000, keep: int = 3,
               async_save: bool = True, cleanup_tmp: bool = False):
    self.directory = epath.Path(os.path.abspath(directory))  # orbax needs absolute paths
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_every, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=cleanup_tmp)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
    self.bad_steps: dict[int, str] = {}  # step -> why it could not be restored (last restore)
    self._unsealed: list[int] = []  # saved steps still waiting for their checksums

  def latest_step(self):
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def save(self, step: int, state, data_state, meta, *, force: bool = False) -> bool:
    """Starts an async save if `step` is on the cadence (or `force`). Returns whether it did."""
    if not (force or self._manager.should_save(step)):
      return False
    self._seal()  # orbax finishes the previous save before it starts a new one anyway
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(_on_disk(state)), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta))
    saved = self._manager.save(step, args=args, force=force)
    if saved:
      self._unsealed.append(step)
    return saved

  def _seal(self):
    """Waits for the pending save and writes the checksums of the steps it finished."""
    self._manager.wait_until_finished()
    if jax.process_index() == 0:
      for step in self._unsealed:
        directory = self.directory / str(step)
        if directory.exists():
          (directory / CHECKSUMS).write_text(json.dumps(_file_checksums(directory)))
    self._unsealed = []

  def _verify(self, step: int):
    """Raises ValueError naming the first file that differs from its checksum."""
    directory = self.directory / str(step)
    path = directory / CHECKSUMS
    if not path.exists():
      return  # written before checksums existed, or its writer died right after the save
    want = json.loads(path.read_text())
    got = _file_checksums(directory)
    for name, crc in sorted(want.items()):
      if got.get(name) != crc:
        why = "is missing" if name not in got else "does not match its checksum"
        raise ValueError(f"{name} {why} (the file changed after the checkpoint was written)")

  def restore(self, abstract_state, step: int | None = None, *, check_meta=None,
              quarantine: bool = True):
    """Restores (state, data_state, meta) at `step` (default: the newest good step).

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings, so arrays come
    back already placed on the mesh. `check_meta(meta)` may raise UserError to reject a
    step (e.g. another model config) before any array is read. A step that fails (bad
    metadata, truncated or missing files, another tree structure) is named in a warning
    and in `self.bad_steps`, and the next older step is tried. With `quarantine`, bad
    steps newer than the restored one are moved to `<directory>.bad/` (never deleted):
    left in place they would count towards `keep` and push good steps out, and block
    re-saving their step numbers.
    """
    self._manager.reload()  # the directory may have changed since this manager listed it
    steps = sorted(self.all_steps(), reverse=True) if step is None else [step]
    if not steps:
      raise UserError(f"no checkpoint in {self.directory}; train first or point --workdir "
                      "at a run that has one.")
    self.bad_steps, mismatches = {}, []
    for s in steps:
      try:
        restored = self._restore_step(s, abstract_state, check_meta)
      except UserError as e:  # the step is readable but belongs to another config
        self.bad_steps[s] = str(e)
        mismatches.append(s)
        continue
      except Exception as e:  # noqa: BLE001 - corrupt or partial: fall back to an older step
        self.bad_steps[s] = f"{type(e).__name__}: {str(e)[:300]}"
        continue
      if self.bad_steps:
        _log.warning("checkpoint steps %s in %s are bad; restored step %d instead",
                     sorted(self.bad_steps), self.directory, s)
        if quarantine and step is None:
          self._quarantine([b for b in self.bad_steps if b > s])
      return restored
    if len(mismatches) == len(steps):
      raise UserError(f"{self.bad_steps[steps[0]]} (all {len(steps)} checkpoint steps in "
                      f"{self.directory} disagree: {sorted(steps)})")
    raise UserError(f"no checkpoint in {self.directory} could be restored:\n  " + "\n  ".join(
        f"step {s}: {why}" for s, why in self.bad_steps.items()) + "\nIf the model config "
        "changed, use a new --workdir; otherwise move the broken step directories away.")

  def _restore_step(self, step, abstract_state, check_meta):
    self._verify(step)
    meta = self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta
    if not isinstance(meta, dict):
      raise TypeError(f"meta is a {type(meta).__name__}, not a JSON object")
    if check_meta is not None:
      check_meta(meta)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_on_disk(abstract_state)), data=ocp.args.JsonRestore()))
    state = restored.state
    if dataclasses.is_dataclass(abstract_state):
      state = dataclasses.replace(abstract_state, **state)
    _check_structure(state, abstract_state)
    return state, restored.data, meta

  def _quarantine(self, steps):
    """Moves bad step directories out of orbax's sight (into `<directory>.bad/`)."""
    if not steps or jax.process_index() != 0:
      return
    bad_root = epath.Path(f"{self.directory}.bad")
    bad_root.mkdir(parents=True, exist_ok=True)
    for s in steps:
      source = self.directory / str(s)
      target = bad_root / f"{s}-{time.strftime('%Y%m%d-%H%M%S')}"
      if source.exists():
        source.rename(target)
        _log.warning("moved bad checkpoint step %d to %s", s, target)
    self._manager.reload()

  def _existing(self, step: int | None) -> int:
    """`step`, or the latest when None; a UserError naming the steps there are if absent."""
    steps = sorted(self.all_steps())
    if not steps:
      raise UserError(f"no checkpoint in {self.directory}; train first or point --workdir "
                      "at a run that has one.")
    if step is None:
      return steps[-1]
    if step not in steps:
      raise UserError(f"no checkpoint step {step} in {self.directory}; it has steps "
                      f"{', '.join(map(str, steps))}: pass one of them (or leave --step "
                      "out for the latest).")
    return step

  def read(self, step: int | None = None):
    """(state, data_state, meta) at `step` (default latest) as host arrays, without a
    target structure or mesh: for inspecting and comparing checkpoints."""
    step = self._existing(step)
    self._verify(step)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return restored.state, restored.data, restored.meta

  def restore_meta(self, step: int | None = None):
    """Only the JSON metadata (cheap: no arrays), e.g. to rebuild the model for generate."""
    step = self._existing(step)
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored.meta

  def restore_params(self, step: int | None = None):
    """(params, meta) at `step` (default latest) on the default device, without needing the
    optimizer or mesh that wrote them: for generation, evaluation, export and warm starts.
    A PPO run's value model (`value_head`, a separate `critic`) is left out: none of them
    reads it, and a critic's LoRA adapters belong to no layer of the language model. A
    step whose files fail their checksums is a UserError (nothing damaged is loaded)."""
    from llmjax.objectives.ppo import VALUE_MODEL
    step = self._existing(step)
    try:
      self._verify(step)
    except ValueError as e:
      raise UserError(f"checkpoint step {step} in {self.directory} is damaged: {e}; pass "
                      "an older --step, or retrain.") from None
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    params = {k: v for k, v in restored.state["params"].items() if k not in VALUE_MODEL}
    return params, restored.meta

  def wait(self):
    self._seal()

  def close(self):
    self._seal()
    self._manager.close()


def _file_checksums(directory) -> dict[str, str]:
  """{path relative to the step directory: CRC-32 (hex)} of every file but the sums."""
  out = {}
  root = str(directory)
  for base, _, files in os.walk(root):
    for name in files:
      path = os.path.join(base, name)
      rel = os.path.relpath(path, root)
      if rel == CHECKSUMS:
        continue
      crc = 0
      with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
          crc = zlib.crc32(chunk, crc)
      out[rel] = f"{crc:08x}"
  return out


def encode_bytes(data: bytes) -> str:
  return base64.b64encode(data).decode("ascii")


def decode_bytes(text: str) -> bytes:
  return base64.b64decode(text.encode("ascii"))


def _on_disk(state):
  """What is written for `state`: a dataclass (the TrainState) as a dict of its fields,
  without the fields that hold no arrays (an empty `frozen`), so a run without frozen
  trees writes and reads the same checkpoints as runs from before that field existed."""
  if not dataclasses.is_dataclass(state):
    return state
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
          if jax.tree.leaves(getattr(state, f.name))}


def abstract_like(tree, shardings):
  """ShapeDtypeStructs with shardings for restoring `tree`'s structure onto the mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _check_structure(restored, abstract) -> None:
  """Orbax restores into the target's structure; a checkpoint with other or differently
  shaped leaves must not pass silently."""
  got, want = jax.tree.structure(restored), jax.tree.structure(abstract)
  if got != want:
    raise ValueError(f"tree structure {got} does not match the model's {want}")
  for (path, b), a in zip(jax.tree_util.tree_flatten_with_path(abstract)[0],
                          jax.tree.leaves(restored)):
    if a.shape != b.shape or a.dtype != b.dtype:
      raise ValueError(f"{jax.tree_util.keystr(path)}: {a.shape} {a.dtype} in the "
                       f"checkpoint, {b.shape} {b.dtype} in the model")
