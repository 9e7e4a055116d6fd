"""PSF refinement on simulated mismatch at the reported geometry (docs/refine-psf.md, issue 18).

Held-out test faces (64 px scenes on the 128 px sensor of ``runs/r64/radial64``) are measured through the dataset's
radial PSF warped by a known θ (a depth change = a scale; a moved mask = shift and rotation), with the dataset's
noise σ; ``nsdd_edge.refine.refine_warp`` then estimates θ from the measurements alone, starting at the calibrated
PSF. Prints a table (true θ, found θ, errors, criterion, evaluations, seconds) and writes JSON.

    python3 scripts/refine_study.py --data runs/r64/radial64 --faces 4 --out runs/refine/study.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nsdd_edge.optics import ForwardModel, LenslessGeometry
from nsdd_edge.psf_warp import PsfWarp, warp_psf
from nsdd_edge.refine import refine_warp

CASES = [  # (name, true warp, parameters refined)
    ("depth: PSF ×0.85", PsfWarp(0.85), ("scale",)),
    ("depth: PSF ×0.92", PsfWarp(0.92), ("scale",)),
    ("depth: PSF ×1.08", PsfWarp(1.08), ("scale",)),
    ("depth: PSF ×1.2", PsfWarp(1.2), ("scale",)),
    ("moved mask: ×1.1, shift (1.5, −1), 2°", PsfWarp(1.1, (1.5, -1.0), 2.0), ("scale", "shift", "rotation")),
    ("moved mask: ×0.95, shift (−0.7, 2.2), −3°", PsfWarp(0.95, (-0.7, 2.2), -3.0), ("scale", "shift", "rotation")),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("runs/r64/radial64"))
    p.add_argument("--faces", type=int, default=4)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path("runs/refine/study.json"))
    args = p.parse_args()
    meta = json.loads((args.data / "dataset.json").read_text())
    fwd = meta["forward"]
    psf = np.load(args.data / "psf.npy").astype(np.float32)
    geometry = LenslessGeometry.make(fwd["model"], fwd["sensor_shape"], psf.shape[-2:], fwd["scene_shape"],
                                     fwd["conv_shape"])
    ids = meta["splits"]["test"][: args.faces] if "splits" in meta else sorted(
        f.stem for f in (args.data / "ground_truth").glob("*.npy"))[: args.faces]
    scenes = [np.load(args.data / "ground_truth" / f"{i}.npy").astype(np.float32) for i in ids]
    sigma = float(meta["noise_std"])
    rows = []
    print(f"{len(scenes)} test faces, σ = {sigma}, geometry {geometry}, {args.iters} FISTA iterations per evaluation")
    print("| case | true θ | found θ | scale error | shift error (px) | rotation error (°) | c start → end | "
          "evaluations | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, (name, true, params) in enumerate(CASES):
        rng = np.random.default_rng(k)
        A = ForwardModel(warp_psf(psf, true), geometry)
        ys = [A(x) + sigma * rng.standard_normal((x.shape[0],) + geometry.sensor_shape).astype(np.float32)
              for x in scenes]
        t0 = time.time()
        result, _ = refine_warp(psf, geometry, ys, parameters=params, iters=args.iters,
                                scale_range=(0.8, 1.25), n_scales=10)
        dt = time.time() - t0
        w = result.warp
        row = {"case": name, "true": true.to_dict(), "found": w.to_dict(), "parameters": list(params),
               "scale_error": w.scale / true.scale - 1,
               "shift_error": float(np.hypot(w.shift[0] - true.shift[0], w.shift[1] - true.shift[1])),
               "rotation_error": w.rotation_deg - true.rotation_deg, "start_criterion": result.start_criterion,
               "criterion": result.criterion, "evaluations": len(result.evaluations), "seconds": dt}
        rows.append(row)
        print(f"| {name} | {true.scale:.3f}, ({true.shift[0]:+.2f}, {true.shift[1]:+.2f}), {true.rotation_deg:+.1f}° | "
              f"{w.scale:.4f}, ({w.shift[0]:+.2f}, {w.shift[1]:+.2f}), {w.rotation_deg:+.2f}° | "
              f"{100 * row['scale_error']:+.2f}% | {row['shift_error']:.3f} | {row['rotation_error']:+.3f} | "
              f"{result.start_criterion:.4f} → {result.criterion:.4f} | {len(result.evaluations)} | {dt:.0f} |",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"data": str(args.data), "faces": ids, "sigma": sigma, "iters": args.iters,
                                    "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
