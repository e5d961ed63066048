"""Transformer building blocks (flax linen, einsum layers with logical axes)."""
