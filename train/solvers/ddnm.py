"""DDNM / DDNM+ (Wang, Yu, Zhang, ICLR 2023): DDIM sampling with range–null-space replacement.

Per step ``t → t'`` (``a = √ᾱ_{t'}``, ``σ_t = √(1 − ᾱ_{t'})``, prior space [−1, 1]):

- ``x0|t = (x_t − √(1−ᾱ_t) ε_θ(x_t, t)) / √ᾱ_t``
- noise-free (``σ_y = 0``): ``x̂0 = x0|t − A†(A x0|t − y) = A†y + (I − A†A) x0|t`` and the DDIM update
  ``x_{t'} = a x̂0 + σ_t η z + σ_t √(1−η²) ε_θ``.
- noisy (DDNM+, ``σ_y > 0``): ``x̂0 = x0|t − Σ_t A†(A x0|t − y)`` with, per singular value ``s_i = |H(f)|``,
  ``λ_{t,i} = 1`` if ``σ_t ≥ a σ_y / s_i`` else ``s_i σ_t √(1−η²) / (a σ_y)``; re-noising per component:
  ``σ_t > aσ_y/s_i`` → ``√(σ_t² − a²σ_y²/s_i²) z``; otherwise ``σ_t η z``; null space → ``σ_t η z + σ_t √(1−η²) ε_θ``.
  For the circular model the SVD is the Fourier basis, so Σ_t and the noise are per-frequency
  multipliers on the rfft half grid.

Choices (documented, not in the paper):

- A† is the operator's Wiener/Tikhonov pseudo-inverse ``conj(H)/(|H|²+λ)``, which acts as an SVD
  truncated near ``s² ≈ λ``. Frequencies with ``s_i < null_cutoff`` (default ``√λ``, i.e. ``A†A < ½``)
  are treated as the null space (``s_i ≈ 0``): ``λ_{t,i} = 0`` and plain DDIM noise.
- ``crop`` model: the replacement uses the operator's ``A`` and ``A_dagger`` (approximate pseudo-inverse);
  the DDNM+ scaling uses the same per-frequency rules with ``|H|`` of the convolution grid, applied as
  ``Pᵀ F⁻¹[Λ G F(Cᵀ r)]`` and noise filtered on the convolution grid then cropped — an approximation,
  since the cropped operator's singular vectors are not Fourier modes.
- Time travel re-noises the last *corrected* estimate ``x̂0`` to the earlier time
  (``√ᾱ_j x̂0 + √(1−ᾱ_j) z``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from train.physics import LenslessOperator, center_crop
from train.prior.base import DiffusionPrior
from train.solvers.base import register
from train.solvers.diffusion_common import (
    DiffusionSolver,
    alpha_bar,
    fourier_multiply,
    from_model_space,
    measurement_to_model_space,
    network_calls,
    randn_per_sample,
    repaint_schedule,
    uniform_timesteps,
    wiener_half_spectrum,
)


@register("ddnm")
class DDNM(DiffusionSolver):
    """DDNM (noise-free) / DDNM+ (``σ_y > 0``) with optional RePaint time travel; see the module docstring.

    ``sigma_y``: measurement noise std in [0, 1] units (default: the operator's ``noise_std``).
    ``seed`` / ``seeds``: x_T and all noise of sample ``i`` come from ``seed + i`` (or ``seeds[i]``).
    """

    def __init__(self, prior: DiffusionPrior, steps: int = 100, eta: float = 0.85, sigma_y: float | None = None,
                 travel_length: int = 1, travel_repeat: int = 1, seed: int = 0, seeds: Sequence[int] | None = None,
                 null_cutoff: float | None = None, clip_x0: bool = False, progress: bool = False):
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        if sigma_y is not None and sigma_y < 0:
            raise ValueError(f"sigma_y must be >= 0, got {sigma_y}")
        super().__init__(prior, steps, seed, seeds, progress)
        self.eta = float(eta)
        self.sigma_y = sigma_y
        self.travel_length = int(travel_length)
        self.travel_repeat = int(travel_repeat)
        self.null_cutoff = null_cutoff
        self.clip_x0 = bool(clip_x0)
        self._timesteps = uniform_timesteps(prior.num_train_timesteps, self.steps)[::-1]  # ascending
        self._schedule = repaint_schedule(self.steps, self.travel_length, self.travel_repeat)
        self.nfe = network_calls(self._schedule)

    def _t(self, index: int) -> int:
        return -1 if index < 0 else self._timesteps[index]

    @torch.no_grad()
    def __call__(self, y: torch.Tensor, physics: LenslessOperator,
                 seeds: Sequence[int] | None = None) -> torch.Tensor:
        y, gens, shape, prior = self._prepare(y, physics, seeds)
        sigma = physics.noise_std if self.sigma_y is None else float(self.sigma_y)
        y_m, sigma_m = measurement_to_model_space(y, physics, sigma)
        x = randn_per_sample(gens, shape, y)
        # DDNM+'s per-frequency scaling assumes Fourier singular vectors; the cg pseudo-inverse regularises by
        # stopping early instead, so it takes the noise-free replacement
        spectral = self._spectral_setup(physics, y) if sigma_m > 0 and physics.projector != "cg" else None

        x0_hat = x
        calls = 0
        pairs = list(zip(self._schedule[:-1], self._schedule[1:]))
        for i, j in tqdm(pairs, desc="ddnm", disable=not self.progress, leave=False):
            t, t_next = self._t(i), self._t(j)
            ab_next = alpha_bar(prior, t_next)
            if j > i:  # time travel: re-noise the last corrected estimate at the earlier time
                x = math.sqrt(ab_next) * x0_hat + math.sqrt(1 - ab_next) * randn_per_sample(gens, shape, y)
                continue
            ab_t = alpha_bar(prior, t)
            eps = prior.eps(x, t).to(y.dtype)
            calls += 1
            x0 = (x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
            if self.clip_x0:
                x0 = x0.clamp(-1, 1)
            a, sigma_t = math.sqrt(ab_next), math.sqrt(1 - ab_next)
            if spectral is None:  # DDNM: range-null replacement + DDIM
                x0_hat = x0 - physics.A_dagger(physics.A(x0) - y_m)
                z = randn_per_sample(gens, shape, y)
                x = a * x0_hat + sigma_t * self.eta * z + sigma_t * math.sqrt(1 - self.eta ** 2) * eps
            else:
                x0_hat, x = self._ddnm_plus_step(x0, eps, y_m, physics, spectral, a, sigma_t, sigma_m, gens, shape[0])
        self.nfe = calls
        return from_model_space(x)

    # ---- DDNM+ ----------------------------------------------------------------------------------
    def _spectral_setup(self, physics: LenslessOperator, like: torch.Tensor) -> dict:
        s = physics.singular_values(like)
        cutoff = math.sqrt(physics.lam) if self.null_cutoff is None else float(self.null_cutoff)
        return {"s": s, "null": s < cutoff, "G": wiener_half_spectrum(physics, like)}

    def _ddnm_plus_step(self, x0: torch.Tensor, eps: torch.Tensor, y_m: torch.Tensor, physics: LenslessOperator,
                        spectral: dict, a: float, sigma_t: float, sigma_y: float,
                        gens: list[torch.Generator], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDNM+ step with per-frequency ``Σ_t`` and per-component re-noising (module docstring)."""
        s, null, G = spectral["s"], spectral["null"], spectral["G"]
        eta = self.eta
        root = math.sqrt(1 - eta ** 2)
        s_safe = s.clamp_min(torch.finfo(s.dtype).tiny)
        full = (s * sigma_t >= a * sigma_y) & ~null  # σ_t ≥ a σ_y / s_i
        lam_t = torch.where(full, torch.ones_like(s), s * sigma_t * root / (a * sigma_y))
        lam_t = torch.where(null, torch.zeros_like(s), lam_t)
        residual = physics.A(x0) - y_m
        if physics.model == "circular":
            correction = torch.fft.irfft2(torch.fft.rfft2(residual, dim=(-2, -1)) * (lam_t * G),
                                          s=physics.conv_shape, dim=(-2, -1))
        else:  # Pᵀ F⁻¹[Λ G F(Cᵀ r)] on the convolution grid (approximation; see the module docstring)
            correction = fourier_multiply(residual, lam_t * G, physics)
        x0_hat = x0 - correction
        above = (s * sigma_t > a * sigma_y) & ~null  # σ_t > a σ_y / s_i
        m_z = torch.where(above, (sigma_t ** 2 - (a * sigma_y / s_safe) ** 2).clamp_min(0).sqrt(),
                          torch.full_like(s, sigma_t * eta))
        m_eps = torch.where(null, torch.full_like(s, sigma_t * root), torch.zeros_like(s))
        if physics.model == "circular":
            z = randn_per_sample(gens, (channels,) + tuple(physics.scene_shape), x0)
            Z = torch.fft.rfft2(z, dim=(-2, -1))
            E = torch.fft.rfft2(eps, dim=(-2, -1))
            noise = torch.fft.irfft2(Z * m_z + E * m_eps, s=physics.conv_shape, dim=(-2, -1))
        else:  # white noise on the convolution grid, filtered, then cropped to the scene
            z = randn_per_sample(gens, (channels,) + tuple(physics.conv_shape), x0)
            z_f = torch.fft.irfft2(torch.fft.rfft2(z, dim=(-2, -1)) * m_z, s=physics.conv_shape, dim=(-2, -1))
            noise = center_crop(z_f, physics.scene_shape) + fourier_multiply(eps, m_eps.to(eps.dtype), physics)
        return x0_hat, a * x0_hat + noise
