"""Hugging Face checkpoint import and export (GPT-2, LLaMA, Mistral, Qwen2, Gemma, BERT,
T5).

  cfg, params, hf_config = import_hf(hf_dir)             # config.json + *.safetensors
  export_hf(hf_dir, cfg, params)                         # a folder `from_pretrained` loads
  hf_to_workdir(hf_dir, workdir); workdir_to_hf(workdir, hf_dir)   # `llmjax convert`

Each architecture module (`gpt2`, `llama` (also Mistral, Qwen2, Gemma), `bert`, `t5`)
maps `config.json` to a `TransformerConfig` and tensor names to the unscanned parameter tree (`layers_i`);
`stack_layers` gives the scanned layout when `config.scan_layers`. Every import is
checked against the shapes `Transformer(cfg).init` would create, so a mapping error
fails loudly instead of loading garbage. Parameters are float32 (`param_dtype`).
"""

import jax
import numpy as np

from llmjax.checkpoint.convert import bert, gpt2, hf_io, llama, t5
from llmjax.checkpoint.convert.common import Tensors
from llmjax.errors import UserError
from llmjax.models.config import TransformerConfig
from llmjax.models.stack import stack_layers, unstack_layers

CONVERTERS = {t: m for m in (gpt2, llama, bert, t5) for t in m.MODEL_TYPES}


def _converter(model_type: str):
  if model_type not in CONVERTERS:
    raise UserError(f"model_type {model_type!r} is not supported by llmjax's Hugging Face "
                    f"converter; supported: {sorted(CONVERTERS)}. Convert another "
                    "architecture by adding a module to llmjax/checkpoint/convert/.")
  return CONVERTERS[model_type]


def expected_shapes(cfg: TransformerConfig) -> dict:
  """{'/'-joined param path: shape} that `Transformer(cfg).init` creates (no compute)."""
  from flax import linen as nn
  from flax import traverse_util

  from llmjax.models.transformer import Transformer
  tokens = jax.ShapeDtypeStruct((1, 2), np.int32)
  extra = {"encoder_tokens": tokens} if cfg.arch == "encoder_decoder" else {}
  shapes = jax.eval_shape(
      lambda t, e: Transformer(cfg).init(jax.random.PRNGKey(0), t, **e)["params"],
      tokens, extra)
  flat = traverse_util.flatten_dict(nn.meta.unbox(shapes), sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def check_params(cfg: TransformerConfig, params) -> None:
  """Raises if `params` does not have exactly the structure and shapes of `cfg`'s model."""
  from flax import traverse_util
  want = expected_shapes(cfg)
  got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  if want != got:
    diff = sorted(set(want.items()) ^ set(got.items()))[:8]
    raise ValueError(f"converted params do not match the model (first differences, "
                     f"(path, shape)): {diff}")


def import_hf(hf_dir: str, *, scan_layers: bool = True):
  """Reads a HF folder -> (TransformerConfig, float32 numpy params, HF config dict)."""
  hf_config = hf_io.read_config(hf_dir)
  conv = _converter(hf_config.get("model_type"))
  tensors = hf_io.read_tensors(hf_dir)
  cfg = conv.config_from_hf(hf_config, tensors).replace(scan_layers=scan_layers)
  t = Tensors({k: v.astype(np.float32) for k, v in tensors.items()}, hf_dir)
  params = conv.params_from_hf(t, cfg)
  check_params(cfg.replace(scan_layers=False), params)
  if scan_layers:
    params = jax.tree.map(np.asarray, stack_layers(params))
  return cfg, params, hf_config


def export_hf(hf_dir: str, cfg: TransformerConfig, params, *, model_type: str | None = None,
              base_config: dict | None = None, max_shard_bytes: int | None = None,
              extra_files: dict[str, bytes] | None = None) -> None:
  """Writes `params` of `cfg` as a HF folder (float32 safetensors + config.json).

  `model_type` defaults to the one `infer_model_type` recognizes; `base_config` (the
  imported config.json) keeps fields llmjax does not model (token ids, ...).
  """
  model_type = model_type or infer_model_type(cfg)
  conv = _converter(model_type)
  params = jax.tree.map(lambda a: np.asarray(a, np.float32), jax.device_get(params))
  if cfg.scan_layers:
    params = unstack_layers(params)
  check_params(cfg.replace(scan_layers=False), params)
  config = conv.config_to_hf(cfg, {**(base_config or {}), "model_type": model_type})
  config["dtype"] = config["torch_dtype"] = "float32"
  tensors = {k: np.ascontiguousarray(v, np.float32)
             for k, v in conv.params_to_hf(params, cfg).items()}
  hf_io.write_hf_dir(hf_dir, config, tensors, max_shard_bytes, extra_files)


def infer_model_type(cfg: TransformerConfig) -> str:
  """The HF architecture a config has the shape of."""
  if cfg.arch == "encoder_decoder":
    return "t5"
  if cfg.arch == "encoder_only":
    return "bert"
  return llama.infer_model_type(cfg) if cfg.position == "rope" else "gpt2"

