#!/usr/bin/env bash
# Everything scripts/gpu_train.sh needs on THIS machine before the one device call (issue 17), so a session that
# draws a GPU spends its device minutes on training only:
#   1. the reported data set runs/r64/radial64 (scripts/cpu_demo.sh simulate: its dataset.json fixes the
#      train/test split; the 200 test faces never travel), if missing;
#   2. the face pack .gpu/faces_train.npz (training split, 64 px, 1,024 of them also at 128 px; JPEG q85) and
#      the LPIPS fp16 weights, if missing;
#   3. the radial PSF copied to .gpu/;
#   4. scripts/gpu_payload.sh: the working tree + .gpu must fit the device's 64 MiB (exit 1 when over).
# Then: device run with carry [".gpu"], command "OUT=$OUT scripts/gpu_train.sh", timeout_s ≈ 570.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
mkdir -p .gpu
[ -f runs/r64/radial64/dataset.json ] || scripts/cpu_demo.sh simulate
[ -f .gpu/faces_train.npz ] || python3 -m train.gpu_oneshot pack --dataset runs/r64/radial64 \
  --out .gpu/faces_train.npz --count128 1024 --lpips-weights "$SHARED/weights/lpips/lpips_alex_full_v0.1.pth"
cp "$SHARED/data/psf/radial_6per_256.npy" .gpu/radial_6per_256.npy
rm -f .gpu/faces64_train.npz  # the 64 px-only pack of the first run (superseded; it would count twice)
exec scripts/gpu_payload.sh
