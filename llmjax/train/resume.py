"""The workdir side of a run: checking it, restoring from it, and leaving it clean when a
run is rejected before its first checkpoint."""

import dataclasses
import functools
import os
import shutil

import jax

from llmjax.checkpoint import manager as ckpt_lib
from llmjax.errors import UserError
from llmjax.quant import ptq


def check_workdir(workdir):
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_probe")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserError(f"workdir {workdir} is not writable ({e.strerror}); pass a --workdir "
                    "you can write to.") from e


def _meta_checker(ckpt, model_cfg, tok):
  """Rejects a checkpoint step made for another model or tokenizer before arrays load."""
  want = dataclasses.asdict(model_cfg)
  defaults = {f.name: f.default for f in dataclasses.fields(model_cfg)}

  def check(meta):
    ptq.require_float(meta, f"the checkpoint in {ckpt.directory}")  # resuming trains it
    saved = meta.get("model_config", {})
    if tok is not None and meta.get("tokenizer") not in (None, ckpt_lib.encode_bytes(
        tok.serialized())):
      raise UserError(
          f"the tokenizer ({tok.vocab_size} pieces) is not the one the checkpoint in "
          f"{ckpt.directory} was trained with (its embedding has {saved.get('vocab_size')} "
          "rows); put the run's original tokenizer.model back into the workdir (a copy is "
          "in every checkpoint's meta) or use a new --workdir.")
    # A field added after the checkpoint was written is read as its default, derived from
    # the saved fields where the default is derived (qkv_bias follows use_bias).
    if saved and set(defaults) - set(saved):
      saved = _with_new_fields(type(model_cfg), saved, defaults)
    if saved and any(saved.get(k) != v for k, v in want.items()):
      diff = {k: (saved.get(k), v) for k, v in want.items() if saved.get(k) != v}
      raise UserError(f"the checkpoint in {ckpt.directory} was trained with a different "
                      f"model config (field: (checkpoint, now) = {diff}); use a new "
                      "--workdir or restore the original config.")

  return check


def _with_new_fields(config_cls, saved, defaults):
  try:
    return dataclasses.asdict(config_cls(**{k: v for k, v in saved.items() if k in defaults}))
  except (UserError, TypeError, ValueError):
    return {**defaults, **saved}


def restore(ckpt, state, shardings, train_iter, model_cfg, log, tok=None):
  """`(state, log state)` of the newest good checkpoint (and its data position), or
  `(state, {})` if there is none. The log state is what `StepLoop` saved of the steps
  since its last log line, so the first line after a resume averages the same steps."""
  if ckpt.latest_step() is None:
    return state, {}
  abstract = ckpt_lib.abstract_like(state, shardings)
  state, data_state, meta = ckpt.restore(abstract,
                                         check_meta=_meta_checker(ckpt, model_cfg, tok))
  _report_bad_steps(ckpt, log)
  train_iter.set_state(data_state)
  log(f"resumed from step {int(state.step)} in {ckpt.directory}")
  return state, meta.get("log", {})


def _report_bad_steps(ckpt, log):
  """One line per skipped step; the full reasons go to `<checkpoints>.bad/skipped.log`."""
  if not ckpt.bad_steps:
    return
  details = f"{ckpt.directory}.bad/skipped.log"
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(details), exist_ok=True)
    with open(details, "a") as f:
      f.writelines(f"step {bad}: {why}\n" for bad, why in sorted(ckpt.bad_steps.items()))
  for bad, why in sorted(ckpt.bad_steps.items()):
    reason = why.strip().splitlines()[0] if why.strip() else "unreadable"
    log(f"checkpoint step {bad} in {ckpt.directory} is bad and was skipped: "
        f"{reason[:160]} (details: {details})")


def no_partial_workdir(fn):
  """A run stopped by a UserError before its first checkpoint leaves the workdir as it
  found it: what it wrote (a freshly trained tokenizer, the operative config) would
  otherwise be silently reused by the next run in that workdir."""

  @functools.wraps(fn)
  def wrapper(workdir, *args, **kwargs):
    path = os.path.abspath(workdir)
    before = set(os.listdir(path)) if os.path.isdir(path) else None
    try:
      return fn(workdir, *args, **kwargs)
    except UserError:
      checkpoints = os.path.join(path, "checkpoints")
      saved = os.path.isdir(checkpoints) and os.listdir(checkpoints)  # even one in flight
      if os.path.isdir(path) and not saved and jax.process_index() == 0:
        for name in set(os.listdir(path)) - (before or set()):
          target = os.path.join(path, name)
          if os.path.isdir(target):
            shutil.rmtree(target)
          else:
            os.remove(target)
        if before is None:
          os.rmdir(path)
      raise

  return wrapper


def write_operative_config(workdir, operative_config: str):
  """After restore (a rejected config must not replace the run's own), atomically."""
  if operative_config and jax.process_index() == 0:
    path = os.path.join(workdir, "operative_config.gin")
    with open(path + ".tmp", "w") as f:
      f.write(operative_config)
    os.replace(path + ".tmp", path)
