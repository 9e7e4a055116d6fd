#!/usr/bin/env python3
"""LPIPS against seconds per image, one marker per geometry: the frontier of docs/results.md (issue 17).

Each ``--metrics GEOMETRY=FILE`` is a ``metrics.json`` of ``nsdd-train evaluate``; every method in it that was run
there (so it has a time: 1 torch thread, batch 1, median) becomes a point. Methods scored from ``--recon`` folders
have no time and are left out (run them in another evaluate whose metrics.json is given too)::

    python scripts/frontier_figure.py --metrics "64 on 128=runs/gpu/eval/metrics.json" \
        --metrics "128 on 256=runs/g256/eval_teacher/metrics.json" --metrics "128 on 256=runs/g256/eval_final/metrics.json" \
        --out docs/results/frontier_both.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

MARKERS = ("o", "s", "^", "D")


def points(files: list[tuple[str, Path]]) -> dict[str, list[tuple[str, float, float]]]:
    """geometry → [(method, seconds per image, LPIPS)] of every timed method."""
    out: dict[str, list[tuple[str, float, float]]] = {}
    for geometry, path in files:
        for name, m in json.loads(path.read_text()).items():
            if m.get("seconds_per_image") and m.get("lpips") is not None:
                out.setdefault(geometry, []).append((name, float(m["seconds_per_image"]), float(m["lpips"])))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--metrics", action="append", required=True, metavar="GEOMETRY=FILE")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    files = []
    for item in args.metrics:
        geometry, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            print(f"frontier_figure: --metrics {item!r}: want GEOMETRY=FILE with an existing metrics.json",
                  file=sys.stderr)
            return 2
        files.append((geometry, Path(path)))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    for k, (geometry, pts) in enumerate(points(files).items()):
        xs, ys = [t for _, t, _ in pts], [v for _, _, v in pts]
        ax.scatter(xs, ys, marker=MARKERS[k % len(MARKERS)], s=40, label=f"{geometry} (scene on sensor, px)")
        for name, t, v in pts:  # of two points less than 0.6 decades apart, the lower one's label goes below it
            below = any(abs(math.log10(t / t2)) < 0.6 and v < v2 for _, t2, v2 in pts)
            ax.annotate(name, (t, v), textcoords="offset points", xytext=(5, -10 if below else 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("seconds per image (1 CPU thread, batch 1, median; log scale)")
    ax.set_ylabel("LPIPS ↓ (against the ground truth)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
