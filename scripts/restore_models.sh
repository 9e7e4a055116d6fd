#!/usr/bin/env bash
# Model folders that left the tree so that it fits the device transfer (issue 17: the working tree that travels
# to the GPU machine is limited to 64 MiB; scripts/gpu_payload.sh checks it). They stay in git history at the
# MODELS_COMMITS below; this extracts them into runs/restored/ (ignored by git, so they never travel):
#
#   scripts/restore_models.sh models/gpu-h200-faces64/student_paper models/cpu-demo-faces64/prior64
#   → runs/restored/models/gpu-h200-faces64/student_paper, runs/restored/models/cpu-demo-faces64/prior64
#
# Without arguments it lists what can be restored. OUT=DIR extracts elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
# the last commit that holds each group of dropped model folders, newest first; a folder is put together from
# every commit that holds it, oldest first
MODELS_COMMITS=(
  e16f201ab65a7758eaf6cbdc76f601473c7509f9  # cpu-faces128/student_paper, cpu-faces128/student_lean256 (142 labels)
  5182d9f2200d814d4756aa6318927d7ac93026d7  # cascade-faces64, cpu-faces128/prior128
  791dad7693cbaf3857b2661465cce6d794d7f8d1  # cpu-demo-faces32, cpu-demo-faces64, gpu-h200-faces64/student_paper
)
OUT=${OUT:-runs/restored}
for commit in "${MODELS_COMMITS[@]}"; do
  if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
    echo "restore_models: commit $commit is not in this clone (a shallow clone? git fetch --unshallow)" >&2
    exit 2
  fi
done
if [ $# -eq 0 ]; then
  for commit in "${MODELS_COMMITS[@]}"; do
    echo "model folders at $commit that are no longer tracked:"
    git ls-tree -d --name-only "$commit" models/ | while read -r top; do
      git ls-tree -d --name-only "$commit" "$top/" | while read -r d; do
        [ -n "$(git ls-files -- "$d")" ] || echo "  $d"
      done
    done
  done
  exit 0
fi
mkdir -p "$OUT"
for path in "$@"; do
  path=${path%/}
  found=()
  for commit in "${MODELS_COMMITS[@]}"; do
    if git cat-file -e "$commit:$path" 2>/dev/null; then found=("$commit" "${found[@]}"); fi
  done
  if [ ${#found[@]} -eq 0 ]; then
    echo "restore_models: $path is in none of ${MODELS_COMMITS[*]} (run without arguments for the list)" >&2
    exit 2
  fi
  for commit in "${found[@]}"; do  # oldest first: a newer commit's files win, none of an older one's are lost
    git archive "$commit" -- "$path" | tar -x -C "$OUT"
  done
  echo "$OUT/$path"
done
