"""Group Relative Policy Optimization (GRPO; Shao et al. 2024, "DeepSeekMath: Pushing
the Limits of Mathematical Reasoning in Open Language Models", §4.1): policy-gradient
RL from a reward function, with no value model. Decoder-only models.

Each train step, for every prompt x of the batch (`B` prompts):

  1. rollouts  sample k = `num_generations` completions o_1..o_k of `max_new_tokens`
               tokens from π_θ (stop-gradient, temperature `temperature`), inside the
               jitted step (`rollout`: a prefill, then one cached step per token in
               `lax.scan`). A completion ends at its first EOS: later tokens are masked.
  2. rewards   r_i = reward(o_i), a registered function (llmjax/objectives/rewards.py).
  3. advantage A_i = (r_i − mean(r_1..r_k)) / (std(r_1..r_k) + eps): zero mean within each
               group (population std; a group of equal rewards has A = 0, no signal).
  4. loss      per completion token t, with ρ_t = π_θ(o_t|x, o_<t) / π_old(o_t|x, o_<t):
                 −min(ρ_t A_i, clip(ρ_t, 1−ε, 1+ε) A_i) + β KL_t
               KL_t = exp(ref_t − logp_t) − (ref_t − logp_t) − 1, the k3 estimator of
               KL(π_θ ‖ π_ref) (Schulman 2020, "Approximating KL divergence"), ≥ 0 and
               unbiased, against the frozen reference. π_old is the policy that
               sampled. With one update per rollout (`epochs = minibatches = 1`, the
               default) π_old is π_θ itself: ρ = exp(logp − stop_gradient(logp)) is 1
               in value while its gradient is ∇logp, the policy gradient A ∇log π, and
               the clip never binds. With `epochs` > 1 or `minibatches` > 1 (the
               paper's μ iterations; TRL's num_iterations) the trainer reuses the
               rollouts for several updates (llmjax/train/step.py) and ρ departs from 1.
  The loss of a completion is its token mean (GRPO's 1/|o_i|), and `weight` counts the
  completions scored, so `summarize` gives the mean over completions and gradient
  accumulation and data parallelism stay exact.

Log-probs are of completion tokens only (the prompt's own tokens and everything after
the EOS are excluded), under logits / `temperature`, the distribution sampled from (for
the reference too, as TRL does). The policy runs without dropout, as it sampled.

The reference π_ref (`beta > 0`) is a copy of the starting parameters (the `init_from`
checkpoint), `TrainState.frozen['reference']`, as DPO's (llmjax/objectives/dpo.py).

NaN rewards. A row whose reward is not finite (a judge that failed) is dropped: its
advantage is 0, it is left out of its group's mean and std, of `weight` and of every
metric but `nan_rewards` (the fraction of completions with a non-finite reward). When
no completion of an update has a finite reward, its loss is NaN on purpose: the trainer
then drops the update (parameters and optimizer state unchanged) and halts or counts it
as `TrainConfig.on_nonfinite` says, its message naming the failed rewards. A reward
function that raises is a UserError naming it, before any update.

Data: records with a `text` field (`shakespeare`, `local_text`); the prompt is the first
`prompt_len` tokens ([bos] + the text's tokens); shorter texts are skipped. Packing:
`DataConfig.feature_lengths = {'prompt': prompt_len}` (any mode: a row holds one prompt).
`DataConfig.batch_size` counts prompts; a step samples batch_size × k completions.

Metrics: loss, reward (mean), reward_std (mean within-group std), kl (mean per-token
k3), completion_length (tokens, EOS included), nan_rewards, completions.

The trainer's experience path: `make_experience` (rollouts, rewards, advantages, the
old and reference log-probs; no gradient) and `experience_sums` (the loss of experience
rows) are what llmjax/train/experience.py calls; `loss_sums` is the two in one, for
evaluation and tests.
"""

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from llmjax.errors import UserError
from llmjax.objectives.rollout import (  # noqa: F401 (rollout, completion_mask: re-exported)
  RolloutObjective,
  all_rewards_failed,
  completion_logps,
  completion_mask,
  rollout,
)

METRICS = ("reward", "reward_std", "kl", "completion_length")


def group_advantages(rewards: jax.Array, ok: jax.Array, group: int, eps: float):
  """`(A [B*k], group std [B*k])` of rewards `[B*k]` (groups of `group` consecutive rows),
  over the rows where `ok`; A = 0 elsewhere."""
  w = ok.reshape(-1, group).astype(jnp.float32)                             # [B, k]
  r = jnp.where(ok, rewards, 0.0).reshape(-1, group).astype(jnp.float32)    # [B, k]
  n = jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)
  mean = jnp.sum(r * w, axis=1, keepdims=True) / n
  std = jnp.sqrt(jnp.sum(w * jnp.square(r - mean), axis=1, keepdims=True) / n)
  adv = jnp.where(w > 0, (r - mean) / (std + eps), 0.0)
  return adv.reshape(-1), jnp.broadcast_to(std, w.shape).reshape(-1)


def token_loss(logp, old_logp, ref_logp, adv, clip_eps: float, beta: float):
  """`(loss [B, T], kl [B, T])`: −min(ρA, clip(ρ, 1−ε, 1+ε)A) + β·k3 per token, with
  ρ = exp(logp − old_logp) and the advantage `adv [B]` of the token's completion."""
  ratio = jnp.exp(logp - old_logp)
  a = adv[:, None]
  surrogate = jnp.minimum(ratio * a, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * a)
  d = ref_logp - logp
  kl = jnp.exp(d) - d - 1.0
  return -surrogate + beta * kl, kl

@dataclasses.dataclass(frozen=True)
class GRPO(RolloutObjective):
  """Group-relative policy gradient from a reward function (see the module docstring)."""

  num_generations: int = 4          # k, completions per prompt (a group)
  clip_eps: float = 0.2             # ε of the clipped ratio
  beta: float = 0.04                # the KL penalty's weight; 0: no reference held
  eps: float = 1e-4                 # in the advantage's denominator

  def __post_init__(self):
    self._validate([("num_generations", self.num_generations >= 2,
                     ">= 2 (advantages compare completions of one prompt)"),
                    ("clip_eps", 0 < self.clip_eps < 1, "in (0, 1), typically 0.2"),
                    ("beta", self.beta >= 0, ">= 0 (0: no KL penalty)"),
                    ("eps", self.eps > 0, "> 0")])

  def frozen_trees(self, params):
    """`{'reference': a copy of params}` (none when beta = 0), and the reward model."""
    trees = self.reward_model_tree()
    if self.beta:
      trees["reference"] = self.frozen_reference(params)
    return trees

  def _check(self, model, prompts, frozen):
    self._check_rollout(model, prompts)
    if self.beta and (not frozen or "reference" not in frozen):
      raise UserError("GRPO with beta > 0 reads frozen['reference'] (the train state's copy "
                      "of the starting parameters), which is missing: build the state with "
                      "the objective's frozen_trees, or set GRPO.beta=0.")

  def make_experience(self, model, params, batch, *, rng=None, frozen=None, state=None):
    """Rollouts, rewards and group advantages of `batch`'s prompts (no gradient):
    `(experience rows [B*k, ...], rollout metric sums)`. The old log-probs (ρ's
    denominator) are computed only when several updates reuse the rollouts; with one,
    π_old is π_θ itself (module docstring)."""
    del state
    prompts, real, rng = self._prompts(model, batch, frozen, rng)
    tokens, mask, _ = rollout(model, params, prompts, jax.random.fold_in(rng, 1),
                              max_new_tokens=self.max_new_tokens,
                              temperature=self.temperature, eos_id=self.eos_id)
    rewards = self.rewards(model, frozen, prompts, tokens, mask)
    finite = jnp.isfinite(rewards)
    ok = real & finite
    adv, std = group_advantages(rewards, ok, self.num_generations, self.eps)
    experience = {"prompt": prompts, "completion": tokens, "mask": mask, "ok": ok, "real": real,
                  "advantage": adv}
    if self.epochs * self.minibatches > 1:
      experience["old_logps"] = completion_logps(model, params, prompts, tokens, mask,
                                                 self.temperature)
    if self.beta:
      experience["ref_logps"] = completion_logps(
          model, jax.lax.stop_gradient(frozen["reference"]), prompts, tokens, mask,
          self.temperature)
    length = jnp.sum(mask, axis=1).astype(jnp.float32)                       # >= 1
    per_completion = {"reward": rewards, "reward_std": std, "completion_length": length}
    sums = {name: jnp.sum(jnp.where(ok, v, 0.0)) for name, v in per_completion.items()}
    sums.update(completions=jnp.sum(real.astype(jnp.float32)),
                nan_rewards=jnp.sum((real & ~finite).astype(jnp.float32)))
    return experience, sums

  def experience_sums(self, model, params, experience, *, rng=None, frozen=None):
    """The summed GRPO loss (and k3 KL) of experience rows; `weight` = the completions
    with a finite reward."""
    del rng, frozen
    e = experience
    logp = completion_logps(model, params, e["prompt"], e["completion"], e["mask"],
                            self.temperature)
    old = e.get("old_logps", jax.lax.stop_gradient(logp))
    ref = e.get("ref_logps", jax.lax.stop_gradient(logp))
    loss, kl = token_loss(logp, old, ref, e["advantage"], self.clip_eps, self.beta)
    mask, ok = e["mask"], e["ok"]
    length = jnp.sum(mask, axis=1).astype(jnp.float32)
    per_token_mean = lambda x: jnp.sum(jnp.where(mask, x, 0.0), axis=1) / length
    on = lambda x: jnp.sum(jnp.where(ok, x, 0.0))
    return {"loss": all_rewards_failed(on(per_token_mean(loss)), ok, e["real"]),
            "kl": on(per_token_mean(kl)), "weight": on(jnp.ones_like(length))}

  def summarize(self, sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Means over the scored completions; nan_rewards over all completions."""
    weight = jnp.maximum(sums["weight"], 1.0)
    out = {name: sums[name] / weight for name in ("loss",) + METRICS}
    out["nan_rewards"] = sums["nan_rewards"] / jnp.maximum(sums["completions"], 1.0)
    out["completions"] = sums["completions"]
    return out
