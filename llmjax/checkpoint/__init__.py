"""Orbax checkpoints that resume exactly."""
