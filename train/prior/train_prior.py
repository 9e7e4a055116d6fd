"""``nsdd-train prior``: train a pixel-space diffusion prior (ε-prediction UNet) on the user's images.

Data: every image under ``--images`` (recursively; PNG/JPEG/TIFF/BMP/NPY), or a dataset directory's
``ground_truth/``. Each image is centre-cropped to a square, resized to ``--size`` and, with
``--pad-to N``, placed in the centre of an N×N zero frame (the sensor-size domain our reconstructions
live in). Scenes map to [−1, 1] (``x' = 2x − 1``). Unreadable images are skipped and listed.

Objective (DDPM, ε-prediction): ``L = ‖ε − ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t)‖²``, ``t ~ U{0..T−1}``,
random horizontal flips; AdamW with linear warm-up; gradient clipping; EMA weights
``θ̄ ← d θ̄ + (1 − d) θ`` with ``d = min(ema, (1 + step)/(10 + step))``; bf16 autocast on a GPU.

Output ``--out`` (loads with :func:`train.prior.io.load_prior` once the first checkpoint is written)::

    config.json, model.safetensors, scheduler_config.json   the EMA prior
    checkpoint.pt         model, EMA, optimizer, step, RNG states, data position (atomic)
    samples/step_NNNNNNN.png   DDIM samples of the EMA prior at each checkpoint (fixed seed)
    train_log.jsonl       loss / learning rate every --log-every steps
    skipped_images.json   images that could not be read, with the reason

A restart with the same ``--out`` resumes from ``checkpoint.pt`` (kill it at any moment: at most the steps
since the last checkpoint are redone, and the result equals an uninterrupted run with the same seed).

Under ``torchrun`` (several GPUs or machines) the run is data parallel: ``--batch`` is the global batch, each
process computes its rows of it (the same indices and noise as one process) and rank 0 writes everything;
the checkpoint resumes with any number of processes (:mod:`train.distributed`, ``docs/scale-out.md``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nsdd_edge.atomic import atomic_write_bytes
from nsdd_edge.cli_common import add_threads_argument
from train.distributed import DistContext, init_distributed
from train.prior.base import DiffusionPrior
from train.prior.data import batch_indices, find_image_files, load_images, make_batch
from train.prior.heldout import HELDOUT_TIMESTEPS, heldout_denoising_loss  # noqa: F401  (re-exported)
from train.prior.init_from import load_folded_weights, read_init_source, settings_with_source
from train.prior.io import (
    PriorError,
    alphas_cumprod_from_schedule,
    atomic_write_json,
    default_schedule,
    save_prior,
)
from train.prior.sampling import ddim_sample, image_grid, save_png
from train.prior.unet import UNet, UNetConfig
from train.progress import TimeEstimate, say
from train.threads import torch_threads

HELP = "train a diffusion prior (ε-prediction UNet) on a folder of images"

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "nsdd-prior-checkpoint/1"

# Settings that define a run: fixed by the checkpoint on resume (a different explicit value is an error).
STRUCTURAL_DEFAULTS = {
    "size": 64, "pad_to": None, "channels": 3, "seed": 0, "batch": 16,
    "base_channels": 64, "channel_mults": [1, 2, 2, 2], "num_res_blocks": 2, "attention_resolutions": None,
    "num_heads": 4, "dropout": 0.1, "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
}
# Optimisation settings: taken from the checkpoint on resume unless given again (then the new value is used).
TUNABLE_DEFAULTS = {"lr": 2e-4, "weight_decay": 0.0, "ema": 0.999, "warmup": 200, "grad_clip": 1.0}
# How long and how often: not part of a run's identity (give them again when resuming).
RUN_DEFAULTS = {"steps": 100_000, "checkpoint_every": 1000, "log_every": 50, "sample_count": 16, "sample_steps": 50}
# --preset NAME: values for any of the above that the command line does not give.
PRESETS = {
    # scripts/cpu_demo.sh and docs/results-cpu64.md: a 32-channel 3-level UNet (1.1M parameters at 64 px,
    # against 9.0M for the defaults)
    "cpu": {"base_channels": 32, "channel_mults": [1, 2, 2], "num_res_blocks": 1, "attention_resolutions": [16],
            "dropout": 0.0, "batch": 16, "warmup": 100, "steps": 2000, "checkpoint_every": 250, "log_every": 50,
            "sample_count": 16, "sample_steps": 50},
}


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def configure_parser(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS  # run-defining settings: absent unless given, so a resume keeps the checkpoint's
    d = {**STRUCTURAL_DEFAULTS, **TUNABLE_DEFAULTS}
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="cpu: the settings of scripts/cpu_demo.sh and docs/results-cpu64.md (32-channel 3-level UNet, "
                        "attention at 16 px, no dropout, batch 16, warm-up 100, 2,000 steps, a checkpoint every 250); "
                        "options given explicitly win (default: the full-size settings below)")
    g = p.add_argument_group("data")
    g.add_argument("--images", required=True, type=Path, metavar="DIR", default=argparse.SUPPRESS,
                   help="folder of training images (searched recursively) or a dataset directory (its train split of ground_truth/; never the test split)")
    g.add_argument("--out", required=True, type=Path, metavar="DIR", default=argparse.SUPPRESS, help="output prior directory (also holds the checkpoint)")
    g.add_argument("--size", type=int, default=S, help=f"scene size in pixels (default: {d['size']})")
    g.add_argument("--pad-to", type=int, default=S,
                   help="centre each --size scene in an N×N zero frame (sensor-size domain) (default: no padding)")
    g.add_argument("--channels", type=int, choices=(1, 3), default=S, help="1 = grayscale, 3 = RGB (default: 3)")
    g = p.add_argument_group("network (UNet)")
    g.add_argument("--base-channels", type=int, default=S,
                   help=f"channels of the first UNet level (default: {d['base_channels']})")
    g.add_argument("--channel-mults", type=_int_list, default=S,
                   help="channel multiplier of each level, comma-separated; one ×2 downsampling between levels "
                        "(default: 1,2,2,2)")
    g.add_argument("--num-res-blocks", type=int, default=S,
                   help=f"residual blocks per level (default: {d['num_res_blocks']})")
    g.add_argument("--attention-resolutions", type=_int_list, default=S,
                   help="feature-map sizes (px) with self-attention, comma-separated, '' for none "
                        "(default: 16, or the coarsest level when 16 is not one)")
    g.add_argument("--num-heads", type=int, default=S, help=f"heads of each self-attention (default: {d['num_heads']})")
    g.add_argument("--dropout", type=float, default=S, help=f"dropout in the residual blocks (default: {d['dropout']})")
    g.add_argument("--init-from", type=Path, default=None, metavar="PRIOR_DIR",
                   help="start from this prior's weights (its architecture and schedule; only --channels and --size may "
                        "differ: RGB→gray sums the input conv over R, G, B and averages the output conv; another "
                        "size keeps the attention at the same network levels, e.g. 16 px of 64 → 32 px of 128); "
                        "recorded in config.json as training.init_from (path, sha256, channels, image_size). A "
                        "resume takes the checkpoint's weights")
    g = p.add_argument_group("diffusion schedule (linear β)")
    g.add_argument("--num-train-timesteps", type=int, default=S, help="diffusion steps T (default: 1000)")
    g.add_argument("--beta-start", type=float, default=S, help="β of the first step (default: 1e-4)")
    g.add_argument("--beta-end", type=float, default=S, help="β of the last step (default: 0.02)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=S,
                   help=f"total training steps (default: {RUN_DEFAULTS['steps']:,}; --preset cpu: "
                        f"{PRESETS['cpu']['steps']:,})")
    g.add_argument("--batch", type=int, default=S, help=f"batch size (default: {d['batch']})")
    g.add_argument("--lr", type=float, default=S, help=f"AdamW learning rate (default: {d['lr']})")
    g.add_argument("--weight-decay", type=float, default=S, help="AdamW weight decay (default: 0)")
    g.add_argument("--warmup", type=int, default=S, help=f"linear learning-rate warm-up steps (default: {d['warmup']})")
    g.add_argument("--grad-clip", type=float, default=S, help="max gradient norm, 0 = off (default: 1.0)")
    g.add_argument("--ema", type=float, default=S, help=f"EMA decay (default: {d['ema']})")
    g.add_argument("--seed", type=int, default=S, help="seed for initialisation, data order and noise (default: 0)")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast on a GPU, fp32 on the CPU")
    add_threads_argument(g, "torch CPU threads", "train")
    g.add_argument("--checkpoint-every", type=int, default=S,
                   help=f"write checkpoint + prior + samples every N steps (default: {RUN_DEFAULTS['checkpoint_every']}"
                        f"; --preset cpu: {PRESETS['cpu']['checkpoint_every']})")
    g.add_argument("--log-every", type=int, default=S,
                   help=f"append the mean loss to train_log.jsonl every N steps (default: {RUN_DEFAULTS['log_every']})")
    g.add_argument("--sample-count", type=int, default=S,
                   help=f"images in each sample grid (0 = no grids) (default: {RUN_DEFAULTS['sample_count']})")
    g.add_argument("--sample-steps", type=int, default=S,
                   help=f"DDIM steps for the sample grids (default: {RUN_DEFAULTS['sample_steps']})")
    g.add_argument("--sample-seed", type=int, default=0, help="seed of the sample grids (fixed across checkpoints)")
    g.add_argument("--save-dtype", choices=("float32", "float16"), default="float32",
                   help="dtype of model.safetensors on disk (always loaded as float32)")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="resume from OUT/checkpoint.pt (default: resume when it exists; --no-resume refuses to "
                        "overwrite an existing checkpoint unless --overwrite)")
    g.add_argument("--overwrite", action="store_true", help="with --no-resume: start over, replacing the checkpoint")
    g.add_argument("--max-steps-this-run", type=int, default=None,
                   help="stop (with a checkpoint) after this many steps in this invocation; run again to continue")
    g.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                   help="stop (with a checkpoint, exit 0) after this many minutes of training in this invocation; "
                        "run again to continue")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


# ---- training pieces ------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise PriorError(f"--device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PriorError(f"--device {name}: CUDA is not available on this machine")
    return device


def diffusion_loss(model: torch.nn.Module, x0: torch.Tensor, alphas_cumprod: torch.Tensor,
                   generator: torch.Generator, use_bf16: bool = False, rows: slice | None = None,
                   global_batch: int | None = None) -> torch.Tensor:
    """``‖ε − ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t)‖²`` (mean) with random horizontal flips of ``x0`` (in [−1, 1]),
    ``t ~ U{0..T−1}`` and ``ε ~ N(0, I)`` drawn from ``generator`` on its own device (the training device on a
    GPU, so no noise is copied from the CPU); the model runs on the device of ``alphas_cumprod``.
    Data parallel: ``x0`` is rows ``rows`` of a ``global_batch``; the flips, ``t`` and ``ε`` of the whole
    global batch are drawn (the same on every rank) and this rank keeps its rows (train.distributed)."""
    n = x0.shape[0] if global_batch is None else global_batch
    gdev = generator.device
    flip = torch.rand(n, generator=generator, device=gdev) < 0.5
    t = torch.randint(0, len(alphas_cumprod), (n,), generator=generator, device=gdev)
    noise = torch.randn((n, *x0.shape[1:]), generator=generator, device=gdev)
    if rows is not None:
        flip, t, noise = flip[rows], t[rows], noise[rows]
    device = alphas_cumprod.device
    x0, flip, t, noise = x0.to(device), flip.to(device), t.to(device), noise.to(device)
    x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    a = alphas_cumprod[t].float()[:, None, None, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        pred = model(x_t, t)
    return F.mse_loss(pred.float(), noise)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``θ̄ ← d θ̄ + (1 − d) θ`` for parameters; buffers copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def ema_decay(target: float, step: int) -> float:
    """EMA warm-up: ``min(target, (1 + step)/(10 + step))``."""
    return min(target, (1 + step) / (10 + step))


def _image_set_digest(root: Path, used: list[Path]) -> str:
    h = hashlib.sha256()
    for p in used:
        h.update(str(p.relative_to(root)).encode() + b"\0")
    return h.hexdigest()[:16]


def _save_checkpoint(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file
        raise PriorError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc}); "
                         "move it away or pass --no-resume --overwrite to start over") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise PriorError(f"{path}: not an nsdd-train prior checkpoint")
    return state


def resolve_settings(args: argparse.Namespace, checkpoint: dict | None, source_settings: dict | None = None) -> dict:
    """Run settings: explicit flags, else the checkpoint's (or the ``--init-from`` source's architecture and
    schedule), else the defaults; structural clashes are errors."""
    given = {k: getattr(args, k) for k in {**STRUCTURAL_DEFAULTS, **TUNABLE_DEFAULTS} if hasattr(args, k)}
    if checkpoint is None:
        if source_settings is not None:
            given = settings_with_source(given, source_settings, args.init_from)
        return {**STRUCTURAL_DEFAULTS, **TUNABLE_DEFAULTS, **given}
    saved = checkpoint["settings"]
    clashes = [f"--{k.replace('_', '-')} {given[k]} (checkpoint: {saved[k]})"
               for k in STRUCTURAL_DEFAULTS if k in given and given[k] != saved.get(k)]
    if clashes:
        raise PriorError(f"{args.out / CHECKPOINT_NAME}: cannot resume with different settings: "
                         + "; ".join(clashes) + ". Use the same flags, a new --out, or --no-resume --overwrite")
    changed = [k for k in TUNABLE_DEFAULTS if k in given and given[k] != saved.get(k)]
    if changed:
        print("resume: using new " + ", ".join(f"{k}={given[k]} (was {saved.get(k)})" for k in changed))
    return {**STRUCTURAL_DEFAULTS, **TUNABLE_DEFAULTS, **saved, **given}


def _architecture(settings: dict) -> UNetConfig:
    size = settings["pad_to"] or settings["size"]
    attention = settings["attention_resolutions"]
    if attention is None:  # default: attend at 16 px, or at the coarsest level when 16 px is not one
        levels = [size // 2 ** i for i in range(len(settings["channel_mults"]))]
        attention = [16] if 16 in levels else [levels[-1]]
    return UNetConfig(in_channels=settings["channels"], out_channels=settings["channels"], image_size=size,
                      base_channels=settings["base_channels"], channel_mults=settings["channel_mults"],
                      num_res_blocks=settings["num_res_blocks"],
                      attention_resolutions=attention,
                      num_heads=settings["num_heads"], dropout=settings["dropout"])


def _validate(args: argparse.Namespace, settings: dict) -> None:
    problems = []
    if settings["size"] < 4:
        problems.append(f"--size {settings['size']} is too small")
    if settings["pad_to"] is not None and settings["pad_to"] < settings["size"]:
        problems.append(f"--pad-to {settings['pad_to']} is smaller than --size {settings['size']}")
    if settings["batch"] < 1:
        problems.append("--batch must be >= 1")
    if args.steps < 0:
        problems.append("--steps must be >= 0")
    if args.checkpoint_every < 1:
        problems.append("--checkpoint-every must be >= 1")
    if getattr(args, "time_limit", None) is not None and not args.time_limit > 0:
        problems.append("--time-limit must be > 0 minutes")
    if args.max_steps_this_run is not None and args.max_steps_this_run < 1:
        problems.append("--max-steps-this-run must be >= 1")
    if not 0.0 <= settings["ema"] < 1.0:
        problems.append(f"--ema {settings['ema']} must be in [0, 1)")
    if problems:
        raise PriorError("nsdd-train prior: " + "; ".join(problems))


def apply_preset(args: argparse.Namespace) -> argparse.Namespace:
    """Fill what the command line left out: the ``--preset``'s values (as if given), then :data:`RUN_DEFAULTS`.
    Structural and tunable settings the preset does not name stay absent (a resume takes the checkpoint's)."""
    preset = PRESETS.get(getattr(args, "preset", None) or "", {})
    for key, value in preset.items():
        if not hasattr(args, key):
            setattr(args, key, list(value) if isinstance(value, list) else value)
    for key, value in RUN_DEFAULTS.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    return args


def main(args: argparse.Namespace) -> int:
    ctx = None
    try:  # under torchrun: one data-parallel process of several (train.distributed); else the one process
        with torch_threads(args.threads, "train"):  # this command only (matters when called in-process)
            ctx = init_distributed(resolve_device(args.device), PriorError)
            with ctx.quiet_unless_main():
                return _train(apply_preset(args), ctx)
    except PriorError as exc:
        print(f"nsdd-train prior: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if ctx is not None:
            ctx.close()


def open_checkpoint(args: argparse.Namespace) -> dict | None:
    """The checkpoint to resume from (None: start), or a PriorError for a run that must not start."""
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise PriorError(f"--out {out}: exists and is not a directory")
    checkpoint_path = out / CHECKPOINT_NAME
    if checkpoint_path.exists():
        if args.resume is False:
            if not args.overwrite:
                raise PriorError(f"{checkpoint_path} exists: resume (default), pick a new --out, "
                                 "or pass --overwrite to start over and replace it")
            return None
        return load_checkpoint(checkpoint_path)
    if args.resume is True:
        raise PriorError(f"--resume: no checkpoint at {checkpoint_path}")
    if (out / "config.json").exists() and not args.overwrite:
        raise PriorError(f"--out {out} already holds a prior (config.json) but no {CHECKPOINT_NAME} to resume: "
                         "pick a new --out, or pass --overwrite to replace it")
    return None


def _train(args: argparse.Namespace, ctx: DistContext) -> int:
    from tqdm.auto import tqdm

    out: Path = args.out
    checkpoint_path = out / CHECKPOINT_NAME
    checkpoint = ctx.from_main(lambda: open_checkpoint(args))  # rank 0 reads it and hands it to the others

    init_from = getattr(args, "init_from", None)
    source = read_init_source(init_from) if init_from is not None and checkpoint is None else None
    if init_from is not None and checkpoint is not None:
        print(f"resume: the weights come from {checkpoint_path} (--init-from only starts a run)")
    settings = resolve_settings(args, checkpoint, source[1] if source else None)
    _validate(args, settings)
    ctx.check_batch(settings["batch"], PriorError)
    try:
        arch = _architecture(settings)
    except ValueError as exc:
        raise PriorError(f"nsdd-train prior: {exc} (check --size/--pad-to and --channel-mults)") from exc
    initial_weights = load_folded_weights(init_from, source[0], arch) if source else None
    provenance = source[2] if source else (checkpoint or {}).get("init_from")
    schedule = default_schedule(settings["num_train_timesteps"], settings["beta_start"], settings["beta_end"])
    alphas_cumprod = alphas_cumprod_from_schedule(schedule)
    device = ctx.device
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")

    # data (every process reads the images; each uses its rows of every global batch)
    progress = not args.no_progress and ctx.is_main
    root, files = find_image_files(args.images)
    images, used, skipped = load_images(files, settings["size"], settings["channels"], progress)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob(".*.tmp"), *out.glob("samples/.*.tmp")] if ctx.is_main else []:  # left by a kill
        stale.unlink(missing_ok=True)
    if skipped and ctx.is_main:
        print(f"skipped {len(skipped)} unreadable image(s) (list in {out / 'skipped_images.json'}):", file=sys.stderr)
        for name, reason in skipped[:20]:
            print(f"  {name}: {reason}", file=sys.stderr)
        if len(skipped) > 20:
            print(f"  ... and {len(skipped) - 20} more", file=sys.stderr)
        atomic_write_json(out / "skipped_images.json", [{"file": n, "reason": r} for n, r in skipped])
    digest = _image_set_digest(root, used)
    n_images = len(used)
    print(f"{n_images} training images from {root} at {settings['size']} px"
          + (f", padded to {settings['pad_to']} px" if settings["pad_to"] else ""))

    # model, EMA, optimiser (initialisation seeded)
    seed = int(settings["seed"])
    torch.manual_seed(seed)
    model = UNet(arch).to(device)
    if initial_weights is not None:
        model.load_state_dict(initial_weights)
        print(f"initialised from {provenance['path']} ({provenance['channels']} → {arch.in_channels} channels)")
    ema = UNet(arch).to(device)
    ema.load_state_dict(model.state_dict())
    ema.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    generator = torch.Generator(device=device).manual_seed(seed)  # noise is drawn on the training device
    step, position = 0, 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, position = int(checkpoint["step"]), int(checkpoint["position"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        try:
            generator.set_state(checkpoint["rng"]["generator"])
        except (RuntimeError, ValueError):  # the checkpoint was written on another kind of device
            print(f"resume: the noise generator state is from another device; continuing with a fresh "
                  f"{device.type} stream seeded by (seed, step)", file=sys.stderr)
            generator.manual_seed(seed * 1_000_003 + step)
        if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
        if checkpoint.get("images", {}).get("digest") != digest:
            print(f"resume: the image set changed since the checkpoint ({checkpoint['images'].get('count')} -> "
                  f"{n_images} images): the data order differs from the original run", file=sys.stderr)
        print(f"resumed from {checkpoint_path} at step {step}")
    ctx.seed_local_rng(seed, step)  # data parallel: each process its own dropout masks
    ddp_model = ctx.wrap(model)  # forward/backward through DDP (gradient all-reduce); `model` is the weights
    if device.type == "cuda":  # keep the (float16) scenes on the GPU: no host copy per step
        images = torch.from_numpy(images).to(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    print(f"UNet: {model.num_parameters:,} parameters, input {arch.in_channels}x{arch.image_size}x{arch.image_size}, "
          f"device {device}{' (bf16 autocast)' if use_bf16 else ''}")
    if ctx.enabled:
        print(f"data parallel: {ctx.world_size} processes ({ctx.backend}), global batch {settings['batch']} = "
              f"{ctx.world_size} x {settings['batch'] // ctx.world_size}")
    abar = alphas_cumprod.to(device=device, dtype=torch.float32)
    ema_prior = DiffusionPrior(ema, alphas_cumprod, image_size=arch.image_size, channels=arch.out_channels,
                               config={"scheduler": schedule}).to(device)

    def rng_state() -> dict:
        return {"torch": torch.get_rng_state(), "generator": generator.get_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}

    def write_checkpoint(samples: bool) -> None:
        if not ctx.is_main:  # one checkpoint, written by rank 0 (every rank holds the same state)
            return
        _save_checkpoint(checkpoint_path, {
            "format": CHECKPOINT_FORMAT, "step": step, "position": position,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "ema": {k: v.detach().cpu() for k, v in ema.state_dict().items()},
            "optimizer": optimizer.state_dict(), "rng": rng_state(), "settings": settings,
            "images": {"root": str(root), "count": n_images, "digest": digest}, "init_from": provenance,
        })
        save_prior(ema, out, schedule=schedule,
                   dtype=torch.float16 if args.save_dtype == "float16" else torch.float32,
                   extra={"step": step, "images": str(root), "num_images": n_images, "scene_size": settings["size"],
                          "pad_to": settings["pad_to"], "settings": settings,
                          **({"init_from": provenance} if provenance else {}),
                          **({"data_parallel": ctx.describe()} if ctx.enabled else {})})
        if samples and args.sample_count > 0:
            path = out / "samples" / f"step_{step:07d}.png"
            sample_steps = min(args.sample_steps, ema_prior.num_train_timesteps)
            started = time.monotonic()
            say(f"prior: step {step}: drawing {args.sample_count} sample images ({sample_steps} DDIM steps, "
                f"{-(-args.sample_count // 16) * sample_steps} network calls) for {path} …")
            grid = ddim_sample(ema_prior, args.sample_count, steps=sample_steps, seed=args.sample_seed,
                               batch_size=16, device=device)
            save_png(path, image_grid(grid))
            say(f"prior: samples written in {time.monotonic() - started:.1f} s")

    if step >= args.steps:
        print(f"already trained to step {step} (--steps {args.steps}); nothing to do")
        if not (out / "model.safetensors").exists():
            write_checkpoint(samples=True)
        return 0

    # Ctrl-C / SIGTERM: finish the current step, write a checkpoint, exit (a second Ctrl-C aborts at once;
    # the last checkpoint on disk is then still intact because every write is atomic).
    stop = {"signal": None}
    previous_handlers = {}

    def request_stop(signum, frame):
        if stop["signal"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous_handlers[sig] = signal.signal(sig, request_stop)
        except ValueError:  # not the main thread: default behaviour
            pass

    log_path = out / "train_log.jsonl"
    if log_path.exists() and ctx.is_main:  # drop entries past the checkpoint: those steps are about to be redone
        lines = log_path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        if len(kept) != len(lines):
            atomic_write_bytes(log_path, "".join(line + "\n" for line in kept).encode())
    batch = settings["batch"]
    last_step = args.steps if args.max_steps_this_run is None else min(args.steps, step + args.max_steps_this_run)
    losses: list[float] = []
    running = None
    model.train()
    bar = tqdm(total=args.steps, initial=step, desc="prior", disable=not progress, dynamic_ncols=True)
    estimate = TimeEstimate("prior", args.steps, "step")
    written_at = step
    time_limit = getattr(args, "time_limit", None)
    deadline = time.monotonic() + 60.0 * time_limit if time_limit else None
    timed_out = False
    lr = settings["lr"]
    try:
        while step < last_step:
            # a signal or the deadline seen by any process stops every process at this step
            signalled, timed_out = ctx.any(stop["signal"] is not None,
                                           deadline is not None and time.monotonic() >= deadline)
            if signalled:
                stop["signal"] = stop["signal"] or "a signal to another process"
                break
            if timed_out:
                if losses and ctx.is_main:  # log the steps since the last entry
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"step": step, "loss": float(np.mean(losses)), "lr": lr,
                                            "time": time.time()}) + "\n")
                break
            index = batch_indices(position, batch, n_images, seed)  # the global batch; this process's rows
            x0 = make_batch(images, ctx.local(index), settings["pad_to"])
            lr = settings["lr"] * min(1.0, (step + 1) / max(1, settings["warmup"]))
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = diffusion_loss(ddp_model, x0, abar, generator, use_bf16,
                                  **({"rows": ctx.rows(batch), "global_batch": batch} if ctx.enabled else {}))
            mean_loss = ctx.mean(loss.detach())  # the global batch's loss (the same on every process)
            if not torch.isfinite(mean_loss):
                raise PriorError(f"loss became {mean_loss.item()} at step {step + 1}; lower --lr "
                                 f"(last good checkpoint: {checkpoint_path})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings["grad_clip"])
            optimizer.step()
            ema_update(ema, model, ema_decay(settings["ema"], step))
            step += 1
            position += batch

            value = float(mean_loss.item())
            losses.append(value)
            running = value if running is None else 0.98 * running + 0.02 * value
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.2e}")
            estimate.update(step)
            if step % args.log_every == 0 or step == last_step:
                if ctx.is_main:  # rank 0 logs (the loss is already the global batch's)
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"step": step, "loss": float(np.mean(losses)), "lr": lr,
                                            "time": time.time()}) + "\n")
                losses = []
            if step % args.checkpoint_every == 0 or step == args.steps:
                write_checkpoint(samples=True)
                written_at = step
    except KeyboardInterrupt:
        print(f"aborted at step {step}; resume from the last checkpoint ({written_at}) in {checkpoint_path}",
              file=sys.stderr)
        return 130
    finally:
        bar.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    if written_at != step:
        write_checkpoint(samples=stop["signal"] is None)
    if stop["signal"] is not None:
        print(f"stopped by {stop['signal']} at step {step}; checkpoint in {checkpoint_path} (run again to resume)")
        return 130
    if timed_out:
        print(f"paused at step {step}/{args.steps} (--time-limit {time_limit:g} min); run the same command "
              "again to continue")
    elif step < args.steps:
        print(f"paused at step {step}/{args.steps} (--max-steps-this-run); run the same command again to continue")
    else:
        print(f"done: {step} steps; prior in {out} (load with train.prior.io.load_prior)")
    return 0
