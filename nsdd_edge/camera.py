"""Camera profiles (``camera.json``): one file from a raw frame to ``y`` and the forward operator.

A profile says everything a lensless camera needs, so that calibration, simulation, reconstruction,
training, export and the runtime use the same numbers (one implementation, numpy only)::

    {"format": "nsdd-camera-profile", "version": 1, "name": str,
     "preprocess": PreprocessConfig fields            raw frame → y (raw_crop, black level, Bayer, binning,
                                                     fixed scale, exposure normalisation)
     "psf": {"file": "psf.npy", "sha256": str,      the PSF on y's pixel grid (unit sum), possibly larger
             "recipe": {...}},                       than the sensor; how it was cut from the PSF image
     "geometry": LenslessGeometry fields,           the forward model that makes y (usually ``crop``: the
                                                     scene on a grid of sensor + PSF, convolved, cropped)
     "recon": {"lam": float, "lam_rule": str,       λ and pseudo-inverse kind of the reconstruction
               "projector": str},                    operator, which is the forward model itself
     "support": {"shape": [h, w], "taper": px} | null,   where scenes sit in the reconstruction
     "noise": {"read_std": σ_r, "shot_gain": g, "rule": str},   var(y) = σ_r² + g · max(y, 0)
     "signal": {"p50", "p99", "p999", "max", "n"},  statistics of real y (for simulate --profile)
     "exposure": {"reference_us": float | null}}

:func:`profile_from_captures` estimates a profile from a PSF image and a folder of captures (what
``nsdd-edge calibrate --psf-image … --captures …`` runs). Bad files or values raise :class:`ProfileError`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nsdd_edge.atomic import atomic_save_npy, atomic_write_text
from nsdd_edge.bundle import BundleError, PreprocessConfig
from nsdd_edge.optics import (
    IMAGE_SUFFIXES,
    PROJECTORS,
    LenslessGeometry,
    OpticsError,
    array_hash,
    box_downsample,
    check_psf,
    normalize,
)
from nsdd_edge.validate import (  # the one validation layer: its ProfileError is the one profiles raise
    MAX_SIDE,
    ProfileError,
    check_int,
    check_psf_content,
    check_real,
    parse_json_bounded,
    read_bounded_array,
)

PROFILE_FORMAT = "nsdd-camera-profile"
PROFILE_VERSION = 1
PROFILE_NAME = "camera.json"
CAPTURE_SUFFIXES = (*IMAGE_SUFFIXES, ".npy", ".npz")


# ---- small validated records ------------------------------------------------------------------
@dataclass(frozen=True)
class NoiseModel:
    """Poisson–Gaussian noise in ``y`` units: ``var(y) = read_std² + shot_gain · max(y, 0)``."""

    read_std: float
    shot_gain: float = 0.0
    rule: str = ""

    def std(self, y: np.ndarray) -> np.ndarray:
        return np.sqrt(self.read_std ** 2 + self.shot_gain * np.maximum(y, 0.0))


@dataclass(frozen=True)
class SupportWindow:
    """The centred window of the reconstruction grid that scenes occupy; ``taper`` pixels of raised cosine
    inside its edge (0: a hard box)."""

    shape: tuple[int, int]
    taper: int = 0

    def mask(self, grid: tuple[int, int]) -> np.ndarray:
        """``(H, W)`` float32 weights: 1 inside, a cosine ramp over ``taper`` pixels to 0 at the window's edge."""
        return support_mask(grid, self.shape, self.taper)


def support_mask(grid: tuple[int, int], shape: tuple[int, int], taper: int = 0) -> np.ndarray:
    """Centred ``shape`` window on ``grid`` (offsets ``(H − h) // 2``) with a raised-cosine edge of ``taper`` px:
    ``w(d) = ½(1 − cos(π d / taper))`` at distance ``d`` < taper from the window's edge (inside), 1 beyond."""
    H, W = int(grid[0]), int(grid[1])
    h, w = int(shape[0]), int(shape[1])
    if h > H or w > W:
        raise ProfileError(f"support {h}x{w} is larger than the grid {H}x{W}")

    def ramp(n: int, inner: int) -> np.ndarray:
        start = (n - inner) // 2
        idx = np.arange(n) - start  # position inside the window
        d = np.minimum(idx + 0.5, inner - idx - 0.5)  # distance from the nearer edge, in pixels
        out = np.where((idx >= 0) & (idx < inner), 1.0, 0.0)
        if taper > 0:
            out = out * np.where(d < taper, 0.5 * (1 - np.cos(np.pi * np.clip(d, 0, taper) / taper)), 1.0)
        return out

    return np.outer(ramp(H, h), ramp(W, w)).astype(np.float32)


# ---- PSF from a PSF image --------------------------------------------------------------------------
def locate_psf_center(image: np.ndarray, method: str = "auto", work_side: int = 384) -> tuple[float, float]:
    """Where the PSF pattern is centred in a PSF image ``(C, H, W)`` or ``(H, W)``, in its pixels.

    ``symmetry``: the centre of point symmetry, half the position of the peak of the pattern's
    auto-convolution ``(p * p)`` (a radial or any point-symmetric mask; works when the pattern is larger
    than the frame). ``centroid``: the energy centroid above the median. ``peak``: the brightest pixel of a
    lightly smoothed copy. ``auto``: symmetry when the auto-convolution has a clear peak (≥ 3× its mean
    magnitude), else the centroid. Computed on a copy binned to about ``work_side`` px.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3:
        img = img.mean(axis=0)
    if img.ndim != 2 or min(img.shape) < 4:
        raise ProfileError(f"PSF image: expected a 2-D image, got shape {np.shape(image)}")
    f = max(1, int(max(img.shape) // work_side))
    small = box_downsample(img, f).astype(np.float64) if f > 1 else img
    small = np.maximum(small - np.median(small), 0.0)
    if not small.any():
        raise ProfileError("PSF image: no pattern above the background (all pixels at the median)")
    H, W = small.shape
    if method in ("symmetry", "auto"):
        S = np.fft.rfft2(small, s=(2 * H, 2 * W))
        ac = np.fft.irfft2(S * S, s=(2 * H, 2 * W))
        r, c = np.unravel_index(int(np.argmax(ac)), ac.shape)
        clear = ac.max() >= 3.0 * np.abs(ac).mean()
        if method == "symmetry" or clear:
            return ((r / 2 + 0.5) * f - 0.5, (c / 2 + 0.5) * f - 0.5)
    if method in ("centroid", "auto"):
        tot = small.sum()
        r = float((small.sum(axis=1) * np.arange(H)).sum() / tot)
        c = float((small.sum(axis=0) * np.arange(W)).sum() / tot)
        return ((r + 0.5) * f - 0.5, (c + 0.5) * f - 0.5)
    if method == "peak":
        import cv2

        blurred = cv2.GaussianBlur(small.astype(np.float32), (0, 0), 1.0)
        r, c = np.unravel_index(int(np.argmax(blurred)), blurred.shape)
        return ((r + 0.5) * f - 0.5, (c + 0.5) * f - 0.5)
    raise ProfileError(f"unknown PSF centring {method!r}; use auto, symmetry, centroid or peak")


def centred_box(center: tuple[float, float], size: tuple[int, int]) -> list[int]:
    """``[top, left, h, w]`` of the ``size`` box centred on ``center`` (the centre pixel at ``(h // 2, w // 2)``)."""
    h, w = int(size[0]), int(size[1])
    return [int(round(center[0])) - h // 2, int(round(center[1])) - w // 2, h, w]


def cut_box(img: np.ndarray, box: list[int]) -> np.ndarray:
    """``img[..., top:top+h, left:left+w]``, zero outside the image (a box may overhang the frame)."""
    top, left, h, w = box
    out = np.zeros(img.shape[:-2] + (h, w), dtype=np.float32)
    H, W = img.shape[-2:]
    r0, r1 = max(top, 0), min(top + h, H)
    c0, c1 = max(left, 0), min(left + w, W)
    if r1 > r0 and c1 > c0:
        out[..., r0 - top : r1 - top, c0 - left : c1 - left] = img[..., r0:r1, c0:c1]
    return out


def prepare_psf(image: np.ndarray, *, center: tuple[float, float], size: tuple[int, int], downsample: int,
                background: float | np.ndarray = 0.0, channels: int = 1) -> np.ndarray:
    """The PSF on ``y``'s pixel grid from a PSF image ``(C, H, W)`` in counts: cut the ``size`` box centred on
    ``center`` (zero outside the frame), subtract ``background``, clip at 0, box-downsample, (mean to one
    channel), normalise to unit sum. Float32 ``(channels, h // ds, w // ds)``."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        img = img[None]
    psf = np.maximum(cut_box(img, centred_box(center, size)) - np.asarray(background, np.float32), 0.0)
    psf = box_downsample(psf, int(downsample))
    if channels == 1 and psf.shape[0] == 3:
        psf = psf.mean(axis=0, keepdims=True)
    check_psf(psf, "PSF")
    try:
        return normalize(psf, "sum")
    except OpticsError:
        raise ProfileError("PSF: nothing left above the background in the PSF box") from None


# ---- noise and signal ------------------------------------------------------------------------------
def noise_std_immerkaer(y: np.ndarray) -> float:
    """Immerkær's fast noise estimate of ``(C, H, W)`` (median over channels): with the Laplacian-difference
    kernel ``N = [[1, −2, 1], [−2, 4, −2], [1, −2, 1]]``, ``σ = √(π/2) / (6 (W−2)(H−2)) Σ |y * N|``. Lensless
    measurements are smooth, so high-frequency energy is noise."""
    y = np.asarray(y, dtype=np.float64)
    if y.ndim == 2:
        y = y[None]
    if min(y.shape[-2:]) < 3:
        raise ProfileError(f"noise estimate: image {y.shape} is too small")
    per_channel = math.sqrt(math.pi / 2) * _laplacian_abs(y).mean(axis=(-2, -1)) / 6.0
    return float(np.median(per_channel))


def _laplacian_abs(y: np.ndarray) -> np.ndarray:
    """``|y * N|`` for Immerkær's kernel ``N = [[1, −2, 1], [−2, 4, −2], [1, −2, 1]]`` (valid part, per channel)."""
    return np.abs(y[..., :-2, :-2] - 2 * y[..., :-2, 1:-1] + y[..., :-2, 2:]
                  - 2 * y[..., 1:-1, :-2] + 4 * y[..., 1:-1, 1:-1] - 2 * y[..., 1:-1, 2:]
                  + y[..., 2:, :-2] - 2 * y[..., 2:, 1:-1] + y[..., 2:, 2:])


def fit_noise_model(ys: list[np.ndarray], block: int = 8) -> NoiseModel:
    """``var = σ_r² + g·y`` from blocks of the captures: per ``block``² tile the Immerkær variance against the
    tile's mean, a least-squares line through them (σ_r², g ≥ 0). Only measurements are used."""
    means, variances = [], []
    for y in ys:
        y = np.asarray(y, dtype=np.float64)
        lap = _laplacian_abs(y)  # (C, H − 2, W − 2), centred on y[1:-1, 1:-1]
        C, h, w = lap.shape
        nb_r, nb_c = h // block, w // block
        if nb_r == 0 or nb_c == 0:
            continue
        tiles = lap[:, : nb_r * block, : nb_c * block].reshape(C, nb_r, block, nb_c, block)
        sigma = math.sqrt(math.pi / 2) * tiles.mean(axis=(2, 4)) / 6.0
        inner = y[:, 1 : 1 + nb_r * block, 1 : 1 + nb_c * block].reshape(C, nb_r, block, nb_c, block)
        means.append(inner.mean(axis=(2, 4)).ravel())
        variances.append((sigma ** 2).ravel())
    if not means or sum(m.size for m in means) < 4:
        raise ProfileError("noise model: the captures are too small to estimate it")
    m, v = np.concatenate(means), np.concatenate(variances)
    A = np.stack([np.ones_like(m), np.maximum(m, 0)], axis=1)
    (a, b), *_ = np.linalg.lstsq(A, v, rcond=None)
    if b < 0 or a < 0:  # no measurable signal dependence: a constant noise level
        return NoiseModel(read_std=float(math.sqrt(max(np.median(v), 0.0))), shot_gain=0.0,
                          rule=f"Immerkær estimate on {block}² tiles (no signal dependence found)")
    return NoiseModel(read_std=float(math.sqrt(a)), shot_gain=float(b),
                      rule=f"Immerkær variance on {block}² tiles against the tile mean, least squares")


def signal_stats(ys: list[np.ndarray]) -> dict:
    """Percentiles of ``y`` over the captures, their count and their channels."""
    values = np.concatenate([np.asarray(y, np.float32).ravel() for y in ys])
    p50, p99, p999 = np.percentile(values, [50, 99, 99.9])
    return {"p50": float(p50), "p99": float(p99), "p999": float(p999), "max": float(values.max()), "n": len(ys),
            "channels": int(np.asarray(ys[0]).shape[0]) if np.asarray(ys[0]).ndim == 3 else 1}


# ---- the profile ------------------------------------------------------------------------------------
@dataclass
class CameraProfile:
    """A loaded, validated camera profile (see the module docstring)."""

    name: str
    preprocess: PreprocessConfig
    psf: np.ndarray
    geometry: LenslessGeometry
    lam: float
    noise: NoiseModel
    lam_rule: str = "given"
    projector: str = "tikhonov"
    support: SupportWindow | None = None
    signal: dict = field(default_factory=dict)
    psf_recipe: dict = field(default_factory=dict)
    reference_exposure_us: float | None = None
    root: Path | None = None

    # -- grids ----------------------------------------------------------------------------------
    @property
    def sensor_shape(self) -> tuple[int, int]:
        return self.geometry.sensor_shape

    @property
    def channels(self) -> int:
        """Channels of ``y``: 1 for a grayscale profile or a mono camera (its signal statistics say how many the
        captures had), else 3."""
        return 1 if self.preprocess.grayscale or self.signal.get("channels") == 1 else 3

    # -- raw → y --------------------------------------------------------------------------------
    def preprocessor(self):
        from nsdd_edge.preprocess import Preprocessor

        return Preprocessor(self.preprocess, self.root)

    def measurement(self, path: str | os.PathLike, exposure_us: float | None = None) -> np.ndarray:
        """``y`` of a saved capture (exposure from ``exposure_us`` or the file name), as the runtime makes it."""
        from nsdd_edge.preprocess import preprocess_capture

        try:
            y = preprocess_capture(path, self.preprocess, self.root, exposure_us=exposure_us)
        except (OpticsError, ValueError) as exc:
            raise ProfileError(str(exc)) from None
        if tuple(y.shape[-2:]) != self.sensor_shape:
            raise ProfileError(f"{path}: y is {tuple(y.shape[-2:])} after the profile's preprocessing, the profile's "
                               f"sensor is {self.sensor_shape} (a capture from another camera or resolution?)")
        return y

    # -- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": PROFILE_FORMAT, "version": PROFILE_VERSION, "name": self.name,
            "preprocess": asdict(self.preprocess),
            "psf": {"file": "psf.npy", "sha256": array_hash(self.psf), "shape": list(self.psf.shape),
                    "recipe": self.psf_recipe},
            "geometry": self.geometry.to_dict(),
            "recon": {"lam": self.lam, "lam_rule": self.lam_rule, "projector": self.projector},
            "support": None if self.support is None else {"shape": list(self.support.shape),
                                                          "taper": self.support.taper},
            "noise": asdict(self.noise), "signal": self.signal,
            "exposure": {"reference_us": self.reference_exposure_us},
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """``DIR/camera.json`` and ``DIR/psf.npy`` (atomic); also copies a background frame it names."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(d / "psf.npy", np.ascontiguousarray(self.psf, dtype=np.float32))
        if self.preprocess.background_file and self.root is not None and Path(self.root).resolve() != d.resolve():
            import shutil

            shutil.copy2(Path(self.root) / self.preprocess.background_file, d / self.preprocess.background_file)
        atomic_write_text(d / PROFILE_NAME, json.dumps(self.to_dict(), indent=2) + "\n")
        self.root = d
        return d / PROFILE_NAME


def _number(d: dict, key: str, where: str, *, positive: bool = False, minimum: float | None = None,
            optional: bool = False) -> float | None:
    value = d.get(key)
    if value is None and optional:
        return None
    return check_real(value, f"{where}.{key}", positive=positive, minimum=minimum, error=ProfileError)


def _dict(d: Any, where: str, optional: bool = False) -> dict:
    if d is None and optional:
        return {}
    if not isinstance(d, dict):
        raise ProfileError(f"{where}: expected an object, got {type(d).__name__}")
    return d


def _shape(value: Any, where: str) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ProfileError(f"{where}: expected [height, width], integers in 1..{MAX_SIDE}, got {value!r}")
    h, w = (check_int(v, where, minimum=1, maximum=MAX_SIDE, error=ProfileError) for v in value)
    return h, w


def profile_from_dict(d: Any, root: Path | None = None, psf: np.ndarray | None = None) -> CameraProfile:
    """Validate a profile record (types, ranges, finite values, bounded sizes) and load its PSF."""
    d = _dict(d, PROFILE_NAME)
    if d.get("format") != PROFILE_FORMAT:
        raise ProfileError(f"{PROFILE_NAME}: format is {d.get('format')!r}, expected {PROFILE_FORMAT!r}")
    version = d.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= PROFILE_VERSION:
        raise ProfileError(f"{PROFILE_NAME}: version {version!r} is not one this runtime reads (1..{PROFILE_VERSION})")
    name = d.get("name")
    if not isinstance(name, str) or not name or len(name) > 200:
        raise ProfileError(f"{PROFILE_NAME}.name: expected a non-empty string, got {name!r}")
    try:
        preprocess = PreprocessConfig.from_dict(_dict(d.get("preprocess"), "preprocess"))
    except (BundleError, TypeError) as exc:
        raise ProfileError(f"preprocess: {exc}") from None
    g = _dict(d.get("geometry"), "geometry")
    try:
        for key in ("sensor_shape", "scene_shape", "conv_shape"):
            _shape(g.get(key), f"geometry.{key}")
        geometry = LenslessGeometry.from_dict(g)
    except (OpticsError, KeyError, TypeError) as exc:
        raise ProfileError(f"geometry: {exc}") from None
    p = _dict(d.get("psf"), "psf")
    if psf is None:
        if p.get("file") != "psf.npy":
            raise ProfileError(f"psf.file: must be 'psf.npy' (inside the profile directory), got {p.get('file')!r}")
        if root is None:
            raise ProfileError("psf: a profile record without its directory cannot load its PSF")
        conv = geometry.conv_shape
        psf = read_bounded_array(Path(root), "psf.npy", "psf.file", max_values=3 * conv[0] * conv[1],
                                 error=ProfileError)
    if p.get("sha256") is not None and array_hash(psf) != p.get("sha256"):
        raise ProfileError("psf: psf.npy does not match the profile's sha256 (changed after calibration?)")
    check_psf_content(np.asarray(psf, dtype=np.float32), geometry.conv_shape, "psf", ProfileError)
    r = _dict(d.get("recon"), "recon")
    lam = _number(r, "lam", "recon", positive=True)
    projector = r.get("projector", "tikhonov")
    if projector not in PROJECTORS:
        raise ProfileError(f"recon.projector: {projector!r} is not one of {', '.join(PROJECTORS)}")
    n = _dict(d.get("noise"), "noise")
    noise = NoiseModel(read_std=_number(n, "read_std", "noise", minimum=0.0),
                       shot_gain=_number(n, "shot_gain", "noise", minimum=0.0) if "shot_gain" in n else 0.0,
                       rule=str(n.get("rule", "")))
    support = None
    if d.get("support") is not None:
        s = _dict(d["support"], "support")
        shape = _shape(s.get("shape"), "support.shape")
        if shape[0] > geometry.scene_shape[0] or shape[1] > geometry.scene_shape[1]:
            raise ProfileError(f"support.shape {list(shape)} is larger than the scene grid "
                               f"{list(geometry.scene_shape)}")
        taper = s.get("taper", 0)
        if not isinstance(taper, int) or isinstance(taper, bool) or not 0 <= taper <= min(shape) // 2:
            raise ProfileError(f"support.taper: expected an integer in 0..{min(shape) // 2}, got {taper!r}")
        support = SupportWindow(shape, taper)
    e = _dict(d.get("exposure"), "exposure", optional=True)
    ref = _number(e, "reference_us", "exposure", positive=True, optional=True)
    signal = _dict(d.get("signal"), "signal", optional=True)
    return CameraProfile(name=name, preprocess=preprocess, psf=psf, geometry=geometry, lam=float(lam),
                         lam_rule=str(r.get("lam_rule", "given")), projector=projector, noise=noise,
                         support=support, signal=dict(signal), psf_recipe=dict(p.get("recipe") or {}),
                         reference_exposure_us=ref, root=root)


def load_profile(path: str | os.PathLike) -> CameraProfile:
    """A profile directory (holding ``camera.json``) or the ``camera.json`` file itself."""
    p = Path(path)
    file = p / PROFILE_NAME if p.is_dir() else p
    if not file.is_file():
        raise ProfileError(f"{p}: no camera profile ({PROFILE_NAME}) there")
    if file.stat().st_size > 1 << 20:
        raise ProfileError(f"{file}: {file.stat().st_size} bytes is too large for a camera profile")
    record = parse_json_bounded(file.read_bytes(), str(file), ProfileError)
    try:
        return profile_from_dict(record, root=file.parent)
    except ProfileError as exc:
        raise ProfileError(f"{file}: {exc}") from None


def list_captures(where: str | os.PathLike) -> list[Path]:
    """Capture files of a folder (sorted), a glob pattern, or one file."""
    text = str(where)
    p = Path(text)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in CAPTURE_SUFFIXES)
    elif p.is_file():
        files = [p]
    else:
        import glob

        files = sorted(Path(f) for f in glob.glob(text) if Path(f).is_file())
    if not files:
        raise ProfileError(f"{text}: no capture files ({', '.join(CAPTURE_SUFFIXES)}) found")
    return files
