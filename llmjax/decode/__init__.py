"""Generation from trained models."""
