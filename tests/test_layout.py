"""The codebase's shape, as docs/architecture.md states it: the layering (an
import-linter contract in setup.cfg), file and function sizes, and the length of the
decoder-only reading path."""

import ast
import glob
import os
import shutil
import subprocess
import sys

import pytest

from llmjax.testing import reading_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT_IMPORTS = os.path.join(os.path.dirname(sys.executable), "lint-imports")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60


def _lint_imports(cwd):
  return subprocess.run([LINT_IMPORTS, "--config", os.path.join(cwd, "setup.cfg")], cwd=cwd,
                        capture_output=True, text=True, timeout=300, check=False)


def test_import_layers_contract_is_kept():
  result = _lint_imports(ROOT)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
  assert "1 kept, 0 broken" in result.stdout


def test_an_import_up_the_layers_breaks_the_contract(tmp_path):
  """The contract is live: layers/ importing train/ is reported."""
  shutil.copytree(os.path.join(ROOT, "llmjax"), tmp_path / "llmjax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  shutil.copy(os.path.join(ROOT, "setup.cfg"), tmp_path / "setup.cfg")
  mlp = tmp_path / "llmjax" / "layers" / "mlp.py"
  mlp.write_text(mlp.read_text() + "\nfrom llmjax.train import step  # noqa\n")
  result = _lint_imports(str(tmp_path))
  assert result.returncode != 0
  assert "llmjax.layers.mlp -> llmjax.train.step" in result.stdout


def _sources():
  """{path: text} of every module of the package."""
  out = {}
  for path in sorted(glob.glob(os.path.join(ROOT, "llmjax", "**", "*.py"), recursive=True)):
    with open(path) as f:
      out[path] = f.read()
  return out


def test_no_file_over_400_lines():
  long = {os.path.relpath(f, ROOT): n for f, text in _sources().items()
          if (n := text.count("\n")) > MAX_FILE_LINES}
  assert not long


def test_no_function_over_60_lines():
  long = []
  for f, text in _sources().items():
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        if node.end_lineno - first + 1 > MAX_FUNCTION_LINES:
          long.append(f"{os.path.relpath(f, ROOT)}:{node.lineno} {node.name}")
  assert not long


@pytest.mark.slow
def test_decoder_only_reading_path_is_at_most_700_lines():
  counts = reading_path.count()
  assert "layers/linear.py" in counts and "train/step.py" in counts  # the path was traced
  assert not any(name.startswith("kernels") for name in counts)
  assert sum(counts.values()) <= reading_path.LIMIT, counts
