"""The train and eval steps: pure functions, jit-compiled once by the loop.

Losses are accumulated as sums over micro-batches and divided once by the summed
`weight`, so gradient accumulation gives the same update as one big batch. Gradients
are taken for the trainable parameters only (a frozen leaf is a constant of the loss;
its update is zero and it has no optimizer state; an integer leaf, such as a QLoRA
base's 4-bit codes, is always frozen and its gradient is a zero of its dtype). A
non-finite loss or gradient never
reaches the parameters: the update is dropped and `nonfinite` is reported, and the loop
halts or counts it, as configured.

Rollout objectives (PPO, GRPO: `Objective.make_experience`) take another path: a train
step first makes an experience batch from the prompts (rollouts, rewards, old log-probs,
advantages; no gradient), then applies `epochs` x `minibatches` optimizer updates over it
(each epoch a new permutation of its rows, cut into `minibatches` parts; each part's
gradient is `experience_sums`' loss over that part's weight), then updates the
objective's own state (`update_state`: PPO's adaptive KL coefficient) from the
experience's metrics. Loss metrics are summed over all updates and divided by `epochs`
(every epoch sees each row once), so they read as the mean over the experience.
"""

import jax
import jax.numpy as jnp
import optax

from llmjax.errors import UserError
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


def updates_per_step(objective) -> int:
  """Optimizer updates one train step applies: epochs x minibatches for a rollout
  objective, else 1."""
  if getattr(objective, "make_experience", None) is None:
    return 1
  return objective.epochs * objective.minibatches


def _apply(tx, grads, opt_state, params, trainable):
  """`(params, opt_state, grad_norm)` after one update of `grads` (already divided by
  the weight); frozen leaves stay the very same arrays."""
  updates, new_opt = tx.update(grads, opt_state, params)
  if trainable is None:
    new_params, grad_norm = optax.apply_updates(params, updates), optax.global_norm(grads)
  else:
    new_params = jax.tree.map(lambda p, u, t: optax.apply_updates(p, u) if t else p,
                              params, updates, trainable)
    grad_norm = optax.global_norm(jax.tree.leaves(
        jax.tree.map(lambda g, t: g if t else None, grads, trainable)))
  return new_params, new_opt, grad_norm


def make_train_step(model, objective, tx, schedule, *, grad_accum_steps: int = 1,
                    trainable=None):
  """Returns `train_step(state, batch) -> (state, metrics)`.

  `trainable`: a pytree of bools over the parameters (`OptimizerConfig.trainable_mask`),
  None = all train. It must agree with `tx`, which gives frozen leaves zero updates.
  """

  def masked(params):
    if trainable is None:
      return params
    # frozen leaves: no gradient computed through them
    return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)

  def loss_fn(params, batch, rng, frozen):
    sums = objective.loss_sums(model, masked(params), batch, rng=rng, deterministic=False,
                               frozen=frozen)
    return sums["loss"], sums

  def update(params, opt_state, grads, sums):
    """One optimizer update from summed gradients; dropped when not finite."""
    weight = jnp.maximum(sums["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    new_params, new_opt, grad_norm = _apply(tx, grads, opt_state, params, trainable)
    finite = jnp.isfinite(sums["loss"]) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    return keep(new_params, params), keep(new_opt, opt_state), grad_norm, finite

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    grads, sums = _grads_and_sums(lambda p, b, r: loss_fn(p, b, r, state.frozen),
                                  state.params, batch, rng, grad_accum_steps)
    params, opt_state, grad_norm, finite = update(state.params, state.opt_state, grads, sums)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = objective.summarize(sums)
    metrics.update(grad_norm=grad_norm, param_norm=optimizers.float_norm(new_state.params),
                   learning_rate=schedule(state.step), nonfinite=1 - finite.astype(jnp.int32))
    return new_state, metrics

  def experience_loss_fn(params, experience, rng, frozen):
    sums = objective.experience_sums(model, masked(params), experience, rng=rng,
                                     frozen=frozen)
    return sums["loss"], sums

  def experience_train_step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    experience, rollout_sums = objective.make_experience(
        model, jax.lax.stop_gradient(state.params), batch, rng=rng, frozen=state.frozen,
        state=state.objective)
    rows = jax.tree.leaves(experience)[0].shape[0]
    epochs, parts = objective.epochs, objective.minibatches
    _check_minibatches(type(objective).__name__, rows, parts, grad_accum_steps)

    def one_update(carry, i):
      params, opt_state = carry
      epoch, part = i // parts, i % parts
      if parts == 1:
        minibatch = experience
      else:  # each epoch a new permutation of the rows
        order = jax.random.permutation(jax.random.fold_in(rng, 2**20 + epoch), rows)
        take = jax.lax.dynamic_slice_in_dim(order, part * (rows // parts), rows // parts)
        minibatch = jax.tree.map(lambda x: x[take], experience)
      grads, sums = _grads_and_sums(
          lambda p, b, r: experience_loss_fn(p, b, r, state.frozen), params, minibatch,
          jax.random.fold_in(rng, i), grad_accum_steps)
      params, opt_state, grad_norm, finite = update(params, opt_state, grads, sums)
      return (params, opt_state), (sums, grad_norm, finite)

    (params, opt_state), (sums, grad_norms, finite) = jax.lax.scan(
        one_update, (state.params, state.opt_state), jnp.arange(epochs * parts))
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

  if getattr(objective, "make_experience", None) is not None:
    return experience_train_step
  return train_step


def _check_minibatches(name, rows, parts, grad_accum_steps):
  if rows % parts or (rows // parts) % grad_accum_steps:
    raise UserError(f"{name} splits an experience batch of {rows} completions (batch_size x "
                    f"num_generations) into {name}.minibatches={parts} minibatches of "
                    f"{grad_accum_steps} accumulation steps each, which does not divide "
                    f"evenly: make {rows} a multiple of minibatches x grad_accum_steps.")


def make_eval_step(model, objective):
  """Returns `eval_step(params, batch, frozen) -> sums` (add sums over batches, then
  `objective.summarize`)."""

  def eval_step(params, batch, frozen=None):
    return objective.loss_sums(model, params, batch, deterministic=True, frozen=frozen or {})

  return eval_step
