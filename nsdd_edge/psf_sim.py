"""Simulated lensless PSFs (numpy only, seeded): PhlatCam contours, DiffuserCam caustics, binary masks.

Every generator returns a float32 ``(1, H, W)`` PSF that is non-negative, sums to one and is centred
(intensity centroid at ``(H // 2, W // 2)``), and is a deterministic function of ``(shape, seed, **kw)``.

- :func:`contour_psf` (PhlatCam, Boominathan et al. 2020): the zero level set of a smoothed random field,
  i.e. thin closed contours ``|f| < width`` of a low-pass Gaussian field ``f``, slightly blurred.
- :func:`caustic_psf` (DiffuserCam, Antipa et al. 2018): the intensity ``|U_z|²`` of a plane wave after
  a random smooth phase screen ``φ``, propagated a distance ``z`` with the angular spectrum
  ``U_z = F⁻¹[F(e^{iφ}) · e^{i z √(k² − 4π²(fx² + fy²))}]`` (evanescent waves dropped).
- :func:`binary_mask_psf` (FlatCam-style amplitude mask): a random binary mask ``M`` of square cells;
  ``diffraction=True`` gives the Fresnel diffraction pattern ``|F⁻¹[F(M) e^{−iπλz(fx²+fy²)}]|²``,
  otherwise the geometric shadow ``M`` itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

PsfKind = Literal["contour", "caustic", "binary"]
PSF_KINDS: tuple[str, ...] = ("contour", "caustic", "binary")


def _shape2(shape: Sequence[int] | int) -> tuple[int, int]:
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape), int(shape))
    if len(shape) == 3:  # accept (1, H, W)
        shape = shape[-2:]
    if len(shape) != 2:
        raise ValueError(f"PSF shape must be (H, W), got {tuple(shape)}")
    h, w = int(shape[0]), int(shape[1])
    if h < 8 or w < 8:
        raise ValueError(f"PSF shape must be at least 8×8, got {(h, w)}")
    return h, w


def _freq_sq(shape: tuple[int, int]) -> np.ndarray:
    """``fx² + fy²`` in cycles per pixel on the DFT grid."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.fftfreq(shape[1])[None, :]
    return fy**2 + fx**2


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Circular Gaussian blur of standard deviation ``sigma`` pixels: ``F⁻¹[F(img) e^{−2π²σ²|f|²}]``."""
    if sigma <= 0:
        return img
    k = np.exp(-2.0 * np.pi**2 * sigma**2 * _freq_sq(img.shape))
    return np.fft.ifft2(np.fft.fft2(img) * k).real


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], corr: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field with correlation length ``corr`` pixels."""
    f = _gaussian_blur(rng.standard_normal(shape), corr)
    f -= f.mean()
    return f / max(float(f.std()), 1e-12)


def _finish(intensity: np.ndarray) -> np.ndarray:
    """Clip to ≥ 0, centre the intensity centroid at ``(H // 2, W // 2)`` (circular shift), sum to one."""
    psf = np.maximum(intensity, 0.0)
    total = float(psf.sum())
    if not total > 0:
        raise ValueError("simulated PSF has no energy (try other parameters)")
    h, w = psf.shape
    # circular centroid: robust to energy wrapping across the borders
    ang_r = np.angle((psf.sum(axis=1) * np.exp(2j * np.pi * np.arange(h) / h)).sum())
    ang_c = np.angle((psf.sum(axis=0) * np.exp(2j * np.pi * np.arange(w) / w)).sum())
    r = round(float(ang_r) / (2 * np.pi) * h) % h
    c = round(float(ang_c) / (2 * np.pi) * w) % w
    psf = np.roll(psf, (h // 2 - r, w // 2 - c), axis=(0, 1))
    psf = psf / psf.sum()
    return psf.astype(np.float32)[None]


def _aperture(shape: tuple[int, int], fill: float) -> np.ndarray:
    """Circular aperture of diameter ``fill × min(H, W)`` centred on the grid (0/1)."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    r = 0.5 * fill * min(h, w)
    return (((yy - h / 2 + 0.5) ** 2 + (xx - w / 2 + 0.5) ** 2) <= r**2).astype(np.float64)


def contour_psf(shape: Sequence[int] | int, seed: int = 0, *, correlation: float | None = None,
                width: float = 0.04, blur: float = 0.7, fill: float = 0.8) -> np.ndarray:
    """PhlatCam-style contour PSF: ``blur(𝟙[|f| < width · ‖∇f‖-scaled] · aperture)``.

    ``f`` is a smoothed unit-variance random field of correlation length ``correlation`` pixels
    (default ``min(H, W) / 32``); the contours are where ``|f| / |∇f| < width · correlation`` (so
    their thickness is about ``2 · width · correlation`` pixels everywhere), inside a circular aperture
    of diameter ``fill · min(H, W)``, then blurred by a Gaussian of ``blur`` pixels.
    """
    h, w = _shape2(shape)
    rng = np.random.default_rng(seed)
    corr = float(correlation) if correlation is not None else max(min(h, w) / 32.0, 1.5)
    f = _smooth_field(rng, (h, w), corr)
    gy, gx = np.gradient(f)
    grad = np.sqrt(gx**2 + gy**2) + 1e-9
    distance = np.abs(f) / grad  # first-order distance to the zero level set, in pixels
    lines = (distance < max(width * corr, 0.5)).astype(np.float64)
    return _finish(_gaussian_blur(lines * _aperture((h, w), fill), blur))


def caustic_psf(shape: Sequence[int] | int, seed: int = 0, *, correlation: float | None = None,
                phase_std: float | None = None, distance: float | None = None, wavelength: float = 0.5,
                fill: float = 0.9) -> np.ndarray:
    """DiffuserCam-style caustic PSF: ``|F⁻¹[F(a e^{iφ}) e^{i z k_z}]|²`` for a smooth random phase ``φ``.

    ``φ = phase_std · field`` (a smoothed unit-variance random field, correlation ``correlation`` px,
    default ``min(H, W) / 12``; ``phase_std`` defaults to ``correlation`` radians, a phase slope of about
    1 rad/px, steep enough for sharp caustics and below the π rad/px at which the grid aliases) inside a circular aperture ``a`` of diameter ``fill · min(H, W)``;
    ``k_z = √(k² − (2π f)²)``, ``k = 2π / wavelength`` (lengths in pixels); the propagation distance
    ``z`` defaults to about the focal length of the screen's lenslets, where caustics are sharpest.
    """
    h, w = _shape2(shape)
    rng = np.random.default_rng(seed)
    corr = float(correlation) if correlation is not None else max(min(h, w) / 12.0, 2.0)
    phase_std = float(phase_std) if phase_std is not None else corr
    phase = phase_std * _smooth_field(rng, (h, w), corr)
    field = _aperture((h, w), fill) * np.exp(1j * phase)
    k = 2.0 * np.pi / wavelength
    # a bump of height phase_std and width corr focuses at z ≈ k corr² / phase_std (paraxial lens)
    z = float(distance) if distance is not None else k * corr**2 / max(phase_std, 1e-6)
    kz_sq = k**2 - (2.0 * np.pi) ** 2 * _freq_sq((h, w))
    propagator = np.where(kz_sq > 0, np.exp(1j * z * np.sqrt(np.maximum(kz_sq, 0.0))), 0.0)
    u = np.fft.ifft2(np.fft.fft2(field) * propagator)
    return _finish(np.abs(u) ** 2)


def random_binary_mask(shape: Sequence[int] | int, seed: int = 0, *, cell: int = 1, density: float = 0.5,
                       fill: float = 0.8) -> np.ndarray:
    """A random 0/1 mask ``(H, W)`` float64: a centred square of side ``fill · min(H, W)`` made of
    ``cell × cell`` squares, each open with probability ``density`` (at least one is open)."""
    h, w = _shape2(shape)
    if not 0.0 < density < 1.0:
        raise ValueError(f"density must be in (0, 1), got {density}")
    rng = np.random.default_rng(seed)
    side = max(int(fill * min(h, w)) // cell, 2)
    cells = (rng.random((side, side)) < density).astype(np.float64)
    if not cells.any():
        cells[side // 2, side // 2] = 1.0
    mask_small = np.kron(cells, np.ones((cell, cell)))
    mask = np.zeros((h, w))
    r, c = (h - mask_small.shape[0]) // 2, (w - mask_small.shape[1]) // 2
    mask[r : r + mask_small.shape[0], c : c + mask_small.shape[1]] = mask_small[: h - r, : w - c]
    return mask


def binary_mask_psf(shape: Sequence[int] | int, seed: int = 0, *, cell: int | None = None,
                    density: float = 0.5, diffraction: bool = True, fresnel_number: float = 4.0,
                    fill: float = 0.8) -> np.ndarray:
    """Binary amplitude-mask PSF: a random 0/1 mask of ``cell``-pixel squares (open with ``density``).

    ``diffraction=True``: Fresnel pattern ``|F⁻¹[F(M) e^{−iπ λz |f|²}]|²`` with ``λz = cell² / fresnel_number``
    (pixels²), so one cell has Fresnel number ``fresnel_number``; ``False``: the geometric shadow ``M``.
    The mask fills a centred square of side ``fill · min(H, W)``.
    """
    h, w = _shape2(shape)
    cell = int(cell) if cell is not None else max(min(h, w) // 32, 1)
    mask = random_binary_mask((h, w), seed, cell=cell, density=density, fill=fill)
    if not diffraction:
        return _finish(mask)
    lam_z = cell**2 / float(fresnel_number)
    u = np.fft.ifft2(np.fft.fft2(mask) * np.exp(-1j * np.pi * lam_z * _freq_sq((h, w))))
    return _finish(np.abs(u) ** 2)


def simulate_psf(kind: PsfKind, shape: Sequence[int] | int, seed: int = 0, **kw) -> np.ndarray:
    """A simulated PSF by name: ``contour`` | ``caustic`` | ``binary``; float32 ``(1, H, W)``, sum 1."""
    if kind == "contour":
        return contour_psf(shape, seed, **kw)
    if kind == "caustic":
        return caustic_psf(shape, seed, **kw)
    if kind == "binary":
        return binary_mask_psf(shape, seed, **kw)
    raise ValueError(f"unknown PSF kind {kind!r}; use one of {', '.join(PSF_KINDS)}")
