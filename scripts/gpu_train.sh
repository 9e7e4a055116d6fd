#!/usr/bin/env bash
# The GPU one-shot (issue 17): in at most ~9 minutes on one H100-class GPU, from face crops to weights:
# face prior → DDNM+ teacher labels → paper student and two lean students → figures at 64 px scenes on a 128 px
# sensor, then (pack with 128 px faces, --share256 of the budget) the 128 px prior, labels and the lean student of
# the paper's geometry, 128 px scenes on a 256 px sensor (train/gpu_oneshot.py).
#
# Inputs (nothing is downloaded):
#   FACES  face pack written by `python -m train.gpu_oneshot pack --dataset runs/r64/radial64 --out .gpu/faces_train.npz
#          --count128 1024 --lpips-weights ../shared/weights/lpips/lpips_alex_full_v0.1.pth` (the training split
#          only; the held-out test faces never travel; 1,024 of them at 128 px). Default .gpu/faces_train.npz.
#   PSF    the radial PSF (default .gpu/radial_6per_256.npy, a copy of ../shared/data/psf/radial_6per_256.npy)
#   LPIPS  LPIPS-Alex weights (default .gpu/lpips_alex_fp16.pth, the float16 copy `pack` writes)
#   OUT    output folder (default $OUT on the device machine, else runs/gpu_oneshot)
#   BUDGET wall-time budget in seconds (default 510)
# Before a device call: scripts/gpu_prepare.sh makes all of the above here if missing and ends with
# scripts/gpu_payload.sh (the working tree + .gpu/ must stay under the device's 64 MiB;
# budgets tracked ≤ 35 MiB, .gpu ≤ 22 MiB, total ≤ 57 MiB; exit 1 when over).
# Extra arguments go to `python -m train.gpu_oneshot run` (e.g. --tiny for one step of everything on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
FACES=${FACES:-.gpu/faces_train.npz}
PSF=${PSF:-.gpu/radial_6per_256.npy}
LPIPS=${LPIPS:-.gpu/lpips_alex_fp16.pth}
OUT=${OUT:-runs/gpu_oneshot}
BUDGET=${BUDGET:-510}
WORK=${WORK:-$(mktemp -d /tmp/nsdd-oneshot.XXXXXX)}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'PY' || true
import torch
print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "") + f", {torch.get_num_threads()} threads")
PY
exec python3 -m train.gpu_oneshot run --faces "$FACES" --psf "$PSF" --lpips-weights "$LPIPS" --out "$OUT" \
  --work "$WORK" --budget-seconds "$BUDGET" "$@"
