"""ADMM with total variation and non-negativity in the DiffuserCam splitting (Antipa et al. 2018).

Problem, on the convolution grid (``x`` there, ``P`` the zero-padding of the scene)::

    min_x ½‖C H x − y‖² + τ ‖Ψ x‖₁ + ι_{x ≥ 0, supp x ⊆ scene}(x)

with ``C`` the centre crop to the sensor (identity for the circular model), ``H`` the convolution by
the PSF and ``Ψ`` circular forward differences (anisotropic TV). Splitting ``v = H x``, ``u = Ψ x``,
``w = x`` with scaled duals ``ξ, η, ρ``; every step is closed form::

    u ← soft(Ψx + η/μ₂, τ/μ₂)
    v ← (CᵀC + μ₁)⁻¹ (ξ + μ₁ H x + Cᵀ y)
    w ← 𝟙_scene · max(x + ρ/μ₃, 0)
    x ← F⁻¹[ F(μ₃ w − ρ + Ψᵀ(μ₂ u − η) + Hᵀ(μ₁ v − ξ)) / (μ₁|H|² + μ₂|Ψ|² + μ₃) ]
    ξ += μ₁(Hx − v);  η += μ₂(Ψx − u);  ρ += μ₃(x − w)

The spectra are the operator's (``physics._spec('H')``). ``μ₂, μ₃`` are given relative to ``max|H|²``
and ``τ`` relative to ``max|H| · mean|y|`` (``tau_scale="data"``, the default) so the settings depend neither
on how the PSF is normalised nor on the measurement's intensity scale: the data term grows with the square
of y's scale and the TV term linearly, so a fixed τ over-smooths dim data and under-smooths bright data
(``tau_scale="fixed"``: relative to ``max|H|`` only, the earlier convention). The DiffuserCam tutorial's
values (μ₁ ~ 1e-6, μ₂ ~ 1e-5, μ₃ ~ 4e-5, τ ~ 1e-4) are for an L2-normalised PSF, whose max|H| is in the
hundreds; the defaults here (μ₁ = 1, μ₂ = μ₃ = 1e-2, τ = 4.6e-4 · mean|y|, 100 iterations) reproduce the
earlier fixed τ = 2e-4 on the real DiffuserCam hand at ×8 (mean|y| = 0.43, docs/diffusercam.md) and give the
dimmer simulated radial-PSF faces (mean|y| ≈ 0.13) a 3.3× smaller τ, where the fixed value made small-PSF
reconstructions blocky.
For the circular model ``C`` is the identity; when the scene grid is smaller than the convolution grid,
the non-negativity step also zeroes ``w`` outside the scene (support constraint).
"""

from __future__ import annotations

import torch

from train.physics import LenslessOperator, center_crop, center_pad
from train.solvers.base import Solver, register


def _tv_spectrum(shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """``|Ψ|² = (2 − 2cos 2πk_y/H) + (2 − 2cos 2πk_x/W)`` on the rfft2 half grid of ``shape``."""
    h, w = shape
    ky = torch.arange(h, dtype=like.dtype, device=like.device)[:, None]
    kx = torch.arange(w // 2 + 1, dtype=like.dtype, device=like.device)[None, :]
    return (2 - 2 * torch.cos(2 * torch.pi * ky / h)) + (2 - 2 * torch.cos(2 * torch.pi * kx / w))


def _grad(x: torch.Tensor) -> torch.Tensor:
    """``Ψx``: circular forward differences, stacked on a new axis ``-3`` (rows, columns)."""
    return torch.stack((x - torch.roll(x, 1, dims=-2), x - torch.roll(x, 1, dims=-1)), dim=-3)


def _grad_adjoint(u: torch.Tensor) -> torch.Tensor:
    """``Ψᵀu`` for :func:`_grad`."""
    dr, dc = u.unbind(dim=-3)
    return (dr - torch.roll(dr, -1, dims=-2)) + (dc - torch.roll(dc, -1, dims=-1))


@register("admm")
class ADMM(Solver):
    """TV + non-negativity ADMM (DiffuserCam splitting), crop-aware, batched, per-channel PSFs."""

    def __init__(self, iters: int = 100, mu1: float = 1.0, mu2: float = 1e-2, mu3: float = 1e-2,
                 tau: float = 4.6e-4, nonneg: bool = True, clip: bool = False, tau_scale: str = "data"):
        if int(iters) < 1:
            raise ValueError(f"admm: iters must be ≥ 1, got {iters}")
        for key, val in (("mu1", mu1), ("mu2", mu2), ("mu3", mu3)):
            if not float(val) > 0:
                raise ValueError(f"admm: {key} must be > 0, got {val}")
        if float(tau) < 0:
            raise ValueError(f"admm: tau must be ≥ 0, got {tau}")
        self.iters = int(iters)
        self.mu1, self.mu2, self.mu3, self.tau = float(mu1), float(mu2), float(mu3), float(tau)
        self.nonneg = bool(nonneg)
        self.clip = bool(clip)
        if tau_scale not in ("data", "fixed"):
            raise ValueError(f"admm: tau_scale must be 'data' or 'fixed', got {tau_scale!r}")
        self.tau_scale = tau_scale

    @torch.no_grad()
    def __call__(self, y: torch.Tensor, physics: LenslessOperator) -> torch.Tensor:
        physics._check(y, physics.sensor_shape, "measurement y")
        conv = physics.conv_shape
        dims = (-2, -1)
        H = physics._spec("H", y)  # (C_psf, Hc, Wc//2+1)
        scale = float(physics._spec("S", y).max())
        mu1, mu2, mu3 = self.mu1, self.mu2 * scale**2, self.mu3 * scale**2
        tau = self.tau * scale
        if self.tau_scale == "data":  # per sample: τ · max|H| · mean|y|
            tau = tau * y.abs().mean(dim=(-3, -2, -1), keepdim=True).unsqueeze(-3)
        denom = mu1 * H.abs() ** 2 + mu2 * _tv_spectrum(conv, y) + mu3

        def conv_H(x: torch.Tensor, conj: bool = False) -> torch.Tensor:
            return torch.fft.irfft2(torch.fft.rfft2(x, dim=dims) * (H.conj() if conj else H), s=conv, dim=dims)

        ones_sensor = torch.ones((1,) * (y.ndim - 2) + tuple(physics.sensor_shape), dtype=y.dtype, device=y.device)
        crop_mask = center_pad(ones_sensor, conv)  # CᵀC
        ones_scene = torch.ones((1,) * (y.ndim - 2) + tuple(physics.scene_shape), dtype=y.dtype, device=y.device)
        support = center_pad(ones_scene, conv)  # 𝟙_scene (all ones when scene = conv)
        Cty = center_pad(y, conv)

        batch = y.shape[:-2]
        x = torch.zeros(batch + conv, dtype=y.dtype, device=y.device)
        xi = torch.zeros_like(x)
        rho = torch.zeros_like(x)
        eta = torch.zeros(batch + (2,) + conv, dtype=y.dtype, device=y.device)
        Hx = conv_H(x)
        Psix = _grad(x)
        for _ in range(self.iters):
            z = Psix + eta / mu2
            u = torch.sign(z) * (z.abs() - tau / mu2).clamp_min(0)
            v = (xi + mu1 * Hx + Cty) / (crop_mask + mu1)
            w = x + rho / mu3
            if self.nonneg:
                w = w.clamp_min(0)
            w = w * support
            r = (mu3 * w - rho) + _grad_adjoint(mu2 * u - eta) + conv_H(mu1 * v - xi, conj=True)
            x = torch.fft.irfft2(torch.fft.rfft2(r, dim=dims) / denom, s=conv, dim=dims)
            Hx = conv_H(x)
            Psix = _grad(x)
            xi = xi + mu1 * (Hx - v)
            eta = eta + mu2 * (Psix - u)
            rho = rho + mu3 * (x - w)
        # the constrained variable w is the feasible iterate (≥ 0, zero outside the scene)
        out = center_crop(w, physics.scene_shape)
        return out.clamp(0, 1) if self.clip else out
