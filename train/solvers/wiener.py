"""Wiener/Tikhonov reconstruction: ``x̂ = A†y`` (the operator's own pseudo-inverse, one implementation)."""

from __future__ import annotations

import torch

from train.physics import LenslessOperator
from train.solvers.base import Solver, register


@register("wiener")
class Wiener(Solver):
    """``x̂ = F⁻¹[G Y]`` with ``G = conj(H)/(|H|² + λ)`` (or the truncated pseudo-inverse), optionally clipped
    to ``[0, 1]``. ``lam`` / ``projector``: this solver's own λ and kind (default: the operator's)."""

    def __init__(self, clip: bool = False, lam: float | None = None, projector: str | None = None):
        if lam is not None and not (float(lam) > 0 and float(lam) < float("inf")):
            raise ValueError(f"Wiener λ must be finite and > 0, got {lam}")
        self.clip = clip
        self.lam = None if lam is None else float(lam)
        self.projector = projector

    @torch.no_grad()
    def __call__(self, y: torch.Tensor, physics: LenslessOperator) -> torch.Tensor:
        if self.lam is not None or self.projector is not None:
            physics = physics.with_lam(physics.lam if self.lam is None else self.lam, self.projector)
        x = physics.A_dagger(y)
        return x.clamp(0, 1) if self.clip else x
