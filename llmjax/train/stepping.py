"""The step loop of a run (`loop.train` builds everything it needs first): steps,
metrics fetched one step late, log lines, evals, checkpoints, NaN/Inf checks and
SIGTERM preemption.

A resumed run logs each step once: the metrics of the steps since the last log line go
into every checkpoint (`log_state`) and come back with it, and `metrics.jsonl` and the
TensorBoard events drop what an interrupted attempt logged past the restored step. So
the log of an interrupted run equals an uninterrupted one's in its steps and losses.
"""

import signal
import time

import jax
import numpy as np

from llmjax.errors import NonFiniteError
from llmjax.train import host_memory
from llmjax.train import metrics as metrics_lib


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. inside a test runner thread)
      self._old = None

  def _handle(self, signum, frame):
    self.requested = True

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


class StepLoop:
  """Runs `setup`'s train step from the restored step to `cfg.num_steps` (or
  `stop_at_step`). A NaN/Inf update has already been dropped inside the step; here it
  halts the run or is counted, as `cfg.on_nonfinite` says."""

  def __init__(self, setup, cfg, mfu_per_step_per_s: float, log):
    self.s, self.cfg, self.mfu_per_step_per_s, self.log = setup, cfg, mfu_per_step_per_s, log
    self.window = list(setup.log_state.get("window", []))  # settled, not yet logged
    self.skipped = setup.log_state.get("nonfinite_total", 0)

  def log_state(self) -> dict:
    """What a checkpoint keeps of the log: the unlogged steps' metrics, the skip count."""
    return {"window": self.window, "nonfinite_total": self.skipped}

  def _restart_clock(self):  # compile and eval time stay out of tokens/s
    self.window_start, self.timed_steps = time.time(), 0

  def run(self):
    from tqdm.auto import tqdm

    s, cfg = self.s, self.cfg
    is_main = jax.process_index() == 0
    preempt, state, pending = _Preemption(), s.state, None
    start_step, end = int(state.step), min(cfg.num_steps, cfg.stop_at_step or cfg.num_steps)
    self.writer = metrics_lib.MetricsWriter(s.workdir, enabled=is_main, resume_step=start_step)
    self.bar = tqdm(total=cfg.num_steps, initial=start_step, dynamic_ncols=True, desc="train",
                    disable=not (cfg.progress_bar and is_main))
    self._restart_clock()
    try:
      for step in range(start_step, end):
        state, metrics = s.train_step(state, s.put(next(s.train_iter)))
        self.timed_steps += 1
        if step == start_step:  # the first call compiles: keep that out of tokens/s
          jax.block_until_ready(metrics)
          self.bar.write(f"compiled and ran the first step in "
                         f"{time.time() - self.window_start:.1f}s")
          self._restart_clock()
        if pending is not None:  # fetched one step late: the host never waits on a step
          self._settle(*pending)  # it just dispatched
        pending, done = (step + 1, metrics), step + 1
        if done % cfg.log_every == 0 or done == cfg.num_steps:
          self._settle(*pending)
          pending = None
          self._write_log(done)
        if done % cfg.eval_every == 0 or done == cfg.num_steps:
          self._evaluate(done, state)
        self.bar.update(1)
        if preempt.requested or done == end or s.ckpt.should_save(done):
          if pending is not None:  # the checkpoint keeps every step's metrics up to `done`
            self._settle(*pending)
            pending = None
          self._save(done, state)
        if preempt.requested:
          self._preempted(done)
          break
    finally:
      self.bar.close()
      self.writer.close()
      preempt.restore()
    return state

  def _save(self, done, state):
    s = self.s
    s.ckpt.save(done, state, s.train_iter.get_state(), dict(s.meta, log=self.log_state()),
                force=True)

  def _settle(self, step, metrics):
    metrics = {k: metrics_lib.to_python(v) for k, v in jax.device_get(metrics).items()}
    host_memory.trim_if_grown()  # hand back step blocks the heap could not reuse
    if metrics["nonfinite"]:
      self.skipped += 1
      if self.cfg.on_nonfinite == "halt":
        ckpt = self.s.ckpt
        ckpt.wait()  # the step named below is on disk, not still being written
        last = ckpt.latest_step()
        raise NonFiniteError(
            f"non-finite loss or gradient at step {step} (loss={metrics['loss']}, grad_norm="
            f"{metrics['grad_norm']}); the update was not applied. Last good checkpoint: "
            f"{'step ' + str(last) if last is not None else 'none'} in {ckpt.directory}. "
            + ("Every completion's reward was NaN (nan_rewards=1): the reward function "
               "failed on all of them; fix it, or set TrainConfig.on_nonfinite='skip'."
               if metrics.get("nan_rewards") == 1 else
               "Lower the learning rate or set TrainConfig.on_nonfinite='skip'."))
    self.window.append(metrics)

  def _write_log(self, done):
    elapsed = max(time.time() - self.window_start, 1e-9)
    record = {k: float(np.mean([m[k] for m in self.window])) for k in self.window[0]}
    if self.timed_steps:
      record.update(step_time=elapsed / self.timed_steps,
                    tokens_per_s=self.s.tokens_per_step * self.timed_steps / elapsed,
                    mfu=self.mfu_per_step_per_s * self.timed_steps / elapsed)
    record["nonfinite_total"] = self.skipped
    self.writer.write(done, record)
    self.bar.set_postfix(loss=f"{record['loss']:.3f}",
                         tok_s=f"{record.get('tokens_per_s', 0):.0f}")
    self.window = []
    self._restart_clock()

  def _evaluate(self, done, state):
    """`cfg.eval_batches` batches of the validation split, summarized by the objective."""
    s, total = self.s, None
    for i, batch in enumerate(s.make_eval_iter()):
      if i >= self.cfg.eval_batches:
        break
      sums = s.eval_step(state.params, s.put(batch), state.frozen)
      total = sums if total is None else jax.tree.map(lambda a, b: a + b, total, sums)
    if total is not None:
      summary = s.objective.summarize(jax.device_get(total))
      ev = {f"eval_{k}": v for k, v in summary.items()}
      self.writer.write(done, ev)
      ppl = f" (ppl {ev['eval_perplexity']:.2f})" if "eval_perplexity" in ev else ""
      self.bar.write(f"step {done}: eval_loss {ev['eval_loss']:.4f}{ppl}")
    if s.eval_tasks:  # TrainConfig.eval_tasks: perplexity, lm-eval tasks
      extra = s.eval_tasks(s.net, state.params, s.tokenizer)
      self.writer.write(done, extra)
      self.bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in extra.items()))
    self._restart_clock()

  def _preempted(self, done):
    s = self.s
    s.ckpt.wait()
    self.log(f"SIGTERM: saved checkpoint at step {done} in {s.ckpt.directory}; exiting. "
             "Run the same command again to resume.")
