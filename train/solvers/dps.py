"""DPS (Chung et al., ICLR 2023): DDPM ancestral sampling with a measurement-gradient step.

Per step ``t → t'`` on the prior's schedule (uniformly respaced when ``steps < T``:
``β_t = 1 − ᾱ_t/ᾱ_{t'}``), in the prior space [−1, 1] with ``y' = 2y − A·1``:

- ``x̂0 = clip((x_t − √(1−ᾱ_t) ε_θ(x_t, t)) / √ᾱ_t, −1, 1)``
- ``x'_{t'} = μ̃(x_t, x̂0) + σ̃_t z`` with ``μ̃ = √ᾱ_{t'} β_t/(1−ᾱ_t) x̂0 + √(1−β_t)(1−ᾱ_{t'})/(1−ᾱ_t) x_t``,
  ``σ̃_t² = (1−ᾱ_{t'})/(1−ᾱ_t) β_t``
- ``x_{t'} = x'_{t'} − ζ ∇_{x_t} ‖y' − A x̂0(x_t)‖`` (the norm, not squared; one norm per sample, the
  gradient flows through the network).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from train.physics import LenslessOperator
from train.prior.base import DiffusionPrior
from train.solvers.base import register
from train.solvers.diffusion_common import (
    DiffusionSolver,
    alpha_bar,
    from_model_space,
    measurement_to_model_space,
    randn_per_sample,
    uniform_timesteps,
)


@register("dps")
class DPS(DiffusionSolver):
    """Diffusion posterior sampling; ``zeta`` is the step on the gradient of ``‖y − A x̂0‖``."""

    def __init__(self, prior: DiffusionPrior, steps: int = 1000, zeta: float = 0.3, seed: int = 0,
                 seeds: Sequence[int] | None = None, progress: bool = False):
        if zeta < 0:
            raise ValueError(f"zeta must be >= 0, got {zeta}")
        super().__init__(prior, steps, seed, seeds, progress)
        self.zeta = float(zeta)
        self._timesteps = uniform_timesteps(prior.num_train_timesteps, self.steps)  # descending
        self.nfe = len(self._timesteps)
        #: the starting point x_T mapped to [0, 1] (diagnostics; set by each call)
        self.last_start: torch.Tensor | None = None

    def __call__(self, y: torch.Tensor, physics: LenslessOperator,
                 seeds: Sequence[int] | None = None) -> torch.Tensor:
        y, gens, shape, prior = self._prepare(y, physics, seeds)
        y_m, _ = measurement_to_model_space(y, physics)
        x = randn_per_sample(gens, shape, y)
        self.last_start = from_model_space(x)
        ts = self._timesteps
        calls = 0
        for k in tqdm(range(len(ts)), desc="dps", disable=not self.progress, leave=False):
            t = ts[k]
            t_prev = ts[k + 1] if k + 1 < len(ts) else -1
            ab_t, ab_prev = alpha_bar(prior, t), alpha_bar(prior, t_prev)
            beta_t = 1.0 - ab_t / ab_prev
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                eps = prior.eps(x_in, t).to(y.dtype)
                calls += 1
                x0 = ((x_in - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)).clamp(-1, 1)
                norms = (y_m - physics.A(x0)).flatten(1).norm(dim=1)
                (grad,) = torch.autograd.grad(norms.sum(), x_in)
            with torch.no_grad():
                x0 = x0.detach()
                mean = (math.sqrt(ab_prev) * beta_t / (1 - ab_t)) * x0 + (
                    math.sqrt(1 - beta_t) * (1 - ab_prev) / (1 - ab_t)) * x.detach()
                var = (1 - ab_prev) / (1 - ab_t) * beta_t
                x = mean - self.zeta * grad
                if var > 0:
                    x = x + math.sqrt(var) * randn_per_sample(gens, shape, y)
        self.nfe = calls
        return from_model_space(x.detach())
