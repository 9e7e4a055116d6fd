#!/usr/bin/env bash
# What travels to the GPU machine for scripts/gpu_train.sh, against its budgets (issue 17).
#
# The device machine receives the working tree (tracked files and untracked files git does not ignore) plus the
# carried .gpu/ folder (face pack, LPIPS fp16, PSF): 64 MiB in all, or the call is refused. The budgets keep
# 7 MiB of margin: tracked ≤ 35 MiB (tests/test_payload.py holds CI to it), .gpu ≤ 22 MiB, total ≤ 57 MiB
# (34/56 until the scale-range refocus student, 0.98 MB that supersedes nothing, took the tree to 34.97 MiB).
# Model weights are the bulk of the tracked tree: a new run's weights replace the ones they supersede (the old
# ones stay in history, scripts/restore_models.sh), never add to them.
#
#   scripts/gpu_payload.sh            # prints the table; exit 1 when a budget is exceeded
#   GPU_DIR=elsewhere scripts/gpu_payload.sh
set -euo pipefail
# (no `head` in a pipeline: under pipefail the writer's SIGPIPE, exit 141, would fail the script at random)
cd "$(dirname "$0")/.."
TRACKED_BUDGET_MIB=35
CARRY_BUDGET_MIB=22
TOTAL_TARGET_MIB=57
DEVICE_LIMIT_MIB=64
GPU_DIR=${GPU_DIR:-.gpu}
if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  echo "gpu_payload: $PWD is not a git checkout (the device machine is sent a git working tree)" >&2
  exit 2
fi
# sizes as they would be copied: a link counts as a link, a tracked file deleted here does not count
sizes() { xargs -0 -r stat -c '%s %n' -- 2>/dev/null || true; }
sum() { awk '{s += $1} END {print s + 0}'; }
tracked=$(git ls-files -z | sizes | sum)
untracked=$(git ls-files -z --others --exclude-standard | sizes | sum)
carried=0
[ -d "$GPU_DIR" ] && carried=$(find "$GPU_DIR" -type f -printf '%s\n' | sum)
total=$((tracked + untracked + carried))
mib() { awk -v b="$1" 'BEGIN {printf "%7.2f MiB", b / 1048576}'; }
over() { awk -v b="$1" -v m="$2" 'BEGIN {exit !(b > m * 1048576)}'; }
echo "device payload of scripts/gpu_train.sh (the working tree + $GPU_DIR carried; the device refuses > $DEVICE_LIMIT_MIB MiB)"
printf '  %-28s %s  (budget %d MiB)\n' "tracked files" "$(mib "$tracked")" "$TRACKED_BUDGET_MIB"
printf '  %-28s %s\n' "untracked, not ignored" "$(mib "$untracked")"
printf '  %-28s %s  (budget %d MiB)\n' "$GPU_DIR (carried)" "$(mib "$carried")" "$CARRY_BUDGET_MIB"
printf '  %-28s %s  (target %d MiB)\n' "total" "$(mib "$total")" "$TOTAL_TARGET_MIB"
echo "largest tracked folders:"
git ls-files -z | sizes | awk '{f = substr($0, index($0, " ") + 1); n = split(f, p, "/"); k = (n > 3) ? p[1] "/" p[2] "/" p[3] : f; s[k] += $1}
  END {for (k in s) printf "%d %s\n", s[k], k}' | sort -rn | awk 'NR <= 6' |
  while read -r b d; do printf '  %-48s %s\n' "$d" "$(mib "$b")"; done
status=0
if over "$tracked" "$TRACKED_BUDGET_MIB"; then
  echo "OVER BUDGET: tracked files exceed $TRACKED_BUDGET_MIB MiB; drop superseded weights (git rm; scripts/restore_models.sh brings them back) or store them as fp16" >&2
  status=1
fi
if over "$carried" "$CARRY_BUDGET_MIB"; then
  echo "OVER BUDGET: $GPU_DIR exceeds $CARRY_BUDGET_MIB MiB; pack fewer 128 px faces (gpu_oneshot pack --count128)" >&2
  status=1
fi
if over "$total" "$TOTAL_TARGET_MIB"; then
  echo "OVER BUDGET: the payload exceeds $TOTAL_TARGET_MIB MiB (the device refuses more than $DEVICE_LIMIT_MIB MiB)" >&2
  status=1
fi
exit $status
