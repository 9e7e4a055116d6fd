"""Wiener/Tikhonov reconstruction: ``x̂ = A†y`` (the operator's own pseudo-inverse, one implementation)."""

from __future__ import annotations

import torch

from train.physics import LenslessOperator
from train.solvers.base import Solver, register


@register("wiener")
class Wiener(Solver):
    """``x̂ = F⁻¹[conj(H) Y / (|H|² + λ)]``, optionally clipped to ``[0, 1]``."""

    def __init__(self, clip: bool = False):
        self.clip = clip

    @torch.no_grad()
    def __call__(self, y: torch.Tensor, physics: LenslessOperator) -> torch.Tensor:
        x = physics.A_dagger(y)
        return x.clamp(0, 1) if self.clip else x
