#!/usr/bin/env bash
# Quality at the paper's geometry on the 2-core CPU (issue 17): 128 px faces through the radial PSF at full size
# (256² sensor), a teacher whose prior is the GPU 64 px face prior fine-tuned at 128 px, and the LEAN256 student
# distilled from its labels. Every stage resumes; run one stage at a time (`scripts/g256_quality.sh labels 2`
# starts a second labelling worker). docs/results.md ("Quality at 256² on the CPU") has what each stage gave.
#
#   folders   link faces of the canonical split (runs/r64/radial64: UTKFace, seed 0), by position in its sorted
#             id lists: test 0–29 (scored), test 30–93 (the prior's held-out check), train 0–1999 (prior),
#             train 0–599 (labels)
#   simulate  crop model, 128² scenes, 256² sensor, σ = 0.005
#   prior     nsdd-train prior --init-from the 64 px prior at --size 128 (the attention moves to 32 px, the same
#             level); stop when time is up, keep the snapshot with the lowest held-out denoising loss
#   snapshot  copy the fine-tune's current weights to $G/priors/prior128_ft_sSTEP (run after each checkpoint)
#   heldout   scripts/prior_heldout.py on the 64 held-out faces (t = 50, 250, 500): no reconstruction, no ground truth
#   zeroshot  a look at the 64 px prior as it is, as the teacher's prior, on the first two scored faces (ground
#             truth: a picture of the scale problem, not a choice)
#   labels    DDNM+ (50 steps, η 0.85) labels of the training measurements
#   teacher   Wiener and the teacher on the 30 scored faces (nsdd-train evaluate)
#   student   LEAN256 (train/gpu_oneshot.py): null-space L1 + 0.1 LPIPS, λ by the discrepancy principle
#   score     Wiener, the teacher and the student on the 30 scored faces; export: ONNX, verify, bundle, live
#
# The kept prior is in git history: PRIOR=runs/restored/models/cpu-faces128/prior128 after
# `scripts/restore_models.sh models/cpu-faces128/prior128` reuses it instead of the run's snapshot.
set -euo pipefail
cd "$(dirname "$0")/.."
G=${G:-runs/g256}
PRIOR=${PRIOR:-$G/priors/prior128_ft_s50}
LPIPS=${LPIPS:-../shared/weights/lpips/lpips_alex_full_v0.1.pth}
STAGE=${1:-}
[ $# -gt 0 ] && shift

labelled_run() {  # how many teacher labels ID.npy follow one another from id $1 without a gap
  local k=0
  while [ -f "$G/teacher_train/$(printf '%06d' $(($1 + k))).npy" ]; do k=$((k + 1)); done
  echo "$k"
}
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
  prior)  # ${1:-65} minutes; `snapshot` after each checkpoint (every 25 steps) for the held-out check
    nsdd-train prior --images "$G/train_faces" --out "$G/priors/prior128_ft" --size 128 \
      --init-from models/gpu-h200-faces64/prior64 --steps 100000 --batch 8 --lr 5e-5 --warmup 20 --ema 0.99 \
      --checkpoint-every 25 --log-every 5 --sample-count 0 --save-dtype float16 --threads 1 --time-limit "${1:-65}"
    ;;
  snapshot)
    step=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['training']['step'])" \
      "$G/priors/prior128_ft/config.json")
    mkdir -p "$G/priors/prior128_ft_s$step"
    cp "$G/priors/prior128_ft/"{config.json,model.safetensors,scheduler_config.json} "$G/priors/prior128_ft_s$step/"
    echo "$G/priors/prior128_ft_s$step"
    ;;
  heldout)  # the start (--steps 0 of the same command; beside it the 64 px prior at its own size) and every
            # snapshot given as arguments: heldout_zeroshot.json, heldout_sSTEP.json
    [ -d "$G/priors/prior128_zeroshot" ] || nsdd-train prior --images "$G/train_faces" \
      --out "$G/priors/prior128_zeroshot" --size 128 --init-from models/gpu-h200-faces64/prior64 --steps 0 \
      --batch 8 --sample-count 0 --save-dtype float16 --threads 1 --no-progress
    python3 scripts/prior_heldout.py --images "$G/val_faces" --channels 3 --prior "$G/priors/prior128_zeroshot" \
      --prior models/gpu-h200-faces64/prior64 --out "$G/heldout_zeroshot.json" --threads 1
    for p in "$@"; do
      python3 scripts/prior_heldout.py --images "$G/val_faces" --channels 3 --prior "$p" \
        --out "$G/heldout_s${p##*_s}.json" --threads 1
    done
    ;;
  zeroshot)
    nsdd-train evaluate --data "$G/test128" --split test --limit 2 --methods wiener,ddnm \
      --prior "$G/priors/prior128_zeroshot" --set ddnm.steps=50 --lpips-weights "$LPIPS" --threads 1 \
      --out "$G/sanity_zeroshot"
    ;;
  labels)
    nsdd-train teacher --data "$G/train128" --prior "$PRIOR" --out "$G/teacher_train" --steps 50 --batch 1 \
      --shard-size 8 --threads 1 --no-png --worker "w${1:-1}"
    ;;
  teacher)
    nsdd-train evaluate --data "$G/test128" --split test --limit 30 --methods wiener,ddnm \
      --names "Wiener,DDNM+ teacher" --prior "$PRIOR" --set ddnm.steps=50 --lpips-weights "$LPIPS" --threads 1 \
      --out "$G/eval_teacher"
    ;;
  student)  # on the first N labelled training measurements (N: the labels' contiguous prefix, or $1)
    # env: OBJECTIVE=full (the ablation), LPIPS_WEIGHT (0.1), LAM (discrepancy), INIT=DIR (warm start), LR,
    # TAG (folder suffix), HOLDOUT=K (the last K of the N are not trained on; their loss is logged: no ground truth)
    n=${1:-$(labelled_run 0)}
    if [ "$n" -lt 1 ]; then echo "student: no labels in $G/teacher_train (run the labels stage)" >&2; exit 2; fi
    echo "student: $n labels"
    objective=${OBJECTIVE:-nullspace}
    out=$G/student_lean256$([ "$objective" = full ] && echo _full || true)${TAG:+_$TAG}
    exec nsdd-train distill --data "$G/train128" --targets "$G/teacher_train" --out "$out" --student edge \
      --objective "$objective" ${INIT:+--init-student "$INIT"} \
      --width 32 --depth 3 --max-width 128 --blocks 2 --unshuffle 2 --lr "${LR:-5e-4}" --warmup 100 \
      --lpips-weight "${LPIPS_WEIGHT:-0.1}" --lpips-weights "$LPIPS" --lam "${LAM:-discrepancy}" --batch 8 \
      --limit "$n" --holdout "${HOLDOUT:-0}" --steps "${STEPS:-1800}" --fp16 --preload --threads "${THREADS:-2}" --time-budget "${MINUTES:-36}"
    ;;
  paper)  # the cascade's labeller: the NSDD paper student (g_φ + the teacher's prior UNet at t* = 50, fine-tuned)
          # on the first N teacher labels ($1: the contiguous prefix); env HOLDOUT (the last K held out), STEPS,
          # MINUTES, THREADS. It starts from the prior, so it needs few labels (64 px: 384 gave LPIPS 0.0016 from
          # the teacher); then it labels many measurements cheaply for the lean student (`cascade`)
    n=${1:-$(labelled_run 0)}
    echo "paper: $n labels, the last ${HOLDOUT:-0} held out"
    exec nsdd-train distill --data "$G/train128" --targets "$G/teacher_train" --out "$G/student_paper" \
      --student paper --prior "$PRIOR" --lam discrepancy --lpips-weight 0.1 --lpips-weights "$LPIPS" --batch 8 \
      --warmup 50 --lr 2e-4 --checkpoint-every 50 --limit "$n" --holdout "${HOLDOUT:-0}" --steps "${STEPS:-600}" \
      --fp16 --preload --threads "${THREADS:-2}" --time-budget "${MINUTES:-45}"
    ;;
  cascade-data)  # the cascade's measurements: the 2,000 prior faces less the label faces from training id $1 = 204
                 # on (the teacher labels there stay held out: `select $1` scores on faces no student saw)
    python3 - "$G" "${1:-204}" <<'EOF2'
import json, sys
from pathlib import Path
g, start = Path(sys.argv[1]), int(sys.argv[2])
held = {n for i, n in json.loads((g / "train128/dataset.json").read_text())["sources"].items() if int(i) >= start}
out = g / "cascade_faces"
out.mkdir(exist_ok=True)
kept = [f for f in sorted((g / "train_faces").iterdir()) if f.name not in held]
for f in kept:
    if not (out / f.name).exists():
        (out / f.name).symlink_to(f.resolve())
print(f"{out}: {len(kept)} faces ({len(held)} held out)")
EOF2
    exec nsdd-train simulate --images "$G/cascade_faces" --psf ../shared/data/psf/radial_6per_256.npy \
      --psf-downsample 1 --size 128 --noise-std 0.005 --seed 1 --threads 1 --n-test 0 --out "$G/cascade128"
    ;;
  cascade)  # the paper student labels the cascade measurements; LEAN256 learns from those labels (env as the
            # student stage: INIT, LR, STEPS, MINUTES, THREADS; CASCADE_N: the first N measurements only)
    [ -f "$G/cascade128/dataset.json" ] || { echo "cascade: run the cascade-data stage first" >&2; exit 2; }
    nsdd-train solve --method "student:$G/student_paper" --data "$G/cascade128" --split train --batch-size 8 \
      ${CASCADE_N:+--limit "$CASCADE_N"} --threads "${THREADS:-2}" --out "$G/cascade_labels"
    exec nsdd-train distill --data "$G/cascade128" --targets "$G/cascade_labels" --out "$G/student_lean256_cascade" \
      --student edge ${INIT:+--init-student "$INIT"} --width 32 --depth 3 --max-width 128 --blocks 2 --unshuffle 2 \
      --lr "${LR:-5e-4}" --warmup 100 --lpips-weight 0.1 --lpips-weights "$LPIPS" --lam discrepancy --batch 8 \
      ${CASCADE_N:+--limit "$CASCADE_N"} --steps "${STEPS:-2400}" --fp16 --preload --threads "${THREADS:-2}" \
      --time-budget "${MINUTES:-36}"
    ;;
  select)  # students against held-out teacher labels (ids from $1 = 142 on, which no student trained on; no
            # ground truth); further arguments: the student folders (default: the null-space and full students);
            # env SELECT_N: at most that many labels, OUT: the output folder ($G/select)
    skip=${1:-142}
    [ $# -gt 0 ] && shift
    students=("$@")
    [ ${#students[@]} -gt 0 ] || students=("$G/student_lean256" "$G/student_lean256_full")
    k=$(labelled_run "$skip")
    [ -n "${SELECT_N:-}" ] && [ "$SELECT_N" -lt "$k" ] && k=$SELECT_N  # a fixed block while a worker adds labels
    if [ "$k" -lt 1 ]; then echo "select: no labels after id $skip in $G/teacher_train" >&2; exit 2; fi
    echo "select: $k held-out labels"
    methods=$(printf 'student:%s,' "${students[@]}")
    names=$(for d in "${students[@]}"; do basename "$d"; done | paste -sd,)
    exec nsdd-train evaluate --data "$G/train128" --split train --skip "$skip" --limit "$k" --against "$G/teacher_train" \
      --methods "${methods%,}" --names "$names" --lpips-weights "$LPIPS" --threads 1 --out "${OUT:-$G/select}"
    ;;
  score)  # on the 30 scored faces: Wiener and the teacher (their saved reconstructions) and each student folder
           # that exists: the cascade's LEAN256, its labeller (the paper student) and the first LEAN256 (142 labels)
    methods=() names=()
    for pair in "student_lean256_cascade:LEAN256 (cascade)" "student_paper:paper student" \
                "student_lean256:LEAN256 (142 labels)"; do
      if [ -f "$G/${pair%%:*}/model.safetensors" ]; then methods+=("student:$G/${pair%%:*}"); names+=("${pair#*:}"); fi
    done
    exec nsdd-train evaluate --data "$G/test128" --split test --limit 30 \
      --recon "$G/eval_teacher/recon/Wiener,$G/eval_teacher/recon/DDNM+_teacher" \
      --methods "$(IFS=,; echo "${methods[*]}")" \
      --names "Wiener,DDNM+ teacher (50 steps),$(IFS=,; echo "${names[*]}")" \
      --lpips-weights "$LPIPS" --threads 1 --out "$G/eval_final" --report "$G/report.md"
    ;;
  export)  # the student and the matmul-DFT pseudo-inverse as one graph, FP16, checked, bundled, run live on test faces
           # (env STUDENT: the student folder, $G/student_lean256 by default)
    E=$G/export
    S=${STUDENT:-$G/student_lean256}
    mkdir -p "$E"
    nsdd-export onnx --student "$S" --psf "$G/train128/psf.npy" --psf-normalization none \
      --size 256 256 --out "$E/lean256.onnx"
    nsdd-export quantize "$E/lean256.onnx" --precision fp16 --out "$E/lean256_fp16.onnx"
    nsdd-export verify "$E/lean256.onnx" --data "$G/test128" --student "$S" \
      --psf "$G/train128/psf.npy" --psf-normalization none --fp16 "$E/lean256_fp16.onnx" --limit 4 \
      --json "$E/verify.json"
    nsdd-export bundle --onnx "$E/lean256.onnx,$E/lean256_fp16.onnx" --psf "$G/train128/psf.npy" \
      --psf-normalization none --out "$G/bundle" \
      --preprocess '{"black_level": 256, "white_level": 4095, "normalization": "fixed", "scale": 3800}'
    nsdd-edge run --model "$G/bundle" --frames 60 --threads 1 \
      --source "sim://?realtime=0&images=$G/test_faces&hold=0.25&motion=static"
    ;;
  *)
    echo "usage: scripts/g256_quality.sh folders|simulate|prior [MIN]|snapshot|heldout [SNAPSHOT…]|zeroshot|" \
      "labels [WORKER]|teacher|student [N]|paper [N]|cascade-data [FROM]|cascade|select [SKIP [STUDENT…]]|score|export" >&2
    exit 2
    ;;
esac
