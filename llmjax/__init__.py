"""llmjax: a JAX/Flax (linen) research codebase for the whole life of a language model."""

__version__ = "0.1.0"
