#!/usr/bin/env bash
# The real DiffuserCam hand, calibrate → gray prior → fit → live run (docs/real-cameras.md, "DiffuserCam: a
# gray prior and a fit"). Every step resumes: run it again after an interruption, or to continue the prior's
# fine-tune (it stops after PRIOR_MINUTES per invocation; the fit is skipped once its report exists).
#   1. calibrate the mono DiffuserCam profile (records the captures' channel count: 1)
#   2. fine-tune a gray 64 px face prior from the RGB GPU prior (nsdd-train prior --init-from, channels
#      folded), on UTKFace minus every 34th face, which is held out for the denoising check
#   3. the held-out denoising loss of the folded start and of the fine-tuned prior (scripts/prior_heldout.py)
#   4. nsdd-train fit with that prior, then nsdd-edge run on a folder holding only the hand capture
# Needs the shared data (SHARED, default ../shared) and models/gpu-h200-faces64/prior64 (RGB_PRIOR).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
OUT=${OUT:-runs/diffusercam}
RGB_PRIOR=${RGB_PRIOR:-models/gpu-h200-faces64/prior64}
THREADS=${THREADS:-1}
PRIOR_MINUTES=${PRIOR_MINUTES:-33}
FIT_MINUTES=${FIT_MINUTES:-38}
DC=$SHARED/data/lensless/diffusercam
FACES=$SHARED/data/faces/utkface
LPIPS=$SHARED/weights/lpips/lpips_alex_full_v0.1.pth
export OMP_NUM_THREADS=$THREADS
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, whatever is installed
nsdd-edge() { python3 -m nsdd_edge.cli "$@"; }
nsdd-train() { python3 -m train.cli "$@"; }
mkdir -p "$OUT"

# 1. the profile
[ -f "$OUT/diffusercam_150/camera.json" ] || nsdd-edge calibrate --psf-image "$DC/psf_sample.tif" \
  --captures "$DC/rawdata_hand_sample.tif" --sensor 150 --black-level corner --name diffusercam \
  --out "$OUT/diffusercam_150"

# 2. the gray prior: every 34th face (sorted names) held out, the rest linked into train/
if [ ! -f "$OUT/faces/split.done" ]; then
  mkdir -p "$OUT/faces/train" "$OUT/faces/heldout"
  python3 - "$FACES" "$OUT/faces" <<'PY'
import os, sys
from pathlib import Path
faces, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
for i, name in enumerate(sorted(p.name for p in faces.iterdir() if p.is_file())):
    link = out / ("heldout" if i % 34 == 0 else "train") / name
    if not link.is_symlink():
        os.symlink(faces / name, link)
(out / "split.done").write_text("every 34th face held out\n")
PY
fi
nsdd-train prior --init-from "$RGB_PRIOR" --channels 1 --images "$OUT/faces/train" --out "$OUT/prior64_gray" \
  --steps 100000 --batch 16 --lr 5e-5 --warmup 50 --ema 0.995 --checkpoint-every 200 --log-every 25 \
  --sample-count 16 --sample-steps 50 --time-limit "$PRIOR_MINUTES" --threads "$THREADS" --no-progress

# 3. held-out denoising loss: the folded start (step 0) against the fine-tuned prior
python3 scripts/prior_heldout.py --images "$OUT/faces/heldout" --channels 1 --init-from "$RGB_PRIOR" \
  --start-samples "$OUT/prior64_gray/samples_start.png" --prior "$OUT/prior64_gray" \
  --out "$OUT/prior64_gray/heldout.json" --threads "$THREADS"

# 4. fit, then the live runtime on a folder that holds only the hand capture
mkdir -p "$OUT/hand"
ln -sf "$(cd "$DC" && pwd)/rawdata_hand_sample.tif" "$OUT/hand/rawdata_hand_sample.tif"
[ -f "$OUT/fit/report.md" ] || nsdd-train fit --profile "$OUT/diffusercam_150" --images "$FACES" \
  --prior "$OUT/prior64_gray" --captures "$OUT/hand" --out "$OUT/fit" --budget-minutes "$FIT_MINUTES" \
  --lpips-weights "$LPIPS" --threads "$THREADS"
nsdd-edge run --model "$OUT/fit/bundle" --source "file://$(cd "$OUT/hand" && pwd)" --frames 1 --threads "$THREADS" \
  --quiet --stats "$OUT/run_stats.json" --snapshot "$OUT/run_snapshot.png"
