#!/usr/bin/env bash
# PSF refinement on the real full-aperture radial prototype (docs/refine-psf.md, issue 18): the profile from
# nsdd-edge calibrate (as scripts/real_cameras.sh makes it), then nsdd-train refine-psf on the six monitor faces
# and on the 3-D pawns scene, with the lab's hand-picked scale 1.31 for comparison; the simulated-mismatch study.
# Every step resumes. Needs ../shared and runs/r64/radial64 (the reported dataset) for the study.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
OUT=${OUT:-runs/refine}
RF=$SHARED/data/lensless/radial_full
PROFILE=${PROFILE:-runs/real/radial_full_128}
mkdir -p "$OUT" docs/refine-psf
[ -f "$PROFILE/camera.json" ] || nsdd-edge calibrate --psf-image "$RF/psf_40cm.tiff" \
  --captures "$RF/*us.tiff" --sensor 128 --name radial_full --out "$PROFILE"
[ -f "$OUT/faces15/refine.json" ] || nsdd-train refine-psf --profile "$PROFILE" --captures "$RF/face_*_15000us.tiff" \
  --max-captures 6 --compare-scale 1.31 --out "$OUT/faces15"
[ -f "$OUT/pawns/refine.json" ] || nsdd-train refine-psf --profile "$PROFILE" --captures "$RF/pawns_*us.tiff" \
  --compare-scale 1.31 --out "$OUT/pawns"
[ -f "$OUT/study.json" ] || python3 scripts/refine_study.py --data runs/r64/radial64 --faces 4 --out "$OUT/study.json"
for n in faces15 pawns; do  # JPEG q85 copies for the docs (the device payload budget, scripts/gpu_payload.sh)
  python3 -c "import cv2, sys; cv2.imwrite(sys.argv[2], cv2.imread(sys.argv[1]), [cv2.IMWRITE_JPEG_QUALITY, 85])" \
    "$OUT/$n/refine.png" "docs/refine-psf/$n.jpg"
done
