"""Training objectives: they own batch keys, losses and metrics."""
