"""A trained workdir's network, parameters and tokenizer, ready to decode or evaluate."""

import os


def load_workdir(workdir, step=None, adapter=None, tokenizer_path=None):
  """`(network, params, tokenizer)` of a workdir's checkpoint (default: latest), ready to
  decode: LoRA folded into the kernels, other adapters and soft prompts run through a
  `PeftModel`, `adapter` picking one of several named adapters ('none': the base). A
  checkpoint written by `llmjax quantize` gives a `QuantizedModel` and its packed
  arrays (`llmjax.quant.model`)."""
  from llmjax.checkpoint import manager as ckpt_lib
  from llmjax.data import tokenizer as tokenizer_lib
  from llmjax.errors import UserError
  from llmjax.models.config import TransformerConfig
  from llmjax.models.transformer import Transformer
  from llmjax.peft import model as peft_model

  ckpt = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"))
  params, meta = ckpt.restore_params(step)
  ckpt.close()
  model = Transformer(TransformerConfig(**meta["model_config"]))
  if meta.get("quantization"):
    from llmjax.quant import model as quant_model
    if adapter not in (None, "none"):
      raise UserError(f"{workdir} is quantized: its adapters were folded into the weights "
                      "before quantizing, so there is none to pick; drop --adapter.")
    model, params = quant_model.from_checkpoint(model, params, meta)
  else:
    model, params = peft_model.merged_model(model, params, meta, adapter)
  if tokenizer_path:
    tokenizer = tokenizer_lib.load_any(tokenizer_path)
  elif meta.get("tokenizer"):
    tokenizer = tokenizer_lib.from_serialized(ckpt_lib.decode_bytes(meta["tokenizer"]))
  else:
    raise UserError(f"the checkpoint in {workdir} has no tokenizer (it was converted "
                    "from a folder without one): pass --tokenizer=PATH (a SentencePiece "
                    ".model or a tokenizer.json).")
  return model, params, tokenizer
