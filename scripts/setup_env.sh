#!/usr/bin/env bash
# Creates (or reuses) the one virtualenv at .venv in the repository root and installs
# llmjax into it in editable mode with the given extras (default: none).
# Usage: bash scripts/setup_env.sh [extras]     e.g.  bash scripts/setup_env.sh dev,hf
# Re-running is cheap: the install is skipped while setup.cfg and the extras are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($python --version)"
  "$python" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
fi
stamp=".venv/.llmjax-install-$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)-${extras//,/_}"
if [ ! -f "$stamp" ]; then
  spec="."
  [ -n "$extras" ] && spec=".[$extras]"
  echo "[setup] pip install -e '$spec' (first run downloads jax, flax, ...; a few minutes)"
  .venv/bin/python -m pip install -q -e "$spec"
  rm -f .venv/.llmjax-install-*
  touch "$stamp"
fi
