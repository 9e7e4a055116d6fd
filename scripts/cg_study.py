"""The pseudo-inverse of a camera whose PSF is larger than its sensor (docs/real-cameras.md, issue 12).

For every capture of a camera profile: the zero-padded Wiener filter (the ``tikhonov`` A†), the ``cg`` A† after
10, 20 (the default, :data:`nsdd_edge.optics.CG_ITERATIONS`) and 50 conjugate-gradient steps, and FISTA with
non-negativity (300 iterations): consistency ‖A x̂ − y‖/‖y‖ under the profile's forward model, mean brightness,
and the numpy time per capture (one thread: run with OMP_NUM_THREADS=1). Writes ``OUT/cg_study.md`` and
``OUT/cg_study.png`` (rows: captures; columns: the methods, each scaled by its own 99.5th percentile).

    OMP_NUM_THREADS=1 python scripts/cg_study.py --profile runs/real/radial_full_128_cg \
        --captures "../shared/data/lensless/radial_full/*15000us.tiff" --out runs/real/cg_study
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np

from nsdd_edge.camera import list_captures, load_profile
from nsdd_edge.optics import ForwardModel, WienerFilter, cg_tikhonov
from nsdd_edge.preview import to_display
from nsdd_edge.refine import nonneg_least_squares


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", type=Path, required=True)
    p.add_argument("--captures", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--side", type=int, default=160, help="tile side of the figure in pixels")
    args = p.parse_args()
    profile = load_profile(args.profile)
    g, psf, lam = profile.geometry, profile.psf, profile.lam
    A = ForwardModel(psf, g)
    padded = WienerFilter(psf, g, lam, "tikhonov")
    methods = {"Wiener (zero-padded)": padded,
               **{f"cg {k}": (lambda y, k=k: cg_tikhonov(A, y, lam, k)) for k in (10, 20, 50)},
               "FISTA ≥0 (300)": lambda y: nonneg_least_squares(A, y, 300)}
    rows, table = [], {m: {"consistency": [], "mean": [], "seconds": []} for m in methods}
    files = list_captures(args.captures)
    for f in files:
        y = profile.measurement(f)
        tiles = []
        for name, fn in methods.items():
            t = time.perf_counter()
            x = fn(y)
            table[name]["seconds"].append(time.perf_counter() - t)
            table[name]["consistency"].append(A.consistency(x, y))
            table[name]["mean"].append(float(x.mean()))
            tiles.append(cv2.resize(to_display(x, autoscale=True, percentile=99.5), (args.side, args.side),
                                    interpolation=cv2.INTER_AREA))
        rows.append(np.concatenate(tiles, axis=1))
        print(f.name, " ".join(f"{m}: {table[m]['consistency'][-1]:.4f}" for m in methods), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out / "cg_study.png"), np.concatenate(rows, axis=0))
    lines = [f"# cg study: {profile.name} ({len(files)} captures; λ {lam:.3g}; rows of cg_study.png: "
             + ", ".join(f.name for f in files) + ")", "",
             "| A† / method | mean ‖Ax̂ − y‖/‖y‖ | mean x̂ | seconds / capture (median) |", "|---|---:|---:|---:|"]
    for name, t in table.items():
        lines.append(f"| {name} | {np.mean(t['consistency']):.4f} | {np.mean(t['mean']):.3f} | "
                     f"{np.median(t['seconds']):.3f} |")
    (args.out / "cg_study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
