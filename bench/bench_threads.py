"""Thread counts (and model precisions) of the computing commands, timed on this machine idle and busy;
prints a markdown table.

    python bench/bench_threads.py [--threads 1,2] [--busy 0,1] [--repeats 5] [--workloads loop,prior,...]

``--busy K`` runs K extra processes that each keep one core fully busy (a pure-Python spin loop) while a
row is timed: on a 2-core machine ``--busy 1`` is "another engineer's job is running". The variants of a
row (thread counts, precisions) are timed in turn within each repeat, so a change of load on a shared
machine hits them alike; each cell is the median over ``--repeats``, after one untimed warm-up each.
Workloads, what each command computes per unit of work, at the README walkthrough's sizes:

- ``loop``: ``nsdd-edge run``/``bench``: the shipped bundle's student in ONNX Runtime (``--threads`` =
  intra-op threads), ms per 128×128×3 frame, and in brackets the whole loop (capture thread,
  preprocessing, engine, outputs; ``nsdd-edge bench``'s lossless replay of 20 ``sim://`` frames) in fps;
- ``prior``: one ``nsdd-train prior --preset cpu`` step (64 px, batch 16: forward, backward, AdamW, EMA);
- ``distill``: one ``nsdd-train distill`` step of the default edge student (batch 8, 128² grid, 64² support);
- ``simulate``: the crop-model forward operator on a batch of 32 scenes (64² scenes, 128² sensor, 256²
  grid), per image;
- ``precision``: ONNX Runtime ms per frame of the shipped student as FP32, FP16 (``nsdd-export quantize``,
  ``--fp16-mode auto``) and INT8 (max calibration on 16 ``sim://`` frames): ``run --precision auto``.

The defaults ``nsdd_edge.cli_common.THREAD_RULES`` and ``nsdd_edge.engines.AUTO_ONNX_ORDER`` come from this
table (docs/threads.md).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from nsdd_edge.cli_common import default_threads, usable_cpus

WORKLOADS = ("loop", "prior", "distill", "simulate", "precision")
Variant = Callable[[], float]  # one unit of work, timed inside; returns seconds (or a figure)


def _spin() -> None:  # one core, fully busy, until terminated
    while True:
        pass


class Busy:
    """``k`` spinning processes for the duration of a ``with`` block."""

    def __init__(self, k: int):
        self.k, self.procs = k, []

    def __enter__(self):
        self.procs = [mp.Process(target=_spin, daemon=True) for _ in range(self.k)]
        for p in self.procs:
            p.start()
        time.sleep(0.3 if self.k else 0.0)
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.terminate()
            p.join()


def timed_torch(fn: Callable[[], None], threads: int) -> Variant:
    """``fn`` run with ``threads`` torch threads; returns its wall seconds."""
    import torch

    def run() -> float:
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run


# ---- workloads: {variant label: callable} ---------------------------------------------------------------
def loop_variants(threads: list[int]) -> tuple[dict[str, Variant], dict[str, list[float]]]:
    """Engine seconds per frame of the shipped bundle (``nsdd-edge bench``'s code) as variants, and the loop
    fps of every run of them (the warm-up first), filled in as they run."""
    from nsdd_edge.commands.bench import benchmark, capture_frames
    from nsdd_edge.commands.run import make_preprocessor, open_bundle, open_camera
    from nsdd_edge.engines import select_engine

    bundle = open_bundle(None)
    frames = capture_frames(open_camera("sim://?realtime=0", bundle), 20)
    preprocess = make_preprocessor(bundle)
    engines = {t: select_engine(bundle, "onnx", threads=t)[0] for t in threads}
    fps: dict[str, list[float]] = {str(t): [] for t in threads}

    def engine_seconds(t: int) -> Variant:
        def run() -> float:
            result = benchmark(engines[t], preprocess, frames, warmup=0)
            fps[str(t)].append(result["loop_fps"])
            return result["engine_ms"] / 1e3
        return run

    return {str(t): engine_seconds(t) for t in threads}, fps


def prior_variants(threads: list[int]) -> dict[str, Variant]:
    import torch
    from bench_prior import training_step

    from train.prior.base import linear_alphas_cumprod
    from train.prior.train_prior import PRESETS, _architecture, apply_preset
    from train.prior.unet import UNet

    args = apply_preset(argparse.Namespace(preset="cpu"))
    settings = {"size": 64, "pad_to": None, "channels": 3, "num_heads": 4,
                **{k: getattr(args, k) for k in PRESETS["cpu"]}}
    torch.manual_seed(0)
    model = UNet(_architecture(settings))
    ema = UNet(_architecture(settings)).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    x0 = torch.rand(settings["batch"], 3, 64, 64) * 2 - 1
    step = training_step(model, ema, optimizer, x0, linear_alphas_cumprod(), torch.Generator().manual_seed(0),
                         False, lambda: None)
    return {str(t): timed_torch(step, t) for t in threads}


def distill_variants(threads: list[int], psf: np.ndarray) -> dict[str, Variant]:
    import torch

    from train.distill import distill_loss
    from train.physics import LenslessOperator
    from train.students import build_student, make_config

    physics = LenslessOperator(psf, (128, 128), "circular", lam=1e-3)
    torch.manual_seed(0)
    student = build_student(make_config("edge", "nullspace", 3, physics, support_shape=(64, 64)))
    optimizer = torch.optim.AdamW(student.net.parameters(), lr=2e-4)
    y, target = torch.rand(8, 3, 128, 128) * 0.5, torch.rand(8, 3, 128, 128)

    def step() -> None:
        loss = distill_loss(student(y, physics), target, physics, "nullspace", "l1")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return {str(t): timed_torch(step, t) for t in threads}


def simulate_variants(threads: list[int], psf: np.ndarray) -> dict[str, Variant]:
    import torch

    from train.physics import LenslessOperator

    forward = LenslessOperator(psf, (128, 128), "crop", scene_shape=(64, 64), conv_shape=(256, 256))
    x = torch.rand(32, 3, 64, 64)

    def batch() -> None:
        with torch.no_grad():
            forward.A(x)

    def per_image(t: int) -> Variant:
        run = timed_torch(batch, t)
        return lambda: run() / len(x)

    return {str(t): per_image(t) for t in threads}


def precision_models(work: Path) -> dict[str, Path]:
    """The shipped student's FP32 ONNX and its FP16 and INT8 versions (calibrated on 16 sim:// frames)."""
    from export.quantize import quantize_file
    from nsdd_edge.commands.bench import capture_frames
    from nsdd_edge.commands.run import make_preprocessor, open_bundle, open_camera

    bundle = open_bundle(None)
    fp32 = bundle.model_path("onnx_fp32")
    data = work / "calibration"
    (data / "measurements").mkdir(parents=True, exist_ok=True)
    preprocess = make_preprocessor(bundle)
    for k, frame in enumerate(capture_frames(open_camera("sim://?realtime=0&seed=3", bundle), 16)):
        np.save(data / "measurements" / f"{k:04d}.npy", preprocess(frame.data).astype(np.float32))
    models = {"fp32": fp32}
    for p in ("fp16", "int8"):
        models[p] = work / f"student.{p}.onnx"
        quantize_file(fp32, p, models[p], data=data)
    return models


def precision_variants(threads: list[int], models: dict[str, Path]) -> dict[str, Variant]:
    """ONNX Runtime CPU seconds per frame of each model × thread count (20 calls per unit)."""
    from nsdd_edge.engines import OnnxRuntimeEngine

    y = np.random.default_rng(0).random((1, 3, 128, 128), dtype=np.float32) * 0.3
    out = {}
    for p, path in models.items():
        for t in threads:
            engine = OnnxRuntimeEngine(path, threads=t)

            def run(engine=engine) -> float:
                t0 = time.perf_counter()
                for _ in range(20):
                    engine.infer(y)
                return (time.perf_counter() - t0) / 20

            out[f"{p}/{t}"] = run
    return out


def measure(variants: dict[str, Variant], repeats: int, busy: int) -> dict[str, float]:
    """Median of each variant over ``repeats`` rounds (variants in turn within a round), one warm-up each."""
    with Busy(busy):
        for run in variants.values():
            run()
        samples: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(repeats):
            for k, run in variants.items():
                samples[k].append(run())
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2", help="thread counts to time, comma-separated")
    p.add_argument("--busy", default="0,1", help="numbers of busy cores to add, comma-separated")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per row (median)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of " + ", ".join(WORKLOADS))
    p.add_argument("--psf", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/psf/radial_6per_256.npy"),
                   help="the radial PSF (box-downsampled ×2 to 128², as the README's dataset)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_prior
    import torch

    from nsdd_edge.optics import load_psf

    threads = [int(v) for v in args.threads.split(",")]
    busy = [int(v) for v in args.busy.split(",")]
    workloads = [w for w in args.workloads.split(",") if w]
    psf = load_psf(args.psf, downsample=2) if {"distill", "simulate"} & set(workloads) else None
    print(f"# {usable_cpus()} usable CPUs, load average {', '.join(f'{v:.2f}' for v in os.getloadavg())} at the "
          f"start; torch {torch.__version__}; {args.repeats} rounds per row")
    print(f"# defaults here: loop {default_threads('loop')}, train {default_threads('train')}, "
          f"simulate {default_threads('simulate')}\n")
    print("| workload | unit | busy cores | " + " | ".join(f"{t} thread{'s' * (t > 1)}" for t in threads) + " |")
    print("|---|---|---|" + "---|" * len(threads))

    def row(name: str, unit: str, k: int, values: dict[str, float], fmt: Callable[[float], str],
            prefix: str = "") -> None:
        print(f"| {name} | {unit} | {k} | " + " | ".join(fmt(values[f"{prefix}{t}"]) for t in threads) + " |",
              flush=True)

    for workload in workloads:
        for k in busy:
            if workload == "loop":
                engine, fps = loop_variants(threads)
                values = measure(engine, args.repeats, k)
                print(f"| loop | ms/frame (loop fps) | {k} | " + " | ".join(
                    f"{1e3 * values[str(t)]:.1f} ({statistics.median(fps[str(t)][1:]):.0f})" for t in threads)
                      + " |", flush=True)
            elif workload == "prior":
                row("prior", "s/step", k, measure(prior_variants(threads), args.repeats, k), lambda v: f"{v:.2f}")
            elif workload == "distill":
                row("distill", "s/step", k, measure(distill_variants(threads, psf), args.repeats, k),
                    lambda v: f"{v:.3f}")
            elif workload == "simulate":
                row("simulate", "ms/image", k, measure(simulate_variants(threads, psf), args.repeats, k),
                    lambda v: f"{1e3 * v:.1f}")
            elif workload == "precision":
                models = precision_models(Path(tempfile.mkdtemp(prefix="nsdd-bench-threads-")))
                values = measure(precision_variants(threads, models), args.repeats, k)
                for prec in models:
                    row(f"precision {prec}", "ms/frame", k, values, lambda v: f"{1e3 * v:.1f}", prefix=f"{prec}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
