"""Distillation over a range of PSF scales: a student that stays valid as the scene's depth changes.

A radial mask's PSF scales with depth (:mod:`nsdd_edge.psf_warp`). ``nsdd-train distill --psf-scale-range LO HI``
draws a scale ``s`` per sample (log-uniform in ``[LO, HI]``, on a grid of 0.5% steps so operators are reused),
simulates that sample's measurement from its teacher label ``T`` (a clean-image estimate; no ground truth) through
the dataset's forward model with the PSF scaled by ``s``,

    y_s = clip(C F⁻¹[H_s F(P x)] + n, 0, 1),   x = clip(T, 0, 1) on the forward model's scene grid,
    H_s from warp_psf(pad(h), s),  n ~ N(0, σ²), σ the dataset's noise level

(``nsdd-train simulate``'s physics with ``T`` as the scene; on a crop geometry the PSF is zero-padded to the
convolution grid first so a magnified PSF keeps its light), and trains on ``(y_s, A_s†y_s)`` with the null-space
objective under ``A_s``: ``A_s`` is the dataset's reconstruction operator of ``warp_psf(h, s)`` (the PSF's own box,
as the runtime's live refocus computes its spectra). The student is conditioned on the operator only through
``A_s†y``. ``LO = HI = 1`` is the same pipeline for one PSF (the baseline the study compares with).

Deterministic and resumable: the scales and the noise of step ``k`` depend only on ``(seed, k, sample row)``.
:class:`OperatorBatch` applies each sample's own operator, so :class:`train.students.Student` and the distillation
loss work unchanged.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from nsdd_edge.psf_warp import PsfWarp, psf_at_scale, warp_psf
from train.data import LenslessDataset
from train.distill_data import DistillError, TargetSet
from train.physics import LenslessOperator, fit_to_grid

SCALE_STEP = 1.005  # scales are drawn on a geometric grid of 0.5% steps (operators are cached per grid point)
MIN_SCALE, MAX_SCALE = 0.25, 4.0


def check_scale_range(scale_range: Sequence[float]) -> tuple[float, float]:
    """``(lo, hi)`` with ``MIN_SCALE ≤ lo ≤ hi ≤ MAX_SCALE``, else :class:`DistillError`."""
    try:
        lo, hi = (float(v) for v in scale_range)
    except (TypeError, ValueError):
        raise DistillError(f"--psf-scale-range: expected two numbers LO HI, got {scale_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and MIN_SCALE <= lo <= hi <= MAX_SCALE):
        raise DistillError(f"--psf-scale-range {lo:g} {hi:g}: need {MIN_SCALE} ≤ LO ≤ HI ≤ {MAX_SCALE}")
    return lo, hi


def grid_scale(scale: float) -> float:
    """``scale`` rounded to the nearest point of the 0.5% geometric grid (exactly 1.0 stays 1.0)."""
    step = math.log(SCALE_STEP)
    return float(math.exp(round(math.log(scale) / step) * step))


class OperatorBatch:
    """Per-sample operators acting on a batch, with the parts of :class:`LenslessOperator` a student and the
    distillation loss use (``A``, ``A_dagger``, ``null_project``, ``consistency``, the grids). Samples that share
    an operator are applied together."""

    def __init__(self, operators: Sequence[LenslessOperator]):
        if not operators:
            raise DistillError("an operator batch needs at least one operator")
        self.operators = list(operators)
        first = self.operators[0]
        self.geometry = first.geometry
        self.scene_shape, self.sensor_shape = first.scene_shape, first.sensor_shape
        self.lam, self.projector, self.channels = first.lam, first.projector, first.channels
        groups: dict[int, list[int]] = {}
        for i, op in enumerate(self.operators):
            groups.setdefault(id(op), []).append(i)
        self._groups = [(self.operators[rows[0]], rows) for rows in groups.values()]

    def _apply(self, t: torch.Tensor, method: str) -> torch.Tensor:
        if len(t) != len(self.operators):
            raise DistillError(f"operator batch of {len(self.operators)} applied to a batch of {len(t)}")
        parts: list[torch.Tensor | None] = [None] * len(t)
        for op, rows in self._groups:
            out = getattr(op, method)(t[rows])
            for k, row in enumerate(rows):
                parts[row] = out[k]
        return torch.stack(parts)  # type: ignore[arg-type]

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply(x, "A")

    def A_dagger(self, y: torch.Tensor) -> torch.Tensor:
        return self._apply(y, "A_dagger")

    def null_project(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply(x, "null_project")

    def consistency(self, x_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r = (self.A(x_hat) - y).flatten(1).norm(dim=1)
        return r / y.flatten(1).norm(dim=1).clamp_min(1e-12)

    def to(self, *args, **kwargs) -> OperatorBatch:
        return OperatorBatch([op.to(*args, **kwargs) for op in self.operators])


class ScaleOperators:
    """The reconstruction operator ``A_s`` and the forward operator of scale ``s`` (cached, least recently used
    dropped beyond ``cache``)."""

    def __init__(self, dataset: LenslessDataset, *, model: str | None, lam: float, projector: str,
                 device: torch.device, cache: int = 96):
        self.dataset, self.model, self.lam, self.projector, self.device = dataset, model, lam, projector, device
        self.cache = int(cache)
        self._ops: OrderedDict[float, tuple[LenslessOperator, LenslessOperator]] = OrderedDict()

    def recon_psf(self, scale: float) -> np.ndarray:
        """``warp_psf(h, s)`` on the PSF's own box: what the runtime feeds a spectra-input graph."""
        return warp_psf(self.dataset.psf, PsfWarp(scale))

    def __call__(self, scale: float) -> tuple[LenslessOperator, LenslessOperator]:
        """``(A_s reconstruction operator, forward operator)`` for ``scale``."""
        key = float(scale)
        if key in self._ops:
            self._ops.move_to_end(key)
            return self._ops[key]
        recon = self.dataset.physics(model=self.model, lam=self.lam, projector=self.projector,
                                     psf=self.recon_psf(key)).to(self.device)
        forward = self.dataset.forward_physics(psf=psf_at_scale(self.dataset.psf, self.dataset.forward_geometry,
                                                                 key)).to(self.device)
        self._ops[key] = (recon, forward)
        if len(self._ops) > self.cache:
            self._ops.popitem(last=False)
        return recon, forward


class ScaleRangeData:
    """Batches ``(y_s, target, OperatorBatch)`` for :func:`train.distill` (see the module docstring)."""

    def __init__(self, data: TargetSet, operators: ScaleOperators, scale_range: Sequence[float], *, seed: int,
                 noise_std: float):
        self.data, self.operators = data, operators
        self.lo, self.hi = check_scale_range(scale_range)
        self.seed, self.noise_std = int(seed), float(noise_std)
        self._row = {sample_id: k for k, sample_id in enumerate(data.ids)}
        fwd = operators.dataset.forward_geometry
        self.forward_scene = fwd.scene_shape

    def scales(self, ids: Sequence[str], key: int) -> list[float]:
        """The grid scales of ``ids`` at step ``key`` (log-uniform in the range; a function of seed, key, row)."""
        out = []
        for sample_id in ids:
            u = np.random.default_rng([self.seed, key, self._row[sample_id]]).random()
            out.append(grid_scale(self.lo * (self.hi / self.lo) ** u) if self.hi > self.lo else grid_scale(self.lo))
        return out

    def simulate(self, targets: torch.Tensor, forward: Sequence[LenslessOperator], ids: Sequence[str],
                 key: int) -> torch.Tensor:
        """``clip(A_s x + n, 0, 1)`` with ``x`` the targets clipped to [0, 1] on the forward scene grid."""
        x = fit_to_grid(targets.float().clamp(0.0, 1.0), self.forward_scene)
        ys = []
        for i, (op, sample_id) in enumerate(zip(forward, ids)):
            with torch.no_grad():
                clean = op.A(x[i : i + 1])[0]
            g = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, key, self._row[sample_id], 1])
                                                  .integers(0, 2**62)))
            noise = torch.randn(clean.shape, generator=g, dtype=clean.dtype).to(clean.device)
            ys.append((clean + self.noise_std * noise).clamp(0.0, 1.0))
        return torch.stack(ys)

    def batch(self, ids: Sequence[str], key: int) -> tuple[torch.Tensor, torch.Tensor, OperatorBatch]:
        """``(y_s, targets, per-sample A_s)`` of ``ids`` at step ``key``."""
        _, targets = self.data.batch(ids)
        targets = targets.to(self.operators.device)
        pairs = [self.operators(s) for s in self.scales(ids, key)]
        y = self.simulate(targets, [f for _, f in pairs], ids, key)
        return y, targets, OperatorBatch([r for r, _ in pairs])

    def describe(self) -> dict:
        return {"psf_scale_range": [self.lo, self.hi], "scale_draw": f"log-uniform on a {SCALE_STEP - 1:.1%} grid",
                "measurements": "simulated from the targets (clipped to [0, 1]) through the forward model of the "
                                "scaled PSF, Gaussian noise, clip to [0, 1]", "noise_std": self.noise_std}
