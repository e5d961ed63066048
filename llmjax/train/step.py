"""The train and eval steps: pure functions, jit-compiled once by the loop.

Losses are accumulated as sums over micro-batches and divided once by the summed
`weight`, so gradient accumulation gives the same update as one big batch. Gradients
are taken for the trainable parameters only (a frozen leaf is a constant of the loss;
its update is zero and it has no optimizer state; an integer leaf, such as a QLoRA
base's 4-bit codes, is always frozen and its gradient is a zero of its dtype). A
non-finite loss or gradient never
reaches the parameters: the update is dropped and `nonfinite` is reported, and the loop
halts or counts it, as configured.
"""

import jax
import jax.numpy as jnp
import optax

from llmjax.optim import optimizers
from llmjax.train.state import TrainState


def _split_microbatches(batch, num):
  """[B, ...] -> [num, B / num, ...] for every array in the batch."""
  return jax.tree.map(lambda x: x.reshape((num, x.shape[0] // num) + x.shape[1:]), batch)


def _grads_and_sums(loss_fn, params, batch, rng, grad_accum_steps):
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


def make_train_step(model, objective, tx, schedule, *, grad_accum_steps: int = 1,
                    trainable=None):
  """Returns `train_step(state, batch) -> (state, metrics)`.

  `trainable`: a pytree of bools over the parameters (`OptimizerConfig.trainable_mask`),
  None = all train. It must agree with `tx`, which gives frozen leaves zero updates.
  """

  def loss_fn(params, batch, rng, frozen):
    if trainable is not None:  # frozen leaves: no gradient computed through them
      params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p),
                            params, trainable)
    sums = objective.loss_sums(model, params, batch, rng=rng, deterministic=False,
                               frozen=frozen)
    return sums["loss"], sums

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    grads, sums = _grads_and_sums(lambda p, b, r: loss_fn(p, b, r, state.frozen),
                                  state.params, batch, rng, grad_accum_steps)
    weight = jnp.maximum(sums["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if trainable is None:
      params, grad_norm = optax.apply_updates(state.params, updates), optax.global_norm(grads)
    else:  # frozen leaves stay the very same arrays
      params = jax.tree.map(lambda p, u, t: optax.apply_updates(p, u) if t else p,
                            state.params, updates, trainable)
      grad_norm = optax.global_norm(jax.tree.leaves(
          jax.tree.map(lambda g, t: g if t else None, grads, trainable)))
    finite = jnp.isfinite(sums["loss"]) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state))
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
