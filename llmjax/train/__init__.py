"""Train state, step, loop and the gin entry point."""
