#!/usr/bin/env bash
# The CPU-sized NSDD demo on real faces (UTKFace) through the real radial PSF, end to end:
# simulate → prior → DDNM+ teacher → students (edge and paper, null-space + `full` ablation) → report.
#
# Defaults: 64 px scenes on a 128 px sensor (the radial PSF box-downsampled ×2), reconstructed at sensor
# size with the circular model as the NSDD authors do. The prior is a 64 px face prior (no padding): the
# diffusion solvers run it on the scenes' centred 64×64 support and know the rest is black
# (train.prior.base.SupportPrior), and the students' network fills only that window (`distill --support
# auto`). This is what a 2-core CPU affords in about two hours; on a GPU raise PRIOR_STEPS, TEACHER_N,
# TEACHER_STEPS and the student width. The first CPU report (docs/results-cpu.md: 32 px scenes on a 64 px
# sensor, a prior trained on padded scenes, students over the whole grid) is
#   RUNS=runs SIZE=32 PSF_DS=4 DATA=runs/faces32 PRIOR_PAD=64 PRIOR_STEPS=2500 SUPPORT=full REPORT=docs/results-cpu.md \
#     TEACHER_DIR=runs/teacher scripts/cpu_demo.sh
# Each stage resumes where it stopped when the script is run again.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
RUNS=${RUNS:-runs/r64}
SIZE=${SIZE:-64}; PSF_DS=${PSF_DS:-2}; SENSOR=$((256 / PSF_DS))
DATA=${DATA:-$RUNS/radial$SIZE}
PRIOR_PAD=${PRIOR_PAD:-}                 # empty: the prior sees the bare scenes
PRIOR=${PRIOR:-$RUNS/prior${PRIOR_PAD:-$SIZE}}
PRIOR_STEPS=${PRIOR_STEPS:-2000}
TEACHER_N=${TEACHER_N:-512}; TEACHER_STEPS=${TEACHER_STEPS:-50}; TEACHER_DIR=${TEACHER_DIR:-$RUNS/teacher}
STUDENT_STEPS=${STUDENT_STEPS:-2400}; STUDENT_LAM=${STUDENT_LAM:-1e-3}; SUPPORT=${SUPPORT:-auto}
PAPER_STEPS=${PAPER_STEPS:-600}; PAPER_LPIPS=${PAPER_LPIPS:-0.1}   # paper student: g_φ + the fine-tuned prior
EVAL_N=${EVAL_N:-30}; DPS_STEPS=${DPS_STEPS:-200}; THREADS=${THREADS:-2}
REPORT=${REPORT:-docs/results.md}
LPIPS=${LPIPS:-$SHARED/weights/lpips/lpips_alex_full_v0.1.pth}

stage=${1:-all}
if [[ $stage == all || $stage == simulate ]]; then
  nsdd-train simulate --images "$SHARED/data/faces/utkface" --psf "$SHARED/data/psf/radial_6per_256.npy" \
    --psf-downsample "$PSF_DS" --size "$SIZE" --noise-std 0.005 --seed 0 --n-test 200 --threads 1 --out "$DATA"
fi
if [[ $stage == all || $stage == prior ]]; then
  # --preset cpu: the UNet and schedule of the reported runs (nsdd-train prior --help)
  nsdd-train prior --images "$DATA" --size "$SIZE" ${PRIOR_PAD:+--pad-to "$PRIOR_PAD"} --preset cpu \
    --steps "$PRIOR_STEPS" --threads "$THREADS" --no-progress --out "$PRIOR"
fi
if [[ $stage == all || $stage == teacher ]]; then
  nsdd-train teacher --data "$DATA" --prior "$PRIOR" --split train --limit "$TEACHER_N" \
    --steps "$TEACHER_STEPS" --batch 16 --shard-size 64 --out "$TEACHER_DIR"
fi
if [[ $stage == all || $stage == distill ]]; then
  for objective in nullspace full; do
    nsdd-train distill --data "$DATA" --targets "$TEACHER_DIR" --limit "$TEACHER_N" --student edge \
      --objective "$objective" --lam "$STUDENT_LAM" --support "$SUPPORT" --width 16 --depth 3 --max-width 128 \
      --steps "$STUDENT_STEPS" --batch 16 --warmup 50 --checkpoint-every 200 --threads "$THREADS" --quiet \
      --out "$RUNS/student_$objective"
  done
fi
if [[ $stage == all || $stage == distill-paper ]]; then
  for objective in nullspace full; do
    nsdd-train distill --data "$DATA" --targets "$TEACHER_DIR" --limit "$TEACHER_N" --student paper --prior "$PRIOR" \
      --objective "$objective" --lam "$STUDENT_LAM" --support "$SUPPORT" --lpips-weight "$PAPER_LPIPS" \
      --lpips-weights "$LPIPS" --steps "$PAPER_STEPS" --batch 16 --warmup 50 --lr 2e-4 --checkpoint-every 100 \
      --threads "$THREADS" --quiet --out "$RUNS/student_paper_$objective"
  done
fi
if [[ $stage == all || $stage == evaluate ]]; then
  nsdd-train solve --method wiener --data "$DATA" --split test --limit "$EVAL_N" --lam "$STUDENT_LAM" \
    --out "$RUNS/recon/wiener_lam$STUDENT_LAM" --overwrite
  nsdd-train evaluate --data "$DATA" --split test --limit "$EVAL_N" \
    --recon "$RUNS/recon/wiener_lam$STUDENT_LAM" \
    --methods "wiener,admm,dps,diffpir,ddnm,student:$RUNS/student_paper_nullspace,student:$RUNS/student_paper_full,student:$RUNS/student_nullspace,student:$RUNS/student_full" \
    --names "wiener (λ=$STUDENT_LAM),wiener (λ=1e-6),admm,dps,diffpir,ddnm+ (teacher),nsdd paper student,paper full ablation,nsdd edge student,edge full ablation" \
    --prior "$PRIOR" --set ddnm.steps="$TEACHER_STEPS" --set dps.steps="$DPS_STEPS" \
    --lpips-weights "$LPIPS" --out "$RUNS/eval" --report "$REPORT"
fi
