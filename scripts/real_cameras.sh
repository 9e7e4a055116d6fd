#!/usr/bin/env bash
# Real captures through camera profiles (docs/real-cameras.md): calibrate each camera from its PSF image and
# captures (nsdd-edge calibrate), reconstruct every capture with Wiener, ADMM and FISTA through the profile
# (nsdd-train solve --profile), then the side-by-side figures and the consistency table
# (scripts/real_cameras_figure.py). Every step resumes. Needs ../shared.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
OUT=${OUT:-runs/real}
RF=$SHARED/data/lensless/radial_full
DC=$SHARED/data/lensless/diffusercam
THREADS=${THREADS:-1}
mkdir -p "$OUT"
[ -f "$OUT/radial_full_128/camera.json" ] || nsdd-edge calibrate --psf-image "$RF/psf_40cm.tiff" \
  --captures "$RF/*us.tiff" --sensor 128 --name radial_full --out "$OUT/radial_full_128"
[ -f "$OUT/diffusercam_150/camera.json" ] || nsdd-edge calibrate --psf-image "$DC/psf_sample.tif" \
  --captures "$DC/rawdata_hand_sample.tif" --sensor 150 --black-level corner --name diffusercam \
  --out "$OUT/diffusercam_150"
# wiener: the profile's A† (cg where the PSF is larger than the sensor); wiener_padded: the zero-padded Wiener filter
for m in wiener_padded wiener admm fista; do
  method=$m; set_=()
  [ "$m" = wiener_padded ] && method=wiener && set_=(--set projector=tikhonov)
  nsdd-train solve --method "$method" "${set_[@]}" --capture "$RF/*us.tiff" --profile "$OUT/radial_full_128" \
    --batch-size 1 --threads "$THREADS" --out "$OUT/rf128_$m"
  nsdd-train solve --method "$method" "${set_[@]}" --capture "$DC/rawdata_hand_sample.tif" \
    --profile "$OUT/diffusercam_150" --batch-size 1 --threads "$THREADS" --out "$OUT/dc150_$m"
done
python3 scripts/real_cameras_figure.py --out "$OUT"
