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
cp "$OUT/faces15/refine.png" docs/refine-psf/faces15.png
cp "$OUT/pawns/refine.png" docs/refine-psf/pawns.png
