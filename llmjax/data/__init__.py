"""Text to batches: tokenizer, cleaning, TFDS builders, grain pipeline, packing."""
