"""Hand-written kernels that XLA calls through its FFI (built on first use)."""
