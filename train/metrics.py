"""Image-quality and physics metrics on batches ``(N, C, H, W)`` (torch; scenes in [0, 1]).

- PSNR with data range 1: ``10 log10(1 / MSE)`` per image.
- SSIM (Wang, Bovik, Sheikh, Simoncelli 2004) with an 11×11 Gaussian window, σ = 1.5,
  ``C1 = (0.01)²``, ``C2 = (0.03)²``, computed on the valid window positions per channel and averaged:
  ``SSIM = mean[(2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2))]``.
- LPIPS-Alex v0.1: :mod:`train.lpips`.
- Measurement consistency ``‖A x̂ − y‖ / ‖y‖``: :meth:`train.physics.LenslessOperator.consistency`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from train.physics import LenslessOperator

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_pair(x: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{what}: shapes differ: {tuple(x.shape)} vs {tuple(ref.shape)}")
    if x.ndim != 4:
        raise ValueError(f"{what}: expected batches (N, C, H, W), got shape {tuple(x.shape)}")


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """``10 log10(data_range² / mean((x − ref)²))`` per image, shape ``(N,)`` (``inf`` if identical)."""
    _check_pair(x, ref, "PSNR")
    mse = (x.double() - ref.double()).pow(2).flatten(1).mean(dim=1)
    return (10 * torch.log10(data_range ** 2 / mse)).to(torch.float32)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Normalised 2-D Gaussian ``w(i, j) ∝ exp(−(i² + j²) / 2σ²)`` on a ``size × size`` grid, sums to 1."""
    r = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_map(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0, window: int = SSIM_WINDOW,
             sigma: float = SSIM_SIGMA, k1: float = SSIM_K1, k2: float = SSIM_K2) -> torch.Tensor:
    """Local SSIM at every valid window position, shape ``(N, C, H − window + 1, W − window + 1)``."""
    _check_pair(x, ref, "SSIM")
    if min(x.shape[-2:]) < window:
        raise ValueError(f"SSIM: images of size {tuple(x.shape[-2:])} are smaller than the {window}x{window} window")
    c = x.shape[1]
    x, ref = x.double(), ref.double()
    w = gaussian_window(window, sigma).to(x.device).expand(c, 1, window, window)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=c)

    mu_x, mu_y = blur(x), blur(ref)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(ref * ref) - mu_y ** 2
    cov = blur(x * ref) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM per image (each channel's map averaged, then the channels), shape ``(N,)``."""
    return ssim_map(x, ref, data_range).mean(dim=(1, 2, 3)).to(torch.float32)


def consistency(x_hat: torch.Tensor, y: torch.Tensor, physics: LenslessOperator) -> torch.Tensor:
    """Measurement consistency ``‖A x̂ − y‖ / ‖y‖`` per sample (the operator's own ``A``)."""
    return physics.consistency(x_hat.to(y.dtype), y)


def lpips(x: torch.Tensor, ref: torch.Tensor, weights: str | os.PathLike | None = None,
          batch_size: int = 8) -> torch.Tensor:
    """LPIPS-Alex v0.1 distance per image of images in [0, 1], shape ``(N,)`` (see :mod:`train.lpips`)."""
    from train.lpips import get_lpips

    _check_pair(x, ref, "LPIPS")
    model = get_lpips(weights, x.device)
    out = []
    with torch.no_grad():
        for k in range(0, x.shape[0], batch_size):
            out.append(model(x[k : k + batch_size].float(), ref[k : k + batch_size].float()).cpu())
    return torch.cat(out)
