#!/usr/bin/env bash
# Model folders that left the tree so that it fits the device transfer (issue 17: the working tree that travels
# to the GPU machine is limited to 64 MiB; scripts/gpu_payload.sh checks it). They stay in git history at
# MODELS_COMMIT; this extracts them into runs/restored/ (ignored by git, so they never travel):
#
#   scripts/restore_models.sh models/gpu-h200-faces64/student_paper models/cpu-demo-faces64/prior64
#   → runs/restored/models/gpu-h200-faces64/student_paper, runs/restored/models/cpu-demo-faces64/prior64
#
# Without arguments it lists what can be restored. OUT=DIR extracts elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS_COMMIT=791dad7693cbaf3857b2661465cce6d794d7f8d1  # the last commit that holds every dropped model folder
OUT=${OUT:-runs/restored}
if ! git cat-file -e "$MODELS_COMMIT^{commit}" 2>/dev/null; then
  echo "restore_models: commit $MODELS_COMMIT is not in this clone (a shallow clone? git fetch --unshallow)" >&2
  exit 2
fi
if [ $# -eq 0 ]; then
  echo "model folders at $MODELS_COMMIT that are no longer tracked:"
  git ls-tree -d --name-only "$MODELS_COMMIT" models/ | while read -r top; do
    git ls-tree -d --name-only "$MODELS_COMMIT" "$top/" | while read -r d; do
      [ -n "$(git ls-files -- "$d")" ] || echo "  $d"
    done
  done
  exit 0
fi
for path in "$@"; do
  path=${path%/}
  if ! git cat-file -e "$MODELS_COMMIT:$path" 2>/dev/null; then
    echo "restore_models: $path is not in commit $MODELS_COMMIT (run without arguments for the list)" >&2
    exit 2
  fi
done
mkdir -p "$OUT"
git archive "$MODELS_COMMIT" -- "$@" | tar -x -C "$OUT"
for path in "$@"; do echo "$OUT/${path%/}"; done
