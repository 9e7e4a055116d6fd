"""Side-by-side pictures and the consistency table of scripts/real_cameras.sh (docs/real-cameras.md).

For each camera: rows are captures, columns the methods (each reconstruction clipped at 0 and scaled by its own
99.5th percentile, as a person would view it); the table gives ‖A x̂ − y‖/‖y‖ from each solve's recon.json
(the profile's forward operator) and the mean brightness of each reconstruction, so the 2 ms and 15 ms
captures of one scene can be compared.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

from nsdd_edge.preview import to_display

CAMERAS = {"rf128": "full-aperture radial prototype (radial_full, sensor 128²)",
           "dc150": "DiffuserCam hand (sensor 150²)"}
METHODS = ("wiener_padded", "wiener", "admm", "fista")  # wiener: the profile's A† (cg or Wiener)


def view(x: np.ndarray, side: int = 200) -> np.ndarray:
    """BGR tile of a reconstruction scaled by its 99.5th percentile (the runtime preview's display rule)."""
    return cv2.resize(to_display(x, autoscale=True, percentile=99.5), (side, side), interpolation=cv2.INTER_AREA)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/real"))
    args = p.parse_args()
    lines = []
    for cam, title in CAMERAS.items():
        records = {m: json.loads((args.out / f"{cam}_{m}" / "recon.json").read_text()) for m in METHODS
                   if (args.out / f"{cam}_{m}" / "recon.json").exists()}
        if not records:
            continue
        ids = sorted(next(iter(records.values()))["images"])
        rows = []
        for i in ids:
            tiles = [view(np.load(args.out / f"{cam}_{m}" / f"{i}.npy")) for m in records]
            rows.append(np.concatenate(tiles, axis=1))
        cv2.imwrite(str(args.out / f"{cam}.png"), np.concatenate(rows, axis=0))
        lines += [f"## {title}", "", f"![{cam}]({cam}.png) (columns: {', '.join(records)}; rows: {', '.join(ids)})",
                  "", "| capture | " + " | ".join(f"{m} ‖Ax̂−y‖/‖y‖" for m in records) + " | "
                  + " | ".join(f"{m} mean x̂" for m in records) + " |",
                  "|---|" + "---:|" * (2 * len(records))]
        for i in ids:
            cons = [records[m]["images"][i]["consistency"] for m in records]
            means = [float(np.load(args.out / f"{cam}_{m}" / f"{i}.npy").mean()) for m in records]
            lines.append(f"| {i} | " + " | ".join(f"{c:.4f}" for c in cons) + " | "
                         + " | ".join(f"{v:.4f}" for v in means) + " |")
        lines.append("")
    (args.out / "real_cameras.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
