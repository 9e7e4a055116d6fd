#!/usr/bin/env bash
# A null-space student for the real DiffuserCam PSF, run on the real hand capture beside Wiener and ADMM
# (docs/diffusercam.md, "A DiffuserCam student"). Stages (each resumes where it stopped):
#   simulate  UTKFace faces (SIZE² px) through the DiffuserCam PSF (corner background removed, ×DS: 75×100 at
#             ×16), crop model, noise 0.005; reconstruction operator circular at sensor size
#   teacher   DDNM+ labels with the face prior PRIOR (SIZE px; it works on the scenes' centred window)
#   distill   edge null-space student, the network on the scenes' SIZE² window only (--support auto)
#   hand      Wiener, ADMM (crop model, as in docs/diffusercam.md) and the student (its circular operator)
#             on rawdata_hand_sample.tif at the same ×DS; figure + consistency table (scripts/diffusercam_figure.py)
# Usage: scripts/diffusercam_student.sh [all|simulate|teacher|distill|hand]
# Toy check (minutes on a CPU): LIMIT=40 N_TEST=8 TEACHER_N=16 TEACHER_STEPS=5 STUDENT_STEPS=20 \
#   RUNS=runs/dc16_toy PRIOR=DIR FIGURE=runs/dc16_toy/hand/figure.png scripts/diffusercam_student.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
RUNS=${RUNS:-runs/dc16}
PRIOR=${PRIOR:-runs/r64/prior64}
DS=${DS:-16}; SIZE=${SIZE:-64}; NOISE=${NOISE:-0.005}
LIMIT=${LIMIT:-}; N_TEST=${N_TEST:-200}
TEACHER_N=${TEACHER_N:-384}; TEACHER_STEPS=${TEACHER_STEPS:-50}; TEACHER_BATCH=${TEACHER_BATCH:-16}
STUDENT_STEPS=${STUDENT_STEPS:-2000}; STUDENT_LAM=${STUDENT_LAM:-1e-3}
THREADS=${THREADS:-1}; DEVICE=${DEVICE:-cpu}
FIGURE=${FIGURE:-docs/img/diffusercam_hand_student.jpg}
D=$SHARED/data/lensless/diffusercam
DATA=$RUNS/faces$SIZE
STUDENT=$RUNS/student_nullspace
HAND=$RUNS/hand

stage=${1:-all}
case $stage in all|simulate|teacher|distill|hand) ;; *) echo "usage: $0 [all|simulate|teacher|distill|hand]" >&2; exit 2;; esac
t0=$SECONDS
took() { echo "== $1: $((SECONDS - t0)) s" >&2; t0=$SECONDS; }

if [[ $stage == all || $stage == simulate ]]; then
  nsdd-train simulate --images "$SHARED/data/faces/utkface" --psf "$D/psf_sample.tif" --psf-background corner \
    --psf-downsample "$DS" --size "$SIZE" --noise-std "$NOISE" --seed 0 --n-test "$N_TEST" ${LIMIT:+--limit "$LIMIT"} \
    --threads "$THREADS" --out "$DATA"
  took simulate
fi
if [[ $stage == all || $stage == teacher ]]; then
  OMP_NUM_THREADS=$THREADS nsdd-train teacher --data "$DATA" --prior "$PRIOR" --split train --limit "$TEACHER_N" \
    --steps "$TEACHER_STEPS" --batch "$TEACHER_BATCH" --shard-size 64 --device "$DEVICE" --out "$RUNS/teacher"
  took teacher
fi
if [[ $stage == all || $stage == distill ]]; then
  nsdd-train distill --data "$DATA" --targets "$RUNS/teacher" --limit "$TEACHER_N" --student edge \
    --objective nullspace --lam "$STUDENT_LAM" --support auto --width 16 --depth 3 --max-width 128 \
    --steps "$STUDENT_STEPS" --batch 16 --warmup 50 --checkpoint-every 200 --threads "$THREADS" \
    --device "$DEVICE" --quiet --out "$STUDENT"
  took distill
fi
if [[ $stage == all || $stage == hand ]]; then
  capture=(--capture "$D/rawdata_hand_sample.tif" --psf "$D/psf_sample.tif" --downsample "$DS")
  for m in wiener admm "student:$STUDENT"; do
    # wiener/admm: the crop model (scene = 2× sensor) and λ = 1e-4, the --capture defaults; the student: the
    # operator it was trained for (circular at sensor size, λ = STUDENT_LAM)
    nsdd-train solve --threads "$THREADS" --method "$m" "${capture[@]}" --out "$HAND/${m%%:*}" --overwrite
  done
  python scripts/diffusercam_figure.py --hand "$HAND" --psf "$D/psf_sample.tif" --capture "$D/rawdata_hand_sample.tif" \
    --downsample "$DS" --support "$SIZE" --figure "$FIGURE" --table "$HAND/table.md"
  took hand
fi
