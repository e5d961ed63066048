"""Parameter-efficient fine-tuning on the intercept seam (`llmjax.layers.intercept`):
the model is never edited, its layers are intercepted by module path.

  lora           LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024) on any `Einsum`;
                 merge/unmerge fold them into the kernels and back.
  adapters       bottleneck adapters (Houlsby et al. 2019) after the attention and/or
                 MLP output projections; not mergeable.
  prompt_tuning  prompt tuning (Lester et al. 2021): k soft-prompt vectors before the
                 (encoder's) input, through the `embed` lookup; not mergeable.
  model          `PeftModel`, the wrapper that applies any mix of them (at most one soft
                 prompt), its checkpoint metadata (`meta['peft']`) and `merged`, which
                 folds what folds and keeps the rest running through the interceptors;
                 also QAT (`llmjax.quant.qat`) and a QLoRA base (`llmjax.quant.qlora`).
  qlora          merging LoRA into a QLoRA run's 4-bit base: de-quantize, fold,
                 re-quantize, and report the error that adds.

Gin: `train.peft = [@LoraConfig()]` / `[@AdapterConfig()]` / `[@PromptTuningConfig()]`
(gin_configs/peft/); only their parameters train. `[@LoraConfig(), @QloraConfig()]` is
QLoRA (peft/qlora.gin); `[@QatConfig()]` is QAT (gin_configs/quant/), where all train.
"""
