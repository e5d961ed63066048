"""The objective protocol: everything the trainer, evaluation and sampling ask of an
objective. The trainer never branches on architecture or objective; a new objective
(SFT, a reward model, DPO, PPO) is a class with these methods.

  feature_fn(example, tokenizer)   one record -> numpy features, packed by the pipeline
                                   (`DataConfig.feature_lengths` names their row lengths)
  init_inputs(lengths)             keyword arguments of `model.init` for such rows
  loss_sums(model, params, batch, *, rng, deterministic, frozen)
                                   summed metrics of one batch; must hold `loss` (what
                                   is differentiated) and `weight` (its normalizer: the
                                   step divides gradients and `summarize` divides sums
                                   by the total weight, so gradient accumulation and
                                   multi-host sums stay exact)
  summarize(sums)                  summed metrics -> the logged means
  frozen_trees(params)             named parameter trees the objective needs beside the
                                   trained ones, held in `TrainState.frozen` (a DPO
                                   reference model); `frozen` in `loss_sums` is that dict
  can_sample                       whether the end-of-run sample (a causal-LM prompt)
                                   makes sense
  new_params (optional)            a regex over parameter paths the objective adds to
                                   the network (a reward model's 'reward_head'): a
                                   warm start from a source without them keeps their
                                   initialization instead of failing
  trained_params (optional)        a regex of parameters that train even when PEFT
                                   trains only adapters (that reward head)
  warm_params(params) (optional)   a fresh run's parameters after its warm start,
                                   adjusted (PPO copies the policy into its critic)

Rollout objectives (GRPO, PPO) add the experience path, which the train step takes
when `make_experience` exists (llmjax/train/step.py):

  make_experience(model, params, batch, *, rng, frozen, state)
                                   rollouts, rewards, advantages of a batch, no gradient:
                                   `(experience rows, rollout metric sums)`
  experience_sums(model, params, experience, *, rng, frozen)
                                   the summed loss of some experience rows
  epochs, minibatches              optimizer passes over an experience batch, and
                                   updates per pass
  initial_state() / update_state(state, rollout_sums) / state_metrics(state)
                                   a small state carried from step to step in
                                   `TrainState.objective` (PPO's adaptive KL β)

`TokenObjective` gives the defaults of a token-level objective; subclasses override
what differs.
"""

from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.objectives import losses


@runtime_checkable
class Objective(Protocol):
  """What every objective implements (see the module docstring)."""

  can_sample: ClassVar[bool]

  def feature_fn(self, example: Mapping[str, Any], tokenizer) -> dict[str, np.ndarray]: ...

  def init_inputs(self, lengths: Mapping[str, int]) -> dict[str, Any]: ...

  def loss_sums(self, model, params, batch: Mapping[str, jax.Array], *,
                rng: jax.Array | None = None, deterministic: bool = True,
                frozen: Mapping[str, Any] | None = None) -> dict[str, jax.Array]: ...

  def summarize(self, sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]: ...

  def frozen_trees(self, params) -> dict[str, Any]: ...


class TokenObjective:
  """Defaults for objectives scored per token with `losses.cross_entropy_sums`."""

  can_sample: ClassVar[bool] = True

  def init_inputs(self, lengths: Mapping[str, int]) -> dict[str, Any]:
    """One row of `lengths['tokens']` tokens."""
    return {"tokens": jnp.zeros((1, lengths["tokens"]), jnp.int32)}

  def summarize(self, sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-token loss, perplexity and accuracy (`losses.summarize`)."""
    return losses.summarize(sums)

  def frozen_trees(self, params) -> dict[str, Any]:
    """None: every parameter tree this objective reads is the model's."""
    return {}


def dropout_rngs(rng: jax.Array | None, deterministic: bool):
  """`model.apply`'s `rngs` for a training call (dropout on) or None."""
  return {"dropout": rng} if (rng is not None and not deterministic) else None
