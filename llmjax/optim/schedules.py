"""Learning-rate schedules: linear warmup, then cosine / linear decay or constant."""

import optax

from llmjax.errors import UserError

DECAYS = ("cosine", "linear", "constant")


def make_schedule(peak_lr: float, total_steps: int, warmup_steps: int = 0,
                  decay: str = "cosine", end_lr_ratio: float = 0.1) -> optax.Schedule:
  """Warmup from 0 to `peak_lr` over `warmup_steps`, then decay to `end_lr_ratio * peak_lr`
  at `total_steps` (cosine or linear), or stay at `peak_lr` (constant)."""
  if decay not in DECAYS:
    raise UserError(f"unknown learning-rate decay {decay!r}; use one of {DECAYS}.")
  if warmup_steps < 0 or total_steps <= 0:
    raise UserError(f"need total_steps > 0 and warmup_steps >= 0, got {total_steps=}, "
                    f"{warmup_steps=}.")
  warmup_steps = min(warmup_steps, total_steps)
  decay_steps = max(total_steps - warmup_steps, 1)
  end_lr = peak_lr * end_lr_ratio
  if decay == "cosine":
    after = optax.cosine_decay_schedule(peak_lr, decay_steps, alpha=end_lr_ratio)
  elif decay == "linear":
    after = optax.linear_schedule(peak_lr, end_lr, decay_steps)
  else:
    after = optax.constant_schedule(peak_lr)
  if warmup_steps == 0:
    return after
  warmup = optax.linear_schedule(0.0, peak_lr, warmup_steps)
  return optax.join_schedules([warmup, after], [warmup_steps])
