"""Camera sources by URI: ``sim://``, ``file://``, ``picamera2://``, ``csi://N``, ``v4l2:///dev/videoN``, ``tcp://``.

``open_source(uri, **options)`` returns a :class:`FrameSource`; ``source.read(timeout)`` returns a
:class:`Frame` holding the *raw* sensor data (uint16 ``(H, W)`` Bayer/mono counts, ``(H, W, 3)``
uint8/uint16 RGB, or float32) with its metadata (black level, gain, Bayer pattern, exposure, ...).
:class:`nsdd_edge.preprocess.Preprocessor` turns a raw frame into the measurement ``y``.

Errors: :class:`SourceError` (the camera/file failed; the message names it), :class:`SourceStalled`
(no frame within ``timeout``), :class:`EndOfStream` (a finite source is exhausted). A bad or unknown
URI raises ``ValueError`` naming the URI and the supported schemes.

Options come from the URI query (``sim://?fps=30&seed=0``) and from keyword arguments (which win);
arrays such as ``psf=`` and ``geometry=`` can only be passed as keywords.

Timestamps: live sources stamp frames with ``time.monotonic()`` at capture; recorded media
(``file://``, ``sim://?realtime=0``) carry the media time ``index / fps``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

import numpy as np

from nsdd_edge.optics import (
    ARRAY_SUFFIXES,
    IMAGE_SUFFIXES,
    LenslessGeometry,
    OpticsError,
    WienerSpectra,
    center_crop,
    center_pad,
    load_psf,
    read_image01,
    read_image_native,
)

BAYER_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv")


class SourceError(RuntimeError):
    """A camera or file source failed (missing library/device, unreadable file, lost connection)."""


class SourceStalled(SourceError):
    """No frame arrived within the requested timeout (the source may recover)."""


class EndOfStream(SourceError):
    """A finite source (file, stack, ``sim://?frames=N``) has no more frames."""


@dataclass
class Frame:
    """One raw frame: ``data`` as the sensor gives it, ``index`` (frame counter of the source; gaps mean
    dropped frames), ``timestamp`` in seconds, ``meta`` (black_level, white_level, gain, bayer_pattern,
    exposure_us, bit_depth, ...); ``truth``: the scene itself when the source knows it (``sim://``: float32
    ``(C, *scene_shape)`` in [0, 1], for a ground-truth panel), else None."""

    data: np.ndarray
    index: int
    timestamp: float
    meta: dict[str, Any] = field(default_factory=dict)
    truth: np.ndarray | None = None


# ----------------------------------------------------------------------------------------------
# URI parsing and option coercion
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedUri:
    uri: str
    scheme: str
    netloc: str
    path: str
    query: dict[str, str]


def _supported() -> str:
    return ", ".join(f"{s}://" for s in SOURCE_TYPES)


def parse_uri(uri: str) -> ParsedUri:
    """Split ``scheme://netloc/path?query``; ``ValueError`` naming the URI for anything malformed."""
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"camera source URI {uri!r} is empty; supported schemes: {_supported()}")
    if "://" not in uri:
        raise ValueError(f"camera source {uri!r} is not a URI (expected SCHEME://...); supported schemes: "
                         f"{_supported()} (a file is file:///path/to/video.mp4)")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in SOURCE_TYPES:
        raise ValueError(f"camera source {uri!r}: unknown scheme {scheme or '(none)'!r}; supported schemes: "
                         f"{_supported()}")
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise ValueError(f"camera source {uri!r}: malformed query {parts.query!r} ({exc})") from None
    query: dict[str, str] = {}
    for k, v in pairs:
        if k in query:
            raise ValueError(f"camera source {uri!r}: option {k!r} given twice")
        query[k] = v
    return ParsedUri(uri=uri, scheme=scheme, netloc=parts.netloc, path=parts.path, query=query)


class _Options:
    """Typed access to a source's options; every option must be consumed (unknown ones are errors)."""

    def __init__(self, uri: str, query: dict[str, str], kwargs: dict[str, Any]):
        self.uri = uri
        self.values: dict[str, Any] = {**query, **{k: v for k, v in kwargs.items() if v is not None}}
        self.used: set[str] = set()

    def _bad(self, key: str, value: Any, what: str) -> ValueError:
        return ValueError(f"camera source {self.uri!r}: option {key}={value!r} is not {what}")

    def raw(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        return self.values.get(key, default)

    def str(self, key: str, default: str | None = None, choices: tuple[str, ...] | None = None) -> str | None:
        v = self.raw(key, default)
        if v is None:
            return None
        v = str(v)
        if choices is not None and v not in choices:
            raise ValueError(f"camera source {self.uri!r}: option {key}={v!r} must be one of {', '.join(choices)}")
        return v

    def float(self, key: str, default: float | None = None, *, minimum: float | None = None,
              positive: bool = False) -> float | None:
        v = self.raw(key, default)
        if v is None:
            return None
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise self._bad(key, v, "a number") from None
        if not math.isfinite(f) or (positive and f <= 0) or (minimum is not None and f < minimum):
            raise self._bad(key, v, "a positive number" if positive else f"a finite number ≥ {minimum}")
        return f

    def int(self, key: str, default: int | None = None, *, minimum: int | None = None) -> int | None:
        v = self.raw(key, default)
        if v is None:
            return None
        try:
            i = int(v)
        except (TypeError, ValueError):
            raise self._bad(key, v, "an integer") from None
        if minimum is not None and i < minimum:
            raise self._bad(key, v, f"an integer ≥ {minimum}")
        return i

    def bool(self, key: str, default: bool = False) -> bool:
        v = self.raw(key, default)
        if isinstance(v, bool):
            return v
        s = str(v).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off", ""):
            return False
        raise self._bad(key, v, "a boolean (0/1)")

    def size(self, key: str, default: tuple[int, int] | None = None) -> tuple[int, int] | None:
        """``WxH`` (e.g. ``2028x1520``) → (width, height)."""
        v = self.raw(key, default)
        if v is None or isinstance(v, tuple):
            return v
        m = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", str(v))
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise self._bad(key, v, "a size WIDTHxHEIGHT such as 2028x1520")
        return int(m.group(1)), int(m.group(2))

    def bayer(self, key: str = "bayer") -> str | None:
        v = self.raw(key)
        if v is None or v == "":
            return None
        p = str(v).upper()
        if p not in BAYER_PATTERNS:
            raise self._bad(key, v, f"a Bayer pattern ({', '.join(BAYER_PATTERNS)})")
        return p

    def finish(self) -> None:
        unknown = sorted(set(self.values) - self.used)
        if unknown:
            raise ValueError(f"camera source {self.uri!r}: unknown option(s) {', '.join(unknown)}; "
                             f"this source understands {', '.join(sorted(self.used))}")


# ----------------------------------------------------------------------------------------------
# Base class
# ----------------------------------------------------------------------------------------------


class FrameSource(ABC):
    """A camera or recording that yields raw :class:`Frame` s. Use as a context manager or
    ``open()`` / ``read()`` / ``close()``; ``read()`` opens the source on first use."""

    scheme: ClassVar[str] = ""
    is_live: bool = False
    frame_rate: float | None = None

    def __init__(self, uri: str):
        self.uri = uri
        self._is_open = False

    def open(self) -> FrameSource:
        if not self._is_open:
            self._open()
            self._is_open = True
        return self

    def read(self, timeout: float | None = None) -> Frame:
        """The next frame; raises :class:`SourceStalled` after ``timeout`` s without one,
        :class:`EndOfStream` at the end of a finite source, :class:`SourceError` on failure."""
        if not self._is_open:
            self.open()
        return self._read(timeout)

    def close(self) -> None:
        if self._is_open:
            self._is_open = False
            self._close()

    def describe(self) -> dict[str, Any]:
        return {"uri": self.uri, "scheme": self.scheme, "live": self.is_live, "frame_rate": self.frame_rate,
                "open": self._is_open}

    @abstractmethod
    def _open(self) -> None: ...

    @abstractmethod
    def _read(self, timeout: float | None) -> Frame: ...

    def _close(self) -> None:
        pass

    def __enter__(self) -> FrameSource:  # noqa: PYI034 - typing.Self needs Python 3.11, the package supports 3.10
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Frame]:
        """Frames until :class:`EndOfStream`."""
        while True:
            try:
                yield self.read()
            except EndOfStream:
                return

    def __del__(self) -> None:  # release devices even if the caller forgot
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown: nothing left to report to
            pass


class _Pacer:
    """Deliver frame ``k`` at ``t0 + k / fps`` (a live camera's clock)."""

    def __init__(self, fps: float):
        self.fps = fps
        self.t0: float | None = None

    def start(self) -> None:
        self.t0 = time.monotonic()

    def due_index(self) -> int:
        assert self.t0 is not None
        return math.floor((time.monotonic() - self.t0) * self.fps)

    def wait_for(self, index: int, timeout: float | None) -> float:
        """Sleep until frame ``index`` is due; :class:`SourceStalled` if that is beyond ``timeout``."""
        assert self.t0 is not None
        due = self.t0 + index / self.fps
        wait = due - time.monotonic()
        if wait > 0:
            if timeout is not None and wait > timeout:
                time.sleep(max(timeout, 0.0))
                raise SourceStalled(f"no frame within {timeout:.3f} s (next frame due in {wait:.3f} s)")
            time.sleep(wait)
        return time.monotonic()


# ----------------------------------------------------------------------------------------------
# sim:// — a simulated lensless camera
# ----------------------------------------------------------------------------------------------


def _procedural_canvas(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A seeded scene ``(H, W, 3)`` float32 in [0, 1]: a smooth colour field, shapes and text."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = shape
    coarse = rng.uniform(0.05, 0.6, size=(4, 4, 3)).astype(np.float32)
    canvas = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    scale = max(h, w) / 256.0
    for _ in range(10):
        colour = tuple(float(c) for c in rng.uniform(0.0, 1.0, size=3))
        kind = rng.integers(0, 4)
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        if kind == 0:
            cv2.circle(canvas, (cx, cy), int(rng.integers(6, 40) * scale) + 1, colour, -1, cv2.LINE_AA)
        elif kind == 1:
            dx, dy = (int(v * scale) + 2 for v in rng.integers(8, 60, size=2))
            cv2.rectangle(canvas, (cx, cy), (cx + dx, cy + dy), colour, -1, cv2.LINE_AA)
        elif kind == 2:
            pts = (rng.integers(-40, 40, size=(3, 2)) * scale).astype(np.int32) + np.array([cx, cy], np.int32)
            cv2.fillPoly(canvas, [pts.reshape(-1, 1, 2)], colour, cv2.LINE_AA)
        else:
            x2, y2 = int(rng.integers(0, w)), int(rng.integers(0, h))
            cv2.line(canvas, (cx, cy), (x2, y2), colour, max(1, int(3 * scale)), cv2.LINE_AA)
    text_mask = np.zeros((h, w), np.uint8)  # cv2.putText draws on 8-bit images only
    for i, text in enumerate(("nsdd-edge", "lensless")):
        org = (int(w * 0.1), int(h * (0.35 + 0.35 * i)))
        cv2.putText(text_mask, text, org, cv2.FONT_HERSHEY_SIMPLEX, 0.9 * scale, 255, max(1, int(2 * scale)),
                    cv2.LINE_AA)
    alpha = (text_mask.astype(np.float32) / 255.0)[..., None]
    canvas = canvas * (1.0 - alpha) + alpha * np.array([1.0, 1.0, 0.95], np.float32)
    return np.clip(canvas, 0.0, 1.0).astype(np.float32)


class SimCamera(FrameSource):
    """``sim://``: a lensless camera simulated from the bundle's PSF.

    Frame ``k``: a scene ``x_k`` (procedural, or the user's images with ``images=DIR``: the sorted folder from
    image ``start=N``, one every ``hold`` seconds, each centre-cropped square and resized like
    ``nsdd-train simulate`` does — the whole image with ``motion=static``; moving by
    ``motion=pan|zoom|static``; ``scene=point`` for PSF calibration, ``scene=dark`` for dark frames)
    → ``y = C_sensor F⁻¹[H · F(P_conv x)]``
    with ``H = WienerSpectra.from_psf(psf, conv_shape, λ).H`` → shot noise ``Poisson(y·photons)/photons``
    (``photons=0``: off) and read noise ``N(0, noise²)`` → counts ``black_level + gain · y``, rounded and
    clipped to ``bits`` bits, stored as uint16. Preprocessing with ``black_level`` and
    ``normalization: fixed, scale = gain`` (:meth:`matching_preprocess`) recovers ``y`` on the training
    scale. ``format``: ``rgb`` (H, W, 3), ``mono`` (H, W) or ``bayer`` (2H, 2W) mosaic of ``bayer=RGGB``.
    Content is a deterministic function of ``(seed, index)``. Each :class:`Frame` carries its scene as
    ``truth``. With a crop ``geometry`` whose scene is smaller than the convolution grid (a bundle with a
    ``support_shape``: :meth:`nsdd_edge.bundle.Bundle.sim_geometry`) the scene is rendered at that size and
    zero-padded centrally by the forward model, as ``nsdd-train simulate`` makes training data.
    """

    scheme = "sim"
    SCENES = ("shapes", "point", "images", "dark")
    MOTIONS = ("pan", "zoom", "static")

    def __init__(self, uri: str, parsed: ParsedUri, options: _Options):
        super().__init__(uri)
        o = options
        if parsed.netloc or parsed.path.strip("/"):
            raise ValueError(f"camera source {uri!r}: sim:// takes no host or path, only options "
                             "(sim://?fps=30&seed=0&noise=0.005&motion=pan)")
        self.fps = o.float("fps", 30.0, positive=True)
        self.frame_rate = self.fps
        self.seed = o.int("seed", 0, minimum=0)
        self.noise = o.float("noise", 0.005, minimum=0.0)
        self.photons = o.float("photons", 20000.0, minimum=0.0)
        self.motion = o.str("motion", "pan", self.MOTIONS)
        images = o.str("images")
        self.scene_kind = o.str("scene", "images" if images else "shapes", self.SCENES)
        if self.scene_kind == "images" and not images:
            raise ValueError(f"camera source {uri!r}: scene=images needs images=DIR")
        self.images_dir = Path(images).expanduser() if images else None
        self.hold = o.float("hold", 3.0, positive=True)
        self.start = o.int("start", 0, minimum=0)
        self.black_level = o.float("black_level", 256.0, minimum=0.0)
        self.gain = o.float("gain", 3800.0, positive=True)
        self.bits = o.int("bits", 12, minimum=8)
        if self.bits > 16:
            raise ValueError(f"camera source {uri!r}: bits={self.bits} does not fit uint16")
        self.white_level = float(2 ** self.bits - 1)
        self.point_level = o.float("point_level", 0.8, positive=True)
        self.max_frames = o.int("frames", None, minimum=1)
        self.realtime = o.bool("realtime", True)
        self.is_live = self.realtime
        self.lam = o.float("lam", 1e-3, positive=True)
        psf = o.raw("psf")
        size = o.int("size", 256, minimum=8)
        if psf is None:
            from nsdd_edge.psf_sim import simulate_psf

            psf = simulate_psf("contour", (size, size), self.seed)
            self.psf_name = f"contour(seed={self.seed})"
        elif isinstance(psf, (str, os.PathLike)):
            self.psf_name = str(psf)
            try:
                psf = load_psf(psf)
            except OpticsError as exc:
                raise ValueError(f"camera source {uri!r}: psf: {exc}") from None
        else:
            self.psf_name = "array"
        self.psf = np.asarray(psf, dtype=np.float32)
        if self.psf.ndim == 2:
            self.psf = self.psf[None]
        geometry = o.raw("geometry")
        if geometry is None:
            geometry = LenslessGeometry.make("circular", self.psf.shape[-2:])
        elif isinstance(geometry, dict):
            geometry = LenslessGeometry.from_dict(geometry)
        if not isinstance(geometry, LenslessGeometry):
            raise TypeError(f"camera source {uri!r}: geometry= must be a LenslessGeometry or its dict")
        self.geometry = geometry
        self.channels = o.int("channels", 3, minimum=1)
        if self.channels not in (1, 3):
            raise ValueError(f"camera source {uri!r}: channels={self.channels} must be 1 or 3")
        if self.psf.shape[0] == 3 and self.channels == 1:
            raise ValueError(f"camera source {uri!r}: a 3-channel PSF needs channels=3")
        self.format = o.str("format", "rgb" if self.channels == 3 else "mono", ("rgb", "mono", "bayer"))
        self.bayer_pattern = o.bayer("bayer") if self.format == "bayer" else None
        if self.format == "bayer":
            self.bayer_pattern = self.bayer_pattern or "RGGB"
            if self.channels != 3:
                raise ValueError(f"camera source {uri!r}: format=bayer needs channels=3")
        elif o.values.get("bayer"):
            raise ValueError(f"camera source {uri!r}: bayer= needs format=bayer")
        if self.format == "mono" and self.channels != 1:
            raise ValueError(f"camera source {uri!r}: format=mono needs channels=1")
        if self.format == "rgb" and self.channels != 3:
            raise ValueError(f"camera source {uri!r}: format=rgb needs channels=3")
        options.finish()
        try:
            spectra = WienerSpectra.from_psf(self.psf, geometry.conv_shape, self.lam)
        except OpticsError as exc:
            raise ValueError(f"camera source {uri!r}: {exc}") from None
        self._H_half = spectra.half("H").astype(np.complex64)
        self._canvas: np.ndarray | None = None
        self._image_files: list[Path] = []
        self._image_cache: dict[int, np.ndarray] = {}
        self._pacer = _Pacer(self.fps)
        self._next_index = 0

    # -- scenes ---------------------------------------------------------------------------------

    def _open(self) -> None:
        sh, sw = self.geometry.scene_shape
        canvas_shape = (int(sh * 1.5), int(sw * 1.5))
        if self.scene_kind == "shapes":
            self._canvas = _procedural_canvas(canvas_shape, self.seed)
        elif self.scene_kind == "images":
            self._image_files = self._list_images()
        self._next_index = 0
        self._pacer.start()

    def _list_images(self) -> list[Path]:
        d = self.images_dir
        assert d is not None
        if not d.is_dir():
            raise SourceError(f"sim:// images={d}: not a directory")
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SourceError(f"sim:// images={d}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        if self.start >= len(files):
            raise SourceError(f"sim:// start={self.start}: images={d} holds only {len(files)} images")
        return files

    def _image_canvas(self, number: int, canvas_shape: tuple[int, int]) -> np.ndarray:
        """Image ``number`` of the sorted folder, centre-cropped to a square and resized (INTER_AREA) to the
        canvas, as ``nsdd-train simulate`` prepares scenes; read on first use, a few kept in memory."""
        import cv2

        if not self._image_files:
            self._image_files = self._list_images()
        if number not in self._image_cache:
            path = self._image_files[number]
            try:
                img = np.moveaxis(read_image01(path), 0, -1)
            except OpticsError as exc:
                raise SourceError(f"sim:// images: {exc}") from None
            if img.shape[-1] == 1:
                img = np.repeat(img, 3, axis=-1)
            h, w = img.shape[:2]
            side = min(h, w)
            img = img[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
            if len(self._image_cache) >= 8:
                self._image_cache.pop(next(iter(self._image_cache)))
            self._image_cache[number] = cv2.resize(np.ascontiguousarray(img), canvas_shape[::-1],
                                                   interpolation=cv2.INTER_AREA)
        return self._image_cache[number]

    def scene(self, index: int) -> np.ndarray:
        """The scene ``x`` of frame ``index``: float32 ``(C, *scene_shape)`` in [0, 1]."""
        import cv2

        sh, sw = self.geometry.scene_shape
        if self.scene_kind == "dark":  # lens cap on / light source off: only black level and noise
            return np.zeros((self.channels, sh, sw), np.float32)
        if self.scene_kind == "point":
            x = np.zeros((self.channels, sh, sw), np.float32)
            x[:, sh // 2, sw // 2] = 1.0
            y_peak = float(self._forward(x).max())  # scale the point so the brightest pixel of y is point_level
            return x * np.float32(self.point_level / y_peak) if y_peak > 0 else x
        if self.scene_kind == "shapes":
            if self._canvas is None:
                self._canvas = _procedural_canvas((int(sh * 1.5), int(sw * 1.5)), self.seed)
            canvas = self._canvas
        else:  # static: the whole image fills the scene; pan / zoom: a 1.5x canvas leaves room to move
            if not self._image_files:
                self._image_files = self._list_images()
            number = (self.start + int(index / self.fps / self.hold)) % len(self._image_files)
            canvas_shape = (sh, sw) if self.motion == "static" else (int(sh * 1.5), int(sw * 1.5))
            canvas = self._image_canvas(number, canvas_shape)
        t = index / self.fps
        ch, cw = canvas.shape[:2]
        zoom, dx, dy = 1.0, 0.0, 0.0
        if self.motion == "pan":
            dx = 0.15 * cw * math.sin(2 * math.pi * t / 8.0)
            dy = 0.12 * ch * math.sin(2 * math.pi * t / 11.0)
        elif self.motion == "zoom":
            zoom = 1.0 + 0.3 * math.sin(2 * math.pi * t / 6.0)
        # output pixel (u, v) samples canvas at centre + (u - sw/2, v - sh/2) / zoom + (dx, dy)
        inv = 1.0 / zoom
        m = np.array([[inv, 0.0, cw / 2 + dx - inv * sw / 2],
                      [0.0, inv, ch / 2 + dy - inv * sh / 2]], np.float32)
        view = cv2.warpAffine(canvas, m, (sw, sh), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_REFLECT)
        x = np.moveaxis(view, -1, 0)
        if self.channels == 1:
            x = x.mean(axis=0, keepdims=True)
        return np.ascontiguousarray(np.clip(x, 0.0, 1.0), dtype=np.float32)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        g = self.geometry
        xp = center_pad(x, g.conv_shape) if g.model == "crop" else x
        y = np.fft.irfft2(np.fft.rfft2(xp, axes=(-2, -1)) * self._H_half, s=g.conv_shape, axes=(-2, -1))
        if g.model == "crop":
            y = center_crop(y, g.sensor_shape)
        return np.ascontiguousarray(y, dtype=np.float32)

    def measurement(self, index: int) -> np.ndarray:
        """The noiseless measurement ``y = A x`` of frame ``index``: float32 ``(C, *sensor_shape)``."""
        return self._forward(self.scene(index))

    def matching_preprocess(self) -> dict[str, Any]:
        """PreprocessConfig settings that map this camera's raw frames back to ``y``."""
        return {"black_level": self.black_level, "white_level": self.white_level,
                "bayer_pattern": self.bayer_pattern, "demosaic": "bin2x2", "normalization": "fixed",
                "scale": self.gain, "grayscale": self.channels == 1}

    # -- frames ---------------------------------------------------------------------------------

    def raw_frame(self, index: int) -> np.ndarray:
        """Raw uint16 counts of frame ``index`` (deterministic per ``(seed, index)``)."""
        return self._raw_from(self.measurement(index), index)

    def _raw_from(self, y: np.ndarray, index: int) -> np.ndarray:
        """Noise, gain, black level, rounding and clipping of the measurement ``y`` of frame ``index``."""
        rng = np.random.default_rng([self.seed, index])
        if self.format == "bayer":
            h, w = y.shape[-2:]
            idx = {"R": 0, "G": 1, "B": 2}
            site = np.empty((2 * h, 2 * w), np.float32)
            for k, letter in enumerate(self.bayer_pattern or "RGGB"):
                site[k // 2 :: 2, k % 2 :: 2] = y[idx[letter]]
            y = site
        elif self.format == "rgb":
            y = np.moveaxis(y, 0, -1)
        else:
            y = y[0]
        if self.photons > 0:
            y = rng.poisson(np.maximum(y, 0.0) * self.photons).astype(np.float32) / np.float32(self.photons)
        if self.noise > 0:
            y = y + rng.normal(0.0, self.noise, size=y.shape).astype(np.float32)
        counts = np.rint(self.black_level + self.gain * y)
        return np.clip(counts, 0, self.white_level).astype(np.uint16)

    def _read(self, timeout: float | None) -> Frame:
        if self.max_frames is not None and self._next_index >= self.max_frames:
            raise EndOfStream(f"{self.uri}: all {self.max_frames} frames delivered")
        index = self._next_index
        if self.realtime:
            index = max(index, self._pacer.due_index())  # a slow reader misses frames, like a camera
            if self.max_frames is not None and index >= self.max_frames:
                raise EndOfStream(f"{self.uri}: all {self.max_frames} frames delivered")
            stamp = self._pacer.wait_for(index, timeout)
        else:
            stamp = index / self.fps
        scene = self.scene(index)
        data = self._raw_from(self._forward(scene), index)
        self._next_index = index + 1
        meta = {"source": "sim", "black_level": self.black_level, "white_level": self.white_level,
                "gain": self.gain, "bit_depth": self.bits, "bayer_pattern": self.bayer_pattern,
                "exposure_us": 1e6 / self.fps, "analogue_gain": 1.0, "scene": self.scene_kind,
                "motion": self.motion, "seed": self.seed}
        return Frame(data=data, index=index, timestamp=stamp, meta=meta, truth=scene)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"kind": "simulated lensless camera", "psf": self.psf_name, "psf_shape": list(self.psf.shape),
                  "geometry": self.geometry.to_dict(), "format": self.format, "bayer_pattern": self.bayer_pattern,
                  "scene": self.scene_kind, "motion": self.motion, "seed": self.seed, "noise": self.noise,
                  "photons": self.photons, "black_level": self.black_level, "gain": self.gain,
                  "bit_depth": self.bits, "frames": self.max_frames,
                  "preprocess": self.matching_preprocess()})
        return d


# ----------------------------------------------------------------------------------------------
# file:// — video, image directory, .npy stack, single image
# ----------------------------------------------------------------------------------------------


def _file_path(parsed: ParsedUri) -> Path:
    """``file:///abs/path`` → /abs/path; ``file://rel/path`` → rel/path; ``file://~/x`` → home."""
    raw = parsed.netloc + parsed.path if parsed.netloc not in ("", "localhost") else parsed.path
    if not raw:
        raise ValueError(f"camera source {parsed.uri!r}: file:// needs a path (file:///path/to/video.mp4)")
    from urllib.parse import unquote

    return Path(unquote(raw)).expanduser()


class FileSource(FrameSource):
    """``file://PATH``: a video (cv2.VideoCapture; frames in RGB), a directory of images (sorted by name;
    16-bit PNG/TIFF stay uint16; ``.npy`` frames allowed), a ``.npy`` stack ``(N, H, W[, C])`` or a
    single image. Options: ``loop=1``, ``fps=`` (media rate; video default from the file),
    ``realtime=1`` (pace at ``fps`` like a camera), ``start=`` (first frame), and frame metadata
    ``bayer=``, ``black_level=``, ``white_level=``, ``gain=``. A JSON sidecar (``PATH.json`` or
    ``DIR/meta.json``) is merged into every frame's meta."""

    scheme = "file"

    def __init__(self, uri: str, parsed: ParsedUri, options: _Options):
        super().__init__(uri)
        o = options
        self.path = _file_path(parsed)
        self.loop = o.bool("loop", False)
        self.fps = o.float("fps", None, positive=True)
        self.realtime = o.bool("realtime", False)
        self.start = o.int("start", 0, minimum=0)
        meta: dict[str, Any] = {}
        bayer = o.bayer("bayer")
        if bayer:
            meta["bayer_pattern"] = bayer
        for key in ("black_level", "white_level", "gain"):
            v = o.float(key, None, minimum=0.0)
            if v is not None:
                meta[key] = v
        options.finish()
        self._option_meta = meta
        self.is_live = False
        self.kind = "unknown"
        self._count: int | None = None
        self._stack: np.ndarray | None = None
        self._files: list[Path] = []
        self._cap: Any = None
        self._pos = 0
        self._index = 0
        self._meta: dict[str, Any] = {}
        self._pacer: _Pacer | None = None

    def _sidecar_meta(self) -> dict[str, Any]:
        if self.path.is_dir():
            candidates = [self.path / "meta.json"]
        else:
            candidates = [self.path.with_name(self.path.name + ".json")]
        for c in candidates:
            if c.is_file():
                try:
                    d = json.loads(c.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise SourceError(f"{c}: corrupted metadata sidecar ({exc})") from None
                if not isinstance(d, dict):
                    raise SourceError(f"{c}: metadata sidecar must hold a JSON object")
                return d
        return {}

    def _open(self) -> None:
        p = self.path
        if not p.exists():
            raise SourceError(f"file source {self.uri!r}: {p} does not exist")
        suffix = p.suffix.lower()
        if p.is_dir():
            self.kind = "image directory"
            self._files = sorted(f for f in p.iterdir()
                                 if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES + (".npy",))
            if not self._files:
                raise SourceError(f"file source {self.uri!r}: directory {p} holds no images "
                                  f"({', '.join(IMAGE_SUFFIXES)}) or .npy frames")
            self._count = len(self._files)
        elif suffix == ".npy":
            self.kind = "npy stack"
            try:
                stack = np.load(p, mmap_mode="r", allow_pickle=False)
            except Exception as exc:  # noqa: BLE001 - numpy raises many types for a corrupt file
                raise SourceError(f"file source {self.uri!r}: {p} is not a readable .npy ({exc})") from None
            if stack.ndim == 2 or (stack.ndim == 3 and stack.shape[-1] in (3, 4) and stack.shape[0] > 4):
                stack = stack[None]  # a single frame
            if stack.ndim not in (3, 4) or (stack.ndim == 4 and stack.shape[-1] not in (1, 3, 4)):
                raise SourceError(f"file source {self.uri!r}: {p} has shape {stack.shape}; expected a stack "
                                  "(N, H, W) or (N, H, W, C) with C in {1, 3, 4}")
            if stack.shape[0] == 0:
                raise SourceError(f"file source {self.uri!r}: {p} holds no frames")
            if not (np.issubdtype(stack.dtype, np.integer) or np.issubdtype(stack.dtype, np.floating)):
                raise SourceError(f"file source {self.uri!r}: {p} has non-numeric dtype {stack.dtype}")
            self._stack = stack
            self._count = stack.shape[0]
        elif suffix in IMAGE_SUFFIXES or suffix in ARRAY_SUFFIXES:
            self.kind = "image"
            self._files = [p]
            self._count = 1
        else:
            import cv2

            self.kind = "video"
            cap = cv2.VideoCapture(str(p))
            if not cap.isOpened():
                raise SourceError(f"file source {self.uri!r}: OpenCV cannot open {p} as a video "
                                  f"(supported: {', '.join(VIDEO_SUFFIXES)} with the codecs of this OpenCV build)")
            self._cap = cap
            n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            self._count = n if n > 0 else None
            if self.fps is None:
                fps = float(cap.get(cv2.CAP_PROP_FPS))
                self.fps = fps if fps > 0 and math.isfinite(fps) else None
        if self._count is not None and self.start >= self._count:
            raise SourceError(f"file source {self.uri!r}: start={self.start} but it holds {self._count} frames")
        self.frame_rate = self.fps
        self._meta = {"source": "file", "path": str(p), **self._sidecar_meta(), **self._option_meta}
        self._seek(self.start)
        self._index = 0
        if self.realtime:
            if self.fps is None:
                raise SourceError(f"file source {self.uri!r}: realtime=1 needs fps= (the file has no frame rate)")
            self._pacer = _Pacer(self.fps)
            self._pacer.start()
            self.is_live = True

    def _seek(self, pos: int) -> None:
        self._pos = pos
        if self._cap is not None:
            import cv2

            self._cap.set(cv2.CAP_PROP_POS_FRAMES, pos)

    def _load(self, pos: int) -> np.ndarray | None:
        if self._stack is not None:
            if pos >= self._stack.shape[0]:
                return None
            a = np.array(self._stack[pos])
            if a.ndim == 3 and a.shape[-1] == 1:
                return a[..., 0]
            return a[..., :3] if a.ndim == 3 and a.shape[-1] == 4 else a
        if self._files:
            if pos >= len(self._files):
                return None
            f = self._files[pos]
            try:
                if f.suffix.lower() in ARRAY_SUFFIXES:
                    a = np.load(f, allow_pickle=False)
                    if isinstance(a, np.lib.npyio.NpzFile):
                        with a:
                            a = a[a.files[0]]
                    return np.asarray(a)
                return read_image_native(f)
            except OpticsError as exc:
                raise SourceError(f"file source {self.uri!r}: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - numpy raises many types for a corrupt file
                raise SourceError(f"file source {self.uri!r}: {f} unreadable ({type(exc).__name__}: {exc})") from None
        ok, bgr = self._cap.read()
        if not ok or bgr is None:
            return None
        return np.ascontiguousarray(bgr[:, :, ::-1]) if bgr.ndim == 3 else bgr

    def _read(self, timeout: float | None) -> Frame:
        data = self._load(self._pos)
        if data is None:
            if not self.loop or self._pos == self.start:
                raise EndOfStream(f"{self.uri}: end of {self.kind} after {self._index} frames")
            self._seek(self.start)
            data = self._load(self._pos)
            if data is None:
                raise SourceError(f"file source {self.uri!r}: could not rewind {self.path}")
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            pass  # delivered as is: the preprocessor rejects non-finite frames and the loop counts them
        pos = self._pos
        self._pos += 1
        index = self._index
        self._index += 1
        if self._pacer is not None:
            stamp = self._pacer.wait_for(index, timeout)
        else:
            stamp = index / self.fps if self.fps else float(index)
        return Frame(data=data, index=index, timestamp=stamp, meta={**self._meta, "position": pos})

    def _close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
        self._stack = None

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"kind": self.kind, "path": str(self.path), "frames": self._count, "loop": self.loop})
        return d


# ----------------------------------------------------------------------------------------------
# Raw Bayer helpers (V4L2 / picamera2 buffers)
# ----------------------------------------------------------------------------------------------

# V4L2 fourcc → (Bayer pattern or None for mono, bits, packing: "u16" | "mipi10" | "mipi12")
V4L2_RAW_FORMATS: dict[str, tuple[str | None, int, str]] = {
    **{f"{c}10": (p, 10, "u16") for c, p in (("RG", "RGGB"), ("BA", "GRBG"), ("GB", "GBRG"), ("BG", "BGGR"))},
    **{f"{c}12": (p, 12, "u16") for c, p in (("RG", "RGGB"), ("BA", "GRBG"), ("GB", "GBRG"), ("BG", "BGGR"))},
    "RG16": ("RGGB", 16, "u16"), "GR16": ("GRBG", 16, "u16"), "GB16": ("GBRG", 16, "u16"), "BYR2": ("BGGR", 16, "u16"),
    **{f"p{c}AA": (p, 10, "mipi10") for c, p in (("R", "RGGB"), ("g", "GRBG"), ("G", "GBRG"), ("B", "BGGR"))},
    **{f"p{c}CC": (p, 12, "mipi12") for c, p in (("R", "RGGB"), ("g", "GRBG"), ("G", "GBRG"), ("B", "BGGR"))},
    "Y10 ": (None, 10, "u16"), "Y12 ": (None, 12, "u16"), "Y16 ": (None, 16, "u16"),
}


def unpack_raw(buffer: np.ndarray | bytes, width: int, height: int, packing: str,
               bytes_per_line: int | None = None) -> np.ndarray:
    """Raw sensor buffer → uint16 ``(height, width)`` counts.

    ``u16``: little-endian 16-bit containers (V4L2 RG10/RG12, picamera2 unpacked ``SBGGR12``);
    ``mipi10``: 4 pixels in 5 bytes (4 high bytes, then the 2-bit remainders);
    ``mipi12``: 2 pixels in 3 bytes (2 high bytes, then the two 4-bit remainders). Rows may be padded
    (``bytes_per_line``, default: the buffer size / height)."""
    raw = np.frombuffer(buffer, dtype=np.uint8) if isinstance(buffer, (bytes, bytearray, memoryview)) \
        else np.ascontiguousarray(buffer).reshape(-1).view(np.uint8)
    row_bytes = {"u16": 2 * width, "mipi10": (width * 5 + 3) // 4, "mipi12": (width * 3 + 1) // 2}.get(packing)
    if row_bytes is None:
        raise ValueError(f"unknown raw packing {packing!r}; use u16, mipi10 or mipi12")
    stride = bytes_per_line or (raw.size // height if height and raw.size % height == 0 else 0)
    if stride < row_bytes or raw.size < stride * height:
        raise SourceError(f"raw buffer of {raw.size} bytes is too small for {width}x{height} {packing} "
                          f"(needs {row_bytes} bytes per row)")
    rows = raw[: stride * height].reshape(height, stride)[:, :row_bytes]
    if packing == "u16":
        return np.ascontiguousarray(rows).view("<u2").astype(np.uint16, copy=False)
    if packing == "mipi10":
        groups = rows[:, : (width // 4) * 5].reshape(height, -1, 5).astype(np.uint16)
        out = np.empty((height, groups.shape[1], 4), np.uint16)
        for k in range(4):
            out[..., k] = (groups[..., k] << 2) | ((groups[..., 4] >> (2 * k)) & 0x3)
        return out.reshape(height, -1)[:, :width]
    groups = rows[:, : (width // 2) * 3].reshape(height, -1, 3).astype(np.uint16)
    out = np.empty((height, groups.shape[1], 2), np.uint16)
    out[..., 0] = (groups[..., 0] << 4) | (groups[..., 2] & 0xF)
    out[..., 1] = (groups[..., 1] << 4) | (groups[..., 2] >> 4)
    return out.reshape(height, -1)[:, :width]


def parse_libcamera_raw_format(fmt: str) -> tuple[str | None, int, bool]:
    """``'SBGGR12'`` → ``('BGGR', 12, False)``; ``'SRGGB10_CSI2P'`` → ``('RGGB', 10, True)`` (packed);
    ``'R12'`` (mono) → ``(None, 12, False)``."""
    m = re.fullmatch(r"S?(RGGB|BGGR|GRBG|GBRG)(\d+)(_CSI2P)?", fmt) or re.fullmatch(r"()R(\d+)(_CSI2P)?", fmt)
    if not m:
        raise SourceError(f"picamera2: raw format {fmt!r} is not an uncompressed Bayer/mono format "
                          "(request an unpacked format such as SBGGR12; Pi 5 compressed PISP formats are lossy)")
    return (m.group(1) or None), int(m.group(2)), bool(m.group(3))


def _gstreamer_available() -> bool:
    import cv2

    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line.split(":", 1)[1]
    return False


def _v4l2_available() -> bool:
    import cv2

    for line in cv2.getBuildInformation().splitlines():
        if "v4l" in line.lower() and ":" in line:
            return "YES" in line.split(":", 1)[1]
    return False


# ----------------------------------------------------------------------------------------------
# picamera2:// — Raspberry Pi cameras through libcamera
# ----------------------------------------------------------------------------------------------


class PiCamera2Source(FrameSource):
    """``picamera2://[N]``: raw Bayer frames from a Raspberry Pi camera (HQ camera: 2028×1520 12-bit).

    The unpacked raw format of the chosen sensor mode is requested and viewed as uint16; the Bayer order
    comes from ``camera_configuration()['raw']['format']`` (the HQ camera reports SBGGR12 because it is
    mounted upside down). Exposure, analogue gain and colour gains are locked (``exposure_us=``,
    ``gain=``, ``colour_gains=R,B``); ``fps=`` fixes the frame duration; ``size=WxH``, ``bits=``.
    """

    scheme = "picamera2"

    def __init__(self, uri: str, parsed: ParsedUri, options: _Options):
        super().__init__(uri)
        o = options
        num = (parsed.netloc or parsed.path.strip("/") or "0")
        if not num.isdigit():
            raise ValueError(f"camera source {uri!r}: picamera2://N takes a camera number, got {num!r}")
        self.camera_num = int(num)
        self.size = o.size("size", (2028, 1520))
        self.bits = o.int("bits", 12, minimum=8)
        self.exposure_us = o.int("exposure_us", 10000, minimum=1)
        self.gain = o.float("gain", 1.0, minimum=1.0)
        cg = o.str("colour_gains", "1.0,1.0") or "1.0,1.0"
        try:
            r, b = (float(v) for v in cg.split(","))
        except ValueError:
            raise ValueError(f"camera source {uri!r}: colour_gains={cg!r} must be R,B such as 1.8,1.5") from None
        self.colour_gains = (r, b)
        self.fps = o.float("fps", 40.0, positive=True)
        self.frame_rate = self.fps
        self.buffer_count = o.int("buffers", 4, minimum=2)
        options.finish()
        self.is_live = True
        self._cam: Any = None
        self._job: Any = None
        self._index = 0
        self._pattern: str | None = None
        self._raw_bits = self.bits
        self._raw_size = self.size

    def _open(self) -> None:
        try:
            from picamera2 import Picamera2  # type: ignore[import-not-found]
        except ImportError as exc:
            raise SourceError(f"{self.uri}: the picamera2 library is not installed ({exc}); on Raspberry Pi OS "
                              "run 'sudo apt install python3-picamera2' and use a venv with "
                              "--system-site-packages (deploy/pi/setup.sh)") from None
        try:
            cam = Picamera2(camera_num=self.camera_num)
        except Exception as exc:  # noqa: BLE001 - libcamera raises many types for a missing camera
            raise SourceError(f"{self.uri}: cannot open Raspberry Pi camera {self.camera_num} "
                              f"({type(exc).__name__}: {exc})") from None
        try:
            modes = [m for m in cam.sensor_modes if tuple(m["size"]) == self.size and m["bit_depth"] == self.bits]
            if not modes:
                have = ", ".join(f"{m['size'][0]}x{m['size'][1]}@{m['bit_depth']}bit" for m in cam.sensor_modes)
                raise SourceError(f"{self.uri}: the sensor has no {self.size[0]}x{self.size[1]} {self.bits}-bit "
                                  f"mode (it has {have})")
            mode = modes[0]
            frame_us = round(1e6 / self.fps)
            config = cam.create_video_configuration(
                raw={"format": mode["unpacked"], "size": mode["size"]},
                sensor={"output_size": mode["size"], "bit_depth": mode["bit_depth"]},
                buffer_count=self.buffer_count,
                controls={"AeEnable": False, "AwbEnable": False, "ExposureTime": self.exposure_us,
                          "AnalogueGain": self.gain, "ColourGains": self.colour_gains,
                          "FrameDurationLimits": (frame_us, frame_us)})
            cam.configure(config)
            raw_cfg = cam.camera_configuration()["raw"]
            self._pattern, self._raw_bits, packed = parse_libcamera_raw_format(str(raw_cfg["format"]))
            if packed:
                raise SourceError(f"{self.uri}: libcamera gave the packed format {raw_cfg['format']}; "
                                  "an unpacked one is needed")
            self._raw_size = tuple(raw_cfg["size"])
            cam.start()
        except BaseException:
            cam.close()
            raise
        self._cam = cam
        self._index = 0

    def _read(self, timeout: float | None) -> Frame:
        cam = self._cam
        try:
            if self._job is None:  # a request that timed out last time is still pending: keep waiting for it
                self._job = cam.capture_request(wait=False)
            request = cam.wait(self._job, timeout=timeout)  # Job.get_result → concurrent.futures TimeoutError
        except TimeoutError:
            raise SourceStalled(f"{self.uri}: no frame within {timeout} s") from None
        except Exception as exc:  # noqa: BLE001
            self._job = None
            raise SourceError(f"{self.uri}: capture failed ({type(exc).__name__}: {exc})") from None
        self._job = None
        try:
            buf = request.make_array("raw")
            md = request.get_metadata()
        finally:
            request.release()
        w, h = self._raw_size
        data = unpack_raw(buf, w, h, "u16", bytes_per_line=buf.shape[1] if buf.ndim == 2 else None)
        black16 = md.get("SensorBlackLevels", [4096])  # libcamera reports them on a 16-bit scale
        black = float(np.mean(black16)) / 2 ** (16 - self._raw_bits)
        meta = {"source": "picamera2", "bayer_pattern": self._pattern, "bit_depth": self._raw_bits,
                "black_level": black, "white_level": float(2 ** self._raw_bits - 1),
                "exposure_us": md.get("ExposureTime"), "analogue_gain": md.get("AnalogueGain"),
                "gain": 1.0, "colour_gains": md.get("ColourGains"), "sensor_timestamp_ns": md.get("SensorTimestamp"),
                "sensor_temperature": md.get("SensorTemperature")}
        index = self._index
        self._index += 1
        return Frame(data=data, index=index, timestamp=time.monotonic(), meta=meta)

    def _close(self) -> None:
        if self._cam is not None:
            self._job = None
            try:
                self._cam.stop()
            finally:
                self._cam.close()
                self._cam = None

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"kind": "Raspberry Pi camera (libcamera raw)", "camera": self.camera_num,
                  "size": list(self._raw_size), "bit_depth": self._raw_bits, "bayer_pattern": self._pattern,
                  "exposure_us": self.exposure_us, "gain": self.gain, "colour_gains": list(self.colour_gains)})
        return d


# ----------------------------------------------------------------------------------------------
# csi://N (Jetson, GStreamer nvarguscamerasrc) and v4l2:///dev/videoN
# ----------------------------------------------------------------------------------------------


class _CaptureSource(FrameSource):
    """Shared ``cv2.VideoCapture`` reading with a watchdog for ``timeout``."""

    _cap: Any = None

    def _grab(self, timeout: float | None) -> np.ndarray:
        # cv2.VideoCapture.read blocks; run it in a helper thread so a dead camera becomes SourceStalled.
        import threading

        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["ok"], result["img"] = self._cap.read()
            except Exception as exc:  # noqa: BLE001
                result["error"] = exc

        if timeout is None:
            work()
        else:
            t = threading.Thread(target=work, daemon=True)
            t.start()
            t.join(timeout)
            if t.is_alive():
                raise SourceStalled(f"{self.uri}: no frame within {timeout} s")
        if "error" in result:
            raise SourceError(f"{self.uri}: capture failed ({result['error']})")
        if not result.get("ok") or result.get("img") is None:
            raise SourceError(f"{self.uri}: the camera returned no frame (unplugged or busy?)")
        return result["img"]

    def _close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class CsiSource(_CaptureSource):
    """``csi://N``: a Jetson CSI camera through GStreamer ``nvarguscamerasrc sensor-id=N`` (ISP-processed
    RGB, uint8). Options ``size=WxH`` (1920x1080), ``fps=`` (30), ``flip=`` (nvvidconv flip-method 0–7)."""

    scheme = "csi"

    def __init__(self, uri: str, parsed: ParsedUri, options: _Options):
        super().__init__(uri)
        o = options
        num = parsed.netloc or parsed.path.strip("/")
        if not num.isdigit():
            raise ValueError(f"camera source {uri!r}: csi://N takes a sensor id such as csi://0")
        self.sensor_id = int(num)
        self.size = o.size("size", (1920, 1080))
        self.fps = o.float("fps", 30.0, positive=True)
        self.flip = o.int("flip", 0, minimum=0)
        options.finish()
        self.frame_rate = self.fps
        self.is_live = True
        self._index = 0

    def pipeline(self) -> str:
        w, h = self.size
        return (f"nvarguscamerasrc sensor-id={self.sensor_id} ! video/x-raw(memory:NVMM),width={w},height={h},"
                f"format=NV12,framerate={round(self.fps)}/1 ! nvvidconv flip-method={self.flip} ! "
                "video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=1")

    def _open(self) -> None:
        import cv2

        if not _gstreamer_available():
            raise SourceError(f"{self.uri}: this OpenCV build has no GStreamer support "
                              "(cv2.getBuildInformation() says GStreamer: NO); on Jetson use the system OpenCV "
                              "from JetPack (python3-opencv) in a venv with --system-site-packages")
        cap = cv2.VideoCapture(self.pipeline(), cv2.CAP_GSTREAMER)
        if not cap.isOpened():
            raise SourceError(f"{self.uri}: GStreamer could not open CSI camera {self.sensor_id} "
                              f"(pipeline: {self.pipeline()}); check the cable and 'nvargus-daemon'")
        self._cap = cap
        self._index = 0

    def _read(self, timeout: float | None) -> Frame:
        img = self._grab(timeout)
        index = self._index
        self._index += 1
        return Frame(data=np.ascontiguousarray(img[:, :, ::-1]), index=index, timestamp=time.monotonic(),
                     meta={"source": "csi", "sensor_id": self.sensor_id, "bit_depth": 8, "black_level": 0.0,
                           "white_level": 255.0, "bayer_pattern": None})

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"kind": "Jetson CSI camera (GStreamer)", "pipeline": self.pipeline()})
        return d


class V4l2Source(_CaptureSource):
    """``v4l2:///dev/videoN``: a V4L2 camera. With ``pixelformat=`` a raw Bayer fourcc (``RG10``, ``BG12``,
    ``pRAA``, ...) the driver's buffer is read unconverted (CAP_PROP_CONVERT_RGB off) and unpacked to
    uint16 counts; otherwise frames are RGB uint8. Options ``size=WxH``, ``fps=``, ``black_level=``."""

    scheme = "v4l2"

    def __init__(self, uri: str, parsed: ParsedUri, options: _Options):
        super().__init__(uri)
        o = options
        self.device = parsed.path or ("/dev/" + parsed.netloc if parsed.netloc else "")
        if not re.fullmatch(r"/dev/\S+", self.device):
            raise ValueError(f"camera source {uri!r}: v4l2 needs a device path such as v4l2:///dev/video0")
        self.pixelformat = o.str("pixelformat")
        if self.pixelformat is not None:
            self.pixelformat = self.pixelformat.ljust(4)
            if self.pixelformat not in V4L2_RAW_FORMATS:
                raise ValueError(f"camera source {uri!r}: pixelformat={self.pixelformat.strip()!r} is not a raw "
                                 f"format this source unpacks ({', '.join(k.strip() for k in V4L2_RAW_FORMATS)})")
        self.size = o.size("size")
        self.fps = o.float("fps", None, positive=True)
        self.black_level = o.float("black_level", None, minimum=0.0)
        options.finish()
        self.frame_rate = self.fps
        self.is_live = True
        self._index = 0

    def _open(self) -> None:
        import cv2

        if not Path(self.device).exists():
            raise SourceError(f"{self.uri}: no such device {self.device} (is the camera connected? 'v4l2-ctl "
                              "--list-devices' lists them)")
        cap = cv2.VideoCapture(self.device, cv2.CAP_V4L2)
        if not cap.isOpened():
            raise SourceError(f"{self.uri}: OpenCV could not open {self.device} with V4L2 (busy, or no permission: "
                              "add the user to the 'video' group)")
        if self.size:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.size[0])
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.size[1])
        if self.fps:
            cap.set(cv2.CAP_PROP_FPS, self.fps)
        if self.pixelformat:
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*self.pixelformat))
            cap.set(cv2.CAP_PROP_CONVERT_RGB, 0)
        self._cap = cap
        self._width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        self._height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        self._index = 0

    def _read(self, timeout: float | None) -> Frame:
        img = self._grab(timeout)
        meta: dict[str, Any] = {"source": "v4l2", "device": self.device}
        if self.pixelformat:
            pattern, bits, packing = V4L2_RAW_FORMATS[self.pixelformat]
            data = unpack_raw(img, self._width, self._height, packing)
            meta.update({"bayer_pattern": pattern, "bit_depth": bits, "white_level": float(2 ** bits - 1),
                         "pixelformat": self.pixelformat.strip()})
        else:
            data = np.ascontiguousarray(img[:, :, ::-1]) if img.ndim == 3 else img
            meta.update({"bayer_pattern": None, "bit_depth": 8, "white_level": 255.0})
        if self.black_level is not None:
            meta["black_level"] = self.black_level
        index = self._index
        self._index += 1
        return Frame(data=data, index=index, timestamp=time.monotonic(), meta=meta)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"kind": "V4L2 camera", "device": self.device, "pixelformat": self.pixelformat})
        return d


# ----------------------------------------------------------------------------------------------
# tcp://host:port — frames served by `nsdd-edge serve-camera`
# ----------------------------------------------------------------------------------------------

TOKEN_ENV = "NSDD_CAMERA_TOKEN"


class TcpSource(FrameSource):
    """``tcp://host:port``: raw frames from a capture host running ``nsdd-edge serve-camera`` (protocol in
    :mod:`nsdd_edge.framing`). Options ``token=`` (default: ``$NSDD_CAMERA_TOKEN``), ``connect_timeout=``
    (5 s), ``reconnect=1`` (after a lost connection, reconnect once per read)."""

    scheme = "tcp"

    def __init__(self, uri: str, parsed: ParsedUri, options: _Options):
        super().__init__(uri)
        o = options
        try:
            host, port = parsed.netloc.rsplit(":", 1)
            self.host, self.port = host.strip("[]"), int(port)
        except ValueError:
            raise ValueError(f"camera source {uri!r}: tcp:// needs host:port, e.g. tcp://raspberrypi.local:5000") \
                from None
        if not self.host or not 0 < self.port < 65536 or parsed.path.strip("/"):
            raise ValueError(f"camera source {uri!r}: tcp:// needs host:port with a port in 1–65535 and no path")
        self.token = o.str("token") or os.environ.get(TOKEN_ENV, "")
        self.connect_timeout = o.float("connect_timeout", 5.0, positive=True)
        self.reconnect = o.bool("reconnect", True)
        options.finish()
        self.is_live = True
        self._sock: socket.socket | None = None
        self.remote: dict[str, Any] = {}

    def _connect(self) -> None:
        from nsdd_edge import framing

        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except OSError as exc:
            raise SourceError(f"{self.uri}: cannot connect to the capture host {self.host}:{self.port} ({exc}); "
                              "is 'nsdd-edge serve-camera' running there?") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            framing.send_message(sock, {"type": "hello", "version": framing.VERSION, "token": self.token})
            header, _ = framing.recv_message(sock)
        except (OSError, framing.FramingError) as exc:
            sock.close()
            raise SourceError(f"{self.uri}: handshake with the capture host failed ({exc})") from None
        if header["type"] != "welcome":
            sock.close()
            raise SourceError(f"{self.uri}: capture host refused the connection: {header.get('message', header)}")
        self.remote = dict(header.get("source") or {})
        fr = self.remote.get("frame_rate")
        self.frame_rate = float(fr) if fr else None
        self._sock = sock

    def _open(self) -> None:
        self._connect()

    def _request(self, timeout: float | None) -> tuple[dict[str, Any], bytearray]:
        from nsdd_edge import framing

        sock = self._sock
        assert sock is not None
        sock.settimeout(None if timeout is None else timeout + 2.0)  # the host answers 'stalled' itself
        framing.send_message(sock, {"type": "read", "timeout": timeout})
        return framing.recv_message(sock)

    def _read(self, timeout: float | None) -> Frame:
        from nsdd_edge import framing

        try:
            if self._sock is None:
                self._connect()
            header, payload = self._request(timeout)
        except TimeoutError:
            self._drop()
            raise SourceStalled(f"{self.uri}: the capture host sent nothing within {timeout} s") from None
        except (OSError, framing.FramingError) as exc:
            self._drop()
            if not self.reconnect:
                raise SourceError(f"{self.uri}: connection lost ({exc})") from None
            try:
                self._connect()
                header, payload = self._request(timeout)
            except (OSError, framing.FramingError) as exc2:
                self._drop()
                raise SourceError(f"{self.uri}: connection lost and reconnecting failed ({exc2})") from None
        kind = header["type"]
        if kind == "frame":
            try:
                data, index, stamp, meta = framing.decode_frame(header, payload)
            except framing.FramingError as exc:
                self._drop()
                raise SourceError(f"{self.uri}: bad frame from the capture host ({exc})") from None
            meta = {**meta, "remote_timestamp": stamp}
            return Frame(data=data, index=index, timestamp=time.monotonic(), meta=meta)
        message = f"{self.uri}: {header.get('message', kind)}"
        if kind == "stalled":
            raise SourceStalled(message)
        if kind == "end":
            raise EndOfStream(message)
        raise SourceError(message)

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def _close(self) -> None:
        from nsdd_edge import framing

        if self._sock is not None:
            try:
                self._sock.settimeout(1.0)
                framing.send_message(self._sock, {"type": "bye"})
            except OSError:
                pass
        self._drop()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"kind": "network capture host", "host": self.host, "port": self.port, "remote": self.remote})
        return d


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

SourceFactory = Callable[[str, ParsedUri, _Options], FrameSource]
SOURCE_TYPES: dict[str, SourceFactory] = {"sim": SimCamera, "file": FileSource, "picamera2": PiCamera2Source,
                                           "csi": CsiSource, "v4l2": V4l2Source, "tcp": TcpSource}


def open_source(uri: str, **options: Any) -> FrameSource:
    """Create the source for ``uri`` (not yet opened; ``read()`` or ``open()`` opens it).

    ``ValueError`` for a malformed URI, an unknown scheme or a bad option, naming the URI."""
    parsed = parse_uri(uri)
    factory = SOURCE_TYPES[parsed.scheme]
    return factory(uri, parsed, _Options(uri, parsed.query, options))


def available_sources() -> dict[str, tuple[bool, str]]:
    """``{scheme: (available, reason)}`` on this machine (for ``nsdd-edge info``)."""
    out: dict[str, tuple[bool, str]] = {}
    for scheme in SOURCE_TYPES:
        check = _AVAILABILITY.get(scheme)
        out[scheme] = check() if check else (True, "built in")
    return out


_AVAILABILITY: dict[str, Callable[[], tuple[bool, str]]] = {
    "sim": lambda: (True, "simulated lensless camera (numpy)"),
    "file": lambda: (True, "OpenCV video, image directories, .npy stacks"),
    "picamera2": lambda: ((True, "picamera2 installed") if _module_available("picamera2")
                          else (False, "picamera2 not installed (Raspberry Pi: apt install python3-picamera2)")),
    "csi": lambda: ((True, "OpenCV has GStreamer (needs nvarguscamerasrc, JetPack)") if _gstreamer_available()
                    else (False, "this OpenCV build has no GStreamer support")),
    "v4l2": lambda: _v4l2_status(),
    "tcp": lambda: (True, "client of 'nsdd-edge serve-camera'"),
}


def _v4l2_status() -> tuple[bool, str]:
    if not _v4l2_available():
        return False, "this OpenCV build has no V4L2 backend"
    devices = sorted(str(p) for p in Path("/dev").glob("video*"))
    return (True, f"devices: {', '.join(devices)}") if devices else (False, "no /dev/video* devices")


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False

