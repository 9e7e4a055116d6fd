"""Speed of the diffusion-prior UNet: parameters, seconds per training step, seconds per ε call.

    python bench/bench_prior.py [--threads 2] [--repeats 3] [--configs small,medium] [--device cpu]

Training step = flips + noising + forward + MSE + backward + grad clip + AdamW + EMA (the code
``nsdd-train prior`` runs), at 64 px, batch 16. ε call = one no-grad forward at 64 and 128 px,
batch 1 and 8. Median of ``--repeats`` timed runs after one warm-up, as wall seconds and as CPU seconds
(process time summed over threads: less sensitive to other jobs on a shared machine). Prints markdown tables.
"""

from __future__ import annotations

import argparse

import torch

from nsdd_edge.timing import time_calls
from train.prior.base import linear_alphas_cumprod
from train.prior.train_prior import diffusion_loss, ema_decay, ema_update
from train.prior.unet import UNet

CONFIGS = {
    "tiny": {"base_channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_resolutions": [32]},
    "small": {"base_channels": 32, "channel_mults": [1, 2, 2], "num_res_blocks": 1, "attention_resolutions": [16]},
    "medium": {"base_channels": 64, "channel_mults": [1, 2, 2, 2], "num_res_blocks": 2,
               "attention_resolutions": [16]},
}


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall seconds and median CPU seconds (this process, all threads) of ``fn()`` after a warm-up."""
    t = time_calls(fn, repeats)
    return t.median_ms / 1e3, t.cpu_median_ms / 1e3


def training_step(model, ema, optimizer, x0, abar, generator, use_bf16: bool, sync):
    """One ``nsdd-train prior`` step: loss, backward, clip, AdamW, EMA."""
    def step():
        loss = diffusion_loss(model, x0, abar, generator, use_bf16=use_bf16)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema_update(ema, model, ema_decay(0.999, 100))
        sync()
    return step


def eps_call(net, x, t, sync):
    def call():
        with torch.no_grad():
            net(x, t)
        sync()
    return call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--configs", default="small,medium")
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-batch", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    print(f"device {device}, torch threads {torch.get_num_threads()}, median of {args.repeats} after 1 warm-up\n")

    print(f"| config | parameters | wall s / train step (64 px, batch {args.train_batch}) | CPU s / train step |")
    print("|---|---:|---:|---:|")
    abar = linear_alphas_cumprod().to(device)
    for name in names:
        torch.manual_seed(0)
        model = UNet(image_size=64, **CONFIGS[name]).to(device).train()
        ema = UNet(image_size=64, **CONFIGS[name]).to(device).eval().requires_grad_(False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        generator = torch.Generator().manual_seed(0)
        x0 = torch.rand(args.train_batch, 3, 64, 64) * 2 - 1

        step = training_step(model, ema, optimizer, x0, abar, generator, device.type == "cuda", sync)
        wall, cpu = timed(step, args.repeats)
        print(f"| {name} | {model.num_parameters:,} | {wall:.3f} | {cpu:.3f} |", flush=True)

    print("\n| config | size | batch | wall s / ε call | CPU s / ε call |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        torch.manual_seed(0)
        net = UNet(image_size=64, **CONFIGS[name]).to(device).eval()
        for size in (64, 128):
            for batch in (1, 8):
                x = torch.randn(batch, 3, size, size, device=device)
                t = torch.full((batch,), 500, device=device)

                wall, cpu = timed(eps_call(net, x, t, sync), args.repeats)
                print(f"| {name} | {size} | {batch} | {wall:.4f} | {cpu:.4f} |", flush=True)


if __name__ == "__main__":
    main()
