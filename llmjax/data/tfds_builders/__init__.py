"""TFDS builders that need no TensorFlow (array_record files)."""
