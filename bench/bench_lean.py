#!/usr/bin/env python3
"""A lean student for a latency budget: EdgeUNet width/depth/unshuffle swept inside the whole exported graph.

Each configuration is exported as the deployed graph, ``x̂ = A†y + (I − A†A) g(y, A†y)`` with the DFT-by-matmul
pseudo-inverse on the sensor grid and ``g`` on the scenes' support window (``export.graph.ReconstructionGraph``),
and timed with the project's one protocol: ONNX Runtime CPU, ``--threads`` (1) intra-op thread, batch 1, one
warm-up call per graph, then ``--rounds`` round-robin rounds (one call of every graph per round, so load hits all
alike), the median. The weights are untrained (seeded random): a graph's cost does not depend on its weights, so
this is a real speed measurement, and it says nothing about quality. Beside the wall-clock median, the median CPU
time of the calling thread (ONNX Runtime on one intra-op thread computes in it): on a shared machine under load
the wall clock also counts the time other processes hold the core, the CPU time does not (``--choose-by cpu``).

Budget: the live loop must reach ``--fps`` with its own overhead at most ``--loop-overhead`` of the engine time,
so the engine may take ``1000 / fps / (1 + overhead)`` ms (31.7 ms at 30 fps and 5 %). Among the graphs whose
median fits and whose fp16 weights stay within ``--max-weights-mb`` (4 MB: trained weights are committed, and the
tracked tree has a device-payload budget, ``scripts/gpu_payload.sh``), the chosen one has the most network GFLOPs
(capacity: the only quality proxy without training; dense blocks before separable ones at equal cost, as the
64 px run found dense better, docs/results.md).

    python bench/bench_lean.py [--sensor 256] [--support 128] [--threads 1] [--rounds 15] [--json FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

RADIAL_PSF = ROOT.parent / "shared/data/psf/radial_6per_256.npy"


def sweep_grid(separable_widths: tuple[int, ...] = (32, 48, 64)) -> list[dict]:
    """EdgeUNet architectures: unshuffle 2 and 4 × width 16–64 × depth 2–3 (max width 4× the base, 2 blocks),
    plus depthwise-separable variants at unshuffle 2."""
    grid = [{"width": w, "depth": d, "max_width": 4 * w, "blocks": 2, "unshuffle": r, "separable": False}
            for r, w, d in itertools.product((2, 4), (16, 24, 32, 48, 64), (2, 3))]
    grid += [{"width": w, "depth": 3, "max_width": 4 * w, "blocks": 2, "unshuffle": 2, "separable": True}
             for w in separable_widths]
    return grid


def engine_budget_ms(fps: float, loop_overhead: float) -> float:
    """The engine's share of one frame: ``1000 / fps / (1 + overhead)`` ms."""
    return 1e3 / fps / (1.0 + loop_overhead)


def fp16_megabytes(params: int) -> float:
    """Size of the weights stored as float16 (2 bytes a parameter), in MB."""
    return 2.0 * params / 1e6


def fits(row: dict, budget_ms: float, max_weights_mb: float, by: str = "ms_median") -> bool:
    return row[by] <= budget_ms and fp16_megabytes(row["params"]) <= max_weights_mb


def choose(rows: list[dict], budget_ms: float, max_weights_mb: float, by: str = "ms_median") -> dict | None:
    """The fitting row (time ``by``) with the most network GFLOPs (dense before separable, then fewer parameters)."""
    fits_ = [r for r in rows if fits(r, budget_ms, max_weights_mb, by)]
    return max(fits_, key=lambda r: (r["gflop_net"], not r["arch"]["separable"], -r["params"]), default=None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sensor", type=int, default=256, help="sensor (= reconstruction grid) side, circular model")
    ap.add_argument("--support", type=int, default=128, help="side of the scenes' window the network fills")
    ap.add_argument("--psf", default=str(RADIAL_PSF),
                    help="PSF (.npy) box-downsampled to the sensor; a simulated contour PSF when absent (same cost)")
    ap.add_argument("--lam", type=float, default=1.7e-3, help="Wiener λ (the cost does not depend on it)")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--rounds", type=int, default=15, help="timed round-robin rounds after the warm-up")
    ap.add_argument("--fps", type=float, default=30.0, help="the live loop's frame-rate target")
    ap.add_argument("--loop-overhead", type=float, default=0.05, help="the loop's allowed overhead on engine time")
    ap.add_argument("--max-weights-mb", type=float, default=4.0, help="largest fp16 weights file to choose (MB)")
    ap.add_argument("--choose-by", choices=["wall", "cpu"], default="wall",
                    help="the time held to the budget: wall-clock median (the protocol), or the calling thread's CPU "
                         "time (for a shared machine under load)")
    ap.add_argument("--json", type=Path, default=None, help="write the rows and the choice here")
    args = ap.parse_args(argv)

    import torch
    from bench_flops import graph_flops

    from export.graph import ReconstructionGraph
    from export.onnx_graph import export_graph
    from export.quantize import make_session
    from nsdd_edge.optics import load_psf
    from nsdd_edge.psf_sim import simulate_psf
    from train.students import EdgeUNet, count_parameters

    torch.set_num_threads(1)
    size = args.sensor
    if Path(args.psf).is_file():
        raw = load_psf(args.psf)
        psf, psf_name = load_psf(args.psf, downsample=max(1, raw.shape[-1] // size)), Path(args.psf).name
    else:
        psf, psf_name = simulate_psf("contour", (size, size), 0), "simulated contour"
    y = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    budget = engine_budget_ms(args.fps, args.loop_overhead)
    rows, sessions = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-lean-") as tmp:
        t0 = time.perf_counter()
        wiener = Path(tmp) / "wiener.onnx"
        export_graph(ReconstructionGraph(psf, (size, size), args.lam, net=None, objective="wiener"), wiener, batch=1)
        sessions["wiener"] = make_session(wiener, threads=args.threads)
        for k, arch in enumerate(sweep_grid()):
            torch.manual_seed(0)
            net = EdgeUNet(6, 3, **arch).eval()
            path = Path(tmp) / f"lean{k}.onnx"
            export_graph(ReconstructionGraph(psf, (size, size), args.lam, net=net, objective="nullspace",
                                             support_shape=(args.support, args.support)), path, batch=1)
            flops = graph_flops(path)
            rows.append({"arch": arch, "params": count_parameters(net), "gflop_net": flops["student"] / 1e9,
                         "gflop_physics": flops["physics"] / 1e9, "onnx_mb": path.stat().st_size / 1e6})
            sessions[k] = make_session(path, threads=args.threads)
            print(f"  exported {k + 1}/{len(sweep_grid())} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
                  flush=True)
        for s in sessions.values():  # warm-up
            s.run(None, {"y": y})
        times: dict = {k: [] for k in sessions}
        cpu: dict = {k: [] for k in sessions}
        for _ in range(args.rounds):
            for k, s in sessions.items():
                t, c = time.perf_counter(), time.thread_time()
                s.run(None, {"y": y})
                times[k].append((time.perf_counter() - t) * 1e3)
                cpu[k].append((time.thread_time() - c) * 1e3)
    for k, row in enumerate(rows):
        row["ms_median"], row["ms_min"] = statistics.median(times[k]), min(times[k])
        row["cpu_ms_median"] = statistics.median(cpu[k])
    wiener_ms, wiener_cpu = statistics.median(times["wiener"]), statistics.median(cpu["wiener"])
    by = "ms_median" if args.choose_by == "wall" else "cpu_ms_median"
    chosen = choose(rows, budget, args.max_weights_mb, by)
    load = os.getloadavg()
    print(f"\n{size}² sensor (circular A† by matmul DFT, {psf_name}), network on the centred {args.support}² window, "
          f"3 channels; ONNX Runtime CPU, {args.threads} thread(s), batch 1, 1 warm-up call then the median of "
          f"{args.rounds} round-robin rounds; untrained seeded weights (speed only); load average "
          f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    print(f"budget: {args.fps:g} fps with ≤ {100 * args.loop_overhead:g}% loop overhead → engine ≤ {budget:.1f} ms; "
          f"fp16 weights ≤ {args.max_weights_mb:g} MB; held to the budget: {args.choose_by} time; Wiener-only graph: "
          f"{wiener_ms:.1f} ms wall, {wiener_cpu:.1f} ms CPU\n")
    print("| unshuffle | width | depth | max | separable | params (M) | fp16 MB | GFLOP net | GFLOP physics | "
          "ms median | ms min | CPU ms median | fps | fits |")
    print("|---:|---:|---:|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for row in sorted(rows, key=lambda r: r[by]):
        a = row["arch"]
        mark = "**chosen**" if row is chosen else ("yes" if fits(row, budget, args.max_weights_mb, by) else
                                                    "no" if row[by] > budget else "too big")
        print(f"| {a['unshuffle']} | {a['width']} | {a['depth']} | {a['max_width']} | "
              f"{'yes' if a['separable'] else ''} | {row['params'] / 1e6:.2f} | {fp16_megabytes(row['params']):.1f} | "
              f"{row['gflop_net']:.2f} | "
              f"{row['gflop_physics']:.2f} | {row['ms_median']:.1f} | {row['ms_min']:.1f} | {row['cpu_ms_median']:.1f} | "
              f"{1e3 / row[by]:.0f} | {mark} |")
    if chosen is None:
        print("\nno configuration fits the budget")
    else:
        print(f"\nchosen (most network GFLOPs within {budget:.1f} ms {args.choose_by} time and {args.max_weights_mb:g} MB): "
              f"{json.dumps(chosen['arch'])}")
    if args.json:
        args.json.write_text(json.dumps({"sensor": size, "support": args.support, "threads": args.threads,
                                         "rounds": args.rounds, "budget_ms": budget, "choose_by": args.choose_by,
                                         "max_weights_mb": args.max_weights_mb, "wiener_ms": wiener_ms, "wiener_cpu_ms": wiener_cpu,
                                         "load_average": load, "rows": rows,
                                         "chosen": chosen["arch"] if chosen else None}, indent=2) + "\n")
    return 0 if chosen else 1


if __name__ == "__main__":
    sys.exit(main())
