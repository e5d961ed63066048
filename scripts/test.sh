#!/usr/bin/env bash
# The test command: sets up .venv (with the dev, hf, ray, eval and quant extras) and runs the whole suite.
# The suite runs on two pytest-xdist workers, each test file on one of them (module
# fixtures are built once); `-n 0` runs it in this process.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k tokenizer -x -n 0
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev,hf,ray,eval,quant
exec .venv/bin/python -m pytest -q -ra --durations=15 -n 2 --dist loadfile "$@"
