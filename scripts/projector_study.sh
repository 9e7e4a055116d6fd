#!/usr/bin/env bash
# The pseudo-inverse study (issue 13, docs/results.md): null-space vs `full` students with the Tikhonov and the
# truncated A†, all four trained the same way on the same labels, scored on the 30 reported test faces and,
# ground-truth-free, against held-out labels.
# Labels come from the GPU paper student (cascade distillation: it is as close to the teacher as the teacher's
# own noise, at ~1/80 of its cost): 1,124 training measurements, the first 1,024 to train on, the last 100
# held out. Each student trains the same STEPS steps (batch 16, one thread; the two objectives of one
# pseudo-inverse side by side, one per core). Every step resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-runs/r64/radial64}
# the GPU paper student left the tree (device payload, issue 17): restored from history into runs/restored/
PAPER=${PAPER:-runs/restored/models/gpu-h200-faces64/student_paper}
[ -d "$PAPER" ] || scripts/restore_models.sh models/gpu-h200-faces64/student_paper
OUT=${OUT:-runs/gpu}
STEPS=${STEPS:-800}
LPIPS=${LPIPS:-../shared/weights/lpips/lpips_alex_full_v0.1.pth}
nsdd-train solve --method "student:$PAPER" --data "$DATA" --split train --limit 1124 --batch-size 16 \
  --threads 1 --out "$OUT/cascade_labels"
for proj in tikhonov truncated; do
  for obj in nullspace full; do
    nsdd-train distill --data "$DATA" --targets "$OUT/cascade_labels" --limit 1024 --student edge --objective "$obj" \
      --projector "$proj" --lam discrepancy --width 16 --depth 3 --max-width 128 \
      --lpips-weight 0.1 --lpips-weights "$LPIPS" --steps "$STEPS" --batch 16 --lr 5e-4 \
      --warmup 50 --checkpoint-every 200 --preload --threads 1 --quiet --out "$OUT/projector_${proj}_${obj}" &
  done
  wait
done
students=""
for proj in tikhonov truncated; do for obj in nullspace full; do students="$students,student:$OUT/projector_${proj}_${obj}"; done; done
names="tikhonov null-space,tikhonov full,truncated null-space,truncated full"
nsdd-train evaluate --data "$DATA" --split test --limit 30 --threads 1 --methods "${students#,}" --names "$names" \
  --lpips-weights "$LPIPS" --out "$OUT/eval_projector"
nsdd-train evaluate --data "$DATA" --split train --skip 1024 --limit 100 --threads 1 --methods "${students#,}" \
  --names "$names" --against "$OUT/cascade_labels" --lpips-weights "$LPIPS" --out "$OUT/eval_projector_heldout"
