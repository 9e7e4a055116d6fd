"""Refine the forward model from measurements alone: which warp θ of the calibrated PSF explains the captures?

The criterion needs no ground truth. For a candidate PSF ``h_θ`` (:func:`nsdd_edge.psf_warp.warp_psf`) it
reconstructs each capture with the cheapest prior that still discriminates (non-negativity and the scene's
support), by ``K`` iterations of FISTA on

    x̂_θ = argmin_{x ≥ 0, supp x ⊆ S} ½‖A_θ x − y‖²,

and scores the self-consistency ``c(θ) = mean_i ‖A_θ x̂_θ,i − y_i‖ / ‖y_i‖``. A wrong PSF cannot explain a real
measurement with a non-negative scene on its support, so ``c`` has its minimum at the PSF that made ``y``
(down to the noise floor). ``K`` is fixed and every solve starts at 0, so ``c`` is a deterministic function.

The search is coarse to fine: ``c`` on a geometric grid of scales (the depth), a parabola through the best
three, then rounds of finite-difference Newton steps (a parabola through ``θ ± δ`` per parameter, ``δ`` halving
each round) on scale, shift and rotation. A shift is only identifiable when the scene has a support smaller
than the convolution grid (it otherwise just moves ``x``); on a full-field geometry it is not refined.

The PSF is first zero-padded to a canvas that holds it at the largest scale searched, and the geometry grows
with it, so every candidate is scored on the same unknowns (:func:`search_geometry`). Mono: channels are
averaged (the PSF is shared by all channels, so the channel mean of ``y`` is the measurement of the channel
mean of ``x``). Torch-free: ``nsdd-train refine-psf`` and the runtime's live refocus both use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from nsdd_edge.optics import ForwardModel, LenslessGeometry, OpticsError, check_psf
from nsdd_edge.psf_warp import PsfWarp, psf_on_canvas, warp_psf

PARAMETERS = ("scale", "shift", "rotation")


class RefineError(OpticsError):
    """Bad input to the PSF refinement (no captures, wrong shapes, an empty search range)."""


def nonneg_least_squares(A: ForwardModel, y: np.ndarray, iters: int, weight: np.ndarray | None = None) -> np.ndarray:
    """``argmin_{x ≥ 0} ½‖W(A x − y)‖²`` by ``iters`` FISTA steps from 0 (Beck & Teboulle 2009):
    ``x_{k+1} = max(z_k − Aᵀ W(A z_k − y)/L, 0)``, ``z_{k+1} = x_{k+1} + (t_k − 1)/t_{k+1} (x_{k+1} − x_k)``.
    ``weight`` (0/1, broadcast to ``y``; default all 1) leaves pixels out, e.g. saturated ones."""
    y = np.asarray(y, dtype=np.float32)
    w = np.float32(1.0) if weight is None else np.asarray(weight, dtype=np.float32)
    step = 1.0 / max(A.lipschitz, 1e-30)
    x = np.zeros(y.shape[:-2] + A.geometry.scene_shape, dtype=np.float32)
    z, t = x, 1.0
    for _ in range(int(iters)):
        x_next = np.maximum(z - np.float32(step) * A.adjoint(w * (A(z) - y)), 0.0)
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        z = x_next + np.float32((t - 1.0) / t_next) * (x_next - x)
        x, t = x_next, t_next
    return x


def fft_size(n: int) -> int:
    """The smallest 5-smooth integer ≥ ``n`` (FFTs of such sizes are fast)."""
    m = int(n)
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def search_geometry(psf: np.ndarray, geometry: LenslessGeometry, max_scale: float) -> tuple[np.ndarray, LenslessGeometry]:
    """The PSF zero-padded to a canvas that holds it at ``max_scale`` and the geometry on that canvas.

    ``crop``: the convolution grid becomes ``max(conv, sensor + canvas)``; a full-field scene (scene = conv)
    grows with it, a smaller scene support is kept. ``circular``: the canvas is the sensor grid."""
    psf = check_psf(np.asarray(psf, dtype=np.float32), "PSF")
    if geometry.model == "circular":
        return psf_on_canvas(psf, geometry.sensor_shape), geometry
    side = tuple(int(math.ceil(n * max(max_scale, 1.0) / 2.0) * 2) for n in psf.shape[-2:])
    canvas = (max(side[0], psf.shape[-2]), max(side[1], psf.shape[-1]))
    conv = tuple(max(c, fft_size(s + k)) for c, s, k in zip(geometry.conv_shape, geometry.sensor_shape, canvas))
    scene = conv if geometry.scene_shape == geometry.conv_shape else geometry.scene_shape
    return psf_on_canvas(psf, canvas), LenslessGeometry.make("crop", geometry.sensor_shape, canvas, scene, conv)


def shift_identifiable(geometry: LenslessGeometry) -> bool:
    """A PSF shift differs from a scene shift only if the scene has a support smaller than the convolution grid."""
    return geometry.model == "crop" and geometry.scene_shape != geometry.conv_shape


@dataclass
class Evaluation:
    warp: PsfWarp
    criterion: float
    per_capture: list[float]


@dataclass
class RefineResult:
    """The refined warp, its criterion, the coarse scale curve and every evaluation made (in order)."""

    warp: PsfWarp
    criterion: float
    start_criterion: float
    scale_curve: list[Evaluation]
    evaluations: list[Evaluation] = field(default_factory=list)
    parameters: tuple[str, ...] = PARAMETERS
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        def ev(e: Evaluation) -> dict:
            return {"warp": e.warp.to_dict(), "criterion": e.criterion, "per_capture": e.per_capture}

        return {"warp": self.warp.to_dict(), "criterion": self.criterion, "start_criterion": self.start_criterion,
                "parameters": list(self.parameters), "notes": self.notes,
                "scale_curve": [ev(e) for e in self.scale_curve], "evaluations": [ev(e) for e in self.evaluations]}


class SelfConsistency:
    """``c(θ)`` on a fixed set of captures (see the module docstring), memoised per θ."""

    def __init__(self, psf: np.ndarray, geometry: LenslessGeometry, ys: Sequence[np.ndarray], *, iters: int = 150,
                 max_scale: float = 1.5, excluded: Sequence[np.ndarray | None] | None = None):
        if len(ys) == 0:
            raise RefineError("PSF refinement: no captures")
        if int(iters) < 1:
            raise RefineError(f"PSF refinement: iters must be ≥ 1, got {iters}")
        checked = []
        for i, y in enumerate(ys):
            y = np.asarray(y, dtype=np.float32)
            y = y[None] if y.ndim == 2 else y
            if y.ndim != 3 or tuple(y.shape[-2:]) != geometry.sensor_shape:
                raise RefineError(f"PSF refinement: capture {i} has shape {y.shape}, the sensor grid is "
                                  f"{geometry.sensor_shape}")
            if not np.all(np.isfinite(y)) or not np.any(y):
                raise RefineError(f"PSF refinement: capture {i} is empty or not finite")
            checked.append(y)
        if excluded is not None and len(excluded) != len(ys):
            raise RefineError(f"PSF refinement: {len(excluded)} exclusion masks for {len(ys)} captures")
        # Without exclusions each capture is scored as its channel mean (one FFT per capture). With them, each
        # channel is its own measurement (the PSF is shared) with weight 0 where that channel is excluded: a
        # capture saturated in red keeps its green and blue.
        rows, weights, owner = [], [], []
        for i, y in enumerate(checked):
            e = None if excluded is None else excluded[i]
            if excluded is None or all(m is None for m in excluded):
                rows.append(y.mean(axis=0, keepdims=True))
                weights.append(np.ones_like(rows[-1]))
                owner.append(i)
                continue
            mask = np.zeros(y.shape, bool) if e is None else np.asarray(e, dtype=bool)
            if tuple(mask.shape[-2:]) != geometry.sensor_shape:
                raise RefineError(f"PSF refinement: exclusion mask {i} has shape {mask.shape}, the sensor grid is "
                                  f"{geometry.sensor_shape}")
            mask = np.broadcast_to(mask.reshape((-1,) + geometry.sensor_shape), y.shape)
            if mask.all():
                raise RefineError(f"PSF refinement: capture {i} has no pixel left after the exclusion mask")
            for c in range(y.shape[0]):
                rows.append(y[c : c + 1])
                weights.append((~mask[c : c + 1]).astype(np.float32))
                owner.append(i)
        self.ys = np.stack(rows)
        self.weight = None if all(w.all() for w in weights) else np.stack(weights)
        self.owner = np.asarray(owner)
        self.captures = len(checked)
        p = np.asarray(psf, dtype=np.float32)
        p = p.mean(axis=0, keepdims=True) if p.ndim == 3 and p.shape[0] == 3 else p
        self.psf, self.geometry = search_geometry(p, geometry, max_scale)
        self.iters = int(iters)
        self.evaluations: list[Evaluation] = []
        self._memo: dict[tuple, Evaluation] = {}

    def operator(self, warp: PsfWarp) -> ForwardModel:
        return ForwardModel(warp_psf(self.psf, warp), self.geometry)

    def reconstruct(self, warp: PsfWarp, ys: np.ndarray | None = None, iters: int | None = None,
                    weight: np.ndarray | None = None) -> np.ndarray:
        """``x̂_θ`` of ``ys`` with ``weight`` (default: the criterion's mono captures and their weights)."""
        A = self.operator(warp)
        if ys is None:
            return nonneg_least_squares(A, self.ys, self.iters if iters is None else iters, self.weight)
        return nonneg_least_squares(A, ys, self.iters if iters is None else iters, weight)

    def __call__(self, warp: PsfWarp) -> Evaluation:
        key = (round(warp.scale, 9), round(warp.shift[0], 9), round(warp.shift[1], 9), round(warp.rotation_deg, 9))
        if key not in self._memo:
            A = self.operator(warp)
            x = nonneg_least_squares(A, self.ys, self.iters, self.weight)
            w = np.float32(1.0) if self.weight is None else self.weight
            r2 = np.sum((w * (A(x) - self.ys)) ** 2, axis=(1, 2, 3))
            y2 = np.sum((w * self.ys) ** 2, axis=(1, 2, 3))
            per = np.sqrt(np.bincount(self.owner, r2, self.captures)
                          / np.maximum(np.bincount(self.owner, y2, self.captures), 1e-24))
            e = Evaluation(warp, float(per.mean()), [float(v) for v in per])
            self._memo[key] = e
            self.evaluations.append(e)
        return self._memo[key]


def _parabola_vertex(xs: Sequence[float], fs: Sequence[float]) -> float | None:
    """The vertex of the parabola through three points, or None if it opens downwards."""
    (x0, x1, x2), (f0, f1, f2) = xs, fs
    d = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (f1 - f0) + x1 * (f0 - f2) + x0 * (f2 - f1)) / d
    b = (x2 * x2 * (f0 - f1) + x1 * x1 * (f2 - f0) + x0 * x0 * (f1 - f2)) / d
    return None if a <= 0 else -b / (2 * a)


def _with(warp: PsfWarp, name: str, value: float) -> PsfWarp:
    if name == "scale":
        return PsfWarp(value, warp.shift, warp.rotation_deg)
    if name == "dy":
        return PsfWarp(warp.scale, (value, warp.shift[1]), warp.rotation_deg)
    if name == "dx":
        return PsfWarp(warp.scale, (warp.shift[0], value), warp.rotation_deg)
    return PsfWarp(warp.scale, warp.shift, value)


def _get(warp: PsfWarp, name: str) -> float:
    return {"scale": warp.scale, "dy": warp.shift[0], "dx": warp.shift[1], "rotation": warp.rotation_deg}[name]


def refine_warp(psf: np.ndarray, geometry: LenslessGeometry, ys: Sequence[np.ndarray], *,
                scale_range: tuple[float, float] = (0.8, 1.25), n_scales: int = 10,
                parameters: Sequence[str] = PARAMETERS, iters: int = 150, rounds: int = 3,
                steps: dict | None = None, excluded: Sequence[np.ndarray | None] | None = None,
                start: PsfWarp | None = None,
                progress: Callable[[Evaluation], None] | None = None) -> tuple[RefineResult, SelfConsistency]:
    """Find ``θ`` minimising the self-consistency ``c(θ)`` of ``ys`` (module docstring).

    ``scale_range``/``n_scales``: the coarse geometric grid of scales (include 1.0 in the range to compare with
    the calibration). ``parameters``: any of ``scale``, ``shift``, ``rotation`` to refine after the coarse
    search (``scale`` only: a depth search). ``steps``: the first finite-difference steps (default scale 2%,
    shift 1 px, rotation 1°), halved each of ``rounds`` rounds. ``excluded``: per capture, a boolean mask of
    sensor pixels to leave out of the data term (saturated ones: a clipped pixel is not ``A x``). ``start``: the
    warp the result is compared with and falls back to (default: the calibration, the identity). Every scale tried
    stays within ``scale_range``."""
    lo, hi = (float(v) for v in scale_range)
    if not (0 < lo < hi) or int(n_scales) < 3:
        raise RefineError(f"PSF refinement: need 0 < scale_min < scale_max and ≥ 3 scales, got {scale_range}, "
                          f"{n_scales}")
    unknown = set(parameters) - set(PARAMETERS)
    if unknown:
        raise RefineError(f"PSF refinement: unknown parameter(s) {sorted(unknown)}; use {', '.join(PARAMETERS)}")
    crit = SelfConsistency(psf, geometry, ys, iters=iters, max_scale=hi * 1.1, excluded=excluded)
    notes = []

    def evaluate(w: PsfWarp) -> Evaluation:
        n = len(crit.evaluations)
        e = crit(w)
        if progress is not None and len(crit.evaluations) > n:
            progress(e)
        return e

    start = evaluate(start or PsfWarp())
    grid = np.exp(np.linspace(math.log(lo), math.log(hi), int(n_scales)))
    curve = [evaluate(PsfWarp(float(s))) for s in grid]
    k = int(np.argmin([e.criterion for e in curve]))
    best = curve[k]
    if 0 < k < len(curve) - 1:  # a parabola in log-scale through the best three
        v = _parabola_vertex([math.log(curve[j].warp.scale) for j in (k - 1, k, k + 1)],
                             [curve[j].criterion for j in (k - 1, k, k + 1)])
        if v is not None:
            e = evaluate(PsfWarp(float(math.exp(v))))
            best = e if e.criterion < best.criterion else best
    else:
        notes.append(f"the best scale {best.warp.scale:.3f} is at the edge of the searched range {lo}–{hi}")
    if best.criterion > start.criterion:
        best = start

    names: list[str] = []
    if "scale" in parameters:
        names.append("scale")
    if "shift" in parameters:
        if shift_identifiable(crit.geometry):
            names += ["dy", "dx"]
        else:
            notes.append("shift not refined: on a full-field geometry a PSF shift only moves the scene")
    if "rotation" in parameters:
        names.append("rotation")
    step = {"scale": 0.02, "dy": 1.0, "dx": 1.0, "rotation": 1.0}
    if steps:
        step.update({("dy" if k == "shift" else k): float(v) for k, v in steps.items()})
        if "shift" in steps:
            step["dx"] = step["dy"]
    for _ in range(int(rounds)):
        for name in names:
            d = step[name] * (best.warp.scale if name == "scale" else 1.0)
            c = _get(best.warp, name)
            low, high = (lo, hi) if name == "scale" else (-math.inf, math.inf)  # scales stay in the searched range
            if name == "scale" and not low < c < high:
                continue  # the fallback to ``start`` outside the range: nothing to refine inside it
            minus = evaluate(_with(best.warp, name, max(c - d, low)))
            plus = evaluate(_with(best.warp, name, min(c + d, high)))
            candidates = [minus, plus]
            xs = [_get(minus.warp, name), c, _get(plus.warp, name)]
            v = _parabola_vertex(xs, [minus.criterion, best.criterion, plus.criterion]) if len(set(xs)) == 3 else None
            if v is not None:
                v = float(np.clip(v, max(c - 2 * d, low), min(c + 2 * d, high)))
                candidates.append(evaluate(_with(best.warp, name, v)))
            for e in candidates:
                if e.criterion < best.criterion:
                    best = e
        step = {k: v / 2 for k, v in step.items()}
    result = RefineResult(best.warp, best.criterion, start.criterion, curve, list(crit.evaluations),
                          tuple(parameters), notes)
    return result, crit
