"""Proximal Policy Optimization for RLHF (PPO; Schulman et al. 2017, "Proximal Policy
Optimization Algorithms"; its RLHF form: Ziegler et al. 2019, "Fine-Tuning Language
Models from Human Preferences", and Ouyang et al. 2022, "InstructGPT", §3.5):
actor-critic RL from a reward, with a per-token KL penalty to a frozen reference.
Decoder-only models.

Each train step, for every prompt x of the batch (`B` prompts):

  1. rollouts  sample k = `num_generations` completions (1 is PPO's usual choice) of
               `max_new_tokens` tokens from π_θ inside the jitted step, with their
               rollout-time log-probs logp_old_t (GRPO's `rollout`: a prefill, then one
               cached step per token). A completion ends at its first EOS.
  2. rewards   the sequence reward R = reward(o), a registered function of the token ids
               (llmjax/objectives/rewards.py), and per completion token t
                 r_t = −β·(logp_old_t − ref_t)  + R on the completion's last token,
               β = `kl_coef`, ref_t the frozen reference's log-prob (the k1 estimate of
               KL(π_θ ‖ π_ref), summed over tokens, is the penalty of Ziegler et al.).
  3. values    V_t = `value_head`(h_t), a scalar read from a hidden state h_t at the
               position that predicts token t: the policy's own (`critic='shared'`: one
               trunk gives logits and values, and value gradients reach it), or that of a
               separate critic trunk (`critic='separate'`: VALUE MODEL below).
  4. GAE       (Schulman et al. 2016) with stop-gradient values, a reverse `lax.scan`:
                 δ_t = r_t + γ·V_{t+1} − V_t,  A_t = δ_t + γλ·A_{t+1},  R_t = A_t + V_t,
               V and A past the last token are 0: EOS, or the `max_new_tokens` cut,
               ends an episode (as TRL's PPO does). A is then whitened: (A − mean)/std
               over the valid tokens of the batch (of the micro-batch, under gradient
               accumulation or on each data-parallel shard).
  5. loss      per token, ρ_t = exp(logp_t − stop_gradient(logp_old_t)):
                 policy  −min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t)
                 value   ½·max((V_t − R_t)², (clip(V_t, V_old−ε_v, V_old+ε_v) − R_t)²)
                 total   policy + vf_coef·value
               averaged over the valid completion tokens (`weight` counts them, so
               gradient accumulation and data parallelism stay exact).

EPOCHS AND MINIBATCHES. Steps 1-4 make an experience batch (no gradient:
`make_experience`); the trainer (llmjax/train/step.py) then runs `epochs` passes over it,
each a new permutation of its rows cut into `minibatches` optimizer updates of the loss
of step 5 (`experience_sums`). logp_old and V_old are the rollout policy's, fixed for
the whole experience batch, so ρ departs from 1 and the clips bind from the second
update on. With `epochs = minibatches = 1` the old policy is the current one: ρ is 1 up
to the rounding between the cached rollout and the full forward pass, and the value
clip is the identity. Advantages are whitened over the whole experience batch.

KL COEFFICIENT. Fixed at `kl_coef`, or, with `kl_target` set, the adaptive controller
of Ziegler et al. (2019, §2.2): after each train step,
  β ← β·(1 + clip(KL/kl_target − 1, −0.2, 0.2)·n/kl_horizon),
KL the mean sequence KL of the step's n scored completions, starting from `kl_coef`.
β is carried in `TrainState.objective` (so a resumed run continues it) and logged as
`kl_coef`.

The reference π_ref (`kl_coef > 0`) is a copy of the starting parameters (the
`init_from` checkpoint) without the value head or critic, `TrainState.frozen['reference']`.

VALUE MODEL. The value head `value_head` (kernel [D, 1], bias [1]) is this objective's
own parameter (`new_params`): a warm start from an SFT or pretraining checkpoint keeps
its initialization. It is made by `init_inputs`' method (`policy_and_values`), so it
sits in the checkpoint beside the language model, which still loads and samples as one.
With `critic='separate'` (InstructGPT's choice: a value model apart from the policy) a
second trunk of the policy's config lives under `params['critic']`; a warm start copies
the starting checkpoint into it (`warm_params`), and from then on the policy's loss
trains only the policy and the value loss only the critic (twice the parameters and
optimizer state, and a second forward pass per loss). Under LoRA (gin_configs/peft/
lora.gin) the critic's layers get their own adapters: the policy's and the critic's
adapters and the value head train (`trained_params`), both frozen bases stay bitwise.

Rewards come from the registry (a function of token ids) or, with `reward='model'` and
`reward_model=WORKDIR`, from a trained reward model (llmjax/objectives/reward.py) held as
`TrainState.frozen['reward_model']` and scoring prompt + completion at the completion's
last token (`RolloutObjective.rewards`). NaN rewards drop their completion, as in GRPO
(an update with no finite reward at all is dropped by the trainer, grpo.py):
its tokens leave the loss, the whitening and `weight`; `nan_rewards` counts them.

Data and packing as GRPO's: `DataConfig.feature_lengths = {'prompt': prompt_len}`;
`DataConfig.batch_size` counts prompts; a step samples batch_size × k completions.

Metrics: per token loss, policy_loss, value_loss, value (mean V), clip_frac (where
the ratio is clipped), averaged over the updates; per completion reward, kl (Σ_t
logp_old_t − ref_t, the controller's KL; 0 when kl_coef = 0 holds no reference), score
(R − β·kl, the RL return), completion_length; nan_rewards, completions; kl_coef (β) with
the adaptive controller.
"""

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.errors import UserError
from llmjax.layers.linear import Einsum
from llmjax.objectives.preference import token_logps
from llmjax.objectives.rollout import (
  RolloutObjective,
  all_rewards_failed,
  completion_logps,
  rollout,
)
from llmjax.sharding.axes import EMBED

VALUE_HEAD = "value_head"
CRITIC = "critic"
CRITICS = ("shared", "separate")
VALUE_MODEL = (VALUE_HEAD, CRITIC)   # what a checkpoint's language-model readers leave out
TOKEN_METRICS = ("policy_loss", "value_loss", "value", "clip_frac")
COMPLETION_METRICS = ("reward", "kl", "score", "completion_length")


# --- the shared-trunk critic ------------------------------------------------------------

def policy_and_values(module, tokens, critic: str = "shared"):
  """`(logits [B, L, V], values f32 [B, L])` of a decoder-only `Transformer` (bound as
  `module`; pass this function as `method=`): the LM head on the final hidden states,
  and `value_head` on the same states (`critic='shared'`) or on those of a second
  trunk of the same config in the child scope `critic` (`critic='separate'`). Both are
  created in child scopes of the module, since `Transformer` makes submodules only in
  `setup` and its one compact method."""
  cfg = module.config
  hidden = module.decode_hidden(tokens)                                      # [B, L, D]
  critic_hidden = hidden
  if critic == "separate":
    trunk = module.clone(parent=module.scope.push(CRITIC, reuse=True))
    critic_hidden = trunk.decode_hidden(tokens)                              # [B, L, D]
  head = Einsum("BLD,DO->BLO", (cfg.embed_dim, 1), (EMBED, None), use_bias=True,
                kernel_init=nn.initializers.normal(cfg.init_std), dtype=cfg.compute_dtype,
                param_dtype=cfg.params_dtype,
                parent=module.scope.push(VALUE_HEAD, reuse=True))
  values = head(critic_hidden)[..., 0].astype(jnp.float32)                  # [B, L, 1] -> [B, L]
  return module.logits(hidden), values


def critic_from_policy(params):
  """`params` with the separate critic's trunk (`params['critic']`) replaced by a copy of
  the policy's own parameters (the leaves the critic has: a trunk without an untied LM
  head has none there). A fresh run's critic thus starts as the starting checkpoint."""
  def like(src, dst, path):
    if not isinstance(dst, dict):
      if src.shape != dst.shape:
        raise UserError(f"the separate critic's {path} has shape {dst.shape}, the policy's "
                        f"{src.shape}; the critic must be the policy's architecture.")
      return src
    return {k: like(src[k], v, f"{path}/{k}") for k, v in dst.items()}
  return {**params, CRITIC: like(params, params[CRITIC], CRITIC)}


def completion_logps_and_values(model, params, prompts, completions, mask,
                                temperature: float = 1.0, critic: str = "shared"):
  """`(logps [B, T], values [B, T])` of the completion tokens (0 off `mask`), one forward
  pass over prompt + completion; the value of token t is read where it is predicted."""
  tokens = jnp.concatenate([prompts, completions], axis=1)                  # [B, P + T]
  logits, values = model.apply({"params": params}, tokens[:, :-1], critic=critic,
                               method=policy_and_values)                    # [B, P+T-1, ...]
  start = prompts.shape[1] - 1
  logits = logits[:, start:].astype(jnp.float32) / temperature              # [B, T, V]
  values = jnp.where(mask, values[:, start:], 0.0)                          # [B, T]
  return token_logps(logits, completions, mask), values


# --- the math -----------------------------------------------------------------------------

def token_rewards(logp_old, ref_logp, rewards, mask, kl_coef: float):
  """r_t `[B, T]`: −β·(logp_old − ref) per completion token, plus the sequence reward
  `rewards [B]` on each completion's last token (0 off `mask`)."""
  nxt = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
  last = mask & ~nxt                                                        # [B, T]
  r = -kl_coef * (logp_old - ref_logp) + jnp.where(last, rewards[:, None], 0.0)
  return jnp.where(mask, r, 0.0)


def gae(rewards, values, mask, gamma: float, lam: float):
  """Generalized advantage estimation: `(advantages [B, T], returns [B, T])`, 0 off
  `mask` (a prefix of each row). Values are stop-gradient; after the last valid token
  the value is 0 (the episode ends)."""
  values = jax.lax.stop_gradient(values)
  m = mask.astype(values.dtype)
  v = values * m
  next_m = jnp.concatenate([m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1)
  next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
  delta = (rewards + gamma * next_v - v) * m                                # [B, T]

  def step(adv_next, xs):
    d, nm = xs
    adv = d + gamma * lam * nm * adv_next
    return adv, adv

  _, adv = jax.lax.scan(step, jnp.zeros_like(delta[:, 0]), (delta.T, next_m.T),
                        reverse=True)                                       # [T, B]
  adv = adv.T * m
  return adv, (adv + v) * m


def whiten(x, mask, eps: float = 1e-8):
  """(x − mean) / sqrt(var + eps) over the entries where `mask` (population variance);
  0 elsewhere."""
  m = mask.astype(x.dtype)
  n = jnp.maximum(jnp.sum(m), 1.0)
  mean = jnp.sum(x * m) / n
  var = jnp.sum(jnp.square(x - mean) * m) / n
  return jnp.where(mask, (x - mean) * jax.lax.rsqrt(var + eps), 0.0)


def policy_loss(logp, logp_old, adv, clip_eps: float):
  """`(loss [B, T], clipped [B, T])`: −min(ρA, clip(ρ, 1−ε, 1+ε)A) per token, ρ =
  exp(logp − stop_gradient(logp_old)); `clipped` where the clipped term is taken."""
  ratio = jnp.exp(logp - jax.lax.stop_gradient(logp_old))
  unclipped = ratio * adv
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
  return -jnp.minimum(unclipped, clipped), clipped < unclipped


def value_loss(values, values_old, returns, clip: float):
  """½·max((V − R)², (clip(V, V_old − ε_v, V_old + ε_v) − R)²) per token."""
  values_old = jax.lax.stop_gradient(values_old)
  clipped = jnp.clip(values, values_old - clip, values_old + clip)
  return 0.5 * jnp.maximum(jnp.square(values - returns), jnp.square(clipped - returns))


def adaptive_kl_update(beta, kl, target: float, horizon: float, n: float):
  """Ziegler et al.'s controller: β·(1 + clip(KL/target − 1, −0.2, 0.2)·n/horizon), for
  a step of `n` samples with mean (sequence) KL `kl`."""
  error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
  return beta * (1.0 + error * n / horizon)


# --- the objective --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PPO(RolloutObjective):
  """PPO with a value head (shared trunk or separate critic) and a KL-penalized reward
  (module docstring)."""

  num_generations: int = 1          # completions per prompt
  clip_eps: float = 0.2             # ε of the clipped ratio
  vf_clip: float = 0.2              # ε_v of the clipped value
  vf_coef: float = 0.1              # the value loss's weight
  kl_coef: float = 0.05             # β of the per-token KL penalty; 0: no reference held
  kl_target: float | None = None    # the adaptive controller's target KL; None: fixed β
  kl_horizon: float = 10000.0       # its horizon (samples)
  gamma: float = 1.0                # GAE's discount γ
  lam: float = 0.95                 # GAE's λ
  whiten_advantages: bool = True
  critic: str = "shared"            # the value model: 'shared' trunk or a 'separate' one

  # Trained even when PEFT trains only adapters (a separate critic's adapters train too).
  trained_params: ClassVar[str] = VALUE_HEAD

  def __post_init__(self):
    self._validate([("num_generations", self.num_generations >= 1, ">= 1"),
                    ("clip_eps", 0 < self.clip_eps < 1, "in (0, 1), typically 0.2"),
                    ("vf_clip", self.vf_clip > 0, "> 0, typically 0.2"),
                    ("vf_coef", self.vf_coef >= 0, ">= 0, typically 0.1"),
                    ("kl_coef", self.kl_coef >= 0, ">= 0 (0: no KL penalty)"),
                    ("gamma", 0 <= self.gamma <= 1, "in [0, 1], typically 1"),
                    ("lam", 0 <= self.lam <= 1, "in [0, 1], typically 0.95"),
                    ("kl_horizon", self.kl_horizon > 0, "> 0"),
                    ("critic", self.critic in CRITICS, "'shared' or 'separate'")])
    if self.kl_target is not None and not (self.kl_target > 0 and self.kl_coef > 0):
      raise UserError(f"PPO.kl_target={self.kl_target!r} asks for the adaptive KL controller, "
                      f"which needs kl_target > 0 and a starting PPO.kl_coef > 0 (it is "
                      f"{self.kl_coef!r}): set both, or kl_target=None for a fixed β.")

  @property
  def new_params(self) -> str:
    """What a warm start from a language model lacks (it keeps its init until
    `warm_params`): the value head, and a separate critic's trunk."""
    return VALUE_HEAD + ("|^/?critic/" if self.critic == "separate" else "")

  def init_inputs(self, lengths):
    """Prompt + completion rows, through `policy_and_values` (so `value_head`, and a
    separate critic, are made)."""
    return {**super().init_inputs(lengths), "method": policy_and_values,
            "critic": self.critic}

  def warm_params(self, params):
    """A warm start's parameters: a separate critic's trunk copied from the policy's."""
    return critic_from_policy(params) if self.critic == "separate" else params

  def frozen_trees(self, params):
    """`{'reference': a copy of params without the value head and critic}` (none when
    kl_coef = 0), and the reward model when reward='model'."""
    trees = self.reward_model_tree()
    if self.kl_coef:
      policy = {k: v for k, v in params.items() if k not in (VALUE_HEAD, CRITIC)}
      trees["reference"] = self.frozen_reference(policy)
    return trees

  def _check(self, model, prompts, frozen):
    self._check_rollout(model, prompts)
    if self.kl_coef and (not frozen or "reference" not in frozen):
      raise UserError("PPO with kl_coef > 0 reads frozen['reference'] (the train state's "
                      "copy of the starting parameters), which is missing: build the state "
                      "with the objective's frozen_trees, or set PPO.kl_coef=0.")

  def initial_state(self) -> dict:
    """`{'kl_coef': β}` when the adaptive controller runs (`kl_target`), else none."""
    return {} if self.kl_target is None else {"kl_coef": jnp.float32(self.kl_coef)}

  def update_state(self, state, rollout_sums):
    """The controller's step (module docstring) from this step's scored completions."""
    if not state:
      return state
    n = rollout_sums["scored"]
    kl = rollout_sums["kl"] / jnp.maximum(n, 1.0)
    return {"kl_coef": adaptive_kl_update(state["kl_coef"], kl, self.kl_target,
                                          self.kl_horizon, n).astype(jnp.float32)}

  def state_metrics(self, state) -> dict:
    """β, when adaptive."""
    return dict(state)

  def make_experience(self, model, params, batch, *, rng=None, frozen=None, state=None):
    """Rollouts, rewards, values and GAE advantages of `batch`'s prompts (no gradient):
    `(experience rows [B*k, ...], rollout metric sums)`. `state` holds the adaptive β."""
    beta = state["kl_coef"] if state else self.kl_coef
    prompts, real, rng = self._prompts(model, batch, frozen, rng)
    tokens, mask, logp_old = rollout(
        model, params, prompts, jax.random.fold_in(rng, 1),
        max_new_tokens=self.max_new_tokens, temperature=self.temperature, eos_id=self.eos_id)
    rewards = self.rewards(model, frozen, prompts, tokens, mask)
    finite = jnp.isfinite(rewards)
    ok = real & finite                                                       # [B*k]
    valid = mask & ok[:, None]                                               # [B*k, T]
    _, values = completion_logps_and_values(model, params, prompts, tokens, mask,
                                            self.temperature, self.critic)
    ref = logp_old
    if self.kl_coef:
      ref = completion_logps(model, jax.lax.stop_gradient(frozen["reference"]), prompts,
                             tokens, mask, self.temperature)
    r = token_rewards(logp_old, ref, jnp.where(ok, rewards, 0.0), valid, beta)
    adv, returns = gae(r, values, valid, self.gamma, self.lam)
    if self.whiten_advantages:
      adv = whiten(adv, valid)
    length = jnp.sum(mask, axis=1).astype(jnp.float32)                       # >= 1
    kl = jnp.sum(jnp.where(mask, logp_old - ref, 0.0), axis=1)               # [B*k]
    per_completion = {"reward": rewards, "kl": kl, "score": rewards - beta * kl,
                      "completion_length": length}
    sums = {name: jnp.sum(jnp.where(ok, v, 0.0)) for name, v in per_completion.items()}
    sums.update(scored=jnp.sum(ok.astype(jnp.float32)),
                completions=jnp.sum(real.astype(jnp.float32)),
                nan_rewards=jnp.sum((real & ~finite).astype(jnp.float32)))
    experience = {"prompt": prompts, "completion": tokens, "mask": mask, "valid": valid,
                  "ok": ok, "real": real,
                  "old_logps": logp_old, "old_values": values, "advantage": adv,
                  "returns": returns}
    return experience, sums

  def experience_sums(self, model, params, experience, *, rng=None, frozen=None):
    """The summed clipped policy and value losses of experience rows; `weight` = their
    valid completion tokens."""
    del rng, frozen
    e, valid = experience, experience["valid"]
    logp, values = completion_logps_and_values(model, params, e["prompt"], e["completion"],
                                               e["mask"], self.temperature, self.critic)
    pg, clipped = policy_loss(logp, e["old_logps"], e["advantage"], self.clip_eps)
    vf = value_loss(values, e["old_values"], e["returns"], self.vf_clip)
    on = lambda x: jnp.sum(jnp.where(valid, x, 0.0))
    loss = all_rewards_failed(on(pg + self.vf_coef * vf), e["ok"], e["real"])
    return {"loss": loss, "policy_loss": on(pg), "value_loss": on(vf),
            "value": on(values), "clip_frac": on(clipped.astype(jnp.float32)),
            "weight": on(jnp.ones_like(pg))}

  def summarize(self, sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Token means (loss, policy_loss, value_loss, value, clip_frac), means over the
    scored completions (reward, kl, score, completion_length), nan_rewards over all."""
    tokens = jnp.maximum(sums["weight"], 1.0)
    scored = jnp.maximum(sums["scored"], 1.0)
    out = {name: sums[name] / tokens for name in ("loss",) + TOKEN_METRICS}
    out.update({name: sums[name] / scored for name in COMPLETION_METRICS})
    out["nan_rewards"] = sums["nan_rewards"] / jnp.maximum(sums["completions"], 1.0)
    out["completions"] = sums["completions"]
    return out
