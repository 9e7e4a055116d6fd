"""A ground-truth-free check of a diffusion prior: its denoising loss on held-out scenes at fixed timesteps."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

HELDOUT_TIMESTEPS = (50, 250, 500)


@torch.no_grad()
def heldout_denoising_loss(net: torch.nn.Module, x0: torch.Tensor, alphas_cumprod: torch.Tensor,
                           timesteps: tuple[int, ...] = HELDOUT_TIMESTEPS, seed: int = 0,
                           batch_size: int = 64) -> dict[str, float]:
    """A fixed, ground-truth-free check of a prior: ``‖ε − ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t)‖²`` on held-out scenes
    ``x0`` (in [−1, 1], never trained on) at fixed ``t`` with fixed noise (``seed``, drawn on the CPU so every
    device scores the same problem). Lower is better; comparable across checkpoints of one data set.
    Returns ``{"t50": …, "t250": …, "t500": …, "mean": …}``."""
    device = alphas_cumprod.device
    was_training = net.training
    net.eval()
    out: dict[str, float] = {}
    for t in timesteps:
        g = torch.Generator().manual_seed(int(seed) + int(t))
        total, count = 0.0, 0
        for k in range(0, x0.shape[0], batch_size):
            xb = x0[k:k + batch_size].float()
            noise = torch.randn(tuple(xb.shape), generator=g)
            xb, noise = xb.to(device), noise.to(device)
            a = alphas_cumprod[int(t)].float()
            x_t = a.sqrt() * xb + (1 - a).sqrt() * noise
            pred = net(x_t, torch.full((xb.shape[0],), int(t), device=device, dtype=torch.long))
            pred = pred.sample if hasattr(pred, "sample") else pred
            total += float(F.mse_loss(pred.float(), noise, reduction="sum"))
            count += noise.numel()
        out[f"t{t}"] = total / max(count, 1)
    out["mean"] = float(np.mean([out[f"t{t}"] for t in timesteps]))
    net.train(was_training)
    return out
