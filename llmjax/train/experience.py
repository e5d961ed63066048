"""The train step of rollout objectives (PPO, GRPO: objectives with `make_experience`).

A step first makes an experience batch from the batch's prompts (rollouts, rewards, old
log-probs, advantages; no gradient), then applies `epochs` x `minibatches` optimizer
updates over it: each epoch a new permutation of its rows, cut into `minibatches`
parts, each part's gradient the objective's `experience_sums` loss over that part's
weight (with `grad_accum_steps` micro-batches per part). Then the objective's own state
(`TrainState.objective`: PPO's adaptive KL coefficient) is updated from the
experience's metrics. Loss metrics are summed over all updates and divided by `epochs`
(each epoch sees every row once), so they read as the mean over the experience; the
rollout metrics are the experience's own.
"""

import jax
import jax.numpy as jnp

from llmjax.errors import UserError
from llmjax.optim import optimizers
from llmjax.train.state import TrainState
from llmjax.train.step import grads_and_sums, masked


def make_train_step(model, objective, tx, schedule, *, grad_accum_steps: int = 1,
                    trainable=None):
  """Returns `train_step(state, batch) -> (state, metrics)` (module docstring);
  arguments as `llmjax.train.step.make_train_step`'s."""
  epochs, parts = objective.epochs, objective.minibatches

  def loss_fn(params, experience, rng, frozen):
    sums = objective.experience_sums(model, masked(params, trainable), experience, rng=rng,
                                     frozen=frozen)
    return sums["loss"], sums

  def minibatch(experience, rng, i):
    """Part `i % parts` of epoch `i // parts`'s permutation of the rows."""
    if parts == 1:
      return experience
    rows = jax.tree.leaves(experience)[0].shape[0]
    order = jax.random.permutation(jax.random.fold_in(rng, 2**20 + i // parts), rows)
    take = jax.lax.dynamic_slice_in_dim(order, (i % parts) * (rows // parts), rows // parts)
    return jax.tree.map(lambda x: x[take], experience)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    experience, rollout_sums = objective.make_experience(
        model, jax.lax.stop_gradient(state.params), batch, rng=rng, frozen=state.frozen,
        state=state.objective)
    check_minibatches(type(objective).__name__, jax.tree.leaves(experience)[0].shape[0],
                      parts, grad_accum_steps)

    def update(carry, i):
      params, opt_state = carry
      grads, sums = grads_and_sums(lambda p, b, r: loss_fn(p, b, r, state.frozen), params,
                                   minibatch(experience, rng, i), jax.random.fold_in(rng, i),
                                   grad_accum_steps)
      grads = jax.tree.map(lambda g: g / jnp.maximum(sums["weight"], 1.0), grads)
      params, opt_state, grad_norm, finite = optimizers.apply_update(
          tx, grads, opt_state, params, trainable, sums["loss"])
      return (params, opt_state), (sums, grad_norm, finite)

    (params, opt_state), (sums, grad_norms, finite) = jax.lax.scan(
        update, (state.params, state.opt_state), jnp.arange(epochs * parts))
    sums = {**rollout_sums, **jax.tree.map(lambda x: jnp.sum(x) / epochs, sums)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              objective=objective.update_state(state.objective, rollout_sums))
    metrics = objective.summarize(sums)
    metrics.update(objective.state_metrics(state.objective))
    metrics.update(grad_norm=jnp.mean(grad_norms),
                   param_norm=optimizers.float_norm(new_state.params),
                   learning_rate=schedule(state.step),
                   nonfinite=jnp.sum(1 - finite.astype(jnp.int32)))
    return new_state, metrics

  return train_step


def check_minibatches(name, rows, parts, grad_accum_steps):
  """A UserError unless the experience's rows split into `parts` minibatches of
  `grad_accum_steps` equal micro-batches."""
  if rows % parts or (rows // parts) % grad_accum_steps:
    raise UserError(f"{name} splits an experience batch of {rows} completions (batch_size x "
                    f"num_generations) into {name}.minibatches={parts} minibatches of "
                    f"{grad_accum_steps} accumulation steps each, which does not divide "
                    f"evenly: make {rows} a multiple of minibatches x grad_accum_steps.")
