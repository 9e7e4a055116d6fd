"""The one validation layer for bundles and preprocessing profiles (``run``, ``info`` and ``bench`` all use it).

A bundle is untrusted input (copied between machines, edited by hand, fetched from anywhere). Before any file
it names is opened, :func:`verify_bundle` checks

- ``bundle.json``: at most :data:`MAX_BUNDLE_JSON_BYTES`, nesting at most :data:`MAX_JSON_DEPTH`, a JSON object
  with known fields only, each of the right type (``version`` an integer, ``lam`` a finite number, …);
- ranges: ``0 < λ ≤`` :data:`MAX_LAM`, ``channels`` in {1, 3}, every grid side in ``[2,`` :data:`MAX_SIDE` ``]``,
  the estimated runtime memory (spectra and frame buffers, :func:`estimate_memory_bytes`) within
  :data:`MAX_RUNTIME_BYTES`;
- files: every name is a plain file name (no directory part, no ``..``, not hidden) that resolves inside the
  bundle directory, is a regular file of bounded size and has a SHA-256 in ``bundle.json`` that matches
  (models: ``sha256`` of the file, an ONNX ``.data`` sidecar: ``data_sha256``; the PSF: :func:`array_hash` of
  its values; a background frame: ``preprocess.background_sha256``);
- the PSF: a real (not complex) numeric ``.npy`` whose header is read before its data, shape ``(C, H, W)``
  with ``C`` in {1, ``channels``}, finite, non-negative (down to :data:`PSF_NEGATIVE_TOLERANCE` × its peak),
  not all zero and no larger than the convolution grid;
- the preprocessing profile (:func:`validate_profile`, also used on its own): every setting's type and range,
  and that its output can be the bundle's measurement (channels, crop size = sensor).

Every check that passed is recorded in plain words in :attr:`Bundle.verification` (``nsdd-edge info`` prints
them); any failure raises :class:`~nsdd_edge.bundle.BundleError` (:class:`ProfileError` for a profile) naming
the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from nsdd_edge.bundle import (
    BAYER_PATTERNS,
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    DEMOSAIC_METHODS,
    NORMALIZATIONS,
    Bundle,
    BundleError,
    PreprocessConfig,
    check_support_taper,
    file_sha256,
    parse_support,
)
from nsdd_edge.graph_spectra import SPECTRA_KINDS
from nsdd_edge.optics import PROJECTORS, LenslessGeometry, OpticsError, array_hash, read_array

MAX_BUNDLE_JSON_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
MAX_NAME_CHARS = 200
MAX_SIDE = 8192
MAX_LAM = 100.0
MAX_RUNTIME_BYTES = 2 << 30
MAX_MODEL_BYTES = 4 << 30
MAX_ARRAY_FILE_BYTES = 1 << 30
MAX_RAW_VALUES = 1 << 26  # a background (raw) frame: 64 M values, e.g. a 4056x3040 mosaic five times over
MAX_DOWNSAMPLE = 64
MAX_COUNTS = float(1 << 32)  # raw counts: black/white level and the fixed scale stay below 32-bit range
PSF_NEGATIVE_TOLERANCE = 1e-3
MODEL_KINDS = ("onnx_fp32", "onnx_fp16", "onnx_int8", "engine")
TOP_LEVEL_FIELDS = ("format", "version", "name", "geometry", "lam", "projector", "channels", "psf", "preprocess",
                    "models", "spectra", "provenance")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}")


class ProfileError(BundleError):
    """A profile — preprocessing settings (``PreprocessConfig``) or a camera profile (``camera.json``,
    :mod:`nsdd_edge.camera`), or a file it needs — with a missing, mistyped or out-of-range value."""


# ------------------------------------------------------------------------------------------------
# Typed values
# ------------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def check_int(v: Any, where: str, *, minimum: int | None = None, maximum: int | None = None,
              error: type[BundleError] = BundleError) -> int:
    """An integer (not a bool, not a float) in ``[minimum, maximum]``."""
    if not _is_int(v):
        raise error(f"{where}: expected an integer, got {_show(v)}")
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        raise error(f"{where}: {v} is outside [{minimum}, {maximum}]")
    return int(v)


def check_real(v: Any, where: str, *, minimum: float | None = None, maximum: float | None = None,
               positive: bool = False, error: type[BundleError] = BundleError) -> float:
    """A finite real number (not a bool, not a string, not complex) in the given range."""
    if not _is_real(v):
        raise error(f"{where}: expected a number, got {_show(v)}")
    f = float(v)
    if not math.isfinite(f):
        raise error(f"{where}: {f} is not a finite number")
    if positive and not f > 0:
        raise error(f"{where}: must be > 0, got {f:g}")
    if (minimum is not None and f < minimum) or (maximum is not None and f > maximum):
        raise error(f"{where}: {f:g} is outside [{minimum if minimum is not None else '-inf'}, "
                    f"{maximum if maximum is not None else 'inf'}]")
    return f


def check_choice(v: Any, where: str, choices: tuple[str, ...], error: type[BundleError] = BundleError) -> str:
    if not isinstance(v, str) or v not in choices:
        raise error(f"{where}: {_show(v)} is not one of {', '.join(choices)}")
    return v


def check_bool(v: Any, where: str, error: type[BundleError] = BundleError) -> bool:
    if not isinstance(v, bool):
        raise error(f"{where}: expected true or false, got {_show(v)}")
    return v


def check_sha256(v: Any, where: str) -> str:
    if not isinstance(v, str) or not _SHA256.fullmatch(v):
        raise BundleError(f"{where}: expected a SHA-256 (64 lower-case hex digits), got {_show(v)}")
    return v


def check_plain_name(v: Any, where: str, error: type[BundleError] = BundleError) -> str:
    """A plain file name inside the bundle: no directory part, no ``..``, not hidden, ≤ 128 characters."""
    if not isinstance(v, str) or not _PLAIN_NAME.fullmatch(v) or v in (".", ".."):
        raise error(f"{where}: {_show(v)} is not a plain file name inside the bundle (letters, digits, '._+-'; "
                    "no directory, no '..', not hidden)")
    return v


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _depth(obj: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        deepest = max(deepest, d)
        if d > MAX_JSON_DEPTH:
            break
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return deepest


def parse_json_bounded(data: bytes, where: str, error: type[BundleError] = BundleError) -> Any:
    """``json.loads`` with bounded size and nesting (a ``bundle.json``, a ``camera.json``); ``error`` (never
    RecursionError/UnicodeError)."""
    if len(data) > MAX_BUNDLE_JSON_BYTES:
        raise error(f"{where}: {len(data)} bytes, more than the {MAX_BUNDLE_JSON_BYTES} a description may have")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{where}: corrupted, not valid JSON ({exc})") from None
    except RecursionError:
        raise error(f"{where}: not valid JSON here: nested more deeply than {MAX_JSON_DEPTH} levels") from None
    if _depth(obj) > MAX_JSON_DEPTH:
        raise error(f"{where}: nested more deeply than {MAX_JSON_DEPTH} levels")
    return obj


# ------------------------------------------------------------------------------------------------
# Preprocessing profiles
# ------------------------------------------------------------------------------------------------


def validate_profile(settings: dict | PreprocessConfig | None, where: str = "preprocess") -> PreprocessConfig:
    """Check every preprocessing setting's type and range; returns the :class:`PreprocessConfig`.

    ``black_level ∈ [0, 2³²)``, ``white_level`` null or ``> black_level``, ``bayer_pattern`` null or one of
    RGGB/BGGR/GRBG/GBRG, ``demosaic``/``normalization`` from their lists, ``background_file`` null or a plain file
    name (with ``background_sha256``), ``downsample ∈ [1, 64]``, ``crop`` and ``raw_crop`` null or ``[top ≥ 0,
    left ≥ 0, h ≥ 1, w ≥ 1]`` (``raw_crop`` even-aligned on a Bayer mosaic), flips/grayscale booleans,
    ``channel_order`` a permutation of RGB, ``scale ∈ (0, 2³²]``, ``reference_exposure_us`` null or in (0, 10⁹] µs.
    """
    err = ProfileError
    if settings is None:
        return PreprocessConfig()
    if isinstance(settings, PreprocessConfig):
        settings = vars(settings)
    if not isinstance(settings, dict):
        raise err(f"{where}: expected an object of settings, got {_show(settings)}")
    unknown = sorted(set(settings) - set(PreprocessConfig.__dataclass_fields__))
    if unknown:
        raise err(f"{where}: unknown settings {unknown}")
    c = PreprocessConfig(**settings)
    c.black_level = check_real(c.black_level, f"{where}.black_level", minimum=0.0, maximum=MAX_COUNTS, error=err)
    if c.white_level is not None:
        c.white_level = check_real(c.white_level, f"{where}.white_level", minimum=0.0, maximum=MAX_COUNTS, error=err)
        if c.white_level <= c.black_level:
            raise err(f"{where}.white_level: {c.white_level:g} must be above black_level {c.black_level:g}")
    if c.bayer_pattern is not None:
        pattern = c.bayer_pattern.upper() if isinstance(c.bayer_pattern, str) else c.bayer_pattern
        c.bayer_pattern = check_choice(pattern, f"{where}.bayer_pattern", BAYER_PATTERNS, err)
    check_choice(c.demosaic, f"{where}.demosaic", DEMOSAIC_METHODS, err)
    if c.background_file is not None:
        check_plain_name(c.background_file, f"{where}.background_file", err)
    if c.background_sha256 is not None and (not isinstance(c.background_sha256, str)
                                            or not _SHA256.fullmatch(c.background_sha256)):
        raise err(f"{where}.background_sha256: expected 64 hex digits, got {_show(c.background_sha256)}")
    c.downsample = check_int(c.downsample, f"{where}.downsample", minimum=1, maximum=MAX_DOWNSAMPLE, error=err)
    for name in ("crop", "raw_crop"):
        box = getattr(c, name)
        if box is None:
            continue
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            raise err(f"{where}.{name}: expected [top, left, height, width], got {_show(box)}")
        setattr(c, name, [check_int(v, f"{where}.{name}[{i}]", minimum=1 if i >= 2 else 0, maximum=MAX_SIDE * 64,
                                    error=err) for i, v in enumerate(box)])
    if c.raw_crop is not None and c.bayer_pattern is not None and any(v % 2 for v in c.raw_crop):
        raise err(f"{where}.raw_crop: {c.raw_crop} must be even-aligned on a Bayer mosaic")
    if c.reference_exposure_us is not None:
        c.reference_exposure_us = check_real(c.reference_exposure_us, f"{where}.reference_exposure_us",
                                             positive=True, maximum=1e9, error=err)
    for flag in ("flip_vertical", "flip_horizontal", "grayscale"):
        check_bool(getattr(c, flag), f"{where}.{flag}", err)
    if not isinstance(c.channel_order, str) or sorted(c.channel_order.upper()) != ["B", "G", "R"]:
        raise err(f"{where}.channel_order: {_show(c.channel_order)} must be a permutation of RGB")
    check_choice(c.normalization, f"{where}.normalization", NORMALIZATIONS, err)
    c.scale = check_real(c.scale, f"{where}.scale", positive=True, maximum=MAX_COUNTS, error=err)
    return c


def check_profile_fits(c: PreprocessConfig, channels: int, sensor_shape: tuple[int, int],
                       where: str = "preprocess") -> None:
    """The profile's output can be the bundle's measurement ``(channels, *sensor_shape)``: a crop has the sensor's
    size, grayscale gives one channel, a Bayer mosaic (without grayscale) three, a channel order needs three."""
    err = ProfileError
    if c.crop is not None and tuple(c.crop[2:]) != tuple(sensor_shape):
        raise err(f"{where}.crop: {c.crop[2]}x{c.crop[3]} is not the bundle's sensor {sensor_shape[0]}x"
                  f"{sensor_shape[1]}; the measurement must be sensor-sized")
    if c.grayscale and channels != 1:
        raise err(f"{where}.grayscale: gives 1 channel but the bundle reconstructs {channels}")
    if c.bayer_pattern is not None and not c.grayscale and channels != 3:
        raise err(f"{where}.bayer_pattern: a Bayer mosaic gives 3 channels but the bundle reconstructs {channels}")
    if c.channel_order.upper() != "RGB" and channels != 3:
        raise err(f"{where}.channel_order: {c.channel_order!r} needs 3 channels, the bundle has {channels}")
    if c.background_file is not None and c.background_sha256 is None:
        raise err(f"{where}.background_file: {c.background_file} has no background_sha256; every file a bundle "
                  "uses must be hashed (re-make the bundle with nsdd-export bundle)")


def _check_background_fits(root: Path, c: PreprocessConfig, input_shape: tuple[int, int, int]) -> str:
    """The background frame is a raw frame of the camera: the profile must turn a frame of its shape into the
    bundle's measurement (what the first live frame would otherwise find out)."""
    from nsdd_edge.preprocess import FrameRejected, Preprocessor

    name = c.background_file
    bg = read_bounded_array(root, name, "preprocess.background_file", max_values=MAX_RAW_VALUES)
    raw_shape = tuple(bg.shape[1:]) if bg.shape[0] == 1 else (*bg.shape[1:], bg.shape[0])
    try:
        out = Preprocessor(c, root, expected_shape=raw_shape).output_shape(raw_shape)
    except (FrameRejected, ValueError) as exc:
        raise BundleError(f"{root}: background frame {name} (raw frames of shape {raw_shape}) does not fit the "
                          f"preprocessing: {exc}") from None
    if tuple(out) != tuple(input_shape):
        raise BundleError(f"{root}: background frame {name}: raw frames of its shape {raw_shape} give measurements "
                          f"{tuple(out)}, the bundle reconstructs {tuple(input_shape)}")
    return f"{name}: raw frames of its shape {list(raw_shape)} give the bundle's measurement {list(input_shape)}"


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------


def bundle_file(root: Path, name: Any, where: str, *, max_bytes: int,
                error: type[BundleError] = BundleError) -> Path:
    """The regular file ``root/name`` for a plain ``name``, resolving inside ``root`` (a bundle or a camera
    profile directory), of 1..``max_bytes`` bytes."""
    check_plain_name(name, f"{root}: {where}", error)
    path = root / name
    try:
        resolved, inside = path.resolve(strict=True), root.resolve(strict=True)
    except (OSError, RuntimeError):
        raise error(f"{root}: {where}: file {name} is missing") from None
    if resolved.parent != inside:
        raise error(f"{root}: {where}: {name} points outside its directory (to {resolved})")
    if not resolved.is_file():
        raise error(f"{root}: {where}: {name} is not a regular file")
    size = resolved.stat().st_size
    if size == 0:
        raise error(f"{root}: {where}: {name} is empty")
    if size > max_bytes:
        raise error(f"{root}: {where}: {name} has {size} bytes, more than the {max_bytes} allowed")
    return path


def npy_header(path: Path, where: str, error: type[BundleError] = BundleError) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` file from its header alone (nothing allocated); :class:`BundleError` if bad."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in reader:
                raise ValueError(f"unsupported .npy version {version}")
            shape, _, dtype = reader[version](f)
    except (OSError, ValueError, SyntaxError, TypeError) as exc:
        raise error(f"{where}: not a readable .npy file ({type(exc).__name__}: {exc})") from None
    return tuple(int(s) for s in shape), np.dtype(dtype)


def read_bounded_array(root: Path, name: Any, where: str, *, max_values: int,
                       error: type[BundleError] = BundleError) -> np.ndarray:
    """A real numeric ``.npy`` array of at most ``max_values`` values, header checked before it is loaded."""
    path = bundle_file(root, name, where, max_bytes=MAX_ARRAY_FILE_BYTES, error=error)
    if path.suffix != ".npy":
        raise error(f"{root}: {where}: {name} must be a .npy file")
    shape, dtype = npy_header(path, f"{root}/{name}", error)
    if dtype.kind not in "uif" or dtype.hasobject:
        raise error(f"{root}/{name}: dtype {dtype} is not a real number type (complex, boolean, text and "
                    "object arrays are refused)")
    count = math.prod(shape) if shape else 1
    if count > max_values:
        raise error(f"{root}/{name}: shape {shape} holds {count} values, more than {max_values}")
    try:
        return read_array(path)
    except OpticsError as exc:
        raise error(f"{root}: {exc}") from None


def check_psf_content(psf: np.ndarray, conv_shape: tuple[int, int], where: str,
                      error: type[BundleError] = BundleError) -> np.ndarray:
    """A PSF array ``(C, H, W)``, C in {1, 3}, no larger than the convolution grid, with some light and non-negative
    down to :data:`PSF_NEGATIVE_TOLERANCE` × its peak (an intensity); ``error`` names ``where`` otherwise."""
    if psf.ndim != 3 or psf.shape[0] not in (1, 3):
        raise error(f"{where}: expected a PSF of shape (C, H, W) with C in {{1, 3}}, got {psf.shape}")
    if psf.shape[1] < 2 or psf.shape[2] < 2 or psf.shape[1] > conv_shape[0] or psf.shape[2] > conv_shape[1]:
        raise error(f"{where}: PSF of size {list(psf.shape[1:])} does not fit the convolution grid {list(conv_shape)}")
    if not np.isfinite(psf).all():
        raise error(f"{where}: PSF has NaN/Inf values")
    peak = float(psf.max())
    if not peak > 0:
        raise error(f"{where}: PSF has no positive value (an intensity PSF is ≥ 0 with some light)")
    if float(psf.min()) < -PSF_NEGATIVE_TOLERANCE * peak:
        raise error(f"{where}: PSF has negative values down to {float(psf.min()):.3g} (peak {peak:.3g}); an "
                    "intensity PSF is non-negative")
    return psf


# ------------------------------------------------------------------------------------------------
# Bundles
# ------------------------------------------------------------------------------------------------


def estimate_memory_bytes(geometry: LenslessGeometry, channels: int, psf_channels: int) -> int:
    """Runtime memory of a bundle: the Wiener spectra on the convolution grid (``H``, ``|H|²``, ``G``, ``R`` and an
    FFT buffer: 64 bytes per value, :class:`~nsdd_edge.optics.WienerSpectra`) plus about 16 float32 frame buffers
    of the sensor and scene grids (raw frame, measurement, reconstruction, queues)."""
    conv = geometry.conv_shape[0] * geometry.conv_shape[1]
    frames = (geometry.sensor_shape[0] * geometry.sensor_shape[1] + geometry.scene_shape[0] * geometry.scene_shape[1])
    return 64 * max(psf_channels, 1) * conv + 16 * 4 * channels * frames


def _check_geometry(d: Any, where: str) -> tuple[LenslessGeometry, Any]:
    if not isinstance(d, dict):
        raise BundleError(f"{where}: expected an object, got {_show(d)}")
    unknown = sorted(set(d) - {"model", "sensor_shape", "scene_shape", "conv_shape", "support_shape",
                               "support_taper"})
    if unknown:
        raise BundleError(f"{where}: unknown fields {unknown}")
    model = check_choice(d.get("model"), f"{where}.model", ("circular", "crop"))
    shapes = {}
    for key in ("sensor_shape", "scene_shape", "conv_shape"):
        v = d.get(key)
        if v is None and key != "sensor_shape":
            shapes[key] = None
            continue
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise BundleError(f"{where}.{key}: expected [height, width], got {_show(v)}")
        shapes[key] = tuple(check_int(s, f"{where}.{key}", minimum=2, maximum=MAX_SIDE) for s in v)
    try:
        g = LenslessGeometry.make(model, shapes["sensor_shape"], scene_shape=shapes["scene_shape"],
                                  conv_shape=shapes["conv_shape"])
    except OpticsError as exc:
        raise BundleError(f"{where}: {exc}") from None
    for key in ("scene_shape", "conv_shape"):
        if max(getattr(g, key)) > MAX_SIDE:
            raise BundleError(f"{where}.{key}: {list(getattr(g, key))} exceeds {MAX_SIDE} pixels a side")
    return g, d.get("support_shape")


def read_bundle_json(root: Path) -> dict:
    """``bundle.json`` as a dict: bounded size and depth, an object with only known fields, the right format."""
    meta_path = root / "bundle.json"
    if not root.is_dir():
        raise BundleError(f"{root}: bundle directory does not exist")
    if not meta_path.is_file():
        raise BundleError(f"{root}: not a bundle (no bundle.json)")
    try:
        with open(meta_path, "rb") as f:
            data = f.read(MAX_BUNDLE_JSON_BYTES + 1)
    except OSError as exc:
        raise BundleError(f"{meta_path}: cannot read ({exc.strerror or exc})") from None
    meta = parse_json_bounded(data, str(meta_path))
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{meta_path}: format is {_show(meta.get('format'))}, expected {BUNDLE_FORMAT!r}")
    version = meta.get("version")
    if not _is_int(version) or version < 1:
        raise BundleError(f"{meta_path}: version must be a positive integer, got {_show(version)}")
    if version > BUNDLE_VERSION:
        raise BundleError(f"{meta_path}: bundle version {version} is newer than this runtime understands "
                          f"({BUNDLE_VERSION})")
    unknown = sorted(set(meta) - set(TOP_LEVEL_FIELDS))
    if unknown:
        raise BundleError(f"{meta_path}: unknown fields {unknown} (bundle version {BUNDLE_VERSION} has "
                          f"{', '.join(TOP_LEVEL_FIELDS)})")
    for key in ("geometry", "lam", "channels", "psf"):
        if key not in meta:
            raise BundleError(f"{meta_path}: missing {key!r}")
    return meta


def verify_bundle(root: str | os.PathLike, *, verify_files: bool = True,
                  max_runtime_bytes: int = MAX_RUNTIME_BYTES) -> Bundle:
    """Load a bundle after checking everything the module docstring lists; the returned bundle's
    ``verification`` says, one line per check, what was verified. ``verify_files=False`` skips the model and
    background hashes (their names, presence and sizes are still checked)."""
    root = Path(root)
    meta = read_bundle_json(root)
    mp = root / "bundle.json"
    done: list[str] = []
    raw_json = mp.read_bytes()
    done.append(f"bundle.json: {len(raw_json)} bytes, SHA-256 {hashlib.sha256(raw_json).hexdigest()[:16]}…; "
                f"format {BUNDLE_FORMAT} version {meta['version']}; only known fields, each type- and range-checked")
    name = meta.get("name", root.name)
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS or not name.isprintable():
        raise BundleError(f"{mp}: name must be printable text of 1..{MAX_NAME_CHARS} characters, got {_show(name)}")
    geometry, support_value = _check_geometry(meta["geometry"], f"{mp}: geometry")
    support = parse_support(support_value, geometry.scene_shape, f"{mp}: geometry.support_shape")
    taper = check_support_taper(meta["geometry"].get("support_taper", 0), support, f"{mp}: geometry.support_taper")
    lam = check_real(meta["lam"], f"{mp}: lam", positive=True, maximum=MAX_LAM)
    projector = check_choice(meta.get("projector", "tikhonov"), f"{mp}: projector", PROJECTORS)
    channels = check_int(meta["channels"], f"{mp}: channels", minimum=1, maximum=3)
    if channels == 2:
        raise BundleError(f"{mp}: channels must be 1 or 3, got 2")
    spectra = check_choice(meta.get("spectra", "fixed"), f"{mp}: spectra", SPECTRA_KINDS)

    psf_rec = meta["psf"]
    if not isinstance(psf_rec, dict) or set(psf_rec) - {"file", "sha256"}:
        raise BundleError(f"{mp}: psf must be {{\"file\": NAME, \"sha256\": HASH}}, got {_show(psf_rec)}")
    psf_hash = check_sha256(psf_rec.get("sha256"), f"{mp}: psf.sha256")
    conv = geometry.conv_shape
    need = estimate_memory_bytes(geometry, channels, channels)
    if need > max_runtime_bytes:
        raise BundleError(f"{mp}: geometry {geometry.model}, sensor {list(geometry.sensor_shape)}, convolution grid "
                          f"{list(conv)} needs about {need / 2**20:.0f} MiB, more than the {max_runtime_bytes / 2**20:.0f}"
                          " MiB allowed")
    psf = read_bounded_array(root, psf_rec.get("file"), "psf.file", max_values=3 * conv[0] * conv[1])
    check_psf_content(psf, conv, f"{root}/{psf_rec['file']} ({geometry.model} model)")
    if psf.shape[0] not in (1, channels):
        raise BundleError(f"{root}: PSF has {psf.shape[0]} channels, bundle says {channels}")
    if array_hash(psf) != psf_hash:
        raise BundleError(f"{root}: PSF hash mismatch: {psf_rec['file']} is not the PSF this bundle was built for")
    done.append(f"{psf_rec['file']}: PSF {list(psf.shape)} real, finite, ≥ 0, sum {float(psf.sum()):.4g}, fits the "
                f"{geometry.model} grid {list(conv)}; its array hash (float32 values and shape) matches "
                f"{psf_hash[:16]}…")
    done.append(f"geometry: {geometry.model}, sensor {list(geometry.sensor_shape)}, scene {list(geometry.scene_shape)},"
                f" conv {list(conv)}" + (f", support {list(support)}" if support else "")
                + f"; λ = {lam:g} in (0, {MAX_LAM:g}], projector {projector}, {channels} channel(s), spectra {spectra}"
                "; estimated runtime "
                f"memory {estimate_memory_bytes(geometry, channels, psf.shape[0]) / 2**20:.1f} MiB "
                f"(limit {max_runtime_bytes / 2**20:.0f} MiB)")

    preprocess = validate_profile(meta.get("preprocess"), f"{mp}: preprocess")
    check_profile_fits(preprocess, channels, geometry.sensor_shape, f"{mp}: preprocess")
    if preprocess.background_file is not None:
        bg_path = bundle_file(root, preprocess.background_file, "preprocess.background_file",
                              max_bytes=MAX_ARRAY_FILE_BYTES)
        if verify_files:
            if file_sha256(bg_path) != preprocess.background_sha256:
                raise BundleError(f"{root}: background frame {preprocess.background_file} is corrupted "
                                  "(SHA-256 mismatch)")
            done.append(f"{preprocess.background_file}: background frame, SHA-256 of the file matches")
        done.append(_check_background_fits(root, preprocess, (channels, *geometry.sensor_shape)))
    done.append("preprocess: every setting type- and range-checked; output can be the measurement "
                f"({channels}, {geometry.sensor_shape[0]}, {geometry.sensor_shape[1]})")

    models_rec = meta.get("models", {})
    if not isinstance(models_rec, dict):
        raise BundleError(f"{mp}: models must be an object, got {_show(models_rec)}")
    models: dict[str, dict[str, Any]] = {}
    for kind, m in models_rec.items():
        w = f"models.{kind}"
        check_choice(kind, f"{mp}: model kind", MODEL_KINDS)
        if not isinstance(m, dict):
            raise BundleError(f"{mp}: {w}: expected an object with file and sha256, got {_show(m)}")
        if "sha256" not in m:
            raise BundleError(f"{mp}: {w}: no sha256; every model file must be hashed")
        sha = check_sha256(m.get("sha256"), f"{mp}: {w}.sha256")
        path = bundle_file(root, m.get("file"), f"{w}.file", max_bytes=MAX_MODEL_BYTES)
        if kind.startswith("onnx_") and path.suffix != ".onnx":
            raise BundleError(f"{root}: {w}: {m['file']} is not an .onnx file")
        sidecar = root / (m["file"] + ".data")
        if "data_sha256" in m or sidecar.exists():
            data_sha = check_sha256(m.get("data_sha256"), f"{mp}: {w}.data_sha256 (for {sidecar.name})")
            bundle_file(root, sidecar.name, f"{w} external data", max_bytes=MAX_MODEL_BYTES)
        if verify_files:
            if file_sha256(path) != sha:
                raise BundleError(f"{root}: model {kind!r} file {m['file']} is corrupted (SHA-256 mismatch)")
            line = f"{m['file']}: model {kind}, {path.stat().st_size} bytes, SHA-256 of the file matches {sha[:16]}…"
            if sidecar.exists():
                if file_sha256(sidecar) != data_sha:
                    raise BundleError(f"{root}: model {kind!r} external data {sidecar.name} is corrupted "
                                      "(SHA-256 mismatch)")
                line += f"; {sidecar.name} matches too"
            done.append(line)
        models[kind] = dict(m)
    if not verify_files:
        done.append("model and background file hashes NOT checked (verify_files=False)")
    provenance = meta.get("provenance", {})
    if not isinstance(provenance, dict):
        raise BundleError(f"{mp}: provenance must be an object, got {_show(provenance)}")
    return Bundle(root=root, name=name, geometry=geometry, lam=lam, channels=channels, psf=psf, preprocess=preprocess,
                  models=models, provenance=provenance, support_shape=support, support_taper=taper,
                  projector=projector, spectra=spectra,
                  verification=done)


def unhashed_files(bundle: Bundle) -> list[str]:
    """Files in the bundle directory that ``bundle.json`` does not name (never read by the runtime)."""
    named = {"bundle.json", bundle_psf_name(bundle)}
    for m in bundle.models.values():
        named |= {m["file"], m["file"] + ".data"}
    if bundle.preprocess.background_file:
        named.add(bundle.preprocess.background_file)
    try:
        return sorted(p.name for p in bundle.root.iterdir() if p.name not in named)
    except OSError:
        return []


def bundle_psf_name(bundle: Bundle) -> str:
    try:
        return str(json.loads((bundle.root / "bundle.json").read_text())["psf"]["file"])
    except (OSError, ValueError, KeyError, TypeError):
        return "psf.npy"


def check_onnx_model(bundle: Bundle, kind: str, *, threads: int = 1) -> str:
    """Load model ``kind`` in ONNX Runtime and run it once on zeros: the output must have the bundle's
    reconstruction shape and be finite. Returns what was verified; ``EngineError`` if it fails,
    ``ImportError`` if ONNX Runtime is not installed (then nothing could be checked)."""
    from nsdd_edge.engines import EngineError, OnnxRuntimeEngine, spectra_feed
    from nsdd_edge.trt_runner import module_available

    ok, why = module_available("onnxruntime")
    if not ok:
        raise ImportError(why)
    path = bundle.model_path(kind)
    engine = OnnxRuntimeEngine(path, threads=threads, input_shape=bundle.input_shape, output_shape=bundle.output_shape,
                               spectra=spectra_feed(bundle), psf=bundle.psf)
    try:
        y = np.zeros((1, *bundle.input_shape), np.float32)
        x = engine.infer(y)
    finally:
        engine.close()
    want = (1, *bundle.output_shape)
    if tuple(x.shape) != want or not np.isfinite(x).all():
        raise EngineError(f"{path}: on a zero measurement the model gives shape {tuple(x.shape)} "
                          f"({'finite' if np.isfinite(x).all() else 'NaN/Inf'}), expected finite {want}")
    fed = f", fed the spectra of the bundle's PSF ({', '.join(engine.spectra.names)})" if engine.spectra else ""
    return f"{path.name}: ONNX Runtime loads it and one inference gives a finite {list(want)} reconstruction{fed}"
