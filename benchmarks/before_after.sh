#!/usr/bin/env bash
# Speed before vs after a refactor, in one session (this machine drifts by 2x within
# seconds, so runs on different days or hours do not compare).
#
#   bash benchmarks/before_after.sh BASE_COMMIT [ROUNDS]
#
# "before" is BASE_COMMIT, checked out as a detached git worktree at
# /tmp/llmjax-before-<sha> (reused when it is already there); "after" is this working
# tree, uncommitted changes included. Runs, from the repository root:
#  1. train_vs_torch, both trees' llmjax (f32 and bf16) and the PyTorch peers interleaved
#     in one run (`@src=` workers import the old tree's llmjax and benchmarks);
#  2. decode_vs_hf, each tree's own script on its own llmjax: old, new, old, new.
# ROUNDS (default 8) goes to both; DECODE_ARGS (e.g. "--cases=char-b1,char-b8") is added
# to the decode runs. Everything is tee'd into /tmp/llmjax-before-after-<sha>-<time>.log.
set -euo pipefail

base=${1:?usage: bash benchmarks/before_after.sh BASE_COMMIT [ROUNDS]}
rounds=${2:-8}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}  # PYTHON=echo: a dry run that prints the commands
sha=$(git -C "$repo" rev-parse --verify "$base^{commit}")
short=$(git -C "$repo" rev-parse --short "$sha")
wt=/tmp/llmjax-before-$short

if [ ! -e "$wt" ]; then
  git -C "$repo" worktree add --detach "$wt" "$sha"
elif [ "$(git -C "$wt" rev-parse HEAD 2>/dev/null)" != "$sha" ]; then
  echo "$wt exists but is not a checkout of $sha; remove it (git worktree remove $wt)" >&2
  exit 1
fi

log=/tmp/llmjax-before-after-$short-$(date +%Y%m%d-%H%M%S).log
exec > >(tee -a "$log") 2>&1
dirty=$(git -C "$repo" status --porcelain --untracked-files=no | grep -q . && echo " + uncommitted changes" || true)
echo "before: $base = $short at $wt"
echo "after:  $(git -C "$repo" rev-parse --short HEAD)$dirty at $repo"

cd "$repo"
echo "=== train_vs_torch: after (llmjax, llmjax-bf16) and before (@src=$wt), $rounds rounds ==="
"$python" -m benchmarks.train_vs_torch --rounds "$rounds" --steps 2 \
  --impls "llmjax,llmjax-bf16,llmjax@src=$wt@label=before,llmjax-bf16@src=$wt@label=before-bf16,torch-ref,hf-eager"

# decode_vs_hf puts its own repository root first on sys.path; PYTHONPATH and the working
# directory say the same, so the editable install (/work/main) cannot win.
decode() {  # decode TREE_NAME DIR
  echo
  echo "=== decode_vs_hf from the $1 tree: $2 ==="
  (cd "$2" && PYTHONPATH="$2" "$python" -c \
    "import sys; sys.path.insert(0, '$2'); import llmjax; print('llmjax from', llmjax.__path__[0])")
  # shellcheck disable=SC2086 # DECODE_ARGS is a list of options
  (cd "$2" && PYTHONPATH="$2" "$python" benchmarks/decode_vs_hf.py --rounds "$rounds" ${DECODE_ARGS:-})
}
for pass in 1 2; do
  echo
  echo "--- decode pass $pass of 2 ---"
  decode before "$wt"
  decode after "$repo"
done
echo
echo "log: $log"
