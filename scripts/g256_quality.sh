#!/usr/bin/env bash
# Quality at the paper's geometry on the 2-core CPU (issue 17): 128 px faces through the radial PSF at full size
# (256² sensor), a teacher whose prior is the GPU 64 px face prior fine-tuned at 128 px, and the LEAN256 student
# distilled from its labels. Every stage resumes; run one stage at a time (`STAGE=labels scripts/g256_quality.sh 2`
# starts a second labelling worker). docs/results.md ("Quality at 256² on the CPU") has what each stage gave.
#
#   folders   link faces of the canonical split (runs/r64/radial64: UTKFace, seed 0): test ids 0–29 (scored),
#             test ids 30–93 (the prior's held-out check), train ids 0–1999 (prior), train ids 0–599 (labels)
#   simulate  crop model, 128² scenes, 256² sensor, σ = 0.005
#   prior     nsdd-train prior --init-from the 64 px prior at --size 128 (the attention moves to 32 px, the same
#             level); stop when time is up, keep the snapshot with the lowest held-out denoising loss
#   heldout   scripts/prior_heldout.py on the 64 held-out faces (t = 50, 250, 500): no reconstruction, no ground truth
#   labels    DDNM+ (50 steps, η 0.85) labels of the training measurements
#   teacher   Wiener and the teacher on the 30 scored faces (nsdd-train evaluate)
#   student   LEAN256 (train/gpu_oneshot.py): null-space L1 + 0.1 LPIPS, λ by the discrepancy principle
set -euo pipefail
cd "$(dirname "$0")/.."
G=${G:-runs/g256}
PRIOR=${PRIOR:-$G/priors/prior128_ft_s50}
LPIPS=${LPIPS:-../shared/weights/lpips/lpips_alex_full_v0.1.pth}
STAGE=${STAGE:-${1:-}}
mkdir -p "$G"
case "$STAGE" in
  folders)
    python3 - "$G" <<'EOF'
import json, sys
from pathlib import Path
g = Path(sys.argv[1])
meta = json.loads(Path("runs/r64/radial64/dataset.json").read_text())
folder, src = Path(meta["settings"]["images"]), meta["sources"]
test, train = sorted(meta["splits"]["test"]), sorted(meta["splits"]["train"])
for name, ids in (("test_faces", test[:30]), ("val_faces", test[30:94]), ("train_faces", train[:2000]),
                  ("label_faces", train[:600])):
    out = g / name
    out.mkdir(parents=True, exist_ok=True)
    for i in ids:
        if not (out / src[i]).exists():
            (out / src[i]).symlink_to((folder / src[i]).resolve())
    print(out, len(ids))
EOF
    ;;
  simulate)
    common=(--psf ../shared/data/psf/radial_6per_256.npy --psf-downsample 1 --size 128 --noise-std 0.005 --seed 0
            --threads 1)
    nsdd-train simulate --images "$G/test_faces" "${common[@]}" --test-fraction 1 --out "$G/test128"
    nsdd-train simulate --images "$G/val_faces" "${common[@]}" --test-fraction 1 --out "$G/val128"
    nsdd-train simulate --images "$G/label_faces" "${common[@]}" --n-test 0 --out "$G/train128"
    ;;
  prior)  # ${2:-65} minutes; snapshot $G/priors/prior128_ft/ at each checkpoint (every 25 steps) for the check
    nsdd-train prior --images "$G/train_faces" --out "$G/priors/prior128_ft" --size 128 \
      --init-from models/gpu-h200-faces64/prior64 --steps 100000 --batch 8 --lr 5e-5 --warmup 20 --ema 0.99 \
      --checkpoint-every 25 --log-every 5 --sample-count 0 --save-dtype float16 --threads 1 --time-limit "${2:-65}"
    ;;
  heldout)  # the start (--steps 0 of the same command) and every snapshot given as arguments
    shift
    [ -d "$G/priors/prior128_zeroshot" ] || nsdd-train prior --images "$G/train_faces" \
      --out "$G/priors/prior128_zeroshot" --size 128 --init-from models/gpu-h200-faces64/prior64 --steps 0 \
      --batch 8 --sample-count 0 --save-dtype float16 --threads 1 --no-progress
    for p in "$G/priors/prior128_zeroshot" "$@"; do
      python3 scripts/prior_heldout.py --images "$G/val_faces" --channels 3 --prior "$p" \
        --out "$G/heldout_$(basename "$p").json" --threads 1
    done
    ;;
  labels)
    nsdd-train teacher --data "$G/train128" --prior "$PRIOR" --out "$G/teacher_train" --steps 50 --batch 1 \
      --shard-size 8 --threads 1 --no-png --worker "w${2:-1}"
    ;;
  teacher)
    nsdd-train evaluate --data "$G/test128" --split test --limit 30 --methods wiener,ddnm \
      --names "Wiener,DDNM+ teacher" --prior "$PRIOR" --set ddnm.steps=50 --lpips-weights "$LPIPS" --threads 1 \
      --out "$G/eval_teacher"
    ;;
  *)
    echo "usage: scripts/g256_quality.sh folders|simulate|prior [MIN]|heldout [PRIOR…]|labels [WORKER]|teacher" >&2
    exit 2
    ;;
esac
