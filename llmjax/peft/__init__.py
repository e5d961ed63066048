"""Parameter-efficient fine-tuning on the intercept seam: LoRA and DoRA (`lora`),
the model wrapper that applies them (`model`)."""
