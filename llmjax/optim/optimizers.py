"""AdamW with global-norm clipping and a weight-decay mask (Loshchilov & Hutter, 2019),
over the trainable part of the parameters.

By default weight decay applies to matrices only: norms' `scale`, every `bias` and the
token/position `embedding` tables are skipped, as in GPT-2/nanoGPT and most LLM recipes.

`OptimizerConfig.trainable` (a regex over '/'-joined parameter paths, e.g.
'decoder/layers_1/' or 'lora_') selects which parameters train; the others are frozen:
`optax.multi_transform` gives them a zero update and no optimizer state, so a LoRA or
head-only run holds moments for its trainable parameters only. Unset, everything trains
and the optimizer is the plain chain (the state checkpoints have always held).
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from llmjax.optim import schedules

# Parameter-path patterns (joined with '/') that get no weight decay by default.
# Biases, norm scales, embedding tables, and their PEFT kin (adapter biases, soft prompts).
DEFAULT_NO_DECAY = (r"(^|/)bias$", r"(^|/)scale$", r"embedding", r"/adapter_(down|up)_bias_",
                    r"/prompt_[A-Za-z0-9]+$")


def _path_str(path):
  parts = []
  for k in path:
    key = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
    parts.append(str(key))
  return "/".join(parts)


def path_mask(params, pattern: str):
  """Pytree of bools: True where the parameter's path matches the regex `pattern`."""
  regex = re.compile(pattern)
  return jax.tree_util.tree_map_with_path(  # a boxed (logically partitioned) leaf is one
      lambda path, _: regex.search(_path_str(path)) is not None, params,
      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def decay_mask(params, no_decay=DEFAULT_NO_DECAY):
  """Pytree of bools: True where weight decay applies (path matches none of `no_decay`)."""
  patterns = [re.compile(p) for p in no_decay]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(p.search(_path_str(path)) for p in patterns), params)


def adamw(learning_rate, *, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
          weight_decay: float = 0.1, clip_norm: float | None = 1.0,
          no_decay=DEFAULT_NO_DECAY) -> optax.GradientTransformation:
  """`learning_rate` is a float or an optax schedule (see `schedules.make_schedule`)."""
  parts = []
  if clip_norm:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay, mask=lambda p: decay_mask(p, no_decay)))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW + schedule hyper-parameters (what gin binds for the optimizer)."""

  peak_lr: float = 1e-3
  warmup_steps: int = 100
  decay: str = "cosine"           # cosine | linear | constant
  end_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float | None = 1.0
  trainable: str | None = None    # regex over parameter paths; None = every parameter

  def make(self, total_steps: int, updates_per_step: int = 1):
    """Returns (optax transformation, learning-rate schedule), the schedule over train
    steps. An objective that applies several optimizer updates per train step (PPO's
    epochs x minibatches over one rollout batch) gives `updates_per_step`: the optimizer
    then reads the schedule at its update count // updates_per_step, so warmup and decay
    stay in train steps."""
    schedule = schedules.make_schedule(self.peak_lr, total_steps, self.warmup_steps,
                                       self.decay, self.end_lr_ratio)
    by_update = schedule if updates_per_step == 1 else (
        lambda count: schedule(count // updates_per_step))
    tx = adamw(by_update, b1=self.b1, b2=self.b2, eps=self.eps,
               weight_decay=self.weight_decay, clip_norm=self.clip_norm)
    return only_trainable(tx, self.trainable), schedule

  def trainable_mask(self, params):
    """Pytree of bools over `params`: which leaves train (all, when `trainable` is None)."""
    if self.trainable is None:
      return jax.tree.map(lambda _: True, params)
    return path_mask(params, self.trainable)


def only_trainable(tx: optax.GradientTransformation, trainable: str | None):
  """`tx` on the parameters whose path matches `trainable`, zero updates (and no state)
  for the rest; `tx` itself when `trainable` is None."""
  if trainable is None:
    return tx
  labels = lambda params: jax.tree.map(lambda t: "train" if t else "frozen",
                                       path_mask(params, trainable))
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def grad_with_int_leaves(loss_fn):
  """`jax.grad(loss_fn, has_aux=True)` over parameters that may hold integer leaves (a
  QLoRA base's 4-bit codes, `llmjax.quant.qlora`): those are always frozen, and their
  gradient is a zero of their own dtype rather than jax's `float0`, so gradient sums,
  accumulation and `only_trainable`'s zero update treat them like any frozen leaf."""
  grad = jax.grad(loss_fn, has_aux=True, allow_int=True)

  def grad_fn(params, *args):
    grads, aux = grad(params, *args)
    zero_if_int = lambda g, p: jnp.zeros_like(p) if g.dtype == jax.dtypes.float0 else g
    return jax.tree.map(zero_if_int, grads, params), aux

  return grad_fn


def float_norm(params) -> jax.Array:
  """The global norm of the floating-point leaves (integer codes are not weights)."""
  return optax.global_norm([p for p in jax.tree.leaves(params)
                            if jnp.issubdtype(p.dtype, jnp.floating)])


def apply_update(tx, grads, opt_state, params, trainable, loss):
  """One guarded optimizer update: `(params, opt_state, grad_norm, finite)`.

  `trainable` (a pytree of bools, or None: all train) keeps frozen leaves the very same
  arrays and leaves them out of the gradient norm. A non-finite `loss` or gradient norm
  drops the update: the old parameters and optimizer state come back, `finite` False."""
  updates, new_opt = tx.update(grads, opt_state, params)
  if trainable is None:
    new_params, grad_norm = optax.apply_updates(params, updates), optax.global_norm(grads)
  else:
    new_params = jax.tree.map(lambda p, u, t: optax.apply_updates(p, u) if t else p,
                              params, updates, trainable)
    grad_norm = optax.global_norm(jax.tree.leaves(
        jax.tree.map(lambda g, t: g if t else None, grads, trainable)))
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  return keep(new_params, params), keep(new_opt, opt_state), grad_norm, finite
