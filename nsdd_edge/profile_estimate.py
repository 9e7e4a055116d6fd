"""Estimate a camera profile from a PSF image and a folder of real captures (no ground truth).

``profile_from_captures`` decides, from the data:

1. the PSF pattern's centre in the PSF image (:func:`nsdd_edge.camera.locate_psf_center`);
2. the full-resolution crop of the captures (a square centred on the PSF centre: the scene point on the
   optical axis lands there) and the integer binning that gives the requested sensor grid;
3. the PSF on that pixel grid: the largest square around its centre that the PSF image holds, minus its
   dark level (a low percentile of the PSF image, or a dark frame), binned the same way, unit sum;
4. the forward model: the crop model with the scene on a grid of sensor + PSF (everything that reaches the
   sensor through a full-aperture mask) — nothing is assumed black;
5. the fixed intensity scale (``y`` ≈ 1 at the 99.9th percentile of the longest-exposure captures) and the
   reference exposure (captures named ``…_NNNNus`` are normalised to it);
6. the noise model from the captures themselves (Immerkær per tile, against the tile mean);
7. the reconstruction λ by the discrepancy principle (``rms(y − A A†y) = σ``), and
8. the scenes' extent: the centred window holding ``energy`` of the Wiener reconstructions' contrast, with a
   soft edge.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nsdd_edge.bundle import PreprocessConfig
from nsdd_edge.camera import (
    CameraProfile,
    NoiseModel,
    ProfileError,
    SupportWindow,
    centred_box,
    fit_noise_model,
    list_captures,
    locate_psf_center,
    prepare_psf,
    signal_stats,
)
from nsdd_edge.optics import LenslessGeometry, OpticsError, WienerFilter, discrepancy_lambda, read_array
from nsdd_edge.preprocess import Preprocessor, exposure_from_name, preprocess_capture


def _even(n: int) -> int:
    return n + (n % 2)


def _white_level(path: Path) -> float | None:
    """The saturation level of an integer image file (its dtype's maximum), else None (.npy floats)."""
    from nsdd_edge.optics import IMAGE_SUFFIXES, read_image_native

    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return None
    raw = read_image_native(path)
    return float(np.iinfo(raw.dtype).max) if np.issubdtype(raw.dtype, np.integer) else None


def scene_extent(x: np.ndarray, energy: float = 0.9, multiple: int = 16) -> tuple[int, int]:
    """The smallest centred square (side a multiple of ``multiple``) holding ``energy`` of the contrast
    ``|x − median(x)|`` summed over channels and images ``(N, C, H, W)``."""
    e = np.abs(x - np.median(x, axis=(-2, -1), keepdims=True)).sum(axis=(0, 1))
    H, W = e.shape
    total = e.sum()
    if not total > 0:
        return H, W
    for side in range(multiple, min(H, W) + 1, multiple):
        r, c = (H - side) // 2, (W - side) // 2
        if e[r : r + side, c : c + side].sum() >= energy * total:
            return side, side
    return H, W


def saturation_map(profile: CameraProfile, path: str | os.PathLike) -> np.ndarray | None:
    """``(C, H, W)`` bool like ``y``: the pixels of each channel of ``y`` that a saturated raw pixel (≥ the profile's
    white level, else the integer file's maximum) reaches, or None when nothing saturates or no level is known.

    The raw indicator goes through the profile's own preprocessing (crop, Bayer binning, downsample, flips) with
    no black level, background, normalisation or exposure scaling: one raw → y path, also for the mask."""
    from dataclasses import replace

    white = profile.preprocess.white_level or _white_level(Path(path))
    if white is None:
        return None
    a = read_array(path)
    raw = a[0] if a.shape[0] == 1 else np.moveaxis(a, 0, -1)
    hit = (raw >= white).astype(np.float32)
    if not hit.any():
        return None
    plain = replace(profile.preprocess, black_level=0.0, white_level=None, background_file=None,
                    background_sha256=None, normalization="none", scale=1.0, reference_exposure_us=None)
    covered = Preprocessor(plain, profile.root)(hit)
    mask = np.asarray(covered).reshape((-1,) + tuple(covered.shape[-2:])) > 0
    return mask if mask.any() else None


def pseudo_inverse_kind(psf_shape: tuple[int, ...], sensor_shape: tuple[int, int]) -> str:
    """The profile's ``A†``: ``cg`` (:func:`nsdd_edge.optics.cg_tikhonov`) when the PSF on y's grid is larger than
    the sensor in either direction, else ``tikhonov``. The zero-padded Wiener filter treats the light that falls
    outside the sensor as 0; with a PSF larger than the sensor that is most of it, and real captures come out
    as streaks (docs/real-cameras.md), while conjugate gradient on the crop model gives the scene."""
    return "cg" if psf_shape[-2] > sensor_shape[0] or psf_shape[-1] > sensor_shape[1] else "tikhonov"


def reconstruction_lambda(psf: np.ndarray, geometry: LenslessGeometry, ys: list[np.ndarray],
                          noise: NoiseModel) -> tuple[float, str, float]:
    """λ of the reconstruction operator by the discrepancy principle at the captures' typical noise level
    (``rms(y − A A†y) = σ``, σ from the noise model at the median signal): ``(λ, the rule in words, σ)``; λ = 1e-3
    if the principle finds none."""
    sigma = float(np.median([noise.std(np.median(y)) for y in ys]))
    try:
        lam = discrepancy_lambda(psf, geometry, np.stack(ys), sigma)
        return float(lam), f"discrepancy principle: rms(y − A A†y) = σ = {sigma:.3g} on {len(ys)} captures", sigma
    except OpticsError as exc:
        return 1e-3, f"1e-3 (the discrepancy principle found no λ: {exc})", sigma


def profile_from_captures(psf_image: str | os.PathLike, captures: str | os.PathLike, *, sensor: int = 128,
                          name: str | None = None, downsample: int | None = None, grayscale: bool = False,
                          center: str | tuple[float, float] = "auto", psf_background: str | float = "percentile",
                          dark: str | os.PathLike | None = None, black_level: float = 0.0,
                          energy: float = 0.9, progress=None) -> tuple[CameraProfile, dict]:
    """A :class:`CameraProfile` estimated from the data (module docstring) and a report of what was found."""
    say = progress or (lambda msg: None)
    try:
        psf_raw = read_array(psf_image)
    except OpticsError as exc:
        raise ProfileError(f"--psf-image {exc}") from None
    files = list_captures(captures)
    try:
        first = read_array(files[0])
    except OpticsError as exc:
        raise ProfileError(f"capture {exc}") from None
    H, W = first.shape[-2:]
    if psf_raw.shape[-2:] != (H, W):
        raise ProfileError(f"--psf-image {psf_image} is {psf_raw.shape[-2]}x{psf_raw.shape[-1]}, the captures are "
                           f"{H}x{W}: the PSF must be imaged by the same sensor at the same resolution")
    if isinstance(center, str):
        cy, cx = locate_psf_center(psf_raw, center)
    else:
        cy, cx = float(center[0]), float(center[1])
    say(f"PSF centre at row {cy:.1f}, column {cx:.1f} of the {H}x{W} PSF image")

    # the capture crop: a square centred on the PSF centre, binned to the sensor grid
    room = 2 * int(min(cy, H - 1 - cy, cx, W - 1 - cx)) + 1
    if downsample is None:
        downsample = max(1, room // sensor)
    side = downsample * sensor
    box = centred_box((cy, cx), (side, side))
    if box[0] < 0 or box[1] < 0 or box[0] + side > H or box[1] + side > W:
        raise ProfileError(f"a {side}x{side} crop (sensor {sensor} × {downsample}) centred on the PSF at "
                           f"({cy:.0f}, {cx:.0f}) does not fit the {H}x{W} frame; ask for a smaller --sensor or "
                           "--downsample")

    # the PSF on the same pixel grid
    dark_frame = None
    if dark is not None:
        dark_frame = read_array(dark)
        psf_level: float | np.ndarray = dark_frame
        level_rule = f"dark frame {dark}"
    elif psf_background == "percentile":
        psf_level = float(np.percentile(psf_raw, 1.0))
        level_rule = "1st percentile of the PSF image"
    else:
        psf_level = float(psf_background)
        level_rule = "given"
    psf_side = _even(2 * int(min(cy, H - 1 - cy, cx, W - 1 - cx)) + 1) // downsample * downsample
    psf = prepare_psf(psf_raw - (psf_level if isinstance(psf_level, np.ndarray) else 0.0),
                      center=(cy, cx), size=(psf_side, psf_side), downsample=downsample,
                      background=0.0 if isinstance(psf_level, np.ndarray) else psf_level,
                      channels=1 if (grayscale or psf_raw.shape[0] == 1) else 3)
    conv = _even(sensor + psf.shape[-1])
    geometry = LenslessGeometry.make("crop", (sensor, sensor), psf.shape[-2:], scene_shape=(conv, conv),
                                     conv_shape=(conv, conv))
    say(f"capture crop {box} (full resolution) binned ×{downsample} → {sensor}x{sensor}; PSF {psf_side}² → "
        f"{psf.shape[-1]}²; forward model: crop, scene = convolution grid {conv}²")

    # y: raw crop, dark, binning, fixed scale (from the longest exposures), exposure normalisation
    exposures = [exposure_from_name(f) for f in files]
    known = [e for e in exposures if e is not None]
    reference = max(known) if known else None
    background_file = None
    if dark_frame is not None:
        background_file = "dark.npy"
    white = _white_level(files[0])
    base = PreprocessConfig(black_level=float(black_level), raw_crop=box, downsample=int(downsample),
                            grayscale=grayscale, normalization="none", background_file=background_file,
                            white_level=white)
    root = None
    if dark_frame is not None:
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="nsdd-profile-"))
        np.save(root / "dark.npy", dark_frame.astype(np.float32))
    counts = {}  # counts above black (and dark), binned; no scale yet
    saturated: dict[str, float] = {}
    for f in files:  # one read per capture; the preprocessor measures saturation on the cropped raw frame
        try:
            pre = Preprocessor(base, root)
            counts[f] = preprocess_capture(f, base, root, preprocessor=pre)
        except (OpticsError, ValueError) as exc:
            raise ProfileError(f"capture {exc}") from None
        if white is not None:
            saturated[str(f)] = pre.saturated_fraction
    for f, frac in saturated.items():
        if frac > 0.01:
            say(f"warning: {Path(f).name}: {frac:.0%} of the cropped raw pixels are saturated (≥ {white:g}); its y "
                "is too dark and its reconstruction unreliable — use a shorter exposure")
    ref_files = [f for f, e in zip(files, exposures) if e == reference] if reference is not None else files
    scale = float(np.median([np.percentile(counts[f], 99.0) for f in ref_files]))  # robust to saturated captures
    if not scale > 0:
        raise ProfileError("the captures are dark after the crop (99.9th percentile ≤ 0): nothing to calibrate on")
    preprocess = PreprocessConfig(**{**base.__dict__, "normalization": "fixed", "scale": scale,
                                     "reference_exposure_us": reference})
    ys = {f: counts[f] / scale * ((reference / e) if (reference and e) else 1.0) for f, e in zip(files, exposures)}
    ref_ys = [ys[f] for f in ref_files]
    noise = fit_noise_model(ref_ys)
    say(f"scale {scale:.4g} counts per unit y at {reference or '(unknown)'} µs; noise σ_r = {noise.read_std:.3g}, "
        f"shot gain {noise.shot_gain:.3g}")

    # λ by the discrepancy principle at the captures' typical noise level, on the reconstruction operator
    profile = CameraProfile(name=name or Path(str(captures)).name or "camera", preprocess=preprocess, psf=psf,
                            geometry=geometry, lam=1e-3, noise=noise, signal=signal_stats(ref_ys),
                            reference_exposure_us=reference, root=root,
                            psf_recipe={"source": str(psf_image), "center": [round(cy, 2), round(cx, 2)],
                                        "center_rule": center if isinstance(center, str) else "given",
                                        "box": centred_box((cy, cx), (psf_side, psf_side)),
                                        "downsample": int(downsample), "dark_level": level_rule})
    lam, lam_rule, sigma = reconstruction_lambda(psf, geometry, ref_ys, noise)
    profile.lam, profile.lam_rule = lam, lam_rule
    profile.projector = pseudo_inverse_kind(psf.shape[-2:], geometry.sensor_shape)
    say(f"λ = {lam:.3g} ({lam_rule}); pseudo-inverse {profile.projector}"
        + (" (the PSF is larger than the sensor: A† solves the crop model by conjugate gradient)"
           if profile.projector == "cg" else ""))

    # where the scenes are: the centred window holding most of the Wiener reconstructions' contrast
    wiener = WienerFilter(psf, geometry, lam, profile.projector)
    x = np.stack([wiener(y) for y in ref_ys])
    h, w = scene_extent(x, energy)
    grid = geometry.scene_shape
    taper = max(2, min(h, w) // 8) if (h, w) != grid else 0
    profile.support = None if (h, w) == grid else SupportWindow((h, w), taper)
    say(f"scene extent: {h}x{w} of the {grid[0]}x{grid[1]} scene grid ({energy:.0%} of the Wiener "
        f"reconstructions' contrast), taper {taper}")
    report = {"center": [cy, cx], "crop": box, "downsample": downsample, "psf_side": psf_side,
              "conv": conv, "scale": scale, "reference_exposure_us": reference, "noise": noise.__dict__,
              "sigma": sigma, "lam": lam, "lam_rule": lam_rule, "support": [h, w], "taper": taper,
              "captures": [str(f) for f in files], "exposures_us": exposures, "wiener": x, "saturated": saturated,
              "y": {str(f): ys[f] for f in files}}
    return profile, report
