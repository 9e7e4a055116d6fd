#!/usr/bin/env bash
# The scale-randomised student (issue 18, docs/refocus.md): an edge student distilled over PSF scales 0.85–1.2
# (a scene at another depth) against the same student distilled for the calibrated PSF alone, same steps, same
# labels, same pipeline (measurements simulated from the labels; --psf-scale-range 1 1 for the single PSF).
# Labels: the GPU paper student's reconstructions of 1,024 training measurements (cascade distillation, made by
# scripts/projector_study.sh). Each student trains STEPS steps of batch 16 on one thread, the two side by side
# (one per core); every step resumes. Then both are exported with --spectra-input and scored on simulated test
# faces at scales 0.85–1.2, each fed its true A_s† through the spectra input (scripts/refocus_study.py).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-runs/r64/radial64}
LABELS=${LABELS:-runs/gpu/cascade_labels}
OUT=${OUT:-runs/refocus}
STEPS=${STEPS:-700}
LPIPS=${LPIPS:-../shared/weights/lpips/lpips_alex_full_v0.1.pth}
common=(--data "$DATA" --targets "$LABELS" --limit 1024 --student edge --objective nullspace --lam discrepancy
        --width 16 --depth 3 --max-width 128 --lpips-weight 0.1 --lpips-weights "$LPIPS" --steps "$STEPS"
        --batch 16 --lr 5e-4 --warmup 50 --checkpoint-every 100 --preload --threads 1 --fp16 --quiet)
nsdd-train distill "${common[@]}" --psf-scale-range 0.85 1.2 --out "$OUT/student_scale_range" &
nsdd-train distill "${common[@]}" --psf-scale-range 1 1 --out "$OUT/student_single_psf" &
wait
python3 scripts/refocus_study.py --data "$DATA" --students "$OUT/student_scale_range,$OUT/student_single_psf" \
  --names "scale range 0.85-1.2,single PSF" --lpips-weights "$LPIPS" --limit 30 --out "$OUT/study" \
  --figure docs/img/refocus_study.jpg
