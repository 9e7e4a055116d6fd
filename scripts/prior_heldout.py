"""Held-out denoising loss of diffusion priors on a folder of images (no ground truth of any reconstruction).

``‖ε − ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t)‖²`` at t = 50, 250, 500 with fixed noise
(:func:`train.prior.heldout.heldout_denoising_loss`) on every image of ``--images`` (never trained on),
prepared as ``nsdd-train prior`` prepares its data (centre square, ``--channels``, the prior's size).
``--init-from RGB_PRIOR`` also scores the start of an ``nsdd-train prior --init-from`` run: that prior's
weights folded to ``--channels`` (train.prior.init_from), before any training; ``--start-samples PNG`` draws
its sample grid as ``nsdd-train prior`` draws a checkpoint's (16 DDIM samples, 50 steps, seed 0). Writes one
JSON object.

    python3 scripts/prior_heldout.py --images FACES_HELDOUT --channels 1 --init-from RGB_PRIOR \
        --prior GRAY_PRIOR --out heldout.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.prior.base import DiffusionPrior
from train.prior.data import find_image_files, load_images
from train.prior.heldout import heldout_denoising_loss
from train.prior.init_from import load_folded_weights, read_init_source
from train.prior.io import alphas_cumprod_from_schedule, default_schedule, load_prior
from train.prior.sampling import ddim_sample, image_grid, save_png
from train.prior.unet import UNet, UNetConfig


def folded_start(path: Path, channels: int) -> tuple[UNet, torch.Tensor]:
    """The network an ``--init-from path --channels N`` run starts with, and its ᾱ."""
    source, settings, _ = read_init_source(path)
    target = UNetConfig.from_dict({**source.to_dict(), "in_channels": channels, "out_channels": channels})
    net = UNet(target)
    net.load_state_dict(load_folded_weights(path, source, target))
    schedule = default_schedule(settings.get("num_train_timesteps", 1000), settings.get("beta_start", 1e-4),
                                settings.get("beta_end", 0.02))
    return net.eval(), alphas_cumprod_from_schedule(schedule)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=Path, required=True, help="held-out images (never trained on)")
    p.add_argument("--channels", type=int, choices=(1, 3), required=True)
    p.add_argument("--prior", type=Path, action="append", default=[], help="a prior directory (repeatable)")
    p.add_argument("--init-from", type=Path, default=None, help="also score this prior folded to --channels")
    p.add_argument("--start-samples", type=Path, default=None, help="with --init-from: the start's sample grid PNG")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    candidates: dict[str, tuple[torch.nn.Module, torch.Tensor, int]] = {}
    if args.init_from is not None:
        net, abar = folded_start(args.init_from, args.channels)
        candidates[f"{args.init_from} folded to {args.channels} channel(s), untrained"] = (net, abar, net.cfg.image_size)
        if args.start_samples is not None:
            start = DiffusionPrior(net, abar, image_size=net.cfg.image_size, channels=args.channels)
            save_png(args.start_samples, image_grid(ddim_sample(start, 16, steps=50, seed=0)))
            print(f"wrote {args.start_samples}")
    for path in args.prior:
        prior = load_prior(path)
        if prior.channels != args.channels:
            print(f"{path}: a {prior.channels}-channel prior, --channels is {args.channels}", file=sys.stderr)
            return 2
        step = prior.config.get("training", {}).get("step")
        candidates[f"{path} (step {step})"] = (prior.net, prior.alphas_cumprod, prior.image_size)
    if not candidates:
        print("give --prior and/or --init-from", file=sys.stderr)
        return 2
    _, files = find_image_files(args.images)
    result = {"images": str(args.images), "count": len(files), "channels": args.channels, "losses": {}}
    for name, (net, abar, size) in candidates.items():
        images, _, _ = load_images(files, size, args.channels, progress=False)
        x0 = torch.from_numpy(images).float() * 2.0 - 1.0
        result["losses"][name] = heldout_denoising_loss(net, x0, abar.float())
        print(f"{name}: " + ", ".join(f"{k} {v:.5f}" for k, v in result["losses"][name].items()), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
