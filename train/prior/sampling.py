"""Unconditional DDIM sampling from a :class:`DiffusionPrior` and sample-grid PNGs (for looking at a prior).

DDIM (Song et al. 2021) on the timesteps ``t_i = i·⌊T/S⌋`` (S steps, e.g. 980, 960, …, 0 for S = 50)::

    x0|t   = clip((x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t, −1, 1)
    σ_t    = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev)
    x_prev = √ᾱ_prev x0|t + √(1−ᾱ_prev−σ_t²) ε̂ + σ_t z            (ᾱ_prev = 1 after t = 0)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from train.prior.base import DiffusionPrior


def ddim_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """Descending DDIM timesteps ``[(S−1)·k, …, k, 0]`` with ``k = ⌊T/S⌋``."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"DDIM steps must be in [1, {num_train_timesteps}] (got {steps})")
    stride = num_train_timesteps // steps
    return [i * stride for i in reversed(range(steps))]


@torch.no_grad()
def ddim_sample(prior: DiffusionPrior, num_samples: int, steps: int = 50, eta: float = 0.0,
                seed: int = 0, image_size: int | None = None, batch_size: int = 16,
                device: str | torch.device | None = None, progress: bool = False) -> torch.Tensor:
    """Draw ``num_samples`` images ``(N, C, S, S)`` in [−1, 1] with a fixed ``seed`` (see module docstring)."""
    device = torch.device(device) if device is not None else prior.alphas_cumprod.device
    size = int(image_size or prior.image_size)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    abar = prior.alphas_cumprod.to(device=device, dtype=torch.float64)
    timesteps = ddim_timesteps(prior.num_train_timesteps, steps)
    param = next(iter(prior.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    chunks = []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        x = torch.randn((n, prior.channels, size, size), generator=generator).to(device)
        iterator = range(len(timesteps))
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc="DDIM", leave=False)
        for i in iterator:
            t = timesteps[i]
            a_t = abar[t]
            a_prev = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.ones((), dtype=torch.float64,
                                                                                      device=device)
            eps = prior.eps(x.to(dtype), t).to(torch.float32)
            x0 = ((x - (1 - a_t).sqrt().float() * eps) / a_t.sqrt().float()).clamp(-1, 1)
            sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
            direction = (1 - a_prev - sigma ** 2).clamp(min=0).sqrt()
            x = a_prev.sqrt().float() * x0 + direction.float() * eps
            if eta > 0 and i + 1 < len(timesteps):
                x = x + sigma.float() * torch.randn(x.shape, generator=generator).to(device)
        chunks.append(x.clamp(-1, 1).cpu())
    return torch.cat(chunks)


def image_grid(images: torch.Tensor | np.ndarray, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images in [−1, 1] into one ``(rows·(H+p)+p, cols·(W+p)+p, 3)`` uint8 RGB array."""
    images = torch.as_tensor(images).detach().float().cpu()
    if images.ndim != 4:
        raise ValueError(f"image_grid expects (N, C, H, W), got {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n, _, h, w = images.shape
    cols = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, 3), np.uint8)
    pixels = ((images[:, :3].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for k in range(n):
        r, c = divmod(k, cols)
        y0, x0 = padding + r * (h + padding), padding + c * (w + padding)
        grid[y0:y0 + h, x0:x0 + w] = pixels[k]
    return grid


def save_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an RGB uint8 array as PNG atomically."""
    import cv2

    from nsdd_edge.atomic import atomic_write_bytes

    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    atomic_write_bytes(Path(path), encoded.tobytes())
    return Path(path)
