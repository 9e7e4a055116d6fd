#!/usr/bin/env python3
"""Live refocus on a scene at a changing depth: the same sim:// frames reconstructed without and with refocus.

    python bench/bench_refocus.py --model BUNDLE \
        --source "sim://?realtime=0&fps=10&images=../shared/data/faces/utkface&motion=static&hold=0.5&psf_scale=1.0,1.15,0.9&psf_scale_hold=4" \
        --frames 120

Both passes read the same deterministic frames (realtime=0, same seed) through the bundle's preprocessing and
engine; the refocus pass runs the :class:`nsdd_edge.refocus.Refocuser` inline (one search every --every-frames
frames, in this thread, so the run is reproducible; ``nsdd-edge run --refocus`` runs the same searches in a
background thread). Prints, per depth segment: the true PSF scale, the scale refocus holds at its end, the two
consistency gauges (:class:`nsdd_edge.refocus.ConsistencyGauge`: under the current scale's models) and the PSNR
of the shown window against the simulated scene (``Frame.truth``); then what a search costs (ms) for a few
settings on the frames of the last segment. Tables only; nothing is written.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nsdd_edge.commands.run import make_preprocessor, open_bundle, open_camera
from nsdd_edge.engines import select_engine
from nsdd_edge.refocus import ConsistencyGauge, Refocuser, RefocusSettings


def psnr(x: np.ndarray, truth: np.ndarray) -> float:
    """PSNR of the clipped reconstruction against the sim scene (train.metrics.psnr, the evaluation's metric)."""
    import torch

    from train.metrics import psnr as psnr_batch

    shown = torch.from_numpy(np.clip(np.asarray(x, np.float32), 0, 1))[None]
    return float(psnr_batch(shown, torch.from_numpy(np.asarray(truth, np.float32))[None])[0])


def run_pass(bundle, source: str, frames: int, engine_kind: str, settings: RefocusSettings | None) -> dict:
    """Reconstruct ``frames`` frames; returns per-frame records and the refocuser (None without refocus)."""
    engine, _ = select_engine(bundle, engine_kind, threads=1)
    gauge = ConsistencyGauge.for_bundle(bundle)
    refocuser = None
    if settings is not None:
        refocuser = Refocuser(bundle.psf, bundle.sim_geometry(), engine, settings, gauge=gauge, inline=True)
    cam = open_camera(source, bundle)
    pre = make_preprocessor(bundle)
    cam.open()
    records = []
    try:
        for _ in range(frames):
            frame = cam.read(2.0)
            y = pre(frame.data, meta=frame.meta)
            if refocuser is not None:
                refocuser.observe(y)
            x = engine.infer(y[None])[0]
            shown = bundle.display_crop(x)
            records.append({"true": frame.meta.get("psf_scale", 1.0), "scale": refocuser.scale if refocuser else 1.0,
                            **gauge(x, y), "psnr": psnr(shown, frame.truth) if frame.truth is not None else None})
    finally:
        cam.close()
        engine.close()
    return {"records": records, "refocuser": refocuser, "engine": engine.describe()}


def segments(records: list[dict]) -> list[tuple[int, int]]:
    """Runs of frames with the same true scale: ``[(start, stop), …]``."""
    out, start = [], 0
    for k in range(1, len(records) + 1):
        if k == len(records) or records[k]["true"] != records[start]["true"]:
            out.append((start, k))
            start = k
    return out


def mean(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if r.get(key) is not None]
    return float(np.mean(values)) if values else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a bundle (spectra: input for a student; any bundle with "
                                                  "--engine wiener)")
    p.add_argument("--source", required=True, help="sim:// URI with psf_scale= (realtime=0)")
    p.add_argument("--frames", type=int, default=120)
    p.add_argument("--engine", default="auto", choices=["auto", "onnx", "wiener"])
    p.add_argument("--every-frames", type=int, default=10, help="frames between two refocus searches")
    args = p.parse_args()
    bundle = open_bundle(args.model)
    settings = RefocusSettings(every_frames=args.every_frames)
    base = run_pass(bundle, args.source, args.frames, args.engine, None)
    ref = run_pass(bundle, args.source, args.frames, args.engine, settings)
    a, b = base["records"], ref["records"]
    print(f"bundle {bundle.name}, engine {base['engine']}; {args.frames} frames of {args.source}")
    print(f"refocus inline every {args.every_frames} frames: {settings}")
    support = "consistency_support" in a[0]
    print("\nPer depth segment, means over its second half (the first half includes the search's lag):")
    head = "| frames | true scale | refocus scale (end) | "
    head += "support consistency: without / with | " if support else ""
    print(head + "consistency: without / with | PSNR (dB): without / with |")
    print("|---|---:|---:|" + ("---:|" if support else "") + "---:|---:|")
    for start, stop in segments(a):
        half = slice((start + stop) // 2, stop)
        row = f"| {start}–{stop - 1} | {a[start]['true']:.3f} | {b[stop - 1]['scale']:.3f} | "
        if support:
            row += f"{mean(a[half], 'consistency_support'):.4f} / {mean(b[half], 'consistency_support'):.4f} | "
        row += (f"{mean(a[half], 'consistency'):.4f} / {mean(b[half], 'consistency'):.4f} | "
                f"{mean(a[half], 'psnr'):.2f} / {mean(b[half], 'psnr'):.2f} |")
        print(row)
    r = ref["refocuser"].report()
    print(f"\n{r['swaps']} swaps in {r['searches']} searches, {r['mean_search_ms']:.0f} ms per search on average "
          f"(inline, 1/{r['search_downsample']} resolution): " + ", ".join(
              f"frame {w['frames_seen']}: {w['scale_from']:.3f} → {w['scale_to']:.3f}" for w in r["recent_swaps"]))

    # what a search costs: the frames of the last segment, a few settings, 3 searches each (median)
    start, stop = segments(a)[-1]
    engine, _ = select_engine(bundle, "wiener")
    cam = open_camera(args.source, bundle)
    pre = make_preprocessor(bundle)
    cam.open()
    ys = []
    for k in range(stop):
        frame = cam.read(2.0)
        if k >= stop - 3:
            ys.append(pre(frame.data, meta=frame.meta))
    cam.close()
    print("\n| downsample | frames | FISTA iterations | search ms (median of 3) | scale found |")
    print("|---:|---:|---:|---:|---:|")
    for d, n, iters in ((1, 2, 30), (2, 1, 30), (2, 2, 30), (2, 3, 30), (2, 2, 60)):
        s = RefocusSettings(downsample=d, frames=n, iters=iters, min_gain=0.0)
        times, found = [], None
        for _ in range(3):
            rf = Refocuser(bundle.psf, bundle.sim_geometry(), engine, s, gauge=ConsistencyGauge.for_bundle(bundle),
                           initial_scale=1.0, inline=True)
            for y in ys[-n:]:
                rf.observe(y)  # kept only: an inline search waits for every_frames (15) frames
            t0 = time.perf_counter()
            rf.search_once()
            times.append((time.perf_counter() - t0) * 1e3)
            found = rf.scale
        print(f"| {d} | {n} | {iters} | {statistics.median(times):.0f} | {found:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
