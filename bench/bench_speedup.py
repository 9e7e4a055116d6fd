"""Student versus DDNM+ teacher: seconds per image on the same machine, resolution and measurements.

The issue's target is a student at least 1000× faster than the teacher. This bench times, on the
``--images`` first test measurements of a dataset, batch 1, float32, ``--threads`` CPU threads:

- the DDNM+ teacher (``train.solvers.ddnm``) with the trained prior, once per ``--teacher-steps`` value
  (100 is the method's default; the labels of ``scripts/cpu_demo.sh`` use 50), full schedules, measured;
- each ``--student`` in torch (``StudentSolver``: FFT pseudo-inverse, network, projector);
- each student as the exported ONNX graph (``export.onnx_graph``: A†y by matrix DFTs, the network and the
  projector in one graph, as the edge runtime runs it) under ONNX Runtime, unless ``--no-onnx``.

Students are timed round-robin (one image each per round, ``--rounds`` rounds after one warm-up), so a
busy moment of a shared CPU hits every variant alike; the teacher runs each image once (a run is 100
network calls, long enough to average the load). Medians are reported, with the CPU load average.

    python bench/bench_speedup.py --data runs/r64/radial64 --prior models/gpu-h200-faces64/prior64 \\
        --student models/gpu-h200-faces64/student_lean [--teacher-steps 50 100] [--images 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train.data import LenslessDataset
from train.prior.io import load_prior
from train.solvers import make_solver
from train.students import count_parameters, load_student


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def onnx_session(solver, source: str, psf: np.ndarray, threads: int, out: Path):
    """ONNX Runtime session of a loaded student's whole reconstruction graph (y → x̂), batch 1."""
    from export.graph import ReconstructionGraph
    from export.onnx_graph import export_graph, student_info
    from export.quantize import make_session

    info = student_info(solver, source)
    graph = ReconstructionGraph(psf, info.sensor_shape, float(info.lam), net=info.net.float().eval(),
                                objective=info.objective, dft="matmul", channels=int(info.channels or 3),
                                support_shape=info.support_shape)
    path = export_graph(graph, out, batch=1)
    return make_session(path, threads=threads)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="dataset directory (nsdd-train simulate)")
    ap.add_argument("--prior", required=True, help="diffusion prior directory (the teacher's)")
    ap.add_argument("--student", action="append", required=True, help="student directory (repeatable)")
    ap.add_argument("--teacher-steps", type=int, nargs="+", default=[100])
    ap.add_argument("--images", type=int, default=3, help="first N test measurements")
    ap.add_argument("--rounds", type=int, default=15, help="timed student rounds (one image each per round)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime timing of the students")
    args = ap.parse_args()
    if args.images < 1 or args.rounds < 1:
        ap.error("--images and --rounds must be ≥ 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ds = LenslessDataset(args.data)
    split = "test" if "test" in ds.splits else None
    ids = ds.ids(split)[: args.images]
    ys = [ds.measurements([i]) for i in ids]
    physics = ds.physics()
    load = os.getloadavg()[0]

    students: dict[str, object] = {}  # display name (the directory's name, made unique) → StudentSolver
    for k, d in enumerate(args.student):
        name = Path(d).name if Path(d).name not in students else f"{Path(d).name} #{k + 1}"
        students[name] = load_student(d)
        students[name].check_physics(physics)
    variants: dict[str, Callable] = {}
    for name, solver in students.items():
        variants[f"{name} (torch)"] = lambda y, s=solver: s(y, physics)
    tmp_dir = tempfile.TemporaryDirectory()
    if not args.no_onnx:
        for k, ((name, solver), d) in enumerate(zip(students.items(), args.student, strict=True)):
            sess = onnx_session(solver, d, ds.psf, args.threads, Path(tmp_dir.name) / f"student{k}.onnx")
            input_name = sess.get_inputs()[0].name
            variants[f"{name} (ONNX Runtime)"] = lambda y, s=sess, n=input_name: s.run(None, {n: y.numpy()})[0]

    student_times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for fn in variants.values():  # warm-up (graph optimisation, allocator)
            fn(ys[0])
        for r in range(args.rounds):
            y = ys[r % len(ys)]
            for k, fn in variants.items():
                t0 = time.perf_counter()
                fn(y)
                student_times[k].append(time.perf_counter() - t0)

    prior = load_prior(args.prior).eval()
    teacher_times: dict[int, list[float]] = {}
    with torch.no_grad():
        for steps in args.teacher_steps:
            solver = make_solver("ddnm", prior=prior, steps=steps)
            solver(ys[0], physics)  # warm-up run (same schedule)
            times = []
            for k, y in enumerate(ys):
                t0 = time.perf_counter()
                solver(y, physics, seeds=[k])
                times.append(time.perf_counter() - t0)
            teacher_times[steps] = times
    tmp_dir.cleanup()

    h, w = physics.scene_shape
    print(f"# student vs teacher, {ds.root.name}: {len(ids)} test measurements, {h}×{w} reconstruction grid, "
          f"batch 1, float32, {args.threads} CPU threads, load average {load:.2f} → {os.getloadavg()[0]:.2f}")
    print(f"prior {args.prior}: {count_parameters(prior.net):,} parameters")
    for name, solver in students.items():
        print(f"student {name}: {solver.kind}, {count_parameters(solver.net):,} parameters")
    print()
    print("| method | ms / image (median) | × faster than " +
          " | × faster than ".join(f"teacher ({s} steps)" for s in args.teacher_steps) + " |")
    print("|---|---:|" + "---:|" * len(args.teacher_steps))
    teacher_ms = {s: median_ms(t) for s, t in teacher_times.items()}
    for s, ms in teacher_ms.items():
        ratios = " | ".join(f"{teacher_ms[o] / ms:.2f}" for o in args.teacher_steps)
        print(f"| DDNM+ teacher, {s} steps (torch) | {ms:.1f} | {ratios} |")
    for k, t in student_times.items():
        ms = median_ms(t)
        ratios = " | ".join(f"{teacher_ms[o] / ms:,.0f}" for o in args.teacher_steps)
        print(f"| {k} | {ms:.2f} | {ratios} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
