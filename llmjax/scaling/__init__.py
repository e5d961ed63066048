"""Compute and memory accounting, scaling-law fits."""
