"""``nsdd-edge calibrate``: measure the PSF from a point source.

    psf = normalise_sum( fit( centre( max( mean_N(P(raw_i)) − background, 0 ))))

``P`` is the preprocessing of the live frames (black level, Bayer, downsample, crop, flip; no
normalisation), so the PSF lies on the same grid as the measurements. The background is the mean of
``--background-frames`` dark frames (source off), a ``--background`` file, or else the DiffuserCam corner
mean ``mean(img[:, 5:15, 5:15])``. Captures with saturated pixels or without a visible point source are
refused. Writes ``OUT`` (.npy float32 (C, H, W), sum 1), ``OUT.png`` (a view), ``OUT.json`` (how it was
made) and ``OUT.capture.npz`` (the averaged capture and background in counts), each atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from nsdd_edge.atomic import atomic_save_npy, atomic_write, atomic_write_bytes, atomic_write_text
from nsdd_edge.bundle import BundleError, PreprocessConfig, load_bundle
from nsdd_edge.optics import (
    OpticsError,
    center_psf,
    check_psf,
    fit_to,
    normalize,
    read_array,
    subtract_background,
)
from nsdd_edge.preprocess import BAYER_PATTERNS, DEMOSAIC_METHODS, FrameRejected, Preprocessor
from nsdd_edge.sources import Frame, FrameSource, SourceError, open_source

HELP = "measure the PSF from a point source (average, subtract background, centre, normalise)"


class CalibrationError(RuntimeError):
    """The capture cannot give a PSF (saturated, dark, source failure); the message says what to change."""


def white_level_of(frame: Frame, config: PreprocessConfig) -> float | None:
    """Saturation level in raw counts: config, frame meta (white_level / bit_depth) or the integer dtype."""
    if config.white_level is not None:
        return float(config.white_level)
    if frame.meta.get("white_level") is not None:
        return float(frame.meta["white_level"])
    if frame.meta.get("bit_depth"):
        return float(2 ** int(frame.meta["bit_depth"]) - 1)
    if frame.data.dtype.kind == "u":
        return float(np.iinfo(frame.data.dtype).max)
    return None


def psf_view(psf: np.ndarray, gamma: float = 0.5) -> np.ndarray:
    """8-bit view of a PSF (scaled to its max, gamma 0.5 so faint caustics show): (H, W) or (H, W, 3) RGB."""
    v = np.clip(psf / max(float(psf.max()), 1e-30), 0.0, 1.0) ** gamma
    img = np.rint(255 * v).astype(np.uint8)
    return img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)


def _prompt(message: str, interactive: bool) -> None:
    if interactive:
        input(f"{message} — press Enter to continue ")
    else:
        print(message, file=sys.stderr)


def _read(source: FrameSource, timeout: float, what: str, i: int, n: int) -> Frame:
    try:
        return source.read(timeout=timeout)
    except SourceError as exc:
        raise CalibrationError(f"{what} frame {i + 1}/{n}: {exc}") from None


class Calibrator:
    """Averages preprocessed frames and turns them into a PSF; usable without the CLI."""

    def __init__(self, source: FrameSource, config: PreprocessConfig | None = None, *, downsample: int | None = None,
                 bayer_pattern: str | None = None, black_level: float | None = None, demosaic: str | None = None,
                 grayscale: bool = False, max_saturated: float = 1e-5, min_signal: float = 0.02,
                 timeout: float = 5.0):
        self.source = source
        self.base = config
        self.overrides = {"downsample": downsample, "bayer_pattern": bayer_pattern, "black_level": black_level,
                          "demosaic": demosaic}
        self.grayscale = grayscale
        self.max_saturated = max_saturated
        self.min_signal = min_signal
        self.timeout = timeout
        self.preprocessor: Preprocessor | None = None
        self.config: PreprocessConfig | None = None
        self.white_level: float | None = None
        self.report: dict[str, Any] = {}

    def _setup(self, frame: Frame) -> None:
        """Preprocessing settings from the bundle (or defaults), the frame's meta, and the overrides."""
        base = dict(self.base.__dict__) if self.base is not None else {}
        base.update({"normalization": "none", "background_file": None})
        if self.base is None:
            base["black_level"] = float(frame.meta.get("black_level") or 0.0)
            base["bayer_pattern"] = frame.meta.get("bayer_pattern")
        for key, value in self.overrides.items():
            if value is not None:
                base[key] = value
        if self.grayscale:
            base["grayscale"] = True
        self.config = PreprocessConfig(**base)
        self.preprocessor = Preprocessor(self.config, expected_shape=tuple(frame.data.shape))
        self.white_level = white_level_of(frame, self.config)

    def _process(self, frame: Frame, what: str, i: int) -> np.ndarray:
        if self.preprocessor is None:
            self._setup(frame)
        assert self.preprocessor is not None
        try:
            return self.preprocessor(frame.data)
        except FrameRejected as exc:
            raise CalibrationError(f"{what} frame {i + 1}: {exc}") from None

    def average(self, n: int, what: str, *, check_saturation: bool) -> np.ndarray:
        """Mean of ``n`` preprocessed frames (float64 accumulation); refuses saturated frames."""
        total: np.ndarray | None = None
        worst = 0.0
        for i in range(n):
            frame = _read(self.source, self.timeout, what, i, n)
            y = self._process(frame, what, i)
            if check_saturation and self.white_level is not None:
                fraction = float(np.count_nonzero(frame.data >= self.white_level)) / frame.data.size
                worst = max(worst, fraction)
                if fraction > self.max_saturated:
                    raise CalibrationError(
                        f"{what} frame {i + 1}/{n} is saturated: {fraction:.3%} of the pixels are at the white level "
                        f"{self.white_level:g} (allowed {self.max_saturated:.3%}); lower the exposure, gain or the "
                        "brightness of the point source and calibrate again")
            total = y.astype(np.float64) if total is None else total + y
        assert total is not None
        self.report[f"{what}_saturated_fraction"] = worst
        return (total / n).astype(np.float32)

    def background_from_file(self, path: str | os.PathLike, shape: tuple[int, int, int]) -> np.ndarray:
        """A dark frame file in raw counts (same shape as the raw frames) or already preprocessed ``shape``."""
        try:
            bg = read_array(path)
        except OpticsError as exc:
            raise CalibrationError(f"--background: {exc}") from None
        if tuple(bg.shape) == tuple(shape):
            return bg
        assert self.preprocessor is not None
        raw = bg[0] if bg.shape[0] == 1 else np.moveaxis(bg, 0, -1)
        try:
            return self.preprocessor(raw)
        except FrameRejected as exc:
            raise CalibrationError(f"--background {path}: has shape {tuple(bg.shape)}, neither the raw frame "
                                   f"shape nor the preprocessed {tuple(shape)} ({exc})") from None

    def finish(self, capture: np.ndarray, background: np.ndarray | None, *,
               size: tuple[int, int] | None = None, center: str = "centroid") -> np.ndarray:
        """Background-subtract, check the signal, centre (``centroid``, ``peak`` or ``none``), fit to ``size``,
        normalise to sum 1."""
        assert self.config is not None
        signal = subtract_background(capture, background, corner=True, clip=True)
        peak = float(signal.max())
        full_scale = None if self.white_level is None else self.white_level - float(self.config.black_level)
        self.report.update({"peak_counts": peak, "full_scale_counts": full_scale})
        if full_scale is not None and peak < self.min_signal * full_scale:
            raise CalibrationError(
                f"the capture is dark: its brightest pixel is {peak:.1f} counts above the background, less than "
                f"{self.min_signal:.0%} of the {full_scale:g}-count range; is the point source on and in view? "
                "Raise the exposure or gain")
        if not peak > 0:
            raise CalibrationError("the capture has no signal above the background; is the point source on?")
        psf = center_psf(signal, by=center) if center != "none" else signal
        if size is not None:
            psf = fit_to(psf, size)
        try:
            return check_psf(normalize(psf, "sum"), "calibrated PSF")
        except OpticsError as exc:
            raise CalibrationError(str(exc)) from None


def save_psf(out: Path, psf: np.ndarray, capture: np.ndarray, background: np.ndarray | None,
             info: dict[str, Any]) -> list[Path]:
    """Write ``out`` (.npy), ``.png``, ``.json`` and ``.capture.npz`` atomically; returns the paths."""
    import cv2

    png = out.with_suffix(".png")
    meta = out.with_suffix(".json")
    raw = out.with_suffix(".capture.npz")
    atomic_write(raw, lambda f: np.savez(f, capture=capture,
                                         background=background if background is not None else np.zeros(0)))
    view = psf_view(psf)
    ok, encoded = cv2.imencode(".png", view if view.ndim == 2 else view[:, :, ::-1])
    if not ok:
        raise CalibrationError(f"{png}: PNG encoding failed")
    atomic_write_bytes(png, encoded.tobytes())
    atomic_write_text(meta, json.dumps(info, indent=2, default=str))
    atomic_save_npy(out, np.ascontiguousarray(psf, dtype=np.float32))
    return [out, png, meta, raw]


def _black_level(text: str) -> float | str:
    if text == "corner":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of counts or 'corner', got {text!r}") from None
    if not (value >= 0 and np.isfinite(value)):
        raise argparse.ArgumentTypeError(f"the black level must be ≥ 0, got {text}")
    return value


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default=None, help="camera URI looking at a point source (see nsdd-edge info)")
    f = p.add_argument_group("from files: a camera profile (camera.json) from a PSF image and real captures")
    f.add_argument("--psf-image", type=Path, default=None,
                   help="a PSF image from the camera (same sensor and resolution as the captures); with --captures "
                        "writes a camera profile directory to --out instead of a PSF file")
    f.add_argument("--captures", default=None, help="folder, glob or file of real captures (…_NNNNus in a name "
                                                     "gives its exposure)")
    f.add_argument("--sensor", type=int, default=128, help="side of the measurement grid y, in pixels (default: 128)")
    f.add_argument("--name", default=None, help="profile name (default: the captures folder's name)")
    f.add_argument("--psf-center", type=float, nargs=2, metavar=("ROW", "COL"), default=None,
                   help="the PSF pattern's centre in the PSF image (default: found by point symmetry or centroid)")
    p.add_argument("--frames", type=int, default=32, help="frames to average with the point source on")
    bg = p.add_mutually_exclusive_group()
    bg.add_argument("--background-frames", type=int, default=0,
                    help="dark frames (point source off) to capture first and subtract")
    bg.add_argument("--background", type=Path, default=None,
                    help="dark frame file (raw counts, same shape as the frames; or already preprocessed)")
    p.add_argument("--bundle", type=Path, default=None, help="take the preprocessing settings from this bundle")
    p.add_argument("--downsample", type=int, default=None, help="box-downsample factor (overrides the bundle)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="crop/pad the centred PSF to H W")
    p.add_argument("--center", choices=("centroid", "peak", "none"), default="centroid",
                   help="move the PSF's intensity centroid (or peak) to the array centre")
    p.add_argument("--bayer", choices=BAYER_PATTERNS, default=None, help="Bayer pattern (default: frame metadata)")
    p.add_argument("--demosaic", choices=DEMOSAIC_METHODS, default=None,
                   help="Bayer to RGB: bin2x2 (half resolution) or bilinear (default: the bundle's, else bin2x2)")
    p.add_argument("--black-level", type=_black_level, default=None,
                   help="raw counts to subtract (default: frame metadata; 0 for --psf-image); with --psf-image also "
                        "'corner': the mean of the first capture's [5:15, 5:15] corner (DiffuserCam convention)")
    p.add_argument("--grayscale", action="store_true", help="average the colour channels into one PSF")
    p.add_argument("--max-saturated", type=float, default=1e-5, help="largest allowed fraction of saturated pixels")
    p.add_argument("--min-signal", type=float, default=0.02,
                   help="smallest accepted PSF peak as a fraction of the sensor range")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each frame")
    p.add_argument("--no-prompt", action="store_true", help="do not wait for Enter between dark and lit frames")
    p.add_argument("--out", type=Path, required=True,
                   help="PSF file to write (.npy); with --psf-image: the camera profile directory")


def main(args: argparse.Namespace) -> int:
    prog = "nsdd-edge calibrate"
    if (args.psf_image is None) == (args.source is None):
        print(f"{prog}: give --source URI (a live point source) or --psf-image FILE --captures FOLDER", file=sys.stderr)
        return 2
    if args.psf_image is not None:
        if args.captures is None:
            print(f"{prog}: --psf-image needs --captures FOLDER|GLOB", file=sys.stderr)
            return 2
        if args.sensor < 8 or (args.downsample is not None and args.downsample < 1):
            print(f"{prog}: --sensor must be ≥ 8 and --downsample ≥ 1", file=sys.stderr)
            return 2
        from nsdd_edge.commands.calibrate_profile import run

        return run(args)
    if args.black_level == "corner":
        print(f"{prog}: --black-level corner is for --psf-image (a live calibration reads the level from the frame "
              "metadata or takes a number)", file=sys.stderr)
        return 2
    if args.out.suffix.lower() != ".npy":
        print(f"{prog}: --out {args.out}: the PSF is written as .npy", file=sys.stderr)
        return 2
    if args.frames < 1 or args.background_frames < 0:
        print(f"{prog}: --frames must be ≥ 1 and --background-frames ≥ 0", file=sys.stderr)
        return 2
    if args.downsample is not None and args.downsample < 1:
        print(f"{prog}: --downsample must be ≥ 1", file=sys.stderr)
        return 2
    config = None
    if args.bundle is not None:
        try:
            config = load_bundle(args.bundle, verify_files=False).preprocess
        except BundleError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 2
    try:
        source = open_source(args.source)
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    interactive = sys.stdin.isatty() and not args.no_prompt and source.is_live
    cal = Calibrator(source, config, downsample=args.downsample, bayer_pattern=args.bayer,
                     black_level=args.black_level, demosaic=args.demosaic, grayscale=args.grayscale,
                     max_saturated=args.max_saturated, min_signal=args.min_signal, timeout=args.timeout)
    started = time.time()
    try:
        with source:
            background = None
            if args.background_frames:
                _prompt(f"Switch the point source OFF: capturing {args.background_frames} dark frames", interactive)
                background = cal.average(args.background_frames, "dark", check_saturation=False)
                _prompt(f"Switch the point source ON: capturing {args.frames} frames", interactive)
            capture = cal.average(args.frames, "point-source", check_saturation=True)
            if args.background is not None:
                background = cal.background_from_file(args.background, capture.shape)
            psf = cal.finish(capture, background, size=tuple(args.size) if args.size else None,
                             center=args.center)
    except (CalibrationError, SourceError, ValueError) as exc:
        print(f"{prog}: refused: {exc}", file=sys.stderr)
        return 1
    info = {"source": args.source, "source_info": source.describe(), "frames": args.frames,
            "background": ("dark frames" if args.background_frames else str(args.background) if args.background
                           else "corner mean [5:15, 5:15]"),
            "background_frames": args.background_frames, "center": args.center,
            "preprocess": cal.config.__dict__ if cal.config else None,
            "shape": list(psf.shape), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            **cal.report}
    try:
        paths = save_psf(args.out, psf, capture, background, info)
    except OSError as exc:
        print(f"{prog}: cannot write {args.out}: {exc}", file=sys.stderr)
        return 1
    print(f"{prog}: PSF {tuple(psf.shape)} from {args.frames} frames (peak {cal.report['peak_counts']:.1f} counts) "
          f"-> {', '.join(str(p) for p in paths)}")
    return 0
