"""Raw frame → measurement ``y`` (float32 ``(C, H, W)``), applying a bundle's :class:`PreprocessConfig`.

Order (the one documented on :class:`nsdd_edge.bundle.PreprocessConfig`)::

    y = exposure( normalise( grayscale( channels( flip( crop( box_downsample(
            bayer(raw_crop(raw)) − black − background )))))))

- ``bayer``: ``bin2x2`` averages each 2×2 Bayer cell into one RGB pixel (R, mean of the two G, B; half
  resolution), ``bilinear`` is OpenCV's bilinear demosaic (full resolution). Frames without a
  ``bayer_pattern`` are mono ``(H, W)`` or RGB ``(H, W, 3)``.
- ``background_file`` (in the bundle) is a dark frame in raw counts with the same shape as the raw
  frames; it goes through the same black-level and Bayer steps once, at the first frame.
- ``raw_crop`` cuts the raw frame at full resolution before anything else (a background frame is cut the
  same way; for a Bayer mosaic the crop must start on an even row and column).
- Normalisation: ``max`` divides by the frame's maximum, ``fixed`` by ``scale`` (e.g. the camera gain in
  counts per unit of ``y``), ``none`` keeps counts. Negative values (noise below the black level) are
  kept, so the noise stays zero-mean as in the simulated training data.
- Exposure: with ``reference_exposure_us`` set, ``y`` is scaled by ``reference / exposure_us`` of the frame
  (``Frame.meta["exposure_us"]``, or the ``…_NNNNus`` of a capture's file name), so captures at different
  exposures share one physical scale; a frame whose exposure is unknown is taken at the reference.

Frames that cannot be processed (wrong dtype or shape, NaN/Inf, all dark under ``max``) raise
:class:`FrameRejected` (a ``ValueError``) with the reason, so the real-time loop can count and skip them.

The camera profile: given a frame's ``meta`` (``Preprocessor(config)(raw, meta)``), its bit depth / white level,
Bayer order and black level are checked against the bundle's (:meth:`Preprocessor.check_profile`); a mismatch
— e.g. a bundle calibrated on a Pi 4 (12-bit, white 4095) fed 16-bit words (×16) — raises
:class:`ProfileMismatch` (a :class:`~nsdd_edge.bundle.BundleError`): no frame of that camera mode can be right.
A frame a capture host already preprocessed with the same settings (``serve-camera --model``: meta
``preprocessed.digest`` = :func:`preprocess_digest`) is taken as ``y`` as is; with other settings it is refused.
Settings of the wrong type or range raise :class:`~nsdd_edge.validate.ProfileError` (a ``ValueError``) when the
preprocessor is made (:func:`~nsdd_edge.validate.validate_profile`); settings that cannot fit the camera's
frames at all (a crop outside the image, a background frame of another shape) raise it at the first frame: no
later frame could pass either.
The same code prepares training data from real captures: :func:`preprocess_capture`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from nsdd_edge.bundle import (  # noqa: F401 - the lists are re-exported (calibrate imports them from here)
    BAYER_PATTERNS,
    DEMOSAIC_METHODS,
    NORMALIZATIONS,
    BundleError,
    PreprocessConfig,
    file_sha256,
)
from nsdd_edge.optics import IMAGE_SUFFIXES, OpticsError, box_downsample, read_array
from nsdd_edge.validate import ProfileError, validate_profile


class FrameRejected(ValueError):
    """A frame the preprocessor cannot use; the message says why."""


class ProfileMismatch(BundleError):
    """The camera's frames are not those the bundle was calibrated for (bit depth, Bayer order, black level, or
    a capture host's preprocessing); the message names both sides."""


def preprocess_digest(config: PreprocessConfig, background: str | os.PathLike | None = None) -> str:
    """SHA-256 of the preprocessing settings (canonical JSON) and the background frame's bytes: two
    preprocessors with the same digest turn the same raw frame into the same ``y``."""
    record = {"config": asdict(config), "background_sha256": file_sha256(background) if background else None}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def bayer_offsets(pattern: str) -> dict[str, list[tuple[int, int]]]:
    """Positions of R, G, B in the 2×2 cell: ``'RGGB'`` → ``{'R': [(0, 0)], 'G': [(0, 1), (1, 0)], 'B': [(1, 1)]}``."""
    pattern = pattern.upper()
    if pattern not in BAYER_PATTERNS:
        raise ValueError(f"unknown Bayer pattern {pattern!r}; use one of {', '.join(BAYER_PATTERNS)}")
    pos: dict[str, list[tuple[int, int]]] = {"R": [], "G": [], "B": []}
    for k, letter in enumerate(pattern):
        pos[letter].append((k // 2, k % 2))
    return pos


def bin_bayer(raw: np.ndarray, pattern: str, out: np.ndarray | None = None) -> np.ndarray:
    """2×2 binning of a Bayer mosaic ``(2h, 2w)`` into RGB float32 ``(3, h, w)``: ``(R, (G₁+G₂)/2, B)``."""
    pos = bayer_offsets(pattern)
    h, w = raw.shape[0] // 2, raw.shape[1] // 2
    if out is None:
        out = np.empty((3, h, w), np.float32)
    (r0, r1), = pos["R"]
    (b0, b1), = pos["B"]
    (g0, g1), (g2, g3) = pos["G"]
    out[0] = raw[r0 : 2 * h : 2, r1 : 2 * w : 2]
    out[2] = raw[b0 : 2 * h : 2, b1 : 2 * w : 2]
    np.add(raw[g0 : 2 * h : 2, g1 : 2 * w : 2], raw[g2 : 2 * h : 2, g3 : 2 * w : 2], out=out[1], dtype=np.float32)
    out[1] *= 0.5
    return out


def _cv2_bayer_code(pattern: str) -> int:
    import cv2

    code = getattr(cv2, f"COLOR_Bayer{pattern}2RGB", None)
    if code is None:  # OpenCV < 4.8 names a pattern after the second row: RGGB sensors are "BayerBG"
        legacy = {"RGGB": "BG", "BGGR": "RG", "GRBG": "GB", "GBRG": "GR"}[pattern]
        code = getattr(cv2, f"COLOR_Bayer{legacy}2RGB")
    return int(code)


def demosaic_bilinear(raw: np.ndarray, pattern: str) -> np.ndarray:
    """OpenCV bilinear demosaic of a uint8/uint16 mosaic ``(H, W)`` → RGB float32 ``(3, H, W)``."""
    import cv2

    bayer_offsets(pattern)  # validates
    if raw.dtype not in (np.uint8, np.uint16):
        raise FrameRejected(f"bilinear demosaic needs uint8/uint16 raw counts, got {raw.dtype}")
    rgb = cv2.cvtColor(np.ascontiguousarray(raw), _cv2_bayer_code(pattern.upper()))
    return np.moveaxis(rgb, -1, 0).astype(np.float32)


class Preprocessor:
    """``Preprocessor(config, bundle_root)(raw) -> y`` float32 ``(C, H, W)``; see the module docstring.

    The raw frame shape is fixed by the first frame (or ``expected_shape``); later frames of another
    shape are rejected. Constants (slices, permutations, the processed background) are prepared once.
    """

    def __init__(self, config: PreprocessConfig, bundle_root: str | os.PathLike | None = None, *,
                 expected_shape: tuple[int, ...] | None = None):
        self.config = c = validate_profile(config)  # types and ranges of every setting (ProfileError, a ValueError)
        self.pattern = c.bayer_pattern
        order = c.channel_order.upper()
        self._perm = None if order == "RGB" else np.array(["RGB".index(ch) for ch in order])
        self._black = np.float32(c.black_level)
        self._background_raw: np.ndarray | None = None
        self.background_path: Path | None = None
        if c.background_file:
            if bundle_root is None:
                raise ProfileError(f"preprocess: background_file {c.background_file!r} needs the bundle directory")
            self.background_path = Path(bundle_root) / c.background_file
            try:
                self._background_raw = read_array(self.background_path)
            except OpticsError as exc:
                raise ProfileError(f"preprocess: background frame: {exc}") from None
        self.digest = preprocess_digest(c, self.background_path)
        self._checked_profile: tuple | None = None
        self._raw_shape: tuple[int, ...] | None = tuple(expected_shape) if expected_shape else None
        self._background: np.ndarray | None = None
        self._bin_out: np.ndarray | None = None
        self.saturated_fraction = 0.0  # of the last frame, when white_level is set
        if self._raw_shape is not None:
            self._prepare(self._raw_shape)

    # -- shape bookkeeping ------------------------------------------------------------------------

    def _check_layout(self, shape: tuple[int, ...]) -> None:
        if self.pattern is not None:
            if len(shape) != 2:
                raise FrameRejected(f"expected a 2-D Bayer mosaic ({self.pattern}), got a frame of shape {shape}")
            if shape[0] % 2 or shape[1] % 2 or min(shape) < 2:
                raise FrameRejected(f"a Bayer mosaic needs even height and width, got {shape}")
        elif not (len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3))):
            raise FrameRejected(f"expected a mono (H, W) or RGB (H, W, 3) frame, got shape {shape}")

    def _prepare(self, shape: tuple[int, ...]) -> None:
        self._check_layout(shape)
        out_shape = self.output_shape(shape)  # ProfileError if the settings cannot fit frames of this shape
        if self.pattern is not None and self.config.demosaic == "bin2x2":
            rows, cols = (self.config.raw_crop[2:] if self.config.raw_crop is not None else shape[:2])
            self._bin_out = np.empty((3, rows // 2, cols // 2), np.float32)  # the binned (raw-cropped) mosaic
        if self._background_raw is not None:
            bg = self._background_raw  # float32 (C, H, W) in raw counts
            raw_like = bg[0] if bg.shape[0] == 1 else np.moveaxis(bg, 0, -1)
            if raw_like.shape != shape and not (len(shape) == 3 and shape[2] == 1 and raw_like.shape == shape[:2]):
                raise ProfileError(f"preprocess: background frame {self.background_path} has shape {raw_like.shape}, "
                                 f"the camera's raw frames are {shape}")
            raw_like = self._raw_crop(raw_like)
            if self.pattern is not None and self.config.demosaic == "bilinear":
                raw_like = np.clip(np.rint(raw_like), 0, 65535).astype(np.uint16)  # OpenCV demosaics integers only
            self._background = self._sensor_rgb(raw_like, out=None).copy()
        if min(out_shape[1:]) < 1:
            raise ProfileError(f"preprocess: frames of shape {shape} leave nothing after the configured steps")
        self._raw_shape = shape  # only once the settings are known to fit frames of this shape

    def _raw_crop(self, raw: np.ndarray) -> np.ndarray:
        if self.config.raw_crop is None:
            return raw
        top, left, h, w = (int(v) for v in self.config.raw_crop)
        return raw[top : top + h, left : left + w]

    def output_shape(self, raw_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """``(C, H, W)`` of ``y`` for raw frames of ``raw_shape``; ValueError if the settings do not fit."""
        c = self.config
        if c.raw_crop is not None:
            top, left, h, w = (int(v) for v in c.raw_crop)
            if top + h > raw_shape[0] or left + w > raw_shape[1]:
                raise ProfileError(f"preprocess: raw_crop {list(c.raw_crop)} does not fit raw frames of "
                                 f"{raw_shape[0]}x{raw_shape[1]}")
            raw_shape = (h, w, *raw_shape[2:])
        if self.pattern is not None:
            ch = 3
            h, w = (raw_shape[0] // 2, raw_shape[1] // 2) if c.demosaic == "bin2x2" else raw_shape[:2]
        else:
            ch = raw_shape[2] if len(raw_shape) == 3 else 1
            h, w = raw_shape[:2]
        h, w = h // c.downsample, w // c.downsample
        if c.crop is not None:
            top, left, ch_h, ch_w = (int(v) for v in c.crop)
            if top + ch_h > h or left + ch_w > w:
                raise ProfileError(f"preprocess: crop {list(c.crop)} does not fit the {h}x{w} image "
                                 f"(raw {tuple(raw_shape)}, downsample {c.downsample})")
            h, w = ch_h, ch_w
        if ch == 3 and c.grayscale:
            ch = 1
        if self._perm is not None and ch != 3:
            raise ProfileError(f"preprocess: channel_order {c.channel_order!r} needs 3 channels")
        return ch, h, w

    # -- steps ------------------------------------------------------------------------------------

    def _sensor_rgb(self, raw: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        """Bayer/layout step and black level: raw → float32 (C, H, W) counts above black."""
        if self.pattern is not None:
            if self.config.demosaic == "bin2x2":
                x = bin_bayer(raw, self.pattern, out=out)
            else:
                x = demosaic_bilinear(raw, self.pattern)
        elif raw.ndim == 2:
            x = raw.astype(np.float32)[None]
        else:
            x = np.moveaxis(raw, -1, 0).astype(np.float32)
        if self._black:
            x -= self._black
        return x

    def validate(self, frame: np.ndarray) -> np.ndarray:
        """Check dtype, shape and finiteness; returns the frame (as an ndarray) or raises FrameRejected."""
        if not isinstance(frame, np.ndarray):
            raise FrameRejected(f"frame is a {type(frame).__name__}, not a numpy array")
        if frame.dtype.kind not in "uif":
            raise FrameRejected(f"frame has unsupported dtype {frame.dtype} (expected uint8/uint16/float)")
        if frame.size == 0:
            raise FrameRejected(f"frame is empty (shape {frame.shape})")
        if self._raw_shape is None:
            self._prepare(tuple(frame.shape))
        elif tuple(frame.shape) != self._raw_shape:
            raise FrameRejected(f"frame shape {tuple(frame.shape)} differs from the stream's {self._raw_shape}")
        if frame.dtype.kind == "f" and not np.isfinite(frame).all():
            raise FrameRejected(f"frame holds {int((~np.isfinite(frame)).sum())} NaN/Inf values")
        return frame

    def check_profile(self, meta: Mapping[str, Any]) -> None:
        """Compare a frame's ``meta`` with the bundle's profile; :class:`ProfileMismatch` naming both.

        White level (``white_level``, else ``2**bit_depth − 1``) against ``config.white_level``; Bayer order;
        black level (within 5 %, at least 1 count; skipped when a background frame holds the offset). Keys the
        frame or the bundle does not give are not checked. A profile that passed once is not re-checked."""
        key = tuple(meta.get(k) for k in ("white_level", "bit_depth", "bayer_pattern", "black_level"))
        if key == self._checked_profile:
            return
        c = self.config
        problems = []
        white = meta.get("white_level")
        if white is None and meta.get("bit_depth"):
            white = 2.0 ** int(meta["bit_depth"]) - 1
        if white is not None and c.white_level is not None and abs(float(white) - float(c.white_level)) > 0.5:
            ratio = (float(white) + 1) / (float(c.white_level) + 1)
            problems.append(f"the camera's white level is {float(white):g} ({meta.get('bit_depth', '?')}-bit) but the "
                            f"bundle was calibrated for {float(c.white_level):g}"
                            + (f": every value would be ×{ratio:g}" if ratio > 1 else f": every value ×{ratio:.3g}"))
        if "bayer_pattern" in meta:
            theirs = str(meta["bayer_pattern"]).upper() if meta["bayer_pattern"] else None
            if theirs != self.pattern:
                problems.append(f"the camera's Bayer order is {theirs or 'none (RGB/mono)'} but the bundle expects "
                                f"{self.pattern or 'none (RGB/mono)'}")
        black = meta.get("black_level")
        if black is not None and not c.background_file:
            tolerance = max(1.0, 0.05 * max(float(black), float(c.black_level)))
            if abs(float(black) - float(c.black_level)) > tolerance:
                problems.append(f"the camera's black level is {float(black):g} but the bundle subtracts "
                                f"{float(c.black_level):g}")
        if problems:
            raise ProfileMismatch("frames do not match the bundle's camera profile: " + "; ".join(problems)
                                  + ". Use a bundle calibrated for this camera mode (nsdd-edge calibrate), or set "
                                  "preprocess.white_level / bayer_pattern / black_level in its bundle.json")
        self._checked_profile = key

    def _already_preprocessed(self, frame: Any, meta: Mapping[str, Any]) -> np.ndarray | None:
        """``y`` of a frame a capture host preprocessed with these settings; None for a raw frame."""
        done = meta.get("preprocessed")
        if not done:
            return None
        digest = done.get("digest") if isinstance(done, Mapping) else None
        if digest != self.digest:
            raise ProfileMismatch(f"the capture host preprocesses frames with other settings (digest "
                                  f"{str(digest)[:12]}…, bundle {done.get('bundle') if isinstance(done, Mapping) else '?'})"
                                  f" than this bundle ({self.digest[:12]}…): run serve-camera --model with the same "
                                  "bundle, or without --model to send raw frames")
        y = np.asarray(frame)
        if y.ndim != 3 or y.dtype != np.float32:
            raise FrameRejected(f"a preprocessed frame must be float32 (C, H, W), got {y.dtype} {y.shape}")
        if not np.isfinite(y).all():
            raise FrameRejected(f"preprocessed frame holds {int((~np.isfinite(y)).sum())} NaN/Inf values")
        return np.array(y, dtype=np.float32, order="C", copy=True)

    def __call__(self, frame: np.ndarray, meta: Mapping[str, Any] | None = None,
                 exposure_us: float | None = None) -> np.ndarray:
        """``y`` of one raw frame. With the frame's ``meta`` the camera profile is checked first, a frame
        preprocessed by a capture host with the same settings is passed through, and the exposure defaults to
        ``meta["exposure_us"]``; ``exposure_us`` (keyword) overrides it."""
        if meta is not None and not isinstance(meta, Mapping):
            raise TypeError(f"Preprocessor: meta must be a mapping (the frame's metadata), got {type(meta).__name__}; "
                            "pass the exposure as exposure_us=")
        if meta:
            y = self._already_preprocessed(frame, meta)
            if y is not None:
                return y
            self.check_profile(meta)
            if exposure_us is None and meta.get("exposure_us") is not None:
                try:
                    exposure_us = float(meta["exposure_us"])
                except (TypeError, ValueError):
                    raise FrameRejected(f"frame meta exposure_us={meta['exposure_us']!r} is not a number") from None
        c = self.config
        raw = self._raw_crop(self.validate(frame))
        if raw.ndim == 3 and raw.shape[2] == 1:
            raw = raw[..., 0]
        if c.white_level is not None:
            self.saturated_fraction = float(np.count_nonzero(raw >= c.white_level)) / raw.size
        if self.pattern is not None and c.demosaic == "bilinear" and raw.dtype.kind == "f":
            if not np.array_equal(raw, np.rint(raw)) or raw.min() < 0 or raw.max() > 65535:
                raise FrameRejected("bilinear demosaic needs integer raw counts; this float frame has fractions "
                                    "or values outside 0..65535 (use demosaic: bin2x2)")
            raw = raw.astype(np.uint16)
        x = self._sensor_rgb(raw, out=self._bin_out)
        if self._background is not None:
            x -= self._background
        x = box_downsample(x, int(c.downsample))
        if c.crop is not None:
            top, left, h, w = (int(v) for v in c.crop)
            x = x[:, top : top + h, left : left + w]
        if c.flip_vertical:
            x = x[:, ::-1]
        if c.flip_horizontal:
            x = x[:, :, ::-1]
        if self._perm is not None:
            x = x[self._perm]
        if c.grayscale and x.shape[0] == 3:
            x = x.mean(axis=0, keepdims=True)
        y = np.array(x, dtype=np.float32, order="C", copy=True)  # never alias the reusable binning buffer
        if c.normalization == "max":
            peak = float(y.max())
            if not peak > 0:
                raise FrameRejected("frame is all dark (maximum ≤ 0 after black level and background); "
                                    "cannot normalise by its max")
            y *= np.float32(1.0 / peak)
        elif c.normalization == "fixed":
            y *= np.float32(1.0 / c.scale)
        if c.reference_exposure_us is not None and exposure_us is not None:
            if not (np.isfinite(exposure_us) and exposure_us > 0):
                raise FrameRejected(f"frame exposure {exposure_us} µs is not a positive number")
            y *= np.float32(c.reference_exposure_us / float(exposure_us))
        return y


_EXPOSURE_IN_NAME = re.compile(r"(?<![0-9])([0-9]+(?:\.[0-9]+)?)\s*us(?![a-z])", re.IGNORECASE)


def exposure_from_name(path: str | os.PathLike) -> float | None:
    """The exposure a capture's file name states, in µs (``face_00000_15000us.tiff`` → 15000.0), else None."""
    p = Path(path)
    stem = p.name[: -len(p.suffix)] if p.suffix.lower() in (*IMAGE_SUFFIXES, ".npy", ".npz") else p.name
    found = _EXPOSURE_IN_NAME.findall(stem)
    return float(found[-1]) if found else None


def preprocess_capture(path: str | os.PathLike, config: PreprocessConfig,
                       bundle_root: str | os.PathLike | None = None, exposure_us: float | None = None, *,
                       preprocessor: Preprocessor | None = None) -> np.ndarray:
    """Prepare a saved raw capture (``.npy``/``.npz``/PNG/TIFF in raw counts) exactly like a live frame; the
    exposure is ``exposure_us`` or the one the file name states (:func:`exposure_from_name`). A caller that
    passes its own ``preprocessor`` (built from ``config``) can read its ``saturated_fraction`` afterwards."""
    a = read_array(path)  # float32 (C, H, W), native units
    raw = a[0] if a.shape[0] == 1 else np.moveaxis(a, 0, -1)
    if exposure_us is None:
        exposure_us = exposure_from_name(path)
    try:
        return (preprocessor or Preprocessor(config, bundle_root))(raw, exposure_us=exposure_us)
    except FrameRejected as exc:
        raise FrameRejected(f"{path}: {exc}") from None
    except ValueError as exc:
        raise ProfileError(f"{path}: {exc}") from None
