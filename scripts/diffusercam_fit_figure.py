#!/usr/bin/env python
"""The DiffuserCam fit in one small figure: the hand through Wiener, FISTA, the DDNM+ teacher and the student
(the fit report's tiles, ``FIT/report.png``), the live runtime's frame (``nsdd-edge run --snapshot``) and the
gray prior's last sample grid, labelled, as one JPEG.

    python3 scripts/diffusercam_fit_figure.py --fit runs/diffusercam/fit --snapshot runs/diffusercam/run_snapshot.png \
        --prior runs/diffusercam/prior64_gray --out docs/real-cameras/diffusercam_fit.jpg
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

TILE = 160
REPORT_COLUMNS = ("Wiener", "FISTA", "DDNM+ teacher", "student")


def labelled(tile: np.ndarray, text: str) -> np.ndarray:
    """``tile`` (gray or BGR, resized to TILE px high, aspect kept) under a 22 px caption bar."""
    width = round(tile.shape[1] * TILE / tile.shape[0])
    tile = cv2.resize(tile, (width, TILE), interpolation=cv2.INTER_AREA)
    if tile.ndim == 2:
        tile = cv2.cvtColor(tile, cv2.COLOR_GRAY2BGR)
    bar = np.full((22, width, 3), 255, np.uint8)
    cv2.putText(bar, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, tile], axis=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fit", type=Path, required=True, help="the nsdd-train fit output (its report.png)")
    p.add_argument("--snapshot", type=Path, required=True, help="nsdd-edge run --snapshot PNG")
    p.add_argument("--prior", type=Path, required=True, help="the prior directory (its last samples/*.png)")
    p.add_argument("--out", type=Path, required=True, help="JPEG to write")
    p.add_argument("--quality", type=int, default=85)
    args = p.parse_args(argv)
    report = cv2.imread(str(args.fit / "report.png"), cv2.IMREAD_UNCHANGED)
    snapshot = cv2.imread(str(args.snapshot), cv2.IMREAD_UNCHANGED)
    grids = sorted((args.prior / "samples").glob("step_*.png"))
    if report is None or snapshot is None or not grids:
        print("missing input: report.png, the snapshot or the prior's sample grids", file=sys.stderr)
        return 2
    side = report.shape[0]
    tiles = [labelled(report[:side, i * side:(i + 1) * side], name) for i, name in enumerate(REPORT_COLUMNS)]
    tiles.append(labelled(snapshot, "nsdd-edge run: y | reconstruction"))
    tiles.append(labelled(cv2.imread(str(grids[-1]), cv2.IMREAD_UNCHANGED), f"prior {grids[-1].stem[5:].lstrip('0')}"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), np.concatenate(tiles, axis=1), [cv2.IMWRITE_JPEG_QUALITY, args.quality])
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
