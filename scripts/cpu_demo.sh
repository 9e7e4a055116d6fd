#!/usr/bin/env bash
# The CPU-sized NSDD demo on real faces (UTKFace) through the real radial PSF, end to end:
# simulate → prior → DDNM+ teacher → null-space student + `full` ablation → evaluation report.
# Sizes are what a 2-core CPU affords in about an hour (32 px scenes on a 64 px sensor); on a GPU raise
# SIZE/PSF_DS, PRIOR_STEPS, TEACHER_N, TEACHER_STEPS and the student width (see docs/results-cpu.md).
# Each stage resumes where it stopped when the script is run again.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
RUNS=${RUNS:-runs}
SIZE=${SIZE:-32}; PSF_DS=${PSF_DS:-4}; SENSOR=$((256 / PSF_DS))
PRIOR_STEPS=${PRIOR_STEPS:-2500}
TEACHER_N=${TEACHER_N:-512}; TEACHER_STEPS=${TEACHER_STEPS:-50}
STUDENT_STEPS=${STUDENT_STEPS:-2400}; STUDENT_LAM=${STUDENT_LAM:-1e-3}
EVAL_N=${EVAL_N:-30}; DPS_STEPS=${DPS_STEPS:-200}; THREADS=${THREADS:-2}
LPIPS=${LPIPS:-$SHARED/weights/lpips/lpips_alex_full_v0.1.pth}
DATA=$RUNS/faces$SIZE

stage=${1:-all}
if [[ $stage == all || $stage == simulate ]]; then
  nsdd-train simulate --images "$SHARED/data/faces/utkface" --psf "$SHARED/data/psf/radial_6per_256.npy" \
    --psf-downsample "$PSF_DS" --size "$SIZE" --noise-std 0.005 --seed 0 --n-test 200 --threads 1 --out "$DATA"
fi
if [[ $stage == all || $stage == prior ]]; then
  nsdd-train prior --images "$DATA" --size "$SIZE" --pad-to "$SENSOR" --base-channels 32 --channel-mults 1,2,2 \
    --num-res-blocks 1 --attention-resolutions 16 --dropout 0 --batch 16 --steps "$PRIOR_STEPS" --warmup 100 \
    --checkpoint-every 250 --sample-count 16 --sample-steps 50 --threads "$THREADS" --no-progress --log-every 50 \
    --out "$RUNS/prior$SENSOR"
fi
if [[ $stage == all || $stage == teacher ]]; then
  nsdd-train teacher --data "$DATA" --prior "$RUNS/prior$SENSOR" --split train --limit "$TEACHER_N" \
    --steps "$TEACHER_STEPS" --batch 16 --shard-size 64 --out "$RUNS/teacher"
fi
if [[ $stage == all || $stage == distill ]]; then
  for objective in nullspace full; do
    nsdd-train distill --data "$DATA" --targets "$RUNS/teacher" --limit "$TEACHER_N" --student edge \
      --objective "$objective" --lam "$STUDENT_LAM" --width 16 --depth 3 --max-width 128 \
      --steps "$STUDENT_STEPS" --batch 16 --warmup 50 --checkpoint-every 200 --threads "$THREADS" --quiet \
      --out "$RUNS/student_$objective"
  done
fi
if [[ $stage == all || $stage == evaluate ]]; then
  nsdd-train solve --method wiener --data "$DATA" --split test --limit "$EVAL_N" --lam "$STUDENT_LAM" \
    --out "$RUNS/recon/wiener_lam$STUDENT_LAM" --overwrite
  nsdd-train evaluate --data "$DATA" --split test --limit "$EVAL_N" \
    --recon "$RUNS/recon/wiener_lam$STUDENT_LAM" \
    --methods "wiener,admm,dps,diffpir,ddnm,student:$RUNS/student_nullspace,student:$RUNS/student_full" \
    --names "wiener (λ=$STUDENT_LAM),wiener (λ=1e-6),admm,dps,diffpir,ddnm+ (teacher),nsdd student,full ablation" \
    --prior "$RUNS/prior$SENSOR" --set ddnm.steps="$TEACHER_STEPS" --set dps.steps="$DPS_STEPS" \
    --lpips-weights "$LPIPS" --out "$RUNS/eval" --report docs/results-cpu.md
fi
