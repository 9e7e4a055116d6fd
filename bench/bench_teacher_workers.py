"""Teacher throughput with several workers on one output folder: images per second for 1 and 2 workers.

    nice -n 10 python bench/bench_teacher_workers.py [--images 24] [--size 32] [--steps 10] [--batch 2]
        [--shard-size 2] [--rows 1x1,1x2,2x1] [--repeats 1] [--device cpu|cuda] [--keep DIR]

Builds a small problem in a temporary folder: procedural scenes, a simulated contour PSF (``nsdd-train
simulate``, circular model, ``--size`` px) and a randomly initialised UNet prior (the weights do not change the
cost). Each row ``WxT`` starts ``W`` workers ``nsdd-train teacher --threads T`` on one new output folder at the
same moment and waits for all of them (on ``--device cuda`` worker ``k`` uses GPU ``k mod count``).

Columns: wall seconds from the start of the workers to the last exit (process start-up included); images/s
over that wall time; images/s from the shard records (``nsdd-train teacher-progress``: the labelling time
only, start-up excluded); whether the targets are byte-identical to the first row with the same threads per
worker (the targets do not depend on the number of workers; thread counts change float rounding).
``--repeats N`` runs the rows N times, interleaved, and shows medians (for a machine shared with other jobs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_problem(folder: Path, n: int, size: int, seed: int = 0) -> tuple[Path, Path]:
    """A simulated dataset (procedural scenes, contour PSF) and a random UNet prior of ``size`` px."""
    import cv2
    import torch

    from nsdd_edge.psf_sim import contour_psf
    from train.cli import main as train_cli
    from train.prior.base import DiffusionPrior, linear_alphas_cumprod
    from train.prior.io import save_prior
    from train.prior.unet import UNet

    rng = np.random.default_rng(seed)
    images = folder / "scenes"
    images.mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size] / size
    for i in range(n):
        a, b, c = rng.uniform(0.5, 4.0, 3)
        img = np.stack([np.sin(a * np.pi * xx + i), np.cos(b * np.pi * yy), np.sin(c * np.pi * (xx + yy))], -1)
        cv2.imwrite(str(images / f"s{i:04d}.png"), ((img * 0.5 + 0.5) * 255).astype(np.uint8))
    psf = folder / "psf.npy"
    np.save(psf, contour_psf((size, size), seed=seed).astype(np.float32))
    data = folder / "data"
    rc = train_cli(["simulate", "--images", str(images), "--psf", str(psf), "--out", str(data), "--size", str(size),
                    "--model", "circular", "--n-test", "0", "--seed", str(seed), "--lam", "1e-3"])
    if rc != 0:
        raise SystemExit(f"simulate failed ({rc})")
    torch.manual_seed(seed)
    net = UNet(image_size=size, base_channels=32, channel_mults=[1, 2], num_res_blocks=1, attention_resolutions=[],
               num_heads=1, dropout=0.0)
    save_prior(DiffusionPrior(net, linear_alphas_cumprod(), size, 3), folder / "prior")
    return data, folder / "prior"


def run_row(data: Path, prior: Path, out: Path, workers: int, threads: int, args: argparse.Namespace) -> dict:
    """Start ``workers`` teacher processes on ``out`` at once; wall seconds and the progress view at the end."""
    from train.teacher_progress import progress_view

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(threads)}
    gpus = 0
    if args.device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise SystemExit("--device cuda: no CUDA device here")
    procs = []
    t0 = time.perf_counter()
    for k in range(workers):
        device = f"cuda:{k % gpus}" if gpus else "cpu"
        cmd = [sys.executable, "-m", "train.cli", "teacher", "--data", str(data), "--prior", str(prior),
               "--out", str(out), "--split", "all", "--steps", str(args.steps), "--batch", str(args.batch),
               "--shard-size", str(args.shard_size), "--threads", str(threads), "--device", device, "--no-png",
               "--worker", f"w{k}"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a teacher worker failed ({p.returncode}):\n{err}")
    wall = time.perf_counter() - t0
    view = progress_view(out)
    return {"wall": wall, "images": view["images_done"], "records_rate": view["images_per_second"],
            "by_worker": {name: w["shards"] for name, w in view["workers"].items()}}


def target_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.npy"))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="DDIM steps of the teacher")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--shard-size", type=int, default=2)
    p.add_argument("--rows", default="1x1,1x2,2x1", help="comma-separated WORKERSxTHREADS")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeats", type=int, default=1, help="runs of every row (interleaved); the table shows medians")
    p.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temporary one)")
    args = p.parse_args()
    rows = [tuple(int(v) for v in r.split("x")) for r in args.rows.split(",")]

    with tempfile.TemporaryDirectory(prefix="nsdd-bench-teacher-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data, prior = make_problem(work / "problem", args.images, args.size)
        print(f"teacher workers: {args.images} measurements of {args.size} px, {args.steps} DDIM steps, batch "
              f"{args.batch}, shards of {args.shard_size}, device {args.device}, {os.cpu_count()} CPU cores, "
              f"median of {args.repeats} (rows interleaved), load average {os.getloadavg()[0]:.1f} at the start\n")
        first: dict[int, dict[str, bytes]] = {}  # threads per worker -> the first targets with them
        results: dict[tuple[int, int], list[dict]] = {row: [] for row in rows}
        for rep in range(args.repeats):  # interleaved, so a change of load on a shared machine hits every row
            for workers, threads in rows:
                out = work / f"teacher_{workers}x{threads}_{rep}"
                r = run_row(data, prior, out, workers, threads, args)
                got = target_bytes(out)
                r["identical"] = first.setdefault(threads, got) == got
                results[(workers, threads)].append(r)
                if args.keep is None:
                    shutil.rmtree(out)
        print("| workers | threads/worker | images | wall s | images/s (wall) | images/s (shard records) "
              "| shards per worker | targets identical to the first run with these threads |")
        print("|---|---|---|---|---|---|---|---|")
        for (workers, threads), runs in results.items():
            wall = statistics.median(r["wall"] for r in runs)
            rates = [r["records_rate"] for r in runs if r["records_rate"] is not None]
            rate = f"{statistics.median(rates):.2f}" if rates else "-"
            shards = "; ".join(", ".join(f"{k}: {v}" for k, v in sorted(r["by_worker"].items())) for r in runs)
            print(f"| {workers} | {threads} | {runs[0]['images']} | {wall:.1f} | {runs[0]['images'] / wall:.2f} | "
                  f"{rate} | {shards} | {'yes' if all(r['identical'] for r in runs) else 'NO'} |")
        print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
