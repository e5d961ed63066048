"""Helpers for tests: tiny configs, fake batches, numeric asserts."""
