"""``sim://``: a lensless camera simulated from a PSF (procedural scenes, the user's images, point, dark)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from nsdd_edge.optics import (
    IMAGE_SUFFIXES,
    ForwardModel,
    LenslessGeometry,
    OpticsError,
    WienerSpectra,
    center_pad,
    load_psf,
    read_image01,
)
from nsdd_edge.psf_warp import psf_at_scale
from nsdd_edge.sources.base import (
    EndOfStream,
    Frame,
    FrameSource,
    FrameUnreadable,
    ParsedUri,
    SourceError,
    _Options,
    _Pacer,
)


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
    image ``start=N``, each centre-cropped square and resized like ``nsdd-train simulate`` does — the whole
    image with ``motion=static``; moving by ``motion=pan|zoom|static``; the next image every ``hold`` seconds
    (default 3 s with pan/zoom; ``motion=static`` shows image ``start`` for the whole run unless ``hold=`` is
    given, so the picture never depends on machine speed); ``scene=point`` for PSF calibration,
    ``scene=dark`` for dark frames)
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
    ``support=(h, w)`` (keyword only; a crop-model bundle's support window): the scene is rendered at that size
    and zero-padded centrally into the geometry's scene grid before ``A`` (``truth`` is the ``h × w`` scene).

    A scene at a changing depth: ``psf_scale=1.0,1.15,0.9`` images frame ``k`` through the PSF magnified by
    ``s(k)`` (:func:`nsdd_edge.psf_warp.warp_psf`, energy kept; on a crop geometry the PSF is first zero-padded
    to the convolution grid so a magnified PSF keeps its light, as on a real sensor): each scale is held
    ``psf_scale_hold`` seconds of frame time (``k / fps``; the last one holds on), or with ``psf_scale_ramp=1``
    ``s`` moves linearly from one to the next over that time. Each frame's ``meta["psf_scale"]`` is its scale.
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
        # seconds per image of images=DIR; None: image `start` for the whole run (motion=static's default)
        self.hold = o.float("hold", None if self.motion == "static" else 3.0, positive=True)
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
        self.scene_window = self._scene_window(uri, o.raw("support"), geometry.scene_shape)
        self.psf_scales = self._scales(uri, o.raw("psf_scale"))
        self.psf_scale_hold = o.float("psf_scale_hold", 2.0, positive=True)
        self.psf_scale_ramp = o.bool("psf_scale_ramp", False)
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
            WienerSpectra.from_psf(self.psf, geometry.conv_shape, self.lam)  # validates the PSF and λ for the grid
            self._model = ForwardModel(self.psf, geometry)  # A x: the same forward model as the runtime's checks
            self._models: dict[float, ForwardModel] = {1.0: self._model}  # the depth change's, per scale (a few)
            for scale in self.psf_scales:
                self._model_at(scale)  # a scale whose PSF leaves nothing in the box is refused here
        except OpticsError as exc:
            raise ValueError(f"camera source {uri!r}: {exc}") from None
        self._canvas: np.ndarray | None = None
        self._image_files: list[Path] = []
        self._image_cache: dict[int, np.ndarray] = {}
        self._bad_images: set[Path] = set()  # images that could not be decoded: left out from then on
        self._pacer = _Pacer(self.fps)
        self._next_index = 0

    @staticmethod
    def _scene_window(uri: str, support: Any, grid: tuple[int, int]) -> tuple[int, int]:
        """The rendered scene's size: ``support`` (two positive integers within the scene ``grid``) or the grid."""
        if support is None:
            return grid
        try:
            h, w = (int(v) for v in (str(support).lower().split("x") if isinstance(support, str) else support))
        except (TypeError, ValueError):
            raise ValueError(f"camera source {uri!r}: support={support!r} must be two integers (h, w)") from None
        if not (0 < h <= grid[0] and 0 < w <= grid[1]):
            raise ValueError(f"camera source {uri!r}: support={[h, w]} must be positive and within the scene grid "
                             f"{list(grid)}")
        return h, w

    @staticmethod
    def _scales(uri: str, value: Any) -> tuple[float, ...]:
        """``psf_scale``: positive scales, comma-separated (a string) or a sequence; () when not given."""
        if value is None:
            return ()
        items = str(value).split(",") if isinstance(value, str) else list(value)
        try:
            scales = tuple(float(v) for v in items)
        except (TypeError, ValueError):
            raise ValueError(f"camera source {uri!r}: psf_scale={value!r} must be numbers separated by commas "
                             "(e.g. 1.0,1.15,0.9)") from None
        if not scales or not all(math.isfinite(v) and 0.25 <= v <= 4.0 for v in scales):
            raise ValueError(f"camera source {uri!r}: psf_scale={value!r}: every scale must be in [0.25, 4]")
        return scales

    def psf_scale_at(self, index: int) -> float:
        """The PSF scale of frame ``index`` (1.0 without ``psf_scale``; see the class docstring)."""
        if not self.psf_scales:
            return 1.0
        position = index / self.fps / self.psf_scale_hold
        k = int(position)
        if k >= len(self.psf_scales) - 1:
            return self.psf_scales[-1]
        if not self.psf_scale_ramp:
            return self.psf_scales[k]
        a, b = self.psf_scales[k], self.psf_scales[k + 1]
        return a + (b - a) * (position - k)

    def _model_at(self, scale: float) -> ForwardModel:
        """``A`` through the PSF warped by ``scale`` (a few kept; a ramp builds one per frame, ~ms)."""
        key = round(float(scale), 6)
        model = self._models.get(key)
        if model is None:
            model = ForwardModel(psf_at_scale(self.psf, self.geometry, key), self.geometry)
            if len(self._models) >= 8:
                self._models.pop(next(k for k in self._models if k != 1.0))
            self._models[key] = model
        return model

    # -- scenes ---------------------------------------------------------------------------------

    def _open(self) -> None:
        sh, sw = self.scene_window
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
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p not in self._bad_images)
        if not files:
            raise SourceError(f"sim:// images={d}: no " + ("readable " if self._bad_images else "")
                              + f"image files ({', '.join(IMAGE_SUFFIXES)})")
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
                # left out from now on (the numbering moves on to the readable images); this frame is skipped
                self._bad_images.add(path)
                self._image_files = [f for f in self._image_files if f != path]
                self._image_cache.clear()
                raise FrameUnreadable(f"sim:// images: {exc}; this image is left out") from None
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

    def image_number(self, index: int) -> int:
        """Which image of the sorted folder frame ``index`` shows: ``(start + ⌊index / (fps·hold)⌋) mod n``
        (``start`` for every frame when ``hold`` is None)."""
        if not self._image_files:
            self._image_files = self._list_images()
        if self.hold is None:
            return self.start
        return (self.start + int(index / self.fps / self.hold)) % len(self._image_files)

    def scene(self, index: int) -> np.ndarray:
        """The scene ``x`` of frame ``index``: float32 ``(C, h, w)`` in [0, 1] (the scene grid, or ``support``)."""
        import cv2

        sh, sw = self.scene_window
        if self.scene_kind == "dark":  # lens cap on / light source off: only black level and noise
            return np.zeros((self.channels, sh, sw), np.float32)
        if self.scene_kind == "point":
            x = np.zeros((self.channels, sh, sw), np.float32)
            x[:, sh // 2, sw // 2] = 1.0
            y_peak = float(self._forward(x, index).max())  # the point's brightest measurement is point_level
            return x * np.float32(self.point_level / y_peak) if y_peak > 0 else x
        if self.scene_kind == "shapes":
            if self._canvas is None:
                self._canvas = _procedural_canvas((int(sh * 1.5), int(sw * 1.5)), self.seed)
            canvas = self._canvas
        else:  # static: the whole image fills the scene; pan / zoom: a 1.5x canvas leaves room to move
            number = self.image_number(index)
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

    def _forward(self, x: np.ndarray, index: int) -> np.ndarray:
        g = self.geometry
        if tuple(x.shape[-2:]) != g.scene_shape:  # a support-size scene, zero-padded into the scene grid
            x = center_pad(x, g.scene_shape)
        return np.ascontiguousarray(self._model_at(self.psf_scale_at(index))(x), dtype=np.float32)

    def measurement(self, index: int) -> np.ndarray:
        """The noiseless measurement ``y = A_s x`` of frame ``index`` (``s``: its PSF scale): float32
        ``(C, *sensor_shape)``."""
        return self._forward(self.scene(index), index)

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
        try:
            scene = self.scene(index)
        except FrameUnreadable:
            self._next_index = index + 1  # skipped: the next read goes on with the next frame
            raise
        data = self._raw_from(self._forward(scene, index), index)
        self._next_index = index + 1
        meta = {"source": "sim", "black_level": self.black_level, "white_level": self.white_level,
                "gain": self.gain, "bit_depth": self.bits, "bayer_pattern": self.bayer_pattern,
                "exposure_us": 1e6 / self.fps, "analogue_gain": 1.0, "scene": self.scene_kind,
                "motion": self.motion, "seed": self.seed}
        if self.psf_scales:
            meta["psf_scale"] = self.psf_scale_at(index)
        return Frame(data=data, index=index, timestamp=stamp, meta=meta, truth=scene)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"kind": "simulated lensless camera", "psf": self.psf_name, "psf_shape": list(self.psf.shape),
                  "geometry": self.geometry.to_dict(), "scene_window": list(self.scene_window), "format": self.format, "bayer_pattern": self.bayer_pattern,
                  "scene": self.scene_kind, "motion": self.motion, "seed": self.seed, "noise": self.noise,
                  "hold_s": self.hold, "psf_scale": list(self.psf_scales) or None,
                  "psf_scale_hold_s": self.psf_scale_hold if self.psf_scales else None,
                  "psf_scale_ramp": self.psf_scale_ramp if self.psf_scales else None,
                  "photons": self.photons, "black_level": self.black_level, "gain": self.gain,
                  "bit_depth": self.bits, "frames": self.max_frames,
                  "preprocess": self.matching_preprocess()})
        return d
