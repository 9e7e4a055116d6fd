"""FISTA for ``min_x ½‖A x − y‖²`` subject to ``x ≥ 0`` (Beck & Teboulle 2009), for either operator model.

    x_{k+1} = max(z_k − Aᵀ(A z_k − y) / L, 0),   t_{k+1} = (1 + √(1 + 4 t_k²)) / 2,
    z_{k+1} = x_{k+1} + (t_k − 1)/t_{k+1} · (x_{k+1} − x_k)

with the step ``1/L``, ``L = max|H|² ≥ ‖A‖²``. Non-negativity is the only prior: on the crop model with the
scene on the whole convolution grid (everything that reaches the sensor through a large PSF) this is the
plain reconstruction that gives clear faces on the full-aperture radial prototype
(``../shared/data/lensless/radial_full``, docs/real-cameras.md). ``x`` starts at 0.
"""

from __future__ import annotations

import math

import torch

from train.physics import LenslessOperator
from train.solvers.base import Solver, register


@register("fista")
class FISTA(Solver):
    """Non-negative least squares by FISTA; ``iters`` iterations (each one ``A`` and one ``Aᵀ``)."""

    def __init__(self, iters: int = 300, nonneg: bool = True, clip: bool = False):
        if int(iters) < 1:
            raise ValueError(f"fista: iters must be ≥ 1, got {iters}")
        self.iters = int(iters)
        self.nonneg = bool(nonneg)
        self.clip = bool(clip)

    @torch.no_grad()
    def __call__(self, y: torch.Tensor, physics: LenslessOperator) -> torch.Tensor:
        physics._check(y, physics.sensor_shape, "measurement y")
        lipschitz = float(physics.singular_values(y).max()) ** 2
        x = torch.zeros(y.shape[:-2] + tuple(physics.scene_shape), dtype=y.dtype, device=y.device)
        z, t = x, 1.0
        for _ in range(self.iters):
            x_next = z - physics.A_adjoint(physics.A(z) - y) / lipschitz
            if self.nonneg:
                x_next = x_next.clamp_min(0)
            t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
            z = x_next + ((t - 1.0) / t_next) * (x_next - x)
            x, t = x_next, t_next
        return x.clamp(0, 1) if self.clip else x
