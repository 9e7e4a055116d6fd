"""DPS (Chung et al., ICLR 2023): DDPM ancestral sampling with a measurement-gradient step.

Per step ``t → t'`` on the prior's schedule (uniformly respaced when ``steps < T``:
``β_t = 1 − ᾱ_t/ᾱ_{t'}``), in the prior space [−1, 1] with ``y' = 2y − A·1``:

- ``x̂0 = clip((x_t − √(1−ᾱ_t) ε_θ(x_t, t)) / √ᾱ_t, −1, 1)``
- ``x'_{t'} = μ̃(x_t, x̂0) + σ_t z`` with ``μ̃ = √ᾱ_{t'} β_t/(1−ᾱ_t) x̂0 + √(1−β_t)(1−ᾱ_{t'})/(1−ᾱ_t) x_t``;
  ``σ_t² = β̃_t = (1−ᾱ_{t'})/(1−ᾱ_t) β_t`` for an ε-only prior, or, for a prior that learns its variance
  (guided-diffusion ``learned_range``, as the DPS reference runs the ADM FFHQ model),
  ``log σ_t² = f log β_t + (1 − f) log β̃_t`` with the network's ``f = (v + 1)/2``; no noise at the last step
  (where guided-diffusion's clipped log-variance is never used either).
- ``x_{t'} = x'_{t'} − ζ ∇_{x_t} ‖y' − A x̂0(x_t)‖`` (the norm, not squared; one norm per sample, the
  gradient flows through the network).

Timesteps are guided-diffusion's respacing (:func:`respaced_timesteps`): the first step is ``t = T − 1``.
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
    respaced_timesteps,
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
        self._timesteps = respaced_timesteps(prior.num_train_timesteps, self.steps)  # descending, from T − 1
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
        posterior = [self._posterior_variance(prior, ts, k) for k in range(len(ts))]
        calls = 0
        for k in tqdm(range(len(ts)), desc="dps", disable=not self.progress, leave=False):
            t = ts[k]
            t_prev = ts[k + 1] if k + 1 < len(ts) else -1
            ab_t, ab_prev = alpha_bar(prior, t), alpha_bar(prior, t_prev)
            beta_t = 1.0 - ab_t / ab_prev
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                eps, frac = prior.eps_and_variance(x_in, t)
                eps = eps.to(y.dtype)
                calls += 1
                x0 = ((x_in - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)).clamp(-1, 1)
                norms = (y_m - physics.A(x0)).flatten(1).norm(dim=1)
                (grad,) = torch.autograd.grad(norms.sum(), x_in)
            with torch.no_grad():
                x0 = x0.detach()
                mean = (math.sqrt(ab_prev) * beta_t / (1 - ab_t)) * x0 + (
                    math.sqrt(1 - beta_t) * (1 - ab_prev) / (1 - ab_t)) * x.detach()
                x = mean - self.zeta * grad
                if t_prev >= 0:  # no noise at the last step
                    if frac is None:
                        std = math.sqrt(posterior[k])
                    else:  # learned_range: log σ² = f log β_t + (1 − f) log β̃_t (β̃ > 0 before the last step)
                        f = frac.detach().to(y.dtype)
                        std = (0.5 * (f * math.log(beta_t) + (1 - f) * math.log(posterior[k]))).exp()
                    x = x + std * randn_per_sample(gens, shape, y)
        self.nfe = calls
        return from_model_space(x.detach())

    @staticmethod
    def _posterior_variance(prior: DiffusionPrior, ts: Sequence[int], k: int) -> float:
        """``β̃ = (1−ᾱ_{t'})/(1−ᾱ_t) β_t`` of step ``k`` of the respaced chain (0 at the last step)."""
        t, t_prev = ts[k], (ts[k + 1] if k + 1 < len(ts) else -1)
        ab_t, ab_prev = alpha_bar(prior, t), alpha_bar(prior, t_prev)
        return (1 - ab_prev) / (1 - ab_t) * (1.0 - ab_t / ab_prev)
