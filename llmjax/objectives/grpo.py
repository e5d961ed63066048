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
metric but `nan_rewards` (the fraction of completions with a non-finite reward). A
batch where no reward is finite thus contributes a zero gradient (the optimizer's
momentum still moves the parameters) and is visible as nan_rewards = 1.

Data: records with a `text` field (`shakespeare`, `local_text`); the prompt is the first
`prompt_len` tokens ([bos] + the text's tokens); shorter texts are skipped. Packing:
`DataConfig.feature_lengths = {'prompt': prompt_len}` (any mode: a row holds one prompt).
`DataConfig.batch_size` counts prompts; a step samples batch_size × k completions.

Metrics: loss, reward (mean), reward_std (mean within-group std), kl (mean per-token
k3), completion_length (tokens, EOS included), nan_rewards, completions.

The trainer's experience path: `make_experience` (rollouts, rewards, advantages, the
old and reference log-probs; no gradient) and `experience_sums` (the loss of experience
rows) are what llmjax/train/step.py calls; `loss_sums` is the two in one, for
evaluation and tests.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.data import tokenizer as tokenizer_lib
from llmjax.errors import UserError
from llmjax.models.stack import unstack_layers
from llmjax.models.transformer import Transformer
from llmjax.objectives import rewards as rewards_lib
from llmjax.objectives.preference import token_logps
from llmjax.objectives.protocol import TokenObjective

METRICS = ("reward", "reward_std", "kl", "completion_length")
MODEL_REWARD = "model"  # `reward=` for a trained reward model (`reward_model=` its workdir)

# --- rollouts ---------------------------------------------------------------------------


def _decoding_layout(model, params):
  """Unscanned layers, no remat (as `llmjax.decode.generate.decoding_model`): each cached
  step then updates one buffer per layer in place."""
  cfg = model.config
  if not cfg.scan_layers and cfg.remat == "none":
    return model, params
  model = model.clone(config=cfg.replace(scan_layers=False, remat="none"))
  return model, unstack_layers(params) if cfg.scan_layers else params


def _empty_cache(cfg, batch: int, length: int) -> dict:
  """A decoder-only KV cache of `length` slots, the layout of `llmjax.decode.cache.
  init_cache` (objectives sit below decode/ in the import layers, so it is restated
  here; tests/objectives/test_grpo.py checks the rollout against the full forward)."""
  k, h, dtype = cfg.num_kv_heads, cfg.head_dim, cfg.compute_dtype
  layer = lambda: {"self": {"key": jnp.zeros((batch, k, length, h), dtype),     # [B, K, T, H]
                            "value": jnp.zeros((batch, k, h, length), dtype)}}  # [B, K, H, T]
  return {"index": jnp.zeros((), jnp.int32), "valid": jnp.zeros((batch, length), bool),
          "layers": tuple(layer() for _ in range(cfg.num_layers))}


def completion_mask(tokens: jax.Array, eos_id: int) -> jax.Array:
  """True on each row's tokens up to and including its first EOS: `[B, T]` bool."""
  eos = tokens == eos_id
  return jnp.cumsum(eos, axis=1) - eos == 0


def rollout(model, params, prompts: jax.Array, rng: jax.Array, *, max_new_tokens: int,
            temperature: float = 1.0, eos_id: int = tokenizer_lib.EOS_ID):
  """Samples a completion of every prompt `[B, P]` (all real tokens): `(tokens [B, T],
  mask [B, T], logps [B, T])`, logps from the cached logits (0 off the mask)."""
  batch, prompt_len = prompts.shape
  model, params = _decoding_layout(model, params)
  cache = _empty_cache(model.config, batch, prompt_len + max_new_tokens)
  positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), prompts.shape)
  logits, cache = model.apply({"params": params}, prompts, positions, cache, last_only=True,
                              method=Transformer.decode_cached)             # [B, 1, V]

  def step(carry, i):
    cache, logits = carry
    logits = logits.astype(jnp.float32) / temperature                      # [B, V]
    token = jax.random.categorical(jax.random.fold_in(rng, i), logits).astype(jnp.int32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=1)[:, 0]
    position = jnp.full((batch, 1), prompt_len + i, jnp.int32)  # (the last step's
    # forward is never read: one spare token step keeps the loop body uniform)
    logits, cache = model.apply({"params": params}, token[:, None], position, cache,
                                method=Transformer.decode_cached)           # [B, 1, V]
    return (cache, logits[:, 0]), (token, logp)

  _, (tokens, logps) = jax.lax.scan(step, (cache, logits[:, 0]),
                                    jnp.arange(max_new_tokens))             # [T, B] each
  tokens, logps = tokens.T, logps.T
  mask = completion_mask(tokens, eos_id)
  return tokens, mask, jnp.where(mask, logps, 0.0)


# --- the loss ---------------------------------------------------------------------------


def completion_logps(model, params, prompts, completions, mask, temperature: float = 1.0):
  """log π(completion token | prompt, earlier completion tokens) `[B, T]`, 0 off `mask`:
  one forward pass over prompt + completion, read at the completion's positions."""
  tokens = jnp.concatenate([prompts, completions], axis=1)                  # [B, P + T]
  logits = model.apply({"params": params}, tokens[:, :-1])                  # [B, P+T-1, V]
  logits = logits[:, prompts.shape[1] - 1:].astype(jnp.float32) / temperature  # [B, T, V]
  return token_logps(logits, completions, mask)


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
class RolloutObjective(TokenObjective):
  """What GRPO and PPO (llmjax/objectives/ppo.py) share: prompts cut from text records,
  rollouts of a decoder-only policy, and a reward from the registry (rewards.py). Error
  messages name the subclass's fields (`PPO.max_new_tokens`, ...)."""

  prompt_len: int = 16
  max_new_tokens: int = 32
  temperature: float = 1.0
  reward: str = "syllables"         # a name in llmjax/objectives/rewards.py, or 'model'
  reward_kwargs: Any = ()           # gin: a dict, e.g. {'token_id': 7}
  reward_model: str | None = None   # reward='model': a reward-model workdir (frozen tree)
  eos_id: int = tokenizer_lib.EOS_ID
  seed: int = 0                     # the eval rollouts' (train rollouts use the step's rng)
  epochs: int = 1                   # optimizer passes over each experience batch
  minibatches: int = 1              # updates per pass (rows split evenly)
  # Host tables of the reward, built from the tokenizer on the first feature_fn call.
  _host: dict = dataclasses.field(default_factory=dict, compare=False, hash=False,
                                  repr=False)

  can_sample: ClassVar[bool] = True

  def _validate(self, checks) -> None:
    """The reward's name and kwargs, the shared fields, then `checks`: `(field, ok, want)`."""
    name = type(self).__name__
    kwargs = dict(self.reward_kwargs or {})
    object.__setattr__(self, "reward_kwargs", tuple(sorted(kwargs.items())))  # hashable
    if (self.reward == MODEL_REWARD) != (self.reward_model is not None):
      raise UserError(f"{name}.reward={self.reward!r} with {name}.reward_model="
                      f"{self.reward_model!r}: a trained reward model scores completions when "
                      f"reward='{MODEL_REWARD}' and reward_model names its workdir "
                      "(runs/reward_model.gin); set both, or neither for a registered reward.")
    if self.reward == MODEL_REWARD:
      if kwargs:
        raise UserError(f"{name}.reward='{MODEL_REWARD}' takes no reward_kwargs; got "
                        f"{sorted(kwargs)}.")
    else:
      rewards_lib.get(self.reward, name).check_kwargs(kwargs, name)
    checks = [("prompt_len", self.prompt_len >= 1, ">= 1"),
              ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
              ("temperature", self.temperature > 0, "> 0 (rollouts are sampled)"),
              ("epochs", self.epochs >= 1, ">= 1"),
              ("minibatches", self.minibatches >= 1, ">= 1"),
              *checks]
    for field, ok, want in checks:
      if not ok:
        raise UserError(f"{name}.{field}={getattr(self, field)!r} is invalid: set it {want}.")

  # --- features -----------------------------------------------------------------------

  def bind_tokenizer(self, tokenizer) -> None:
    """Builds the reward's per-token tables from `tokenizer` (once; feature_fn calls it,
    and callers of `loss_sums` outside the pipeline call it themselves)."""
    if self.reward == MODEL_REWARD:
      return
    reward = rewards_lib.get(self.reward)
    if reward.tables_fn is not None and "tables" not in self._host:
      self._host["tables"] = reward.tables_fn(tokenizer)

  def feature_fn(self, example, tokenizer):
    """`{'prompt': [bos] + the text's first tokens}` (prompt_len), None if shorter."""
    self.bind_tokenizer(tokenizer)
    if not isinstance(example.get("text"), str):
      raise UserError(f"{type(self).__name__} reads a string field 'text', but a record has "
                      f"fields {sorted(example)}: use a text dataset (shakespeare, local_text).")
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    ids = bos + tokenizer.encode(example["text"])
    if len(ids) < self.prompt_len:
      return None
    return {"prompt": np.asarray(ids[:self.prompt_len], np.int32)}

  def init_inputs(self, lengths):
    name = type(self).__name__
    if dict(lengths) != {"prompt": self.prompt_len}:
      raise UserError(f"{name} packs {{'prompt': {self.prompt_len}}} ({name}.prompt_len), "
                      f"but DataConfig.feature_lengths is {dict(lengths)}: set it to that.")
    return {"tokens": jnp.zeros((1, self.prompt_len + self.max_new_tokens), jnp.int32)}

  # --- rollouts and rewards -----------------------------------------------------------

  def reward_fn(self, vocab_size: int):
    """`score(tokens [B, T], mask [B, T]) -> [B]`, the configured reward on the device."""
    reward = rewards_lib.get(self.reward)
    tables = {}
    if reward.tables_fn is not None:
      if "tables" not in self._host:
        raise UserError(f"{type(self).__name__}.reward={self.reward!r} reads per-token tables "
                        "built from the tokenizer, which this objective has not seen: call "
                        "objective.bind_tokenizer(tokenizer) before loss_sums.")
      tables = rewards_lib.padded_tables(self._host["tables"], vocab_size)
    kwargs = dict(self.reward_kwargs)
    return lambda tokens, mask: reward.score(tokens, mask, tables, **kwargs)

  def bind_reward_model(self, config) -> None:
    """The reward model's `TransformerConfig` (llmjax/train/reward_source.py reads it from
    the `reward_model` workdir before the train state is built)."""
    name = type(self).__name__
    if config.arch != "decoder_only":
      raise UserError(f"{name}.reward_model={self.reward_model} is {config.arch}; completions "
                      "are scored by a decoder-only reward model reading prompt + completion.")
    total = self.prompt_len + self.max_new_tokens
    if total > config.max_len and config.position == "learned":
      raise UserError(f"{name}.reward_model={self.reward_model} reads at most max_len="
                      f"{config.max_len} tokens, but a prompt + completion has {total}: lower "
                      f"{name}.max_new_tokens or {name}.prompt_len.")
    self._host["reward_model_config"] = config

  def _reward_model(self) -> Transformer:
    if "reward_model_config" not in self._host:
      raise UserError(f"{type(self).__name__}.reward='{MODEL_REWARD}' needs the reward model's "
                      "config: the train loop binds it (objective.bind_reward_model(config)).")
    return Transformer(self._host["reward_model_config"])

  def reward_model_tree(self):
    """`{'reward_model': params}` for `frozen_trees` when reward='model': an init of the
    reward model's shape with its logical axes (so it shards like a model); the trained
    parameters replace it before step 0 (llmjax/train/reward_source.py). None else."""
    if self.reward != MODEL_REWARD:
      return {}
    net = self._reward_model()
    tokens = jnp.zeros((1, self.prompt_len + self.max_new_tokens), jnp.int32)
    return {"reward_model": net.init({"params": jax.random.key(0)}, tokens,
                                     method="reward")["params"]}

  def rewards(self, model, frozen, prompts, tokens, mask):
    """Rewards `[B]` f32 of completions `tokens [B, T]` (`mask` on the completion): the
    registered function of the token ids, or the frozen reward model's score of
    prompt + completion read at the completion's last token (its EOS, when it has one:
    where the reward model was trained to read; a completion cut at max_new_tokens is
    read at its last token)."""
    if self.reward != MODEL_REWARD:
      return self.reward_fn(model.config.vocab_size)(tokens, mask).astype(jnp.float32)
    if not frozen or "reward_model" not in frozen:
      raise UserError(f"{type(self).__name__}.reward='{MODEL_REWARD}' reads "
                      "frozen['reward_model'], which is missing: build the train state with "
                      "the objective's frozen_trees.")
    sequence = jnp.concatenate([prompts, jnp.where(mask, tokens, 0)], axis=1)  # [B, P + T]
    segment_ids = jnp.concatenate([jnp.ones_like(prompts), mask.astype(jnp.int32)], axis=1)
    scores = self._reward_model().apply(
        {"params": jax.lax.stop_gradient(frozen["reward_model"])}, sequence, segment_ids,
        method="reward")                                                      # [B, P + T]
    last = prompts.shape[1] + jnp.sum(mask, axis=1) - 1                       # [B]
    return jnp.take_along_axis(scores, last[:, None], axis=1)[:, 0].astype(jnp.float32)

  def _check_rollout(self, model, prompts):
    name, cfg = type(self).__name__, model.config
    if cfg.arch != "decoder_only":
      raise UserError(f"{name} samples completions from a decoder-only model, not "
                      f"{cfg.arch}: start from a decoder-only checkpoint.")
    total = self.prompt_len + self.max_new_tokens
    if total > cfg.max_len:
      raise UserError(f"{name}.prompt_len + {name}.max_new_tokens = {self.prompt_len} + "
                      f"{self.max_new_tokens} = {total} exceeds the model's max_len="
                      f"{cfg.max_len}: lower {name}.max_new_tokens or {name}.prompt_len.")
    if prompts.shape[1] != self.prompt_len:
      raise UserError(f"the batch's prompts have {prompts.shape[1]} tokens but {name}."
                      f"prompt_len={self.prompt_len}: make feature_lengths['prompt'] equal.")

  # --- the trainer's experience path (llmjax/train/step.py) ----------------------------

  def initial_state(self) -> dict:
    """The state carried from train step to train step (`TrainState.objective`): none."""
    return {}

  def update_state(self, state, rollout_sums):
    """The next step's state from this step's experience metrics: unchanged."""
    del rollout_sums
    return state

  def state_metrics(self, state) -> dict:
    """What of the state is logged: nothing."""
    del state
    return {}

  def loss_sums(self, model, params, batch, *, rng=None, deterministic=True, frozen=None):
    """One update's summed metrics on `batch`'s prompts: `make_experience` (no gradient)
    then `experience_sums` over all of it (the evaluation path, and the train step's
    when `epochs = minibatches = 1`)."""
    del deterministic  # the policy runs without dropout, as it sampled
    experience, rollout_sums = self.make_experience(
        model, jax.lax.stop_gradient(params), batch, rng=rng, frozen=frozen)
    return {**rollout_sums, **self.experience_sums(model, params, experience, frozen=frozen)}

  def _prompts(self, model, batch, frozen, rng):
    """`(prompts [B*k, P], real [B*k], rng)`: each prompt repeated k times."""
    k, prompts = self.num_generations, batch["prompt"]
    self._check(model, prompts, frozen)
    real = batch.get("prompt_segment_ids", jnp.ones_like(prompts))[:, 0] > 0   # [B]
    rng = jax.random.key(self.seed) if rng is None else rng
    return jnp.repeat(prompts, k, axis=0), jnp.repeat(real, k), rng

  def frozen_reference(self, params):
    """A copy of `params` (a copy: donating the train state must never hand the
    reference's buffers to the update)."""
    copy = lambda x: jnp.copy(x) if isinstance(x, (jax.Array, np.ndarray)) else x
    return jax.tree.map(copy, params)


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
    experience = {"prompt": prompts, "completion": tokens, "mask": mask, "ok": ok,
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
    return {"loss": on(per_token_mean(loss)), "kl": on(per_token_mean(kl)),
            "weight": on(jnp.ones_like(length))}

  def summarize(self, sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Means over the scored completions; nan_rewards over all completions."""
    weight = jnp.maximum(sums["weight"], 1.0)
    out = {name: sums[name] / weight for name in ("loss",) + METRICS}
    out["nan_rewards"] = sums["nan_rewards"] / jnp.maximum(sums["completions"], 1.0)
    out["completions"] = sums["completions"]
    return out
