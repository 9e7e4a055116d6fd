"""``nsdd-train distill`` on the command line: its flags, and the run (:func:`train.distill.train_student`)."""

from __future__ import annotations

import argparse
import math
import sys
import time

from nsdd_edge.cli_common import add_threads_argument
from nsdd_edge.optics import PROJECTORS, OpticsError
from train.data import DatasetError
from train.distill import (
    LOSS_WINDOWS,
    DistillError,
    DistillSettings,
    TrainingInterrupted,
    train_student,
)
from train.students import KINDS, OBJECTIVES, StudentError
from train.threads import torch_threads


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset directory (dataset.json, psf.npy, measurements/)")
    p.add_argument("--targets", required=True, help="teacher targets directory with ID.npy per measurement")
    p.add_argument("--out", required=True, help="output student directory (resumes if it holds a checkpoint)")
    p.add_argument("--student", choices=KINDS, default="edge", help="edge: compact UNet; paper: g_φ + diffusion UNet")
    p.add_argument("--objective", choices=OBJECTIVES, default="nullspace",
                   help="nullspace: x̂ = A†y + (I − A†A) g; full: x̂ = g (ablation)")
    p.add_argument("--loss", choices=("l1", "l2"), default="l1",
                   help="distance to the teacher: l1 (mean |r|) or l2 (mean r²)")
    p.add_argument("--lpips-weight", type=float, default=0.0, help="weight of LPIPS(x̂, T) on full images")
    p.add_argument("--lpips-weights", default=None, help="LPIPS-Alex v0.1 state dict (.pth)")
    p.add_argument("--steps", type=int, default=20000, help="total training steps (the cosine schedule ends here)")
    p.add_argument("--batch", type=int, default=8, help="(measurement, target) pairs per step")
    p.add_argument("--lr", type=float, default=2e-4, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--warmup", type=int, default=500, help="warm-up steps (at most steps/10)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    p.add_argument("--checkpoint-every", type=int, default=500,
                   help="write checkpoint, student, loss curve and a sample grid every N steps")
    p.add_argument("--samples", type=int, default=4, help="rows in the sample grids")
    p.add_argument("--split", default=None, help="dataset split to train on (default: train if present, else all)")
    p.add_argument("--limit", type=int, default=None,
                   help="train on the first N ids of the split only (those `nsdd-train teacher --limit N` labelled)")
    p.add_argument("--holdout", type=int, default=0, metavar="N",
                   help="hold the last N of those out of training and log the EMA student's loss on their teacher "
                        "labels at every checkpoint (loss.json, loss_curve.png): memorising shows, no ground truth")
    p.add_argument("--model", choices=("circular", "crop"), default=None,
                   help="reconstruction operator model (default: dataset.json recon)")
    p.add_argument("--lam", type=lam_value, default=None,
                   help="λ of the student's A†: a number, or 'discrepancy' (the λ whose Wiener residual matches the "
                        "data set's noise level, no ground truth); default: dataset.json recon.lam")
    p.add_argument("--projector", choices=PROJECTORS, default=None,
                   help="the student's pseudo-inverse: tikhonov A† = conj(H)/(|H|²+λ), truncated A† = conj(H)/|H|² "
                        "where |H| > √λ (then I − A†A is an exact projector), or cg (crop model: conjugate gradient on "
                        "(AᵀA + λI)x = Aᵀy, for PSFs larger than the sensor); default: the data set's (tikhonov)")
    p.add_argument("--prior", default=None, help="diffusion prior directory (paper student)")
    p.add_argument("--support", default="auto",
                   help="window of the scene grid the network fills (H[xW] px, centred; full: all of it; auto: the "
                        "simulated scenes' size when it is smaller than the grid, the rest being their black padding; with "
                        "--support-taper τ, τ wider on every side, so the soft edge lies outside the scenes)")
    p.add_argument("--support-taper", type=int, default=0,
                   help="px: g fades out over this border of the support window (raised cosine) instead of stopping "
                        "at a box edge (a camera profile's support.taper; default 0: a hard window)")
    p.add_argument("--t-fixed", type=int, default=None, help="paper student: timestep of the diffusion UNet")
    p.add_argument("--width", type=int, default=None, help="base channels of the (edge / g_φ) UNet")
    p.add_argument("--depth", type=int, default=None, help="number of ×2 downsamplings (input divisible by 2^depth)")
    p.add_argument("--max-width", type=int, default=None, help="channel cap per level")
    p.add_argument("--blocks", type=int, default=None, help="3×3 convolutions per level")
    p.add_argument("--activation", choices=("relu", "leaky_relu", "silu"), default=None,
                   help="activation of the (edge / g_φ) UNet (default: the student kind's)")
    p.add_argument("--unshuffle", type=int, default=None,
                   help="lean student: run the UNet at 1/r resolution on r² times the channels (pixel-unshuffle)")
    p.add_argument("--separable", action=argparse.BooleanOptionalAction, default=None,
                   help="lean student: depthwise-separable 3×3 convolutions")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data order")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto", help="bf16 autocast of the network (auto: on GPUs); FFTs stay float32")
    add_threads_argument(p, "torch CPU threads", "train")
    p.add_argument("--fp16", action="store_true", help="save model.safetensors in float16 (for shipping)")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="fit the run into this many minutes: after a few steps the step rate is measured and "
                        "--steps lowered to what fits (the learning-rate schedule follows)")
    p.add_argument("--preload", action="store_true",
                   help="read all measurements and targets once and keep them in memory (on the GPU when training "
                        "there), with each measurement's A†y (one more scene-grid array per sample)")
    p.add_argument("--psf-scale-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="train over a range of PSF scales (a scene at another depth): each sample's measurement is "
                        "simulated from its target through the PSF scaled by s ~ log-uniform[LO, HI] (dataset noise), "
                        "and the student learns under that A_s (LO = HI = 1: the same pipeline for one PSF)")
    p.add_argument("--loss-window", choices=LOSS_WINDOWS, default="grid",
                   help="where the loss (and LPIPS) is taken: the whole scene grid, or the student's support window "
                        "(scenes much smaller than the grid, e.g. a cg camera's 64² faces on its 256² grid); auto: "
                        "the support window when it is smaller than the grid")
    p.add_argument("--init-student", default=None, metavar="DIR",
                   help="start from this student's weights (same kind, architecture and objective; its PSF, geometry and λ "
                        "may differ; an RGB student starts a gray camera's and back, its colour convolutions "
                        "folded): fine-tune a student trained for another camera")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def lam_value(text: str) -> float | str:
    """``--lam``: a positive number or ``discrepancy``."""
    if text == "discrepancy":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'discrepancy', got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"λ must be finite and > 0, got {text}")
    return value


def settings_from_args(args: argparse.Namespace) -> DistillSettings:
    arch = {k: getattr(args, k) for k in ("width", "depth", "max_width", "blocks", "activation", "unshuffle",
                                          "separable")
            if getattr(args, k) is not None}
    if args.t_fixed is not None:
        arch["t_fixed"] = args.t_fixed
    return DistillSettings(
        data=args.data, targets=args.targets, out=args.out, student=args.student, objective=args.objective,
        loss=args.loss, lpips_weight=args.lpips_weight, lpips_weights=args.lpips_weights, steps=args.steps,
        batch=args.batch, lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup, ema=args.ema,
        grad_clip=args.grad_clip, checkpoint_every=args.checkpoint_every, samples=args.samples, split=args.split,
        limit=args.limit, holdout=args.holdout, model=args.model, lam=args.lam, projector=args.projector,
        prior=args.prior, support=args.support, support_taper=args.support_taper, architecture=arch, seed=args.seed,
        device=args.device,
        amp=args.amp, fp16=args.fp16, progress=not args.quiet,
        time_budget=None if args.time_budget is None else 60.0 * args.time_budget, preload=args.preload,
        psf_scale_range=list(args.psf_scale_range) if args.psf_scale_range is not None else None,
        init_student=args.init_student, loss_window=args.loss_window)


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        with torch_threads(args.threads, "train"):
            summary = train_student(settings_from_args(args))
    except (DistillError, StudentError, DatasetError, OpticsError) as exc:
        print(f"nsdd-train distill: error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        print(f"nsdd-train distill: interrupted by {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        return 130
    if summary["rank"] != 0:  # data parallel: rank 0 reports
        return 0
    print(f"student saved to {summary['out']} (step {summary['step']}, {summary['parameters']:,} parameters, "
          f"final loss {summary['final_loss']:.5g}, {time.perf_counter() - t0:.1f} s)")
    return 0
