#!/usr/bin/env bash
# The test command: sets up .venv (with the dev, hf, ray, eval and quant extras) and runs the whole suite.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k tokenizer -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev,hf,ray,eval,quant
exec .venv/bin/python -m pytest -q -ra --durations=15 "$@"
