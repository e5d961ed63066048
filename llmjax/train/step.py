"""The train and eval steps: pure functions, jit-compiled once by the loop.

Losses are accumulated as sums over micro-batches and divided once by the summed
`weight`, so gradient accumulation gives the same update as one big batch. Gradients
are taken for the trainable parameters only (a frozen leaf is a constant of the loss;
its update is zero and it has no optimizer state; an integer leaf, such as a QLoRA
base's 4-bit codes, is always frozen and its gradient is a zero of its dtype). A
non-finite loss or gradient never
reaches the parameters: the update is dropped and `nonfinite` is reported, and the loop
halts or counts it, as configured.

Rollout objectives (PPO, GRPO) train through llmjax/train/experience.py.
"""

import jax
import jax.numpy as jnp

from llmjax.optim import optimizers
from llmjax.train.state import TrainState


def _split_microbatches(batch, num):
  """[B, ...] -> [num, B / num, ...] for every array in the batch."""
  return jax.tree.map(lambda x: x.reshape((num, x.shape[0] // num) + x.shape[1:]), batch)


def grads_and_sums(loss_fn, params, batch, rng, grad_accum_steps):
  """`(summed gradients, summed metrics)` of `loss_fn(params, batch, rng)` over
  `grad_accum_steps` micro-batches."""
  grad_fn = optimizers.grad_with_int_leaves(loss_fn)  # jax.grad(loss_fn, has_aux=True)
  if grad_accum_steps == 1:
    return grad_fn(params, batch, rng)

  def body(carry, xs):
    grads, sums = carry
    micro, i = xs
    g, s = grad_fn(params, micro, jax.random.fold_in(rng, i))
    return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s)), None

  micro = _split_microbatches(batch, grad_accum_steps)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  zero_sums = jax.tree.map(
      jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro),
                                                      rng)[1]))
  (grads, sums), _ = jax.lax.scan(body, (zero_grads, zero_sums),
                                  (micro, jnp.arange(grad_accum_steps)))
  return grads, sums


def updates_per_step(objective) -> int:
  """Optimizer updates one train step applies: epochs x minibatches for a rollout
  objective, else 1."""
  if getattr(objective, "make_experience", None) is None:
    return 1
  return objective.epochs * objective.minibatches


def masked(params, trainable):
  """`params` with the frozen leaves behind stop_gradient (no gradient computed through
  them); `params` itself when everything trains."""
  if trainable is None:
    return params
  return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)


def make_train_step(model, objective, tx, schedule, *, grad_accum_steps: int = 1,
                    trainable=None):
  """Returns `train_step(state, batch) -> (state, metrics)`.

  `trainable`: a pytree of bools over the parameters (`OptimizerConfig.trainable_mask`),
  None = all train. It must agree with `tx`, which gives frozen leaves zero updates.
  A rollout objective gets the experience path (llmjax/train/experience.py).
  """
  if getattr(objective, "make_experience", None) is not None:
    from llmjax.train import experience
    return experience.make_train_step(model, objective, tx, schedule,
                                      grad_accum_steps=grad_accum_steps, trainable=trainable)

  def loss_fn(params, batch, rng, frozen):
    sums = objective.loss_sums(model, masked(params, trainable), batch, rng=rng,
                               deterministic=False, frozen=frozen)
    return sums["loss"], sums

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    grads, sums = grads_and_sums(lambda p, b, r: loss_fn(p, b, r, state.frozen),
                                 state.params, batch, rng, grad_accum_steps)
    weight = jnp.maximum(sums["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    params, opt_state, grad_norm, finite = optimizers.apply_update(
        tx, grads, state.opt_state, state.params, trainable, sums["loss"])
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = objective.summarize(sums)
    metrics.update(grad_norm=grad_norm, param_norm=optimizers.float_norm(new_state.params),
                   learning_rate=schedule(state.step), nonfinite=1 - finite.astype(jnp.int32))
    return new_state, metrics

  return train_step


def make_eval_step(model, objective):
  """Returns `eval_step(params, batch, frozen) -> sums` (add sums over batches, then
  `objective.summarize`)."""

  def eval_step(params, batch, frozen=None):
    return objective.loss_sums(model, params, batch, deterministic=True, frozen=frozen or {})

  return eval_step
