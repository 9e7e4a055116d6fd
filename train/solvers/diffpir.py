"""DiffPIR (Zhu et al., CVPRW 2023): half-quadratic splitting between the prior and the data term.

Per step ``t → t'`` (quadratic schedule, prior space [−1, 1], ``y' = 2y − A·1``):

- ``x0 = clip((x_t − √(1−ᾱ_t) ε_θ(x_t, t)) / √ᾱ_t, −1, 1)``
- ``σ̄_t = √(1−ᾱ_t)/√ᾱ_t``, ``ρ_t = λ σ_n² / σ̄_t²``
- data step ``x̂0 = argmin ‖A x − y'‖² + ρ_t ‖x − x0‖²`` = ``F⁻¹[(conj(H) Y' + ρ_t X0)/(|H|² + ρ_t)]``
  (:meth:`LenslessOperator.prox_l2`; conjugate gradient for the crop model). The minimiser is the same
  in [0, 1] and [−1, 1] coordinates, so the reference's [0, 1] data step is reproduced exactly.
- ``ε̂ = (x_t − √ᾱ_t x̂0)/√(1−ᾱ_t)``, ``x_{t'} = √ᾱ_{t'} x̂0 + √(1−ζ) √(1−ᾱ_{t'}) ε̂ + √ζ √(1−ᾱ_{t'}) z``.

Choices for lensless data (documented):

- ``σ_n`` is in [0, 1] image units as in the reference (``ρ_t`` mixes it with the [−1, 1] σ̄_t, as the
  reference does). Default: the operator's ``noise_std``, floored at ``sigma_n_floor`` = 1e-3 so ρ_t > 0
  for noise-free data (ρ = 0 would be an unregularised inverse).
- Start: the reference re-noises ``y`` at ``t = 999``; a lensless ``y`` is not an image, so we re-noise
  ``clip(A†y', −1, 1)`` instead: ``x_T = √ᾱ_T clip(A†y') + √(1−ᾱ_T) z``.
- The last step (t = 0) keeps its data step and returns ``x̂0`` (the reference skips it there; with
  ρ_0 large it changes little, and it keeps the output measurement-consistent).
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
    quadratic_timesteps,
    randn_per_sample,
)


@register("diffpir")
class DiffPIR(DiffusionSolver):
    """DiffPIR with the closed-form (circular) or CG (crop) data step; see the module docstring."""

    def __init__(self, prior: DiffusionPrior, steps: int = 100, lam: float = 7.0, zeta: float = 0.3,
                 sigma_n: float | None = None, sigma_n_floor: float = 1e-3, cg_iters: int = 20, seed: int = 0,
                 seeds: Sequence[int] | None = None, progress: bool = False):
        if not 0.0 <= zeta <= 1.0:
            raise ValueError(f"zeta must be in [0, 1], got {zeta}")
        if lam <= 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        super().__init__(prior, steps, seed, seeds, progress)
        self.lam = float(lam)
        self.zeta = float(zeta)
        self.sigma_n = sigma_n
        self.sigma_n_floor = float(sigma_n_floor)
        self.cg_iters = int(cg_iters)
        self._timesteps = quadratic_timesteps(prior.num_train_timesteps, self.steps)  # descending
        self.nfe = len(self._timesteps)
        #: the starting point x_T mapped to [0, 1] (diagnostics; set by each call)
        self.last_start: torch.Tensor | None = None

    def noise_level(self, physics: LenslessOperator) -> float:
        """``σ_n`` in [0, 1] units: the setting, else ``max(noise_std, sigma_n_floor)``."""
        if self.sigma_n is not None:
            return float(self.sigma_n)
        return max(float(physics.noise_std), self.sigma_n_floor)

    @torch.no_grad()
    def __call__(self, y: torch.Tensor, physics: LenslessOperator,
                 seeds: Sequence[int] | None = None) -> torch.Tensor:
        y, gens, shape, prior = self._prepare(y, physics, seeds)
        y_m, _ = measurement_to_model_space(y, physics)
        sigma_n = self.noise_level(physics)
        ts = self._timesteps
        ab_start = alpha_bar(prior, ts[0])
        x = math.sqrt(ab_start) * physics.A_dagger(y_m).clamp(-1, 1) + math.sqrt(1 - ab_start) * randn_per_sample(
            gens, shape, y)
        self.last_start = from_model_space(x)
        calls = 0
        for k in tqdm(range(len(ts)), desc="diffpir", disable=not self.progress, leave=False):
            t = ts[k]
            ab_t = alpha_bar(prior, t)
            eps = prior.eps(x, t).to(y.dtype)
            calls += 1
            x0 = ((x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)).clamp(-1, 1)
            sigma_bar_sq = (1 - ab_t) / ab_t
            rho = self.lam * sigma_n ** 2 / sigma_bar_sq
            x0_hat = physics.prox_l2(x0, y_m, rho, cg_iters=self.cg_iters)
            if k + 1 == len(ts):
                x = x0_hat
                break
            ab_next = alpha_bar(prior, ts[k + 1])
            eps_hat = (x - math.sqrt(ab_t) * x0_hat) / math.sqrt(1 - ab_t)
            z = randn_per_sample(gens, shape, y)
            x = (math.sqrt(ab_next) * x0_hat + math.sqrt(1 - self.zeta) * math.sqrt(1 - ab_next) * eps_hat
                 + math.sqrt(self.zeta) * math.sqrt(1 - ab_next) * z)
        self.nfe = calls
        return from_model_space(x)
