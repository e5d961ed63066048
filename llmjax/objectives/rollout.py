"""What the rollout objectives (GRPO, llmjax/objectives/grpo.py; PPO, ppo.py) share:
sampling completions inside the jitted train step, their log-probs, and
`RolloutObjective` (prompts cut from text records, rewards from the registry or a
trained reward model, the checks and the trainer's experience-path defaults).

`rollout` samples a completion of every prompt: a prefill, then one cached step per
token in `lax.scan`, `max_new_tokens` steps always (a completion ends at its first EOS:
later tokens are masked, not skipped).
"""

import dataclasses
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



def all_rewards_failed(loss, ok, real):
  """`loss`, or NaN when the rows hold real completions and none has a finite reward: the
  trainer's non-finite guard then drops the update instead of letting the optimizer's
  momentum move the parameters on no signal."""
  return jnp.where(jnp.any(real) & ~jnp.any(ok), jnp.nan, loss)


def completion_logps(model, params, prompts, completions, mask, temperature: float = 1.0):
  """log π(completion token | prompt, earlier completion tokens) `[B, T]`, 0 off `mask`:
  one forward pass over prompt + completion, read at the completion's positions."""
  tokens = jnp.concatenate([prompts, completions], axis=1)                  # [B, P + T]
  logits = model.apply({"params": params}, tokens[:, :-1])                  # [B, P+T-1, V]
  logits = logits[:, prompts.shape[1] - 1:].astype(jnp.float32) / temperature  # [B, T, V]
  return token_logps(logits, completions, mask)


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
      score = self.reward_fn(model.config.vocab_size)
      try:
        return score(tokens, mask).astype(jnp.float32)
      except UserError:
        raise
      except Exception as e:
        raise UserError(f"{type(self).__name__}.reward={self.reward!r} raised "
                        f"{type(e).__name__}: {e} while scoring completions (before any "
                        "update): fix the reward function (llmjax/objectives/rewards.py "
                        "shows the signature).") from e
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
