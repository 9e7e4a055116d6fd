"""PSNR / SSIM / consistency: a direct numpy reference of Wang et al.'s formula and sanity values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from train.metrics import consistency, gaussian_window, psnr, ssim, ssim_map
from train.physics import LenslessOperator


def ssim_reference(x: np.ndarray, y: np.ndarray, size: int = 11, sigma: float = 1.5,
                   k1: float = 0.01, k2: float = 0.03, data_range: float = 1.0) -> float:
    """Wang et al. 2004, window by window: Gaussian-weighted means, variances, covariance (numpy loops)."""
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma ** 2))
    w = g / g.sum()
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    per_channel = []
    for xc, yc in zip(x, y):
        vals = []
        for i in range(xc.shape[0] - size + 1):
            for j in range(xc.shape[1] - size + 1):
                a = xc[i : i + size, j : j + size]
                b = yc[i : i + size, j : j + size]
                mx, my = (w * a).sum(), (w * b).sum()
                vx = (w * (a - mx) ** 2).sum()
                vy = (w * (b - my) ** 2).sum()
                cxy = (w * (a - mx) * (b - my)).sum()
                vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
        per_channel.append(np.mean(vals))
    return float(np.mean(per_channel))


def test_ssim_matches_direct_numpy_reference():
    rng = np.random.default_rng(1)
    x = rng.random((2, 3, 22, 19))
    # correlated pair: blurred-ish noise on top of x, plus an unrelated image
    y = np.stack([np.clip(x[0] + 0.1 * rng.standard_normal(x[0].shape), 0, 1), rng.random((3, 22, 19))])
    got = ssim(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    want = np.array([ssim_reference(x[k], y[k]) for k in range(2)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert want[0] > want[1]  # the correlated pair is more similar


def test_ssim_sanity_values():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.random((3, 3, 32, 32)))
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-6)
    y = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)).clamp(0, 1)
    z = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)).clamp(0, 1)
    s_y, s_z = ssim(y, x), ssim(z, x)
    assert torch.all(s_y < 1) and torch.all(s_z < s_y)
    assert torch.allclose(ssim(y, x), ssim(x, y), atol=1e-6)  # symmetric
    # a constant image against a constant image: luminance term only, (2ab + C1) / (a² + b² + C1)
    a, b = 0.2, 0.6
    c1 = 0.01 ** 2
    s = ssim(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b))
    assert float(s) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)
    assert ssim_map(x, x).shape == (3, 3, 22, 22)


def test_gaussian_window():
    w = gaussian_window()
    assert w.shape == (11, 11) and float(w.sum()) == pytest.approx(1.0)
    assert float(w[5, 5]) == float(w.max())
    assert float(w[5, 6] / w[5, 5]) == pytest.approx(math.exp(-1 / (2 * 1.5 ** 2)))


def test_psnr_values():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(psnr(x + 0.1, x), torch.full((2,), 20.0), atol=1e-4)  # MSE 0.01 -> 20 dB
    assert torch.allclose(psnr(x + 0.01, x), torch.full((2,), 40.0), atol=1e-4)
    assert torch.isinf(psnr(x, x)).all()
    noisy = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    mse = ((noisy - x) ** 2).flatten(1).mean(1)
    assert torch.allclose(psnr(noisy, x), -10 * torch.log10(mse), atol=1e-4)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(x, x[:, :, :8])


def test_consistency_uses_operator():
    rng = np.random.default_rng(3)
    psf = rng.random((1, 16, 16)).astype(np.float32)
    psf /= psf.sum()
    op = LenslessOperator(psf, (16, 16), "circular", lam=1e-8).double()
    x = torch.from_numpy(rng.random((2, 3, 16, 16)))
    y = op.A(x)
    assert torch.allclose(consistency(x, y, op), torch.zeros(2, dtype=x.dtype), atol=1e-10)
    assert torch.allclose(consistency(torch.zeros_like(x), y, op), torch.ones(2, dtype=x.dtype))
    # a perturbed scene: ‖A(x + d) − y‖ / ‖y‖ = ‖A d‖ / ‖y‖
    d = 0.1 * torch.from_numpy(rng.standard_normal(x.shape))
    want = op.A(d).flatten(1).norm(dim=1) / y.flatten(1).norm(dim=1)
    assert torch.allclose(consistency(x + d, y, op), want, rtol=1e-6)
