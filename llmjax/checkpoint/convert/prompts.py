"""Soft prompts (prompt tuning) in and out of Hugging Face PEFT's PROMPT_TUNING folders.

PEFT saves a soft prompt as `adapter_config.json` (`peft_type: PROMPT_TUNING`,
`num_virtual_tokens` k, `token_dim` D) and `adapter_model.safetensors` holding
`prompt_embeddings [k, D]`. For a causal LM PEFT concatenates those vectors before the
input embeddings, so they take positions 0..k-1 and the tokens k, k+1, ...: what
llmjax's prompt tuning computes (`llmjax.peft.prompt_tuning`), so the array goes across
as it is (`embed/prompt_<name>`). Decoder-only models only: PEFT's sequence-to-sequence
prompt tuning also puts virtual tokens on the decoder side (`num_transformer_submodules`
2), which llmjax's encoder-side prompt does not model.
"""

import numpy as np

from llmjax.checkpoint.convert import adapters
from llmjax.errors import UserError
from llmjax.models.config import TransformerConfig
from llmjax.peft.prompt_tuning import PromptTuningConfig

KEY = "prompt_embeddings"


def _check_arch(cfg: TransformerConfig):
  if cfg.arch != "decoder_only":
    raise UserError(f"soft prompts go to and from Hugging Face PEFT for decoder-only models "
                    f"only, not {cfg.arch} (PEFT's seq2seq prompt tuning adds decoder-side "
                    "virtual tokens llmjax does not model); sample with `llmjax generate`.")


def export_prompt(out_dir: str, cfg: TransformerConfig, params, config: PromptTuningConfig,
                  *, base_model_name_or_path: str | None = None) -> None:
  """Writes soft prompt `config.name` of `params` as a PEFT PROMPT_TUNING folder."""
  _check_arch(cfg)
  name = f"prompt_{config.name}"
  if name not in params.get("embed", {}):
    raise UserError(f"these parameters hold no soft prompt {config.name!r} (embed/{name}).")
  prompt = np.asarray(params["embed"][name], np.float32)
  adapters.write_peft_dir(out_dir, {
      "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
      "num_virtual_tokens": int(prompt.shape[0]), "token_dim": int(prompt.shape[1]),
      "num_transformer_submodules": 1, "num_attention_heads": cfg.num_heads,
      "num_layers": cfg.num_layers, "prompt_tuning_init": "RANDOM",
      "base_model_name_or_path": base_model_name_or_path, "inference_mode": True},
      {KEY: prompt})


def import_prompt(adapter_dir: str, cfg: TransformerConfig, params, *,
                  name: str = "default"):
  """`(PromptTuningConfig, params with the prompt)` from a PEFT PROMPT_TUNING folder."""
  _check_arch(cfg)
  conf, tensors = adapters.read_peft_dir(adapter_dir, peft_type="PROMPT_TUNING")
  prompt = tensors.get(KEY)
  if prompt is None or prompt.ndim != 2 or prompt.shape[1] != cfg.embed_dim or \
      conf.get("num_transformer_submodules", 1) != 1:
    raise UserError(f"the soft prompt in {adapter_dir} ({KEY} "
                    f"{None if prompt is None else prompt.shape}) does not fit this model "
                    f"(embed_dim {cfg.embed_dim}, one submodule): it was trained on another "
                    "base.")
  config = PromptTuningConfig(length=int(prompt.shape[0]), name=name)
  out = {**params, "embed": {**params["embed"],
                             f"prompt_{name}": np.asarray(prompt, np.float32)}}
  return config, out
