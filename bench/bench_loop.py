#!/usr/bin/env python3
"""Loop FPS against engine-only FPS on the same frames (target: loop overhead ≤ ``--max-overhead``, 5 %), at 128²
and 256².

Model: a real exported NSDD graph from ``export.graph.ReconstructionGraph`` — ``x̂ = A†y + (I − A†A) g(y, A†y)``
with the DFT-by-matmul pseudo-inverse and an edge student ``g`` with **untrained (seeded random) weights**: the
cost is that of the deployed graph, the output is not a meaningful image. ``g`` is the default edge student
(``train.students.build_edge_net``, EdgeUNet width 32, depth 4) unless ``--arch`` gives EdgeUNet settings, and
fills the whole grid unless ``--support`` gives the scenes' centred window (then ``sim://`` renders the scenes at
that size through the crop model on a 2× sensor grid: at 256² with ``--support 128`` the paper's geometry,
128 px scenes on a 256 px sensor). It runs on CPU ONNX Runtime. The numpy Wiener engine is measured as well (a
cheap engine, where fixed loop costs weigh most).

Frames: simulated raw frames from ``sim://`` with the bundle's PSF, captured first and replayed from memory.
Each configuration is measured ``--repeats`` times, engine-only and loop interleaved; the table gives the
medians. Overhead = ``1 − loop FPS / engine FPS`` (the loop adds preprocessing, the queue hand-off and the
capture thread).

    python bench/bench_loop.py [--sizes 128 256] [--frames 40] [--repeats 3] [--threads 1]
    python bench/bench_loop.py --sizes 256 --support 128 --arch '{"width": 32, "depth": 3, "max_width": 128, "unshuffle": 2}'

``--bundle DIR`` measures a real bundle instead (its trained ONNX graph, its geometry; ``--sizes``, ``--arch`` and
``--support`` do not apply), on frames from ``--source`` (default ``sim://?realtime=0``; ``&images=FOLDER`` renders
real faces through the bundle's optics).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_bundle(out: Path, size: int, *, student: bool, seed: int = 0, arch: dict | None = None,
                 support: int | None = None):
    """A bundle at ``size``² with a simulated contour PSF, sim-matched preprocessing and (optionally) the
    exported student graph as ``onnx_fp32`` (``arch``: EdgeUNet settings over the default edge student's;
    ``support``: the side of the centred window the network fills)."""
    import torch

    from export.graph import ReconstructionGraph
    from export.onnx_graph import export_graph
    from nsdd_edge.bundle import PreprocessConfig, write_bundle
    from nsdd_edge.optics import LenslessGeometry
    from nsdd_edge.psf_sim import simulate_psf
    from nsdd_edge.sources import open_source
    from train.students import build_edge_net, default_architecture

    psf = simulate_psf("contour", (size, size), seed)
    support_shape = (support, support) if support else None
    geometry = LenslessGeometry.make("circular", (size, size))
    lam = 1e-3
    camera = open_source("sim://?realtime=0", psf=psf, geometry=geometry, channels=3)
    models = {}
    if student:
        torch.manual_seed(seed)
        net = build_edge_net(3, {**default_architecture("edge", "nullspace"), **(arch or {})}).eval()
        graph = ReconstructionGraph(psf, (size, size), lam, net=net, objective="nullspace", dft="matmul", channels=3,
                                    support_shape=support_shape)
        onnx_path = out.parent / f"student_{size}.onnx"
        export_graph(graph, onnx_path, batch=1)
        models = {"onnx_fp32": {"path": onnx_path, "precision": "fp32", "weights": "untrained (seeded random)"}}
    return write_bundle(out, psf=psf, geometry=geometry, lam=lam, channels=3,
                        preprocess=PreprocessConfig(**camera.matching_preprocess()), models=models,
                        name=f"bench-{size}{'-student' if student else ''}", support_shape=support_shape)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--arch", type=json.loads, default=None,
                    help="EdgeUNet settings as JSON over the default edge student's (e.g. bench/bench_lean.py's choice)")
    ap.add_argument("--support", type=int, default=None, help="side of the scenes' window the network fills")
    ap.add_argument("--bundle", type=Path, default=None,
                    help="measure this bundle's FP32 ONNX graph (trained weights) instead of a seeded one")
    ap.add_argument("--source", default="sim://?realtime=0", help="frame source URI (default: %(default)s)")
    ap.add_argument("--max-overhead", type=float, default=5.0, help="the loop overhead target, in %% of engine time")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(max(1, args.threads))
    from nsdd_edge.commands.bench import benchmark, capture_frames, format_table
    from nsdd_edge.commands.run import make_preprocessor, open_camera
    from nsdd_edge.engines import NumpyWienerEngine, OnnxRuntimeEngine

    from nsdd_edge.bundle import load_bundle

    given_bundle = load_bundle(args.bundle) if args.bundle else None
    if given_bundle is not None:
        ignored = [f for f, given in (("--sizes", args.sizes != [128, 256]), ("--arch", args.arch),
                                      ("--support", args.support)) if given]
        if ignored:
            print(f"bench_loop: --bundle sets the model and geometry; {', '.join(ignored)} ignored", file=sys.stderr)
        if given_bundle.model_path("onnx_fp32") is None:
            print(f"bench_loop: {args.bundle} has no FP32 ONNX model (nsdd-export bundle --onnx FP32_FILE,…)",
                  file=sys.stderr)
            return 2

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in [None] if given_bundle else args.sizes:
            if given_bundle is not None:
                bundle, size = given_bundle, given_bundle.input_shape[-1]
            else:
                bundle = build_bundle(Path(tmp) / f"b{size}", size, student=True, arch=args.arch,
                                      support=args.support)
            frames = capture_frames(open_camera(args.source, bundle), args.frames)
            preprocess = make_preprocessor(bundle)
            engines = {
                f"{size}² ONNX Runtime CPU, NSDD edge student": OnnxRuntimeEngine(
                    bundle.model_path("onnx_fp32"), threads=args.threads, input_shape=bundle.input_shape),
                f"{size}² numpy Wiener A†": NumpyWienerEngine(bundle),
            }
            for label, engine in engines.items():
                runs = [benchmark(engine, preprocess, frames, display_support=bundle.support_shape)
                        for _ in range(args.repeats)]
                med = dict(runs[len(runs) // 2])
                med["engine_fps"] = statistics.median(r["engine_fps"] for r in runs)
                med["loop_fps"] = statistics.median(r["loop_fps"] for r in runs)
                med["engine_ms"] = 1e3 / med["engine_fps"]
                med["overhead_pct"] = 100.0 * (1.0 - med["loop_fps"] / med["engine_fps"])
                med["engine_cpu_ms"] = statistics.median(r["engine_cpu_ms"] for r in runs)
                med["loop_cpu_ms"] = statistics.median(r["loop_cpu_ms"] for r in runs)
                med["cpu_overhead_pct"] = 100.0 * (med["loop_cpu_ms"] / med["engine_cpu_ms"] - 1.0)
                rows.append((label, med))
                print(f"  done: {label}: engine {med['engine_fps']:.1f} fps, loop {med['loop_fps']:.1f} fps",
                      file=sys.stderr, flush=True)
                engine.close()
    if args.bundle:
        student, window = f"the bundle {args.bundle} (trained weights)", ""
    else:
        student = f"EdgeUNet {json.dumps(args.arch)}" if args.arch else "the default edge student"
        window = f", network on the centred {args.support}² window with untrained weights" if args.support else \
            " with untrained weights"
    load = os.getloadavg()
    print(f"\nloop vs engine-only, {args.frames} frames, median of {args.repeats} interleaved runs, "
          f"ONNX Runtime threads={args.threads}, frames from {args.source}, exported graph of {student}{window}; "
          f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    print(format_table(rows))
    worst = max((r["overhead_pct"] for label, r in rows if "ONNX" in label), default=float("nan"))
    worst_cpu = max((r["cpu_overhead_pct"] for label, r in rows if "ONNX" in label), default=float("nan"))
    print(f"\nworst loop overhead with the exported student: {worst:.1f}% wall-clock FPS, {worst_cpu:.1f}% CPU time "
          f"per frame (target ≤ {args.max_overhead:g}%); wall-clock figures include other processes' load on a shared CPU")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
