"""User-facing errors.

Every error a user can cause with bad input (a config, a path, a corpus) is raised as a
`UserError` whose message names the problem and the fix. The CLI prints these without
a traceback; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """Bad input from the user: the message says what is wrong and how to fix it."""


class NonFiniteError(FloatingPointError):
  """Training halted on a NaN/Inf loss or gradient; the message names the step, the last
  good checkpoint and what to change. The CLI prints it without a traceback (exit 3)."""
