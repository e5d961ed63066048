"""A trained reward model as a rollout objective's reward (`reward='model'`,
`reward_model=WORKDIR` on GRPO or PPO).

The reward model is another workdir (runs/reward_model.gin: a transformer with a
`reward_head`). Before the train state is built, `bind` reads its config (the objective
then declares a frozen tree of that shape, sharded like a model); on a fresh run,
`attach` restores its trained parameters into `TrainState.frozen['reward_model']`, where
they stay bitwise frozen and are saved with the run's checkpoints (a resumed run reads
them from there, not from the reward model's workdir again). The reward model must read
the policy's token ids: its tokenizer must be the policy's.
"""

import os

import jax

from llmjax.data import tokenizer as tokenizer_lib
from llmjax.errors import UserError
from llmjax.train import warm_start


def wanted(objective) -> bool:
  return getattr(objective, "reward_model", None) is not None


def bind(objective, tokenizer) -> None:
  """Checks the reward model's workdir against the policy's tokenizer and gives the
  objective its config."""
  if not wanted(objective):
    return
  name = type(objective).__name__
  path = os.path.abspath(objective.reward_model)
  if not os.path.isdir(os.path.join(path, "checkpoints")):
    raise UserError(f"{name}.reward_model={objective.reward_model} has no checkpoints/: "
                    "train a reward model first (llmjax train --gin_file=runs/reward_model.gin)"
                    " and point reward_model at its workdir.")
  source = warm_start.load(path)
  if source.tokenizer_path is None:
    raise UserError(f"{name}.reward_model={path} has no tokenizer file, so it cannot be "
                    "checked against the policy's: copy its tokenizer.model into it.")
  theirs = tokenizer_lib.load_any(source.tokenizer_path)
  if theirs.serialized() != tokenizer.serialized():
    raise UserError(f"{name}.reward_model={path} uses another tokenizer "
                    f"({source.tokenizer_path}, {theirs.vocab_size} pieces) than the policy "
                    f"({tokenizer.vocab_size} pieces): the reward model reads the policy's "
                    "token ids, so train it from the same tokenizer (or the SFT workdir).")
  if source.model_config.vocab_size < tokenizer.vocab_size:
    raise UserError(f"{name}.reward_model={path} has {source.model_config.vocab_size} "
                    f"embeddings for a {tokenizer.vocab_size}-piece tokenizer.")
  objective.bind_reward_model(source.model_config)


def attach(objective, state, shardings, log=print):
  """`state` with the reward model's trained parameters in `frozen['reward_model']`."""
  if not wanted(objective):
    return state
  source = warm_start.load(os.path.abspath(objective.reward_model))
  saved = warm_start.read_params(source)
  if "reward_head" not in saved:
    raise UserError(f"{type(objective).__name__}.reward_model={source.workdir} has no "
                    "reward_head: it is a language model, not a reward model. Train one with "
                    "runs/reward_model.gin from this run's starting checkpoint.")
  like = state.frozen["reward_model"]
  params = warm_start.restore_params(source, like, shardings.frozen["reward_model"],
                                     params=saved)
  log(f"reward model: {source.workdir} (step {source.step}), "
      f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters, frozen")
  return state.replace(frozen={**state.frozen, "reward_model": params})
