"""Speed of the diffusion solvers (DDNM+, DPS, DiffPIR): seconds per image and network calls.

    python bench/bench_diffusion.py [--sizes 64,128] [--timed-steps 4] [--threads 2] [--config face]
                                    [--methods ddnm,ddnm-tt,dps,diffpir] [--device cpu] [--full]

Prior: the real ε-UNet of ``train/prior/unet.py`` with the ``nsdd-train prior`` default architecture
("face": 64 base channels, mults 1-2-2-2, 2 res blocks, attention at 16 px; random weights — speed does
not depend on them). Operator: circular model at the image size with the real radial PSF from
``../shared`` (box-downsampled to the size) or a seeded simulated PSF if ``../shared`` is absent; noise
σ = 0.005, so DDNM runs its DDNM+ (noise-aware) path.

Full runs (100 DDIM steps, 1000 DPS steps) take minutes to hours on 2 CPU cores, so by default each
method runs ``--timed-steps`` real steps of its own loop (same code, shorter schedule) after a one-step
warm-up, ``--repeats`` times (the fastest run counts: on a shared CPU it is the least disturbed);
seconds per network call (network + the method's per-step work: FFTs, the DPS backward pass) are
measured on those, and the full-run time is EXTRAPOLATED as calls × seconds per call. ``--full`` runs
the full schedules instead (measured, not extrapolated). "solver-only s / step" reruns the timed loop
with a zero ε-network: the method's own per-step work (FFTs, projections, noise), without the UNet.
The CPU load average is printed: on a shared machine the timings scale with it. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from train.physics import LenslessOperator
from train.prior.base import DiffusionPrior, linear_alphas_cumprod
from train.prior.unet import UNet
from train.solvers import make_solver

ROOT = Path(__file__).resolve().parents[1]
SHARED_PSF = ROOT.parent / "shared" / "data" / "psf" / "radial_6per_256.npy"

CONFIGS = {
    "face": {},  # the UNetConfig defaults = nsdd-train prior defaults
    "small": {"base_channels": 32, "channel_mults": [1, 2, 2], "num_res_blocks": 1, "attention_resolutions": [16]},
}

# name -> (registered solver, settings for a full run, full-run network calls)
METHODS = {
    "ddnm": ("ddnm", {"steps": 100, "eta": 0.85}, 100),
    "ddnm-tt": ("ddnm", {"steps": 100, "eta": 0.85, "travel_length": 10, "travel_repeat": 3}, 280),
    "dps": ("dps", {"steps": 1000, "zeta": 0.3}, 1000),
    "diffpir": ("diffpir", {"steps": 100}, 100),
}


def make_psf(size: int) -> tuple[np.ndarray, str]:
    if SHARED_PSF.exists() and 256 % size == 0:
        from nsdd_edge.optics import load_psf

        return load_psf(SHARED_PSF, downsample=256 // size), "radial_6per (../shared)"
    from nsdd_edge.optics import normalize

    rng = np.random.default_rng(0)
    return normalize((rng.random((1, size, size)) ** 8).astype(np.float32)), "seeded random (no ../shared)"


def timed_settings(method: str, full: dict, timed_steps: int) -> dict:
    """Settings for a shortened run of the same loop (time travel scaled down with it)."""
    s = dict(full, steps=timed_steps)
    if "travel_length" in s:
        s["travel_length"] = max(1, timed_steps // 4)
        s["travel_repeat"] = 3
    return s


class ZeroEps(torch.nn.Module):
    """``ε ≡ 0``: times a solver's own per-step work without the network."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def run(solver, y, physics, sync) -> float:
    start = time.perf_counter()
    solver(y, physics)
    sync()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="64,128")
    p.add_argument("--methods", default="ddnm,ddnm-tt,dps,diffpir")
    p.add_argument("--config", choices=sorted(CONFIGS), default="face")
    p.add_argument("--timed-steps", type=int, default=4, help="real steps timed per method (extrapolated)")
    p.add_argument("--full", action="store_true", help="time the full schedules (no extrapolation)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per row; the fastest counts (least disturbed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sizes = [int(s) for s in args.sizes.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {sorted(METHODS)}")

    mode = "full runs (measured)" if args.full else f"{args.timed_steps} timed steps per method, full runs EXTRAPOLATED"
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; device {device}, "
          f"torch threads {torch.get_num_threads()}, batch {args.batch}, UNet config '{args.config}', {mode}, "
          f"fastest of {args.repeats} runs after a 1-step warm-up\n")
    print("| method | px | prior params | PSF | timed calls | timed s | s / call | full-run calls "
          "| s / image (full run) | solver-only s / step |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for size in sizes:
        torch.manual_seed(0)
        net = UNet(image_size=size, **CONFIGS[args.config]).eval()
        prior = DiffusionPrior(net, linear_alphas_cumprod(), size, 3).to(device)
        psf, psf_name = make_psf(size)
        physics = LenslessOperator(psf, (size, size), "circular", lam=1e-6, noise_std=0.005).to(device)
        g = torch.Generator().manual_seed(0)
        x = torch.nn.functional.interpolate(torch.rand(args.batch, 3, size // 8, size // 8, generator=g),
                                            size=size, mode="bilinear")
        y = physics.measure(x.to(device), generator=g)
        params = sum(q.numel() for q in net.parameters())
        zero_prior = DiffusionPrior(ZeroEps(), linear_alphas_cumprod(), size, 3).to(device)
        for method in methods:
            name, full_settings, full_calls = METHODS[method]
            warm = make_solver(name, prior=prior, **timed_settings(method, full_settings, 1))
            run(warm, y, physics, sync)
            settings = full_settings if args.full else timed_settings(method, full_settings, args.timed_steps)
            solver = make_solver(name, prior=prior, **settings)
            seconds = min(run(solver, y, physics, sync) for _ in range(max(1, args.repeats)))
            per_call = seconds / solver.nfe / args.batch
            if args.full:
                total, label = seconds / args.batch, f"{seconds / args.batch:.2f} (measured)"
            else:
                total = per_call * full_calls
                label = f"{total:.1f} (extrapolated)"
            bare = make_solver(name, prior=zero_prior, **settings)
            overhead = min(run(bare, y, physics, sync) for _ in range(max(1, args.repeats))) / bare.nfe / args.batch
            print(f"| {method} | {size} | {params / 1e6:.2f} M | {psf_name} | {solver.nfe} | {seconds:.2f} | "
                  f"{per_call:.3f} | {full_calls} | {label} | {overhead:.4f} |", flush=True)


if __name__ == "__main__":
    main()
