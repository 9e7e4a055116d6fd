"""Shared lensless optics in numpy: PSF and capture I/O, preprocessing, geometry and Wiener spectra.

This is the one place that knows how a PSF becomes a transfer function. ``train`` (torch physics),
``export`` (the ONNX graph) and the edge runtime all take their spectra from here.

Conventions
- Arrays are channel-first ``(C, H, W)`` float32 (``C`` = 1 for a PSF shared by all channels).
- A PSF is stored centred in its array; its transfer function on a grid is
  ``H = F(ifftshift(pad(psf)))`` with the unnormalised DFT, so a PSF that sums to one has ``H(0) = 1``.
- Wiener/Tikhonov pseudo-inverse: ``A†y = F⁻¹[conj(H) Y / (|H|² + λ)]``;
  ``A†A`` is the multiplier ``|H|² / (|H|² + λ)``; the null-space projector is ``I − A†A``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

Model = Literal["circular", "crop"]
NormalizeMode = Literal["sum", "l2", "max", "none"]

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
ARRAY_SUFFIXES = (".npy", ".npz")


class OpticsError(ValueError):
    """Bad optical input (file, PSF, geometry); the message names the file or array and the problem."""


# ----------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------


def _imread_any(path: Path) -> np.ndarray:
    import cv2  # opencv is a runtime dependency; imported lazily to keep numpy-only use light

    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size == 0:
        raise OpticsError(f"{path}: file is empty")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise OpticsError(f"{path}: not a readable image (OpenCV could not decode it)")
    if img.ndim == 3:
        if img.shape[2] == 4:
            img = img[:, :, :3]
        img = img[:, :, ::-1]  # BGR -> RGB
    return np.ascontiguousarray(img)


def read_image_native(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file keeping its native dtype and layout: ``(H, W)`` or ``(H, W, 3)`` RGB
    (16-bit PNG/TIFF stay uint16). Camera sources and recorders use this for raw frames."""
    p = Path(path)
    if not p.is_file():
        raise OpticsError(f"{p}: no such file")
    return _imread_any(p)


def _hwc_or_chw_to_chw(a: np.ndarray, name: str) -> np.ndarray:
    if a.ndim == 2:
        return a[None]
    if a.ndim == 3:
        if a.shape[-1] in (1, 3, 4) and a.shape[0] not in (1, 3):
            a = np.moveaxis(a[..., :3] if a.shape[-1] == 4 else a, -1, 0)
            return a
        if a.shape[0] in (1, 3):
            return a
        raise OpticsError(f"{name}: cannot tell the channel axis of an array of shape {a.shape}; "
                          "expected (H, W), (H, W, C) or (C, H, W) with C in {1, 3}")
    raise OpticsError(f"{name}: expected a 2-D or 3-D array, got shape {a.shape}")


def read_array(path: str | os.PathLike, *, key: str | None = None) -> np.ndarray:
    """Read a PSF, capture or image as float32 ``(C, H, W)`` in its native units (counts, not rescaled).

    Accepts ``.npy``, ``.npz`` (``key``, or ``psf``/``arr_0``/the only array), 8/16-bit PNG, 16-bit TIFF,
    JPEG; grayscale or RGB (colour files are returned in RGB order).
    """
    p = Path(path)
    if not p.exists():
        raise OpticsError(f"{p}: no such file")
    if p.is_dir():
        raise OpticsError(f"{p}: is a directory, expected a file")
    if p.stat().st_size == 0:
        raise OpticsError(f"{p}: file is empty")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            a = np.load(p, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                names = list(z.keys())
                if not names:
                    raise OpticsError(f"{p}: .npz holds no array")
                pick = key or next((k for k in ("psf", "capture", "image", "arr_0") if k in names), None)
                if pick is None:
                    if len(names) != 1:
                        raise OpticsError(f"{p}: .npz holds {names}; say which with key=")
                    pick = names[0]
                if pick not in names:
                    raise OpticsError(f"{p}: .npz has no array {pick!r} (it holds {names})")
                a = z[pick]
        elif suffix in IMAGE_SUFFIXES:
            a = _imread_any(p)
        else:
            raise OpticsError(f"{p}: unsupported file type {suffix!r}; use .npy, .npz, .png, .tif/.tiff")
    except OpticsError:
        raise
    except Exception as exc:  # corrupt npy, truncated file, ...
        raise OpticsError(f"{p}: unreadable ({type(exc).__name__}: {exc})") from exc
    if a.size == 0:
        raise OpticsError(f"{p}: array is empty (shape {a.shape})")
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise OpticsError(f"{p}: array has non-numeric dtype {a.dtype}")
    a = _hwc_or_chw_to_chw(np.asarray(a), str(p)).astype(np.float32)
    check_finite(a, str(p))
    return a


def read_image01(path: str | os.PathLike) -> np.ndarray:
    """Read an image file into ``(C, H, W)`` float32 scaled to [0, 1] by its integer range."""
    p = Path(path)
    a = read_array(p)
    if p.suffix.lower() in IMAGE_SUFFIXES:
        raw = _imread_any(p)
        scale = float(np.iinfo(raw.dtype).max) if np.issubdtype(raw.dtype, np.integer) else 1.0
        a = a / scale
    return a


def check_finite(a: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(a)
    if bad.any():
        raise OpticsError(f"{name}: {int(bad.sum())} NaN/Inf values")


# ----------------------------------------------------------------------------------------------
# Preprocessing (shared by PSF calibration, dataset preparation and the edge runtime)
# ----------------------------------------------------------------------------------------------


def corner_background(img: np.ndarray, rows: slice = slice(5, 15), cols: slice = slice(5, 15)) -> np.ndarray:
    """Per-channel background level, DiffuserCam convention: ``mean(img[:, 5:15, 5:15])``."""
    if img.shape[-2] < (rows.stop or 0) or img.shape[-1] < (cols.stop or 0):
        raise OpticsError(f"image of shape {img.shape} is too small for the corner background patch "
                          f"[{rows.start}:{rows.stop}, {cols.start}:{cols.stop}]")
    return img[..., rows, cols].mean(axis=(-2, -1), keepdims=True).astype(np.float32)


def subtract_background(img: np.ndarray, dark: np.ndarray | float | None = None, *,
                        corner: bool = True, clip: bool = True) -> np.ndarray:
    """``img − dark`` (a dark frame or level) or, without one, ``img − corner_background(img)``."""
    if dark is not None:
        bg = np.asarray(dark, dtype=np.float32)
        if bg.ndim >= 2 and bg.shape[-2:] != img.shape[-2:]:
            raise OpticsError(f"background frame of shape {bg.shape} does not match image {img.shape}")
    elif corner:
        bg = corner_background(img)
    else:
        return img.astype(np.float32)
    out = img.astype(np.float32) - bg
    return np.maximum(out, 0.0) if clip else out


def box_downsample(img: np.ndarray, factor: int) -> np.ndarray:
    """Average non-overlapping ``factor × factor`` boxes (trailing rows/columns that do not fill a box are dropped)."""
    if factor == 1:
        return img
    if factor < 1 or int(factor) != factor:
        raise OpticsError(f"downsample factor must be a positive integer, got {factor}")
    factor = int(factor)
    h, w = img.shape[-2] // factor, img.shape[-1] // factor
    if h == 0 or w == 0:
        raise OpticsError(f"downsample x{factor} of an image of shape {img.shape} leaves nothing")
    cut = img[..., : h * factor, : w * factor]
    # two 1-D sums (rows, then columns) in float64: 2–6× faster than one mean over two strided axes, and exact
    # up to the final float32 rounding (the live preprocessing of 2028×1520 frames depends on this speed)
    rows = cut.reshape(*img.shape[:-2], h, factor, w * factor).sum(axis=-2, dtype=np.float64)
    boxes = rows.reshape(*img.shape[:-2], h, w, factor).sum(axis=-1)
    return (boxes * (1.0 / (factor * factor))).astype(np.float32)


def center_crop(img: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Centre crop of the last two axes to ``shape`` (index ``(n − m) // 2``)."""
    h, w = img.shape[-2:]
    th, tw = int(shape[0]), int(shape[1])
    if th > h or tw > w:
        raise OpticsError(f"cannot crop {(h, w)} to larger {(th, tw)}")
    r, c = (h - th) // 2, (w - tw) // 2
    return img[..., r : r + th, c : c + tw]


def center_pad(img: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Zero-pad the last two axes centrally to ``shape``; inverse of :func:`center_crop`."""
    h, w = img.shape[-2:]
    th, tw = int(shape[0]), int(shape[1])
    if th < h or tw < w:
        raise OpticsError(f"cannot pad {(h, w)} to smaller {(th, tw)}")
    r, c = (th - h) // 2, (tw - w) // 2
    out = np.zeros(img.shape[:-2] + (th, tw), dtype=img.dtype)
    out[..., r : r + h, c : c + w] = img
    return out


def fit_to(img: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Centre-crop or zero-pad each of the last two axes independently to ``shape``."""
    h, w = img.shape[-2:]
    th, tw = int(shape[0]), int(shape[1])
    out = img
    if th < h or tw < w:
        out = center_crop(out, (min(th, h), min(tw, w)))
    if th > out.shape[-2] or tw > out.shape[-1]:
        out = center_pad(out, (th, tw))
    return out


def center_psf(psf: np.ndarray, *, by: Literal["peak", "centroid"] = "peak") -> np.ndarray:
    """Circularly shift a PSF so its peak (or intensity centroid) sits at index ``(H // 2, W // 2)``."""
    energy = psf.sum(axis=0) if psf.ndim == 3 else psf
    h, w = energy.shape
    if by == "peak":
        r, c = np.unravel_index(int(np.argmax(energy)), energy.shape)
    else:
        tot = energy.sum()
        if tot <= 0:
            raise OpticsError("cannot centre a PSF with no positive energy")
        r = int(round(float((energy.sum(axis=1) * np.arange(h)).sum() / tot)))
        c = int(round(float((energy.sum(axis=0) * np.arange(w)).sum() / tot)))
    return np.roll(psf, (h // 2 - r, w // 2 - c), axis=(-2, -1))


def normalize(img: np.ndarray, mode: NormalizeMode = "sum") -> np.ndarray:
    """Scale to unit sum (per channel), unit L2 norm (whole array, DiffuserCam) or unit max."""
    img = img.astype(np.float32)
    if mode == "none":
        return img
    if mode == "sum":
        s = img.sum(axis=(-2, -1), keepdims=True, dtype=np.float64)
        if np.any(s <= 0):
            raise OpticsError("cannot normalise to unit sum: a channel sums to zero or less")
        if np.all(np.abs(s - 1.0) <= 1e-6):  # already unit sum: keep the exact bits (and so the PSF's hash)
            return img
        return (img / s).astype(np.float32)
    if mode == "l2":
        n = float(np.linalg.norm(img))
        if n == 0:
            raise OpticsError("cannot normalise to unit L2 norm: the array is all zero")
        return img / n
    if mode == "max":
        m = float(np.abs(img).max())
        if m == 0:
            raise OpticsError("cannot normalise to unit max: the array is all zero")
        return img / m
    raise OpticsError(f"unknown normalisation {mode!r}; use sum, l2, max or none")


def check_psf(psf: np.ndarray, name: str = "PSF") -> np.ndarray:
    """Validate a PSF array ``(C, H, W)``: finite, not all zero, C in {1, 3}."""
    if psf.ndim != 3 or psf.shape[0] not in (1, 3):
        raise OpticsError(f"{name}: expected shape (C, H, W) with C in {{1, 3}}, got {psf.shape}")
    if min(psf.shape[-2:]) < 2:
        raise OpticsError(f"{name}: too small ({psf.shape[-2:]})")
    check_finite(psf, name)
    if not np.any(psf):
        raise OpticsError(f"{name}: PSF is all zero")
    return psf


def load_psf(path: str | os.PathLike, *, dark: str | os.PathLike | np.ndarray | None = None,
             background: Literal["corner", "none"] = "none", downsample: int = 1,
             shape: Sequence[int] | None = None, grayscale: bool = False,
             normalization: NormalizeMode = "sum", center: bool = False) -> np.ndarray:
    """The one PSF loader: read → subtract background → box-downsample → (centre) → fit → normalise.

    ``dark`` is a dark frame (file or array) subtracted first; ``background='corner'`` subtracts the
    DiffuserCam corner mean instead. Returns float32 ``(C, H, W)``.
    """
    name = str(path)
    psf = read_array(path)
    if isinstance(dark, (str, os.PathLike)):
        dark = read_array(dark)
    if dark is not None or background == "corner":
        psf = subtract_background(psf, dark, corner=background == "corner")
    psf = box_downsample(psf, downsample)
    if grayscale and psf.shape[0] == 3:
        psf = psf.mean(axis=0, keepdims=True)
    check_psf(psf, name)
    if center:
        psf = center_psf(psf)
    if shape is not None:
        psf = fit_to(psf, shape)
    try:
        psf = normalize(psf, normalization)
    except OpticsError as exc:
        raise OpticsError(f"{name}: {exc}") from None
    return check_psf(psf, name)


def array_hash(a: np.ndarray) -> str:
    """SHA-256 of an array's float32 bytes and shape (identifies a PSF in datasets and bundles)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    h = hashlib.sha256(str(a.shape).encode())
    h.update(a.tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Geometry and spectra
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LenslessGeometry:
    """Grids of a lensless forward model.

    ``circular``: scene = sensor = convolution grid; ``y = F⁻¹[H · F(x)]``.
    ``crop``: the scene ``x`` is zero-padded centrally to the convolution grid, convolved (circularly
    there, which is linear for supports that fit) and centre-cropped to the sensor:
    ``y = C_sensor F⁻¹[H · F(P_conv x)]``. DiffuserCam: scene = conv = 2× sensor.
    """

    model: Model
    sensor_shape: tuple[int, int]
    scene_shape: tuple[int, int]
    conv_shape: tuple[int, int]

    @staticmethod
    def make(model: Model, sensor_shape: Sequence[int], psf_shape: Sequence[int] | None = None,
             scene_shape: Sequence[int] | None = None,
             conv_shape: Sequence[int] | None = None) -> LenslessGeometry:
        sensor = (int(sensor_shape[0]), int(sensor_shape[1]))
        if model == "circular":
            if scene_shape is not None and tuple(scene_shape) != sensor:
                raise OpticsError(f"circular model: scene {tuple(scene_shape)} must equal sensor {sensor}")
            if psf_shape is not None and (psf_shape[0] > sensor[0] or psf_shape[1] > sensor[1]):
                raise OpticsError(f"PSF of size {tuple(psf_shape)} is larger than the sensor grid {sensor}: "
                                  "use the crop model (model='crop') or crop the PSF")
            return LenslessGeometry("circular", sensor, sensor, sensor)
        if model == "crop":
            conv = tuple(int(v) for v in conv_shape) if conv_shape is not None else (2 * sensor[0], 2 * sensor[1])
            scene = tuple(int(v) for v in scene_shape) if scene_shape is not None else conv
            if conv[0] < sensor[0] or conv[1] < sensor[1]:
                raise OpticsError(f"crop model: convolution grid {conv} smaller than the sensor {sensor}")
            if conv[0] < scene[0] or conv[1] < scene[1]:
                raise OpticsError(f"crop model: convolution grid {conv} smaller than the scene {scene}")
            if psf_shape is not None and (psf_shape[0] > conv[0] or psf_shape[1] > conv[1]):
                raise OpticsError(f"PSF of size {tuple(psf_shape)} is larger than the convolution grid {conv}")
            return LenslessGeometry("crop", sensor, scene, conv)  # type: ignore[arg-type]
        raise OpticsError(f"unknown forward model {model!r}; use 'circular' or 'crop'")

    def to_dict(self) -> dict:
        return {"model": self.model, "sensor_shape": list(self.sensor_shape),
                "scene_shape": list(self.scene_shape), "conv_shape": list(self.conv_shape)}

    @staticmethod
    def from_dict(d: dict) -> LenslessGeometry:
        return LenslessGeometry.make(d["model"], d["sensor_shape"], scene_shape=d.get("scene_shape"),
                                     conv_shape=d.get("conv_shape"))


def psf_transfer_function(psf: np.ndarray, grid_shape: Sequence[int]) -> np.ndarray:
    """``H = F(ifftshift(pad(psf)))`` on ``grid_shape``: complex128 ``(C, Hg, Wg)``.

    The centred PSF is zero-padded (or, if larger, centre-cropped) to the grid, then its centre pixel
    ``(H // 2, W // 2)`` is moved to index (0, 0) so that convolution does not shift the image (for even
    sizes this is ``ifftshift``; an odd-sized PSF on an even grid needs one pixel less).
    """
    psf = check_psf(np.asarray(psf, dtype=np.float64))
    grid = (int(grid_shape[0]), int(grid_shape[1]))
    placed = fit_to(psf, grid)
    return np.fft.fft2(np.roll(placed, psf_centre_shift(psf.shape, grid), axis=(-2, -1)), axes=(-2, -1))


def psf_centre_shift(psf_shape: Sequence[int], grid_shape: Sequence[int]) -> tuple[int, int]:
    """The circular shift that moves the PSF's centre pixel ``(H // 2, W // 2)`` to index (0, 0) after
    :func:`fit_to` placed it on ``grid_shape`` (shared by the numpy and the torch transfer functions)."""

    def centre_in_grid(n: int, g: int) -> int:  # where index n // 2 of the PSF lands after fit_to
        return (g - n) // 2 + n // 2 if g >= n else n // 2 - (n - g) // 2

    return tuple(-centre_in_grid(int(n), int(g)) for n, g in zip(psf_shape[-2:], grid_shape))  # type: ignore[return-value]


PROJECTORS = ("tikhonov", "truncated", "cg")
Projector = Literal["tikhonov", "truncated", "cg"]
#: iterations of the ``cg`` pseudo-inverse (crop model): ``A†y`` = this many conjugate-gradient steps on
#: ``(AᵀA + λI) x = Aᵀy`` from 0. Early stopping is part of the regularisation; docs/real-cameras.md measures
#: 10–50 on the full-aperture radial prototype (20: the face appears, 0.1–0.2 s a frame in numpy).
CG_ITERATIONS = 20


def check_projector(projector: str, model: str | None = None) -> str:
    """``projector`` if it is a known pseudo-inverse kind (for ``model``: ``cg`` is for the crop model only)."""
    if projector not in PROJECTORS:
        raise OpticsError(f"unknown pseudo-inverse {projector!r}; use {', '.join(PROJECTORS)}")
    if projector == "cg" and model is not None and model != "crop":
        raise OpticsError("the cg pseudo-inverse is for the crop model (circular: use tikhonov, its exact solution)")
    return projector


@dataclass(frozen=True)
class WienerSpectra:
    """Per-frequency multipliers on the convolution grid: the pseudo-inverse ``A†`` and ``A†A``.

    ``tikhonov`` (Wiener): ``G = conj(H) / (|H|² + λ)``, ``R = |H|² / (|H|² + λ)``. ``R`` is not idempotent, so
    ``I − A†A`` (the multiplier ``λ / (|H|² + λ)``) is not a projector: a null-space student still changes
    ``A x̂`` wherever ``λ`` is not negligible against ``|H|²``.
    ``truncated`` (truncated SVD, threshold ``τ = √λ``): ``G = conj(H) / |H|²`` where ``|H| > τ``, else 0, and
    ``R = 1[|H| > τ]``: ``A†A`` is idempotent and ``I − A†A`` an exact projector onto the frequencies below τ.
    The multipliers are exact for the circular model; for the crop model they act on the convolution grid.
    ``cg`` (crop model): ``A†`` is :func:`cg_tikhonov`, which iterates with ``H``; ``G`` and ``R`` are the
    Tikhonov ones.
    """

    H: np.ndarray
    lam: float
    G: np.ndarray = field(repr=False)
    R: np.ndarray = field(repr=False)
    projector: str = "tikhonov"

    @staticmethod
    def from_psf(psf: np.ndarray, grid_shape: Sequence[int], lam: float,
                 projector: Projector = "tikhonov") -> WienerSpectra:
        return WienerSpectra.from_transfer(psf_transfer_function(psf, grid_shape), lam, projector)

    @staticmethod
    def from_transfer(H, lam, projector: Projector = "tikhonov") -> WienerSpectra:
        """The spectra of a transfer function ``H``. The Tikhonov multipliers use only array methods and
        operators, so ``H`` and ``λ`` may also be torch tensors (``train.physics`` differentiates through
        them); the truncated ones need numpy arrays."""
        value = float(lam.detach()) if hasattr(lam, "detach") else float(lam)
        if not (value > 0 and np.isfinite(value)):
            raise OpticsError(f"Wiener regularisation λ must be finite and > 0, got {value}")
        check_projector(projector)
        power = abs(H) ** 2
        if projector in ("tikhonov", "cg"):  # cg: A† iterates with H; G, R are the Tikhonov multipliers
            G, R = H.conj() / (power + lam), power / (power + lam)
        elif not isinstance(H, np.ndarray):
            raise OpticsError("the truncated pseudo-inverse is not differentiable: build it from numpy spectra")
        else:
            keep = power > lam
            G = np.where(keep, np.conj(H) / np.where(keep, power, 1.0), 0.0)
            R = keep.astype(np.float64)
        return WienerSpectra(H=H, lam=value, G=G, R=R, projector=projector)

    @property
    def singular_values(self) -> np.ndarray:
        """``|H(f)|``: the singular values of the circular convolution."""
        return abs(self.H)

    def half(self, name: Literal["H", "G", "R"]) -> np.ndarray:
        """The ``rfft2`` half spectrum (last axis ``W // 2 + 1``) of ``H``, ``G`` or ``R``."""
        a = getattr(self, name)
        return a[..., : a.shape[-1] // 2 + 1]


class WienerFilter:
    """Numpy ``A†y``: Wiener/Tikhonov ``x = C_scene F⁻¹[G · F(P_conv y)]`` for either model, or the ``cg``
    pseudo-inverse (:func:`cg_tikhonov`) of a crop model.

    Spectra are computed once; calls only pad, transform and multiply. Input ``(..., C, H, W)`` with
    ``C`` equal to the PSF's channels or the PSF shared (``C_psf = 1``).
    """

    def __init__(self, psf: np.ndarray, geometry: LenslessGeometry, lam: float, projector: Projector = "tikhonov"):
        self.geometry = geometry
        check_projector(projector, geometry.model)
        self.spectra = WienerSpectra.from_psf(psf, geometry.conv_shape, lam, projector)
        self._G_half = self.spectra.half("G").astype(np.complex64)
        self._forward = ForwardModel(psf, geometry) if projector == "cg" else None

    def __call__(self, y: np.ndarray) -> np.ndarray:
        g = self.geometry
        if tuple(y.shape[-2:]) != g.sensor_shape:
            raise OpticsError(f"measurement of spatial size {tuple(y.shape[-2:])} does not match the sensor "
                              f"{g.sensor_shape}")
        y = np.asarray(y, dtype=np.float32)
        if self._forward is not None:
            return cg_tikhonov(self._forward, y, self.spectra.lam)
        if g.model == "crop":
            y = center_pad(y, g.conv_shape)
        Y = np.fft.rfft2(y, axes=(-2, -1))
        x = np.fft.irfft2(Y * self._G_half, s=g.conv_shape, axes=(-2, -1)).astype(np.float32)
        if g.model == "crop":
            x = center_crop(x, g.scene_shape)
        return x


def _batch_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``⟨a, b⟩`` per sample over the last three axes (``(C, H, W)``), kept as ``(..., 1, 1, 1)``."""
    if a.ndim < 3:
        return np.sum(a * b, dtype=np.float64, keepdims=True)
    return np.sum(a * b, axis=(-3, -2, -1), dtype=np.float64, keepdims=True)


def cg_tikhonov(A: ForwardModel, y: np.ndarray, lam: float, iters: int = CG_ITERATIONS) -> np.ndarray:
    """The ``cg`` pseudo-inverse: ``iters`` conjugate-gradient steps on ``(AᵀA + λI) x = Aᵀy`` from ``x = 0``,
    each sample of a batch ``(..., C, H, W)`` on its own (per-sample step sizes). Where the PSF is larger than
    the sensor the zero-padded Wiener filter treats the light outside the sensor as 0; this solves the crop
    model itself. Homogeneous: ``A†(s y) = s A†y``; not linear in ``y`` (the step sizes depend on it).

    Computes in ``A.dtype`` (float32, like training and the exported graph). At the small λ of the real cameras
    (~2e-7) float32 rounding puts 20 steps 4–7% from float64 ones, and summation orders (torch thread counts) 1–2%
    apart: ``bench/bench_cg_precision.py`` measures it."""
    dtype = getattr(A, "dtype", np.dtype(np.float32))
    y = np.asarray(y, dtype=dtype)
    b = A.adjoint(y)
    x = np.zeros_like(b)
    r, p = b.copy(), b.copy()
    rs = _batch_dot(r, r)
    tiny = np.finfo(np.float64).tiny
    for _ in range(int(iters)):
        Ap = A.adjoint(A(p)) + dtype.type(lam) * p
        alpha = (rs / np.maximum(_batch_dot(p, Ap), tiny)).astype(dtype)
        x += alpha * p
        r -= alpha * Ap
        rs_new = _batch_dot(r, r)
        p = r + (rs_new / np.maximum(rs, tiny)).astype(dtype) * p
        rs = rs_new
    return x


class _WienerResidual:
    """``λ ↦ rms(y − A A†_λ y)`` for fixed ``y``: the PSF's transfer function and ``F(P y)`` are computed once,
    each λ costs one multiplier and one inverse FFT (the discrepancy bisection calls it ~34 times)."""

    def __init__(self, psf: np.ndarray, geometry: LenslessGeometry, y: np.ndarray):
        self.geometry = geometry
        self.y = np.asarray(y, dtype=np.float64)
        H = psf_transfer_function(psf, geometry.conv_shape)
        self.H_half = H[..., : H.shape[-1] // 2 + 1]
        yp = center_pad(self.y, geometry.conv_shape) if geometry.model == "crop" else self.y
        self.Y = np.fft.rfft2(yp, axes=(-2, -1))

    def __call__(self, lam: float) -> float:
        g = self.geometry
        R = WienerSpectra.from_transfer(self.H_half, lam).R  # A A†_λ = C F⁻¹[R_λ F(P ·)]
        fit = np.fft.irfft2(self.Y * R, s=g.conv_shape, axes=(-2, -1))
        if g.model == "crop":
            fit = center_crop(fit, g.sensor_shape)
        return float(np.sqrt(np.mean((self.y - fit) ** 2)))


def wiener_residual(psf: np.ndarray, geometry: LenslessGeometry, y: np.ndarray, lam: float) -> float:
    """RMS of the Wiener fit's residual ``y − A A†_λ y`` per pixel (``A A†_λ = C F⁻¹[R_λ F(P ·)]``)."""
    return _WienerResidual(psf, geometry, y)(lam)


def discrepancy_lambda(psf: np.ndarray, geometry: LenslessGeometry, y: np.ndarray, sigma: float, *,
                       tau: float = 1.0, bounds: tuple[float, float] = (1e-9, 1e2), iterations: int = 32) -> float:
    """Morozov's discrepancy principle: the Wiener λ whose residual matches the noise,
    ``rms(y − A A†_λ y) = τ σ`` (bisection in log λ; the residual grows with λ). No ground truth is used:
    only measurements ``y`` (``(C, H, W)`` or a batch) and the noise level σ (same units as ``y``).

    Raises :class:`OpticsError` if σ ≤ 0 or the noise level is outside what λ in ``bounds`` can reach.
    """
    if not (sigma > 0 and np.isfinite(sigma)):
        raise OpticsError(f"discrepancy principle: the noise level σ must be > 0, got {sigma}")
    target = tau * float(sigma)
    residual = _WienerResidual(psf, geometry, y)
    lo, hi = np.log10(bounds[0]), np.log10(bounds[1])
    r_lo, r_hi = residual(10.0 ** lo), residual(10.0 ** hi)
    if not r_lo <= target <= r_hi:
        raise OpticsError(f"discrepancy principle: the residual spans {r_lo:.3g}–{r_hi:.3g} for λ in "
                          f"{bounds}, the noise level τσ = {target:.3g} is outside it")
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if residual(10.0 ** mid) < target:
            lo = mid
        else:
            hi = mid
    return float(10.0 ** (0.5 * (lo + hi)))


class ForwardModel:
    """Numpy ``A x = C F⁻¹[H · F(P x)]`` for either model (``P`` zero-pads the scene to the convolution grid, ``C``
    crops the sensor; identities for ``circular``), and the consistency ``‖A x − y‖ / ‖y‖`` the runtime reports
    as a live sign that the PSF still fits."""

    def __init__(self, psf: np.ndarray, geometry: LenslessGeometry, dtype: type = np.float32):
        """``dtype``: float32 (what the runtime, training and the exported graph compute in) or float64 (a
        reference: ``bench/bench_cg_precision.py``)."""
        if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise OpticsError(f"ForwardModel computes in float32 or float64, not {np.dtype(dtype)}")
        self.geometry = geometry
        self.dtype = np.dtype(dtype)
        H = psf_transfer_function(psf, geometry.conv_shape)
        complex_type = np.complex64 if self.dtype == np.float32 else np.complex128
        self._H_half = H[..., : H.shape[-1] // 2 + 1].astype(complex_type)
        self._Hc_half = np.conj(self._H_half)  # Aᵀ's spectrum, once (cg calls adjoint every step)

    def _filter(self, a: np.ndarray, source: tuple[int, int], target: tuple[int, int], spectrum: np.ndarray,
                what: str) -> np.ndarray:
        """``C_target F⁻¹[spectrum · F(P a)]`` on the convolution grid (``P`` pads ``source``, ``C`` crops)."""
        g = self.geometry
        a = np.asarray(a, dtype=self.dtype)
        if tuple(a.shape[-2:]) != source:
            raise OpticsError(f"{what} of spatial size {tuple(a.shape[-2:])} does not match the model's {what} grid "
                              f"{source}")
        ap = center_pad(a, g.conv_shape) if source != g.conv_shape else a
        b = np.fft.irfft2(np.fft.rfft2(ap, axes=(-2, -1)) * spectrum, s=g.conv_shape, axes=(-2, -1))
        return (center_crop(b, target) if target != g.conv_shape else b).astype(self.dtype)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._filter(x, self.geometry.scene_shape, self.geometry.sensor_shape, self._H_half, "scene")

    def adjoint(self, y: np.ndarray) -> np.ndarray:
        """``Aᵀ y = Pᵀ F⁻¹[conj(H) · F(Cᵀ y)]`` (``Cᵀ`` zero-pads the sensor into the convolution grid, ``Pᵀ``
        crops the scene)."""
        return self._filter(y, self.geometry.sensor_shape, self.geometry.scene_shape, self._Hc_half,
                            "sensor")

    @property
    def lipschitz(self) -> float:
        """``max |H|² ≥ ‖A‖²``: the step ``1/L`` of a gradient method on ``½‖A x − y‖²``."""
        return float(np.max(np.abs(self._H_half)) ** 2)

    def consistency(self, x: np.ndarray, y: np.ndarray) -> float:
        """``‖A x − y‖ / ‖y‖`` over the whole array."""
        r = float(np.linalg.norm(self(x) - y))
        return r / max(float(np.linalg.norm(y)), 1e-12)
