"""Live refocus: follow a scene's depth by re-estimating the PSF scale from recent frames and swapping spectra.

A radial mask's PSF scales with depth, so a scene that moves away from the calibration depth sees the calibrated
PSF ``h`` magnified or shrunk: ``h_s`` (:func:`nsdd_edge.psf_warp.warp_psf` with ``PsfWarp(s)``). The
:class:`Refocuser` keeps the last few measurements ``y``; a search (:func:`nsdd_edge.refine.refine_warp` with
``parameters=("scale",)``, cheap settings: mono, few FISTA iterations, a narrow geometric grid centred on the
current scale ``s``, measurements and PSF box-averaged ``downsample``× — a scale is a scale at any resolution)
scores the self-consistency ``c(s') = mean_i ‖A_s' x̂_s',i − y_i‖ / ‖y_i‖`` of a non-negative reconstruction,
and when the best scale improves on the current one,

    c(s*) < (1 − min_gain) · c(s),

the engine gets the spectra of ``h_s*`` (:meth:`nsdd_edge.engines.Engine.set_psf`: computed in the refocus
thread, used from the next frame on; the capture loop is never blocked) and the live consistency gauge
(:class:`ConsistencyGauge`) the forward models of ``s*``. A search that fails is logged and counted; the loop
goes on with the spectra it has.

Threads: :meth:`Refocuser.start` runs the searches in a background thread every ``period_s`` seconds (when new
frames arrived); ``inline=True`` instead runs one search in :meth:`Refocuser.observe` every ``every_frames``
frames, in the caller's thread — deterministic, for tests and ``bench/bench_refocus.py``.

What it reports (``telemetry.section("refocus")`` and :meth:`Refocuser.report`): the current scale, the number of
swaps and searches, failures, the last criterion values and search time, and the last swaps.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np

from nsdd_edge.optics import (
    ForwardModel,
    LenslessGeometry,
    OpticsError,
    box_downsample,
    center_crop,
    fit_to,
)
from nsdd_edge.psf_warp import PsfWarp, psf_at_scale, warp_psf
from nsdd_edge.refine import refine_warp, shift_identifiable


class RefocusError(OpticsError):
    """Refocus cannot run: bad settings, or an engine/bundle whose spectra cannot be swapped."""


def coarse_geometry(geometry: LenslessGeometry, psf_shape: tuple[int, ...], d: int) -> tuple[int, LenslessGeometry]:
    """``(d, geometry with every grid divided by d)`` when all of them (and the PSF box) are divisible by ``d``,
    else ``(1, geometry)``."""
    sides = [*geometry.sensor_shape, *geometry.scene_shape, *geometry.conv_shape, *psf_shape[-2:]]
    if d == 1 or any(n % d or n // d < 4 for n in sides):
        return 1, geometry
    g = geometry
    return d, LenslessGeometry(g.model, (g.sensor_shape[0] // d, g.sensor_shape[1] // d),
                               (g.scene_shape[0] // d, g.scene_shape[1] // d), (g.conv_shape[0] // d, g.conv_shape[1] // d))


SUPPORT_ITERS, FULL_FIELD_ITERS = 30, 150


@dataclass(frozen=True)
class RefocusSettings:
    """``span``: the search covers scales ``s/(1+span) … s·(1+span)`` around the current ``s`` (``n_scales``
    geometric steps, odd so ``s`` itself is one); ``iters`` FISTA iterations per evaluation (None: 30 when the
    scenes have a support smaller than the convolution grid, 150 on a full-field camera, where a 30-iteration
    reconstruction is far from converged and favours the smaller PSF: on the real radial prototype it ran to
    the lower limit; ``docs/refocus.md``); ``rounds``
    finite-difference refinement rounds; ``frames``: how many recent measurements the criterion uses;
    ``period_s``: seconds between searches (thread); ``every_frames``: frames between searches (``inline``);
    ``min_gain``: relative improvement of the criterion a swap needs; ``scale_limits``: never beyond these;
    ``downsample``: the search runs on ``d × d`` box averages of the measurements and the PSF (the geometry's
    grids divided by ``d``; 1 when they are not divisible)."""

    span: float = 0.12
    n_scales: int = 5
    iters: int | None = None
    rounds: int = 1
    frames: int = 2
    period_s: float = 1.0
    every_frames: int = 15
    min_gain: float = 0.01
    scale_limits: tuple[float, float] = (0.5, 2.0)
    downsample: int = 2

    def __post_init__(self):
        lo, hi = self.scale_limits
        checks = [(self.span > 0 and math.isfinite(self.span), f"span must be > 0, got {self.span}"),
                  (self.n_scales >= 3, f"n_scales must be ≥ 3, got {self.n_scales}"),
                  (self.iters is None or self.iters >= 1, f"iters must be ≥ 1, got {self.iters}"),
                  (self.rounds >= 0, f"rounds must be ≥ 0, got {self.rounds}"),
                  (self.frames >= 1, f"frames must be ≥ 1, got {self.frames}"),
                  (self.period_s > 0 and math.isfinite(self.period_s), f"period must be > 0 s, got {self.period_s}"),
                  (self.every_frames >= 1, f"every_frames must be ≥ 1, got {self.every_frames}"),
                  (0 <= self.min_gain < 1, f"min_gain must be in [0, 1), got {self.min_gain}"),
                  (1 <= self.downsample <= 8, f"downsample must be in 1..8, got {self.downsample}"),
                  (0 < lo < 1 < hi and math.isfinite(hi), f"scale limits must satisfy 0 < lo < 1 < hi, got {lo}, {hi}")]
        for ok, message in checks:
            if not ok:
                raise RefocusError(f"refocus: {message}")

    def search_range(self, scale: float) -> tuple[float, float]:
        """The scales searched around ``scale``, clipped to the limits (never narrower than one step)."""
        lo, hi = self.scale_limits
        return max(scale / (1 + self.span), lo), min(scale * (1 + self.span), hi)


@dataclass
class Swap:
    """One refocus: when (seconds since start, frames seen), from which scale to which, criterion before/after."""

    t_s: float
    frames_seen: int
    scale_from: float
    scale_to: float
    criterion_from: float
    criterion_to: float


class ConsistencyGauge:
    """The live consistency of a reconstruction ``x̂`` with its measurement ``y`` under the PSF scaled by ``s``:

    - ``consistency`` = ``‖A_s x̂ − y‖ / ‖y‖`` under the bundle's reconstruction model (issue 12's gauge);
    - ``consistency_support`` (a bundle whose scenes fill a support window ``S``) = ``‖A'_s P_S C_S x̂ − y‖ / ‖y‖``
      under the camera model of its training data (:meth:`~nsdd_edge.bundle.Bundle.sim_geometry`; ``C_S`` keeps
      the window, ``P_S`` pads it into that model's scene grid; the PSF zero-padded to its convolution grid
      before the warp, as ``sim://`` images): ``x̂`` black outside the window, as evaluate's ``forward`` column.
      A wrong PSF shows far more clearly here: ``A†`` can no longer fit ``y`` with light outside the window.

    :meth:`set_scale` builds the new models first, then swaps them in one assignment (another thread may be
    calling the gauge)."""

    def __init__(self, psf: np.ndarray, recon_geometry: LenslessGeometry, *,
                 support_geometry: LenslessGeometry | None = None, support_shape: tuple[int, int] | None = None,
                 scale: float = 1.0):
        self.psf = np.asarray(psf, dtype=np.float32)
        self.recon_geometry, self.support_geometry, self.support_shape = recon_geometry, support_geometry, support_shape
        if (support_geometry is None) != (support_shape is None):
            raise RefocusError("consistency gauge: give the support geometry and the support window together")
        self.set_scale(scale)

    @staticmethod
    def for_bundle(bundle, scale: float = 1.0) -> ConsistencyGauge:
        """The gauge of a :class:`~nsdd_edge.bundle.Bundle` (with the support figure when it has a window)."""
        support = bundle.support_shape
        return ConsistencyGauge(bundle.psf, bundle.geometry, support_geometry=bundle.sim_geometry() if support else None,
                                support_shape=support, scale=scale)

    def set_scale(self, scale: float) -> None:
        recon = ForwardModel(warp_psf(self.psf, PsfWarp(scale)), self.recon_geometry)
        support = None
        if self.support_geometry is not None:
            support = ForwardModel(psf_at_scale(self.psf, self.support_geometry, scale), self.support_geometry)
        self._models = (recon, support)

    def __call__(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        recon, support = self._models  # one read: a swap meanwhile serves the next call
        out = {"consistency": recon.consistency(x, y)}
        if support is not None:
            window = center_crop(x, self.support_shape)  # type: ignore[arg-type]
            out["consistency_support"] = support.consistency(fit_to(window, self.support_geometry.scene_shape), y)
        return out


class Refocuser:
    """See the module docstring. ``psf``: the calibrated PSF (the bundle's); ``search_geometry``: the forward
    model the criterion uses (a bundle's :meth:`~nsdd_edge.bundle.Bundle.sim_geometry`: with a support window
    the scene is known to be black outside it, which sharpens the criterion); ``gauge``: the live consistency
    gauge it keeps at the current scale (:meth:`ConsistencyGauge.for_bundle`); ``engine``: refocusable
    (:attr:`nsdd_edge.engines.Engine.refocusable`)."""

    def __init__(self, psf: np.ndarray, search_geometry: LenslessGeometry, engine,
                 settings: RefocusSettings | None = None, *, gauge: ConsistencyGauge,
                 initial_scale: float = 1.0, inline: bool = False, telemetry=None,
                 log: Callable[[str], None] | None = None):
        if not getattr(engine, "refocusable", False):
            raise RefocusError(f"--refocus: the engine {engine.describe()} holds fixed spectra; export the model with "
                               "nsdd-export onnx --spectra-input (and bundle it), or run --engine wiener")
        self.settings = settings or RefocusSettings()
        lo, hi = self.settings.scale_limits
        if not lo <= initial_scale <= hi:
            raise RefocusError(f"refocus: the initial scale {initial_scale} is outside the limits {lo}–{hi}")
        self.psf = np.asarray(psf, dtype=np.float32)
        self.downsample, self.search_geometry = coarse_geometry(search_geometry, self.psf.shape[-2:],
                                                                self.settings.downsample)
        self._search_psf = box_downsample(self.psf, self.downsample)
        if self.settings.iters is None:  # the default depends on the camera (see RefocusSettings)
            full_field = not shift_identifiable(self.search_geometry)
            self.settings = replace(self.settings, iters=FULL_FIELD_ITERS if full_field else SUPPORT_ITERS)
        self.engine, self.inline, self.telemetry = engine, inline, telemetry
        self.log = log or (lambda message: None)
        self._frames: deque[np.ndarray] = deque(maxlen=self.settings.frames)
        self._lock = threading.Lock()
        self._seen = 0
        self._searched_at = 0  # frames seen at the last search
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.monotonic()
        self.scale = float(initial_scale)
        self.swaps: list[Swap] = []
        self.searches = 0
        self.failures = 0
        self.last_error: str | None = None
        self.last_search_ms: float | None = None
        self.search_ms_total = 0.0
        self.last_criterion: dict[str, float] | None = None
        self.gauge = gauge
        self.gauge.set_scale(self.scale)
        if self.scale != 1.0:
            self.engine.set_psf(warp_psf(self.psf, PsfWarp(self.scale)))
        self._publish()

    # -- the loop's side ---------------------------------------------------------------------------
    def observe(self, y: np.ndarray) -> None:
        """Keep a copy of the measurement ``y`` (C, H, W); ``inline``: search every ``every_frames`` frames."""
        with self._lock:
            self._frames.append(np.array(y, dtype=np.float32, copy=True))
            self._seen += 1
            due = self.inline and self._seen % self.settings.every_frames == 0
        if due:
            self.search_once()

    def consistency(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """The live gauge (:class:`ConsistencyGauge`) under the current scale."""
        return self.gauge(x, y)

    # -- the search ----------------------------------------------------------------------------------
    def search_once(self) -> Swap | None:
        """One search on the frames kept; swaps the spectra when the criterion improves. Never raises for a
        failing search (logged, counted); returns the swap made, if any."""
        with self._lock:
            ys = [box_downsample(y, self.downsample) for y in self._frames]
            self._searched_at = self._seen
        if not ys:
            return None
        s = self.settings
        current = self.scale
        t0 = time.perf_counter()
        try:
            lo, hi = s.search_range(current)
            result, _ = refine_warp(self._search_psf, self.search_geometry, ys, scale_range=(lo, hi),
                                    n_scales=s.n_scales, parameters=("scale",), iters=s.iters, rounds=s.rounds,
                                    start=PsfWarp(current))
            before = result.start_criterion
            best = min(max(result.warp.scale, s.scale_limits[0]), s.scale_limits[1])
            after = result.criterion
            swap = None
            if best != current and after < (1.0 - s.min_gain) * before:
                self.engine.set_psf(warp_psf(self.psf, PsfWarp(best)))  # computed here, used from the next frame
                self.gauge.set_scale(best)
                self.scale = best
                swap = Swap(round(time.monotonic() - self._started, 3), self._searched_at, current, best, before, after)
                self.swaps.append(swap)
                self.log(f"nsdd-edge: refocus: PSF scale {current:.4f} → {best:.4f} (criterion {before:.4g} → "
                         f"{after:.4g} on {len(ys)} frame(s))")
            self.last_criterion = {"current": before, "best": after, "best_scale": best}
            self.last_error = None
        except Exception as exc:  # noqa: BLE001 - a failing search never stops the loop: logged and counted
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.log(f"nsdd-edge: refocus: search failed ({self.last_error}); keeping scale {current:.4f}")
            swap = None
        finally:
            ms = (time.perf_counter() - t0) * 1e3
            self.searches += 1
            self.last_search_ms = ms
            self.search_ms_total += ms
            self._publish()
        return swap

    # -- the background thread -----------------------------------------------------------------------
    def start(self) -> None:
        """Search every ``period_s`` seconds in a daemon thread (only when new frames arrived)."""
        if self.inline:
            raise RefocusError("refocus: an inline refocuser searches in observe(); it has no thread")
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="nsdd-refocus", daemon=True)
            self._thread.start()

    def _main(self) -> None:
        while not self._stop.wait(self.settings.period_s):
            with self._lock:
                fresh = self._seen > self._searched_at
            if fresh:
                self.search_once()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- reporting -----------------------------------------------------------------------------------
    def report(self) -> dict:
        """The figures the stats carry: current scale, swaps, searches, failures, timing, the last swaps."""
        mean = self.search_ms_total / self.searches if self.searches else None
        return {"scale": round(self.scale, 5), "swaps": len(self.swaps), "searches": self.searches,
                "failures": self.failures, "last_error": self.last_error,
                "last_search_ms": None if self.last_search_ms is None else round(self.last_search_ms, 1),
                "mean_search_ms": None if mean is None else round(mean, 1),
                "last_criterion": self.last_criterion, "settings": asdict(self.settings),
                "mode": "inline" if self.inline else "thread", "search_downsample": self.downsample,
                "search_geometry": self.search_geometry.to_dict(),
                "recent_swaps": [asdict(w) for w in self.swaps[-20:]]}

    def _publish(self) -> None:
        if self.telemetry is not None:
            self.telemetry.section("refocus", self.report())
