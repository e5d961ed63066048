"""How much code a reader follows through one decoder-only training step.

The reading path is embed -> blocks -> logits -> loss -> train step: every function of
`llmjax/layers`, `llmjax/models`, `llmjax/objectives` and `llmjax/train/{state,step}.py`
that runs while a decoder-only model (the `tiny` preset, with dropout, so attention takes
the einsum reference) is initialized and its train step traced, counted whole, plus the
module- and class-level statements of those files (constants, config fields), without
imports, blank lines, comments and docstrings. `llmjax/kernels` (the fast paths behind
the seams) is not on it; neither are the branches of other architectures or decoding,
nor `models/presets.py` (named sizes are data; a reader reads one entry).

  .venv/bin/python -m llmjax.testing.reading_path      # per file, and the total

tests/test_layout.py keeps the total at or under `LIMIT`.
"""

import ast
import collections
import io
import os
import sys
import tokenize

LIMIT = 700
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH_PARTS = ("layers", "models", "objectives", os.path.join("train", "state.py"),
              os.path.join("train", "step.py"))


NOT_ON_PATH = (os.path.join("models", "presets.py"),)  # named sizes: data; one entry is read


def _on_path(filename: str) -> bool:
  rel = os.path.relpath(filename, _PACKAGE)
  return rel not in NOT_ON_PATH and any(rel == p or rel.startswith(p + os.sep)
                                        for p in PATH_PARTS)


def _trace_train_step() -> dict[str, set[int]]:
  """First lines of the functions (per file) that run during init + one traced step."""
  import jax
  import jax.numpy as jnp

  from llmjax.models.presets import get_preset
  from llmjax.models.transformer import Transformer
  from llmjax.objectives.lm import CausalLM
  from llmjax.optim.optimizers import OptimizerConfig
  from llmjax.train import state as state_lib
  from llmjax.train import step as step_lib

  called = collections.defaultdict(set)

  def profile(frame, event, arg):
    if event == "call" and _on_path(frame.f_code.co_filename):
      called[frame.f_code.co_filename].add(frame.f_code.co_firstlineno)

  tx, schedule = OptimizerConfig().make(10)
  tokens = jnp.zeros((2, 16), jnp.int32)
  batch = {"tokens": tokens, "tokens_segment_ids": jnp.ones_like(tokens),
           "tokens_positions": jnp.broadcast_to(jnp.arange(16), tokens.shape)}
  called[state_lib.__file__] = set()  # TrainState's fields (its methods are generated)
  sys.setprofile(profile)
  try:
    model = Transformer(get_preset("tiny", dropout_rate=0.1))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens)["params"])
    state = jax.eval_shape(lambda p: state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
        rng=jax.random.key_data(jax.random.key(1))), params)
    jax.eval_shape(step_lib.make_train_step(model, CausalLM(), tx, schedule), state, batch)
  finally:
    sys.setprofile(None)
  return called


def _code_lines(source: str, tree) -> set[int]:
  docstrings = set()
  for node in ast.walk(tree):
    body = getattr(node, "body", None)
    if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
      docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
  code = set()
  skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
          tokenize.ENDMARKER)
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type not in skip:
      code.update(range(tok.start[0], tok.end[0] + 1))
  return code - docstrings


def _read_lines(filename: str, starts: set[int]) -> set[int]:
  """Lines of the functions starting at `starts`, and of non-import top-level and
  class-level statements."""
  with open(filename) as f:
    source = f.read()
  tree = ast.parse(source)
  lines = set()
  functions = (ast.FunctionDef, ast.AsyncFunctionDef)
  for node in ast.walk(tree):
    if isinstance(node, functions):
      first = min([node.lineno] + [d.lineno for d in node.decorator_list])
      if first in starts or node.lineno in starts:
        lines.update(range(first, node.end_lineno + 1))
  declarations = list(tree.body)
  for node in ast.walk(tree):
    if isinstance(node, ast.ClassDef):
      declarations += [s for s in node.body if not isinstance(s, functions + (ast.ClassDef,))]
  for node in declarations:
    if not isinstance(node, (ast.Import, ast.ImportFrom, ast.ClassDef) + functions):
      lines.update(range(node.lineno, node.end_lineno + 1))
  return lines & _code_lines(source, tree)


def count() -> dict[str, int]:
  """{file relative to llmjax/: lines on the reading path}."""
  return {os.path.relpath(f, _PACKAGE): len(_read_lines(f, starts))
          for f, starts in sorted(_trace_train_step().items())}


if __name__ == "__main__":
  counts = count()
  for path, n in counts.items():
    print(f"{n:5d}  {path}")
  print(f"{sum(counts.values()):5d}  total (limit {LIMIT})")
