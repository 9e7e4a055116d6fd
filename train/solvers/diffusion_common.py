"""Shared pieces of the diffusion solvers (DDNM+, DPS, DiffPIR).

- Measurement mapping: scenes are in [0, 1], priors in [−1, 1]: ``x' = 2x − 1``, hence
  ``y' = A x' = 2y − A·1`` and ``σ_y' = 2σ_y``; outputs are mapped back with ``x = (x' + 1) / 2``.
- Timestep schedules over the prior's training schedule (DDIM uniform, DiffPIR quadratic, RePaint
  time travel) and ``ᾱ_t`` with the convention ``ᾱ_{−1} = 1`` (the step after ``t = 0``).
- Seeded noise per sample: every sample owns a ``torch.Generator`` seeded by its own seed, on the
  solver's device (noise is drawn where it is used, never on the CPU and copied), so x_T and every later
  noise draw of a sample do not depend on which other samples share its batch. Same seeds give the
  same samples on one device; a CPU and a GPU draw different (equally valid) noise.
- Per-frequency multipliers on the scene grid (exact for the circular model, pad → filter → crop on
  the convolution grid for the crop model).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from train.physics import LenslessOperator, center_crop, center_pad
from train.prior.base import DiffusionPrior, prior_for_scene
from train.solvers.base import Solver


# ---- [0, 1] <-> [−1, 1] -------------------------------------------------------------------------
def to_model_space(x01: torch.Tensor) -> torch.Tensor:
    """``x' = 2x − 1``."""
    return 2.0 * x01 - 1.0


def from_model_space(x: torch.Tensor) -> torch.Tensor:
    """``x = (x' + 1) / 2``."""
    return (x + 1.0) / 2.0


def measurement_to_model_space(y: torch.Tensor, physics: LenslessOperator,
                               sigma_y: float = 0.0) -> tuple[torch.Tensor, float]:
    """``(y', σ_y') = (2y − A·1, 2σ_y)``: the measurement of ``x' = 2x − 1`` and its noise level."""
    ones = torch.ones((1, y.shape[1]) + tuple(physics.scene_shape), dtype=y.dtype, device=y.device)
    return 2.0 * y - physics.A(ones), 2.0 * float(sigma_y)


# ---- schedules ----------------------------------------------------------------------------------
def uniform_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """Descending DDIM/DDPM timesteps ``t_k = k · (T/steps)`` (1000/100 → 990, 980, …, 0)."""
    _check_steps(num_train_timesteps, steps)
    skip = num_train_timesteps / steps
    return [int(np.floor(k * skip)) for k in range(steps)][::-1]


def respaced_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """Descending timesteps as guided-diffusion's ``space_timesteps(T, [steps])`` (what the DPS reference uses):
    ``round(k (T−1)/(steps−1))``, so the first step is ``t = T − 1`` for any step count (1000/200 → 999, 994, …, 0)."""
    _check_steps(num_train_timesteps, steps)
    if steps == 1:
        return [num_train_timesteps - 1]
    stride = (num_train_timesteps - 1) / (steps - 1)
    return sorted({int(round(k * stride)) for k in range(steps)}, reverse=True)


def quadratic_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """DiffPIR's 'quad' schedule, descending: ``s_k = ⌊√(k T²/(steps−1))⌋`` (last −1), ``t_k = T−1−s_k``.

    For T = 1000, 100 steps: 999, 899, 858, …, 5, 0 (large jumps at high noise, fine steps near 0).
    """
    _check_steps(num_train_timesteps, steps)
    if steps == 1:
        return [num_train_timesteps - 1]
    s = [int(v) for v in np.sqrt(np.linspace(0, num_train_timesteps ** 2, steps))]
    s[-1] -= 1
    ts = [num_train_timesteps - 1 - v for v in s]
    out: list[int] = []
    for t in ts:  # drop repeats that integer rounding could create for very large step counts
        if not out or t < out[-1]:
            out.append(t)
    return out


def _check_steps(num_train_timesteps: int, steps: int) -> None:
    if not 1 <= int(steps) <= int(num_train_timesteps):
        raise ValueError(f"steps must be in [1, {num_train_timesteps}] (the prior's training steps), got {steps}")


def repaint_schedule(steps: int, travel_length: int = 1, travel_repeat: int = 1) -> list[int]:
    """Step indices for RePaint time travel (as in DDNM's ``get_schedule_jump``), ending with −1.

    Indices run from ``steps − 1`` down to −1; at every index ``j = 0, l, 2l, …`` below ``steps − l``
    the walk jumps back up by ``l`` indices ``r − 1`` times. Forward transitions (next < current) cost
    one network call each: (T=100, l=10, r=3) → 280.
    """
    if travel_length < 1 or travel_repeat < 1:
        raise ValueError(f"travel_length and travel_repeat must be >= 1, got {travel_length}, {travel_repeat}")
    jumps = {j: travel_repeat - 1 for j in range(0, steps - travel_length, travel_length)}
    t = steps
    seq: list[int] = []
    while t >= 1:
        t -= 1
        seq.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(travel_length):
                t += 1
                seq.append(t)
    seq.append(-1)
    return seq


def network_calls(schedule: Sequence[int]) -> int:
    """Forward transitions of a step-index walk (each costs one ε_θ call)."""
    return sum(1 for i, j in itertools.pairwise(schedule) if j < i)


def alpha_bar(prior: DiffusionPrior, t: int) -> float:
    """``ᾱ_t`` of the prior's training schedule, with ``ᾱ_{−1} = 1``."""
    return 1.0 if t < 0 else float(prior.alphas_cumprod[int(t)])


# ---- seeds and noise ----------------------------------------------------------------------------
def sample_seeds(n: int, seed: int = 0, seeds: Sequence[int] | None = None) -> list[int]:
    """Per-sample seeds: the given list, or ``seed + i`` for sample ``i`` of the batch."""
    if seeds is not None:
        seeds = [int(s) for s in seeds]
        if len(seeds) != n:
            raise ValueError(f"got {len(seeds)} per-sample seeds for a batch of {n} measurements")
        return seeds
    return [int(seed) + i for i in range(n)]


def make_generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per sample, on ``device`` (the device the noise is used on)."""
    return [torch.Generator(device=torch.device(device)).manual_seed(int(s)) for s in seeds]


def randn_per_sample(generators: Sequence[torch.Generator], shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """``(N, *shape)`` standard normal noise, row ``i`` drawn from generator ``i`` (batch-independent), drawn on
    the generators' device (the solver's) and cast to ``like``'s dtype."""
    rows = [torch.randn(tuple(shape), generator=g, dtype=torch.float32, device=g.device) for g in generators]
    return torch.stack(rows).to(device=like.device, dtype=like.dtype)


# ---- checks and Fourier multipliers -------------------------------------------------------------
def check_inputs(y: torch.Tensor, physics: LenslessOperator, prior: DiffusionPrior) -> None:
    if y.ndim != 4:
        raise ValueError(f"measurements must be a batch (N, C, H, W), got shape {tuple(y.shape)}")
    if y.shape[1] != prior.channels:
        raise ValueError(f"measurements have {y.shape[1]} channels but the prior generates {prior.channels}")
    if physics.channels not in (1, y.shape[1]):
        raise ValueError(f"PSF has {physics.channels} channels; measurements have {y.shape[1]}")


def fourier_multiply(x: torch.Tensor, multiplier: torch.Tensor, physics: LenslessOperator) -> torch.Tensor:
    """``F⁻¹[M · F(x)]`` for a real multiplier or complex spectrum ``M`` on the rfft half grid.

    ``circular``: exact on the scene grid. ``crop``: ``Pᵀ F⁻¹[M · F(P x)]`` on the convolution grid
    (an approximation of a per-singular-value scaling, since the crop operator has no Fourier SVD).
    """
    padded = center_pad(x, physics.conv_shape)
    X = torch.fft.rfft2(padded, dim=(-2, -1))
    out = torch.fft.irfft2(X * multiplier, s=physics.conv_shape, dim=(-2, -1))
    return center_crop(out, physics.scene_shape)


def wiener_half_spectrum(physics: LenslessOperator, like: torch.Tensor) -> torch.Tensor:
    """``G = conj(H)/(|H|²+λ)`` on the rfft half grid, from the operator's (single) Wiener spectra."""
    G = torch.from_numpy(np.ascontiguousarray(physics.spectra.half("G")))
    return G.to(device=like.device, dtype=torch.complex128 if like.dtype == torch.float64 else torch.complex64)


class DiffusionSolver(Solver):
    """What DDNM+, DPS and DiffPIR share: the prior, the number of steps and per-sample seeds.

    ``seed`` / ``seeds``: x_T and all noise of sample ``i`` come from ``seed + i`` (or ``seeds[i]``), so a
    sample's result does not depend on the batch it is in.
    """

    def __init__(self, prior: DiffusionPrior, steps: int, seed: int = 0, seeds: Sequence[int] | None = None,
                 progress: bool = False):
        self._prior = prior
        self.steps = int(steps)
        self.seed = int(seed)
        self.seeds = list(seeds) if seeds is not None else None
        self.progress = bool(progress)

    @property
    def prior(self) -> DiffusionPrior:
        return self._prior

    def _prepare(self, y: torch.Tensor, physics: LenslessOperator, seeds: Sequence[int] | None
                 ) -> tuple[torch.Tensor, list[torch.Generator], tuple[int, ...], DiffusionPrior]:
        """Check the inputs; return ``y`` as float32, one generator per sample, the ``(C, *scene)`` shape and
        the prior for that scene (:func:`~train.prior.base.prior_for_scene`: a prior of smaller images works
        on their centred support, the rest of the scene known black)."""
        check_inputs(y, physics, self._prior)
        y = y.to(torch.float32)
        gens = make_generators(sample_seeds(y.shape[0], self.seed, seeds if seeds is not None else self.seeds),
                               y.device)
        prior = prior_for_scene(self._prior, tuple(physics.scene_shape))
        return y, gens, (y.shape[1],) + tuple(physics.scene_shape), prior
