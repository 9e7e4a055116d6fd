"""Model bundles: everything the edge runtime needs to turn a raw frame into a reconstruction.

A bundle is a directory::

    bundle.json     schema below
    psf.npy         the normalised PSF, float32 (C, H, W)
    *.onnx, *.plan  optional models (a bundle without models reconstructs with the numpy Wiener filter)

``bundle.json``::

    {"format": "nsdd-edge-bundle", "version": 1, "name": str,
     "geometry": {**LenslessGeometry.to_dict(), "support_shape": [h, w]}, "lam": float, "channels": int,
     "psf": {"file": "psf.npy", "sha256": array_hash(psf)},
     "preprocess": PreprocessConfig fields,
     "models": {"onnx_fp32"|"onnx_fp16"|"onnx_int8"|"engine": {"file", "sha256", ...extra}},
     "spectra": "input",
     "provenance": {...}}

``spectra`` (optional; absent: ``fixed``): ``input`` says the models take the pseudo-inverse spectra as inputs
beside ``y`` (``nsdd-export onnx --spectra-input``): the runtime computes them from the PSF
(:func:`nsdd_edge.graph_spectra.graph_spectra`) — from a warped PSF with ``nsdd-edge run --refocus``.

``geometry`` is the reconstruction's: ``circular`` (the reconstruction has the measurement's size) or ``crop``
(measurements on the sensor grid, reconstructions on the scene grid: :attr:`Bundle.input_shape` and
:attr:`Bundle.output_shape` differ; A† and A act on the convolution grid).

``geometry.support_shape`` (optional; absent or null: the scenes fill the whole grid) is the centred
window of the reconstruction (scene) grid that the student fills — a student trained on small scenes
zero-padded to that grid (``train.students.Student`` ``support_shape``). ``geometry.support_taper`` (optional,
px) is its soft edge; a window with one is the scenes plus the taper on every side, so the scenes themselves
are the window less ``2·taper`` (:attr:`Bundle.scene_support`). With a support, ``sim://`` renders its
scenes at that size and simulates them with the crop model on a 2× sensor convolution grid, as
``nsdd-train simulate`` made the training data (:meth:`Bundle.sim_geometry`; a crop-model bundle uses its
own geometry, the support-size scene zero-padded into its scene grid), and the preview/recorder show the
support crop of the reconstruction (:meth:`Bundle.display_crop`).

Loading (:func:`load_bundle`) goes through the one validation layer, :func:`nsdd_edge.validate.verify_bundle`:
types, ranges, bounded sizes and memory, plain file names inside the bundle and a matching hash for every file
(models ``sha256``, an ONNX ``.data`` sidecar ``data_sha256``, a background frame ``preprocess.background_sha256``);
it raises :class:`BundleError` naming the problem and records what it verified in ``Bundle.verification``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nsdd_edge.atomic import atomic_write, atomic_write_json
from nsdd_edge.optics import (
    LenslessGeometry,
    array_hash,
    center_crop,
    check_psf,
)

BUNDLE_FORMAT = "nsdd-edge-bundle"
BUNDLE_VERSION = 1
BAYER_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")
DEMOSAIC_METHODS = ("bin2x2", "bilinear")
NORMALIZATIONS = ("max", "fixed", "none")


class BundleError(ValueError):
    """A bundle that is missing, corrupted or does not match what it is used with."""


@dataclass
class PreprocessConfig:
    """Raw frame → measurement ``y``; the same settings prepare training data and live frames.

    Order: ``raw_crop`` ``[top, left, height, width]`` in raw-frame pixels (the full-resolution crop of a lab's
    recipe) → black level → Bayer (``demosaic``: ``bin2x2`` or ``bilinear``) → background frame subtraction →
    box downsample → crop ``[top, left, height, width]`` (downsampled pixels) → flip → channel order →
    normalisation (``max``: divide by the frame's max; ``fixed``: divide by ``scale``; ``none``) → exposure
    (with ``reference_exposure_us``: ``y ← y · reference / exposure`` of the frame, so a 2 ms and a 15 ms
    capture of one scene give the same ``y`` scale).
    """

    black_level: float = 0.0
    white_level: float | None = None
    bayer_pattern: str | None = None  # "RGGB", "BGGR", "GRBG", "GBRG" or None for demosaiced input
    demosaic: str = "bin2x2"
    background_file: str | None = None  # a plain file name in the bundle directory
    background_sha256: str | None = None  # SHA-256 of that file (write_bundle fills it in)
    downsample: int = 1
    crop: list[int] | None = None
    flip_vertical: bool = False
    flip_horizontal: bool = False
    channel_order: str = "RGB"
    grayscale: bool = False
    normalization: str = "max"
    scale: float = 1.0
    raw_crop: list[int] | None = None
    reference_exposure_us: float | None = None

    @staticmethod
    def from_dict(d: dict | None, where: str = "preprocess") -> PreprocessConfig:
        """Settings checked by :func:`nsdd_edge.validate.validate_profile` (types and ranges; ``ProfileError``)."""
        from nsdd_edge.validate import validate_profile

        return validate_profile(d, where)


def parse_support(value: Any, grid: tuple[int, int], where: str = "support_shape") -> tuple[int, int] | None:
    """``None`` or ``[h, w]``: two positive integers within the reconstruction grid, else :class:`BundleError`."""
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)):
        raise BundleError(f"{where}: expected null or two integers [height, width], got {value!r}")
    h, w = int(value[0]), int(value[1])
    if h < 1 or w < 1 or h > grid[0] or w > grid[1]:
        raise BundleError(f"{where}: {[h, w]} must be positive and within the reconstruction grid {list(grid)}")
    return h, w


def check_support_taper(value: Any, support: tuple[int, int] | None, where: str = "support_taper") -> int:
    """A support window's soft edge in px: an integer ≥ 0 that leaves scenes inside the window (``2·taper`` below
    its shorter side); 0 without a window. :class:`BundleError` naming the problem otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise BundleError(f"{where}: expected an integer ≥ 0 (pixels), got {value!r}")
    if value and support is None:
        raise BundleError(f"{where}: {value} px needs a support window (support_shape)")
    if value and 2 * int(value) >= min(support):  # type: ignore[arg-type]
        raise BundleError(f"{where}: {value} px does not fit the {support[0]}x{support[1]} support window (at most "
                          f"{min(support) // 2 - 1}: the scenes lie inside its edge)")  # type: ignore[index]
    return int(value)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Bundle:
    """A loaded, verified bundle (see the module docstring)."""

    root: Path
    name: str
    geometry: LenslessGeometry
    lam: float
    channels: int
    psf: np.ndarray
    preprocess: PreprocessConfig
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    support_shape: tuple[int, int] | None = None
    support_taper: int = 0  # px: the student's soft edge on its support window (the scenes lie inside it)
    projector: str = "tikhonov"  # the pseudo-inverse kind of A† (nsdd_edge.optics.WienerSpectra)
    verification: list[str] = field(default_factory=list)  # what loading verified, one line per check
    spectra: str = "fixed"  # fixed: the models hold the PSF's spectra; input: the runtime feeds them (refocus)

    @property
    def psf_sha256(self) -> str:
        return array_hash(self.psf)

    @property
    def scene_support(self) -> tuple[int, int] | None:
        """The scenes' centred window: the support less its soft edge on every side (``None``: the whole grid).
        ``distill --support auto`` may have rounded the window up to its network's multiple: the scenes then were
        up to that much smaller, never larger."""
        if self.support_shape is None:
            return None
        t = 2 * int(self.support_taper)
        return (self.support_shape[0] - t, self.support_shape[1] - t)

    def sim_geometry(self) -> LenslessGeometry:
        """The forward model ``sim://`` uses with this bundle: a crop-model bundle's own geometry (with a support,
        ``sim://`` renders the scene at the support size and zero-pads it into the scene grid); a circular bundle
        with a support: the crop model (scene = the support, convolution grid 2× the sensor, as
        ``nsdd-train simulate``); without, the bundle's geometry."""
        if self.support_shape is None or self.geometry.model == "crop":
            return self.geometry
        sensor = self.geometry.sensor_shape
        return LenslessGeometry.make("crop", sensor, self.psf.shape[-2:], scene_shape=self.scene_support,
                                     conv_shape=(2 * sensor[0], 2 * sensor[1]))

    def display_crop(self, x: np.ndarray) -> np.ndarray:
        """The centred support window of a reconstruction ``(…, H, W)`` on the scene grid (the whole scene
        without a support)."""
        if self.support_shape is None:
            return x
        return center_crop(x, self.support_shape)

    def model_path(self, kind: str) -> Path | None:
        """Path of model ``kind`` (``onnx_fp32``, ``onnx_fp16``, ``onnx_int8``, ``engine``) or None."""
        m = self.models.get(kind)
        return self.root / m["file"] if m else None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of a measurement: the sensor grid."""
        return (self.channels, *self.geometry.sensor_shape)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of a reconstruction: the scene grid (= the sensor for the circular model)."""
        return (self.channels, *self.geometry.scene_shape)

    def check_compatible(self, *, sensor_shape: tuple[int, int] | None = None,
                         psf_sha256: str | None = None) -> None:
        """Refuse use with a different sensor size or PSF."""
        if sensor_shape is not None and tuple(sensor_shape) != self.geometry.sensor_shape:
            raise BundleError(f"{self.root}: bundle expects measurements of {self.geometry.sensor_shape}, "
                              f"got {tuple(sensor_shape)}")
        if psf_sha256 is not None and psf_sha256 != self.psf_sha256:
            raise BundleError(f"{self.root}: bundle was made for PSF {self.psf_sha256[:12]}…, "
                              f"not {psf_sha256[:12]}…")


def load_bundle(root: str | os.PathLike, *, verify_files: bool = True) -> Bundle:
    """Load and verify a bundle directory (:func:`nsdd_edge.validate.verify_bundle`); :class:`BundleError` names
    the problem. ``verify_files=False`` skips hashing the model and background files."""
    from nsdd_edge.validate import verify_bundle

    return verify_bundle(root, verify_files=verify_files)


def write_bundle(out: str | os.PathLike, *, psf: np.ndarray, geometry: LenslessGeometry, lam: float,
                 channels: int, preprocess: PreprocessConfig | None = None,
                 models: dict[str, str | os.PathLike | dict] | None = None, name: str | None = None,
                 provenance: dict | None = None, extra_files: dict[str, str | os.PathLike] | None = None,
                 support_shape: tuple[int, int] | list[int] | None = None, projector: str = "tikhonov",
                 spectra: str = "fixed", support_taper: int = 0) -> Bundle:
    """Write a bundle atomically: build it in a temporary sibling directory, then rename.

    ``models`` maps a kind to a source file path, or to a dict ``{"path": ..., **extra}`` whose extra
    keys (precision, TensorRT version, …) are recorded. ``extra_files`` (e.g. a background frame) are
    copied under their given names. ``support_shape``: the student's centred window (``geometry.support_shape``)
    and ``support_taper`` its soft edge in px (``geometry.support_taper``, left out when 0).
    ``spectra``: ``input`` when the models take the spectra as inputs (recorded; ``fixed`` is left out).

    An existing bundle that cannot be renamed — its parent is not writable (``/bundle`` in a container) or it
    is a mount point (a bind mount: ``EBUSY``) — is rewritten in place instead (:func:`_install_into`): the
    files are staged inside the bundle, then each is replaced atomically, ``bundle.json`` last.
    """
    out = Path(out)
    check_psf(psf, "bundle PSF")
    support = parse_support(list(support_shape) if support_shape is not None else None, geometry.scene_shape)
    geometry_record = geometry.to_dict()
    if support is not None:
        geometry_record["support_shape"] = list(support)
    taper = check_support_taper(support_taper, support)
    if taper:
        geometry_record["support_taper"] = taper
    tmp, in_place = _staging_dir(out)
    try:
        tmp.chmod(0o755)  # mkdtemp creates 0700; a bundle is meant to be read by the service user
        np.save(tmp / "psf.npy", np.ascontiguousarray(psf, dtype=np.float32))
        recorded: dict[str, dict] = {}
        for kind, src in (models or {}).items():
            info = dict(src) if isinstance(src, dict) else {"path": src}
            path = Path(info.pop("path"))
            shutil.copy2(path, tmp / path.name)
            recorded[kind] = {"file": path.name, "sha256": file_sha256(tmp / path.name), **info}
            sidecar = path.with_name(path.name + ".data")  # ONNX external data, if any
            if sidecar.exists():
                shutil.copy2(sidecar, tmp / sidecar.name)
                recorded[kind]["data_sha256"] = file_sha256(tmp / sidecar.name)
        for rel, src in (extra_files or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tmp / rel)
        preprocess = PreprocessConfig(**vars(preprocess or PreprocessConfig()))
        if preprocess.background_file:
            background = tmp / preprocess.background_file
            if not background.is_file():
                raise BundleError(f"{out}: preprocess.background_file {preprocess.background_file} is not among the "
                                  "bundle's files (give it in extra_files)")
            preprocess.background_sha256 = file_sha256(background)
        meta = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "name": name or out.name,
                "geometry": geometry_record, "lam": float(lam), "projector": projector, "channels": int(channels),
                "psf": {"file": "psf.npy", "sha256": array_hash(psf)},
                "preprocess": asdict(preprocess), "models": recorded,
                **({"spectra": spectra} if spectra != "fixed" else {}), "provenance": provenance or {}}
        (tmp / "bundle.json").write_text(json.dumps(meta, indent=2))
        if in_place:
            _install_into(tmp, out)
        elif out.exists():
            old = out.with_name(f".{out.name}.old")
            if old.exists():
                shutil.rmtree(old)
            try:
                out.rename(old)
            except OSError as exc:
                if exc.errno not in _CANNOT_RENAME:
                    raise
                _install_into(tmp, out)  # a mount point (EBUSY) or a directory we may write into but not move
            else:
                tmp.rename(out)
                shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_bundle(out)


# rename(2) errors of a directory that can still be written into: a mount point, another file system,
# a parent we may not modify
_CANNOT_RENAME = {errno.EBUSY, errno.EXDEV, errno.EACCES, errno.EPERM, errno.EROFS}


def _staging_dir(out: Path) -> tuple[Path, bool]:
    """A temporary directory to build the bundle in: a sibling of ``out`` (then renamed), or, when the parent
    is not writable and ``out`` exists, inside ``out`` itself (then installed in place); ``(dir, in_place)``."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)), False
    except OSError as exc:
        if not out.is_dir() or exc.errno not in _CANNOT_RENAME:
            raise BundleError(f"{out}: cannot write the bundle: {exc.strerror or exc} "
                              f"(its parent {out.parent} is not writable and the bundle does not exist yet)") from None
    return Path(tempfile.mkdtemp(prefix=".staging.", dir=out)), True


def _install_into(stage: Path, out: Path) -> None:
    """Replace ``out``'s files by ``stage``'s, each atomically (copy to a temporary file beside it, rename);
    ``bundle.json`` last, then the files only the old ``bundle.json`` named are removed. Never writes outside
    ``out``: works on a bind-mounted bundle and with a read-only parent."""
    old_files = _bundle_files(out)
    files = sorted(p for p in stage.rglob("*") if p.is_file() and p.name != "bundle.json")
    for src in [*files, stage / "bundle.json"]:
        rel = src.relative_to(stage)
        _copy_atomic(src, out / rel)
    new_files = _bundle_files(out)
    for rel in old_files - new_files:
        (out / rel).unlink(missing_ok=True)


def _copy_atomic(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` through a temporary file beside ``dest`` (works across file systems)."""
    with open(src, "rb") as f_in:
        atomic_write(dest, lambda f_out: shutil.copyfileobj(f_in, f_out))


def _bundle_files(root: Path) -> set[str]:
    """Files a bundle's ``bundle.json`` names (PSF, models with their ONNX ``.data``, background frame)."""
    try:
        meta = json.loads((root / "bundle.json").read_text())
    except (OSError, ValueError):
        return set()
    names = {str(meta.get("psf", {}).get("file", "psf.npy"))}
    for m in (meta.get("models") or {}).values():
        names |= {str(m["file"]), str(m["file"]) + ".data"}
    background = (meta.get("preprocess") or {}).get("background_file")
    if background:
        names.add(str(background))
    return names


def register_model(root: str | os.PathLike, kind: str, path: str | os.PathLike, *, file_name: str | None = None,
                   **info: Any) -> Bundle:
    """Add or replace model ``kind`` (e.g. ``engine``) of the existing bundle ``root``, in place.

    The file is copied into the bundle as ``file_name`` (default: its own name; moved when it already lies in
    the bundle), then ``bundle.json`` is rewritten atomically with only ``models[kind]`` changed — every other
    field (``geometry.support_shape``, provenance, fields newer than this runtime) is kept as it was. If the
    name is taken by another file, a content-addressed ``STEM.SHA12.SUFFIX`` is used, so a crash at any point
    leaves a consistent bundle. Nothing is written outside ``root`` (bind mounts, read-only parents)."""
    root = Path(root)
    load_bundle(root)  # verify what we are about to extend
    src = Path(path)
    if not src.is_file():
        raise BundleError(f"{src}: no such model file to register in {root}")
    meta_path = root / "bundle.json"
    meta = json.loads(meta_path.read_text())
    models = dict(meta.get("models") or {})
    sha = file_sha256(src)
    name = file_name or src.name
    dest = root / name
    if dest.exists() and dest.resolve() != src.resolve():
        stem, dot, suffix = name.partition(".")
        name = f"{stem}.{sha[:12]}{dot}{suffix}"
        dest = root / name
    if src.resolve().parent == root.resolve():
        os.replace(src, dest)
    elif dest.resolve() != src.resolve():
        _copy_atomic(src, dest)
    previous = models.get(kind, {}).get("file")
    models[kind] = {"file": name, "sha256": sha, **info}
    meta["models"] = models
    atomic_write_json(meta_path, meta)
    if previous and previous != name and previous not in {m["file"] for m in models.values()}:
        (root / previous).unlink(missing_ok=True)
    return load_bundle(root)
