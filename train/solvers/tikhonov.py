"""Tikhonov by conjugate gradient: ``x̂ = argmin_x ‖A x − y‖² + λ ‖x‖²``, i.e. ``(AᵀA + λ I) x = Aᵀ y``.

For the circular model this is the Wiener filter (closed form, ``conj(H)/(|H|² + λ)``). For the crop model
(``y = C F⁻¹[H F(P x)]``, a sensor smaller than the convolution grid) the operator's own ``A†`` zero-pads ``y``
to the grid before deconvolving: it treats the light that falls outside the sensor as zero. Where the PSF is
larger than the sensor (the full-aperture radial prototype, docs/real-cameras.md) that approximation is what
turns real captures into streaks; conjugate gradient on the normal equations solves the crop model itself,
``iters`` iterations of one ``A`` and one ``Aᵀ`` each, started at 0 (the operator's conjugate gradient, shared
with ``prox_l2`` and the ``cg`` pseudo-inverse). ``lam``: default the operator's λ.
"""

from __future__ import annotations

import torch

from train.physics import LenslessOperator
from train.solvers.base import Solver, register


@register("tikhonov")
class TikhonovCG(Solver):
    """``(AᵀA + λ I) x = Aᵀ y`` by ``iters`` conjugate-gradient iterations (exact for the circular model)."""

    def __init__(self, iters: int = 50, lam: float | None = None, clip: bool = False):
        if int(iters) < 1:
            raise ValueError(f"tikhonov: iters must be ≥ 1, got {iters}")
        if lam is not None and not (float(lam) > 0 and float(lam) < float("inf")):
            raise ValueError(f"tikhonov: λ must be finite and > 0, got {lam}")
        self.iters = int(iters)
        self.lam = None if lam is None else float(lam)
        self.clip = bool(clip)

    @torch.no_grad()
    def __call__(self, y: torch.Tensor, physics: LenslessOperator) -> torch.Tensor:
        physics._check(y, physics.sensor_shape, "measurement y")
        lam = physics.lam if self.lam is None else self.lam
        if physics.model == "circular":  # the closed form (prox at z = 0)
            x = physics.prox_l2(torch.zeros_like(y), y, lam)
        else:
            x = physics.normal_cg(physics.A_adjoint(y), lam, self.iters)
        return x.clamp(0, 1) if self.clip else x
