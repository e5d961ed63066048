#!/usr/bin/env bash
# The main job: set up .venv, train the default model on Shakespeare (builds the dataset
# and the tokenizer on first use), then sample from it.
# Usage: bash scripts/main.sh [WORKDIR]     (default workdirs/shakespeare; re-running resumes)
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="${1:-workdirs/shakespeare}"
bash scripts/setup_env.sh
export TF_CPP_MIN_LOG_LEVEL=2
.venv/bin/llmjax train --gin_file=runs/shakespeare_small.gin --workdir="$workdir" --no_sample
.venv/bin/llmjax generate --workdir="$workdir" --prompt="ROMEO" --max_new_tokens=120 \
  --temperature=0.8 --seed=0
