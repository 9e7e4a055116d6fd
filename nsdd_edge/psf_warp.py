"""Warps of a calibrated PSF: the ways a real camera's PSF differs from the one measured.

A PSF is calibrated once, at one depth. A scene at another depth sees it magnified (a radial or amplitude
mask's PSF scales with depth), a mask that moved sees it shifted or rotated, and the calibration itself is
noisy. :class:`PsfWarp` ``θ = (s, t, φ)`` maps the calibrated PSF ``h`` to

    h_θ(p) = h(c + R(−φ)(p − c − t) / s) / s²

about the PSF's centre pixel ``c = (H // 2, W // 2)`` (where :func:`nsdd_edge.optics.fit_to` places the
optical axis): scale ``s``, shift ``t = (dy, dx)`` in sensor pixels, rotation ``φ`` in degrees
(counter-clockwise in a picture shown with row 0 on top). The ``1/s²`` keeps the light of the pattern
(energy), so what leaves the PSF's box is lost as it is on a real sensor. The gain of a PSF is not
separately identifiable from measurements (it trades against the brightness of ``x``), so a warp has none;
:func:`warp_psf` with ``normalize="sum"`` returns a unit-sum PSF like :func:`nsdd_edge.optics.load_psf`.

Bilinear resampling (OpenCV), with a Gaussian pre-filter when shrinking (``s < 1``) so the pattern is
averaged rather than point-sampled. Torch-free: the runtime's live refocus uses it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import cv2
import numpy as np

from nsdd_edge.optics import LenslessGeometry, OpticsError, check_psf

WarpNormalization = Literal["energy", "sum"]


@dataclass(frozen=True)
class PsfWarp:
    """``θ = (scale, shift (dy, dx) in pixels, rotation in degrees)``; the identity is ``PsfWarp()``."""

    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)
    rotation_deg: float = 0.0

    def __post_init__(self):
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise OpticsError(f"PSF warp: scale must be a positive number, got {self.scale}")
        dy, dx = (float(v) for v in self.shift)
        if not (math.isfinite(dy) and math.isfinite(dx) and math.isfinite(self.rotation_deg)):
            raise OpticsError(f"PSF warp: shift and rotation must be finite, got {self.shift}, {self.rotation_deg}")
        object.__setattr__(self, "shift", (dy, dx))
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "rotation_deg", float(self.rotation_deg))

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.shift == (0.0, 0.0) and self.rotation_deg == 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shift"] = list(self.shift)
        return d

    @staticmethod
    def from_dict(d: dict) -> PsfWarp:
        try:
            return PsfWarp(float(d.get("scale", 1.0)), tuple(float(v) for v in d.get("shift", (0.0, 0.0))),
                           float(d.get("rotation_deg", 0.0)))
        except (TypeError, ValueError, AttributeError) as exc:
            raise OpticsError(f"PSF warp: not a warp ({exc}): {d!r}") from None


def warp_matrix(warp: PsfWarp, shape: tuple[int, int]) -> np.ndarray:
    """The 2×3 affine map from output (x=col, y=row) to source coordinates, for ``cv2.WARP_INVERSE_MAP``:
    ``p_src = c + R(−φ)(p_out − c − t) / s``."""
    h, w = shape
    cy, cx = h // 2, w // 2
    dy, dx = warp.shift
    phi = math.radians(warp.rotation_deg)
    # A picture's rows grow downwards, so a counter-clockwise turn on screen is R(+φ) in (x, −y).
    cos, sin = math.cos(phi), math.sin(phi)
    inv = np.array([[cos, -sin], [sin, cos]]) / warp.scale  # R(−φ)/s in (x, y) with y down
    offset = np.array([cx, cy]) - inv @ np.array([cx + dx, cy + dy])
    return np.hstack([inv, offset[:, None]]).astype(np.float64)


def warp_psf(psf: np.ndarray, warp: PsfWarp, *, normalize: WarpNormalization = "energy") -> np.ndarray:
    """``h_θ`` of a ``(C, H, W)`` or ``(H, W)`` PSF on the same box (see the module docstring); float32.

    ``normalize="energy"``: the light of the pattern is kept (``1/s²``; what leaves the box is lost);
    ``"sum"``: the result is scaled to unit sum."""
    arr = np.asarray(psf, dtype=np.float32)
    squeeze = arr.ndim == 2
    chw = check_psf(arr[None] if squeeze else arr, "PSF")
    if normalize not in ("energy", "sum"):
        raise OpticsError(f"PSF warp: normalize must be 'energy' or 'sum', got {normalize!r}")
    if warp.is_identity:
        out = chw.copy()
    else:
        h, w = chw.shape[-2:]
        matrix = warp_matrix(warp, (h, w))
        sigma = 0.5 * math.sqrt(max(1.0 / warp.scale**2 - 1.0, 0.0))
        planes = []
        for plane in chw:
            src = cv2.GaussianBlur(plane, (0, 0), sigma) if sigma > 0.05 else plane
            planes.append(cv2.warpAffine(src, matrix, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                         borderMode=cv2.BORDER_CONSTANT, borderValue=0.0))
        out = np.stack(planes).astype(np.float32) / np.float32(warp.scale**2)
    if normalize == "sum":
        total = out.sum(axis=(-2, -1), keepdims=True)
        if np.any(total <= 0):
            raise OpticsError(f"PSF warp: nothing of the PSF is left in its box after {warp}")
        out = out / total
    return out[0] if squeeze else out


def psf_with_snr(psf: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """A noisy calibration of ``psf``: ``h + n``, ``n ~ N(0, σ²)`` with ``10 log10(mean(h²)/σ²) = snr_db``,
    clipped at 0 and renormalised to the original sum (a dark-subtracted, noisy PSF capture)."""
    h = np.asarray(psf, dtype=np.float32)
    check_psf(h[None] if h.ndim == 2 else h, "PSF")
    sigma = math.sqrt(float(np.mean(h.astype(np.float64) ** 2)) / 10.0 ** (float(snr_db) / 10.0))
    noisy = np.maximum(h + rng.normal(0.0, sigma, size=h.shape).astype(np.float32), 0.0)
    total = float(noisy.sum())
    if total <= 0:
        raise OpticsError(f"PSF at SNR {snr_db} dB: nothing left after clipping")
    return (noisy * (float(h.sum()) / total)).astype(np.float32)


def psf_on_canvas(psf: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``psf`` ``(…, h, w)`` zero-padded to ``shape`` with its centre pixel ``(h // 2, w // 2)`` on the canvas's
    ``(H // 2, W // 2)``: where :func:`warp_psf` and :func:`nsdd_edge.optics.psf_transfer_function` take the optical
    axis of the padded PSF to be. (:func:`nsdd_edge.optics.center_pad` puts an odd PSF on an even canvas one pixel
    before that centre.)"""
    a = np.asarray(psf, dtype=np.float32)
    h, w = a.shape[-2:]
    H, W = int(shape[0]), int(shape[1])
    if h > H or w > W:
        raise OpticsError(f"PSF of size {h}x{w} does not fit a {H}x{W} canvas")
    top, left = H // 2 - h // 2, W // 2 - w // 2
    out = np.zeros(a.shape[:-2] + (H, W), dtype=np.float32)
    out[..., top : top + h, left : left + w] = a
    return out


def psf_at_scale(psf: np.ndarray, geometry: LenslessGeometry, scale: float) -> np.ndarray:
    """The PSF a scene at another depth sees (``warp_psf`` by ``scale``), for a camera of ``geometry``: on the
    crop model's convolution grid, so a magnified pattern keeps the light that leaves the calibrated PSF's box,
    as on a sensor; the circular model's PSF keeps its box (the sensor grid)."""
    canvas = psf_on_canvas(psf, geometry.conv_shape) if geometry.model == "crop" else psf
    return warp_psf(canvas, PsfWarp(float(scale)))
