"""Assemble an edge bundle (``nsdd_edge.bundle.write_bundle``) from exported models and the PSF.

Every ONNX file must come from ``nsdd-export onnx|quantize`` for the same PSF, λ, geometry and channels;
the PSF given must hash to the models' PSF. The bundle records sizes, λ, the student's support window
(``geometry.support_shape``, from the models' ``nsdd.support_shape``), preprocessing and provenance
(hashes, the student's configuration including its training data, package versions).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from export.graph import ExportError, GraphSpec
from export.onnx_graph import add_psf_arguments, psf_from_args, read_metadata
from nsdd_edge.bundle import BundleError, PreprocessConfig, file_sha256, write_bundle
from nsdd_edge.optics import LenslessGeometry, OpticsError, array_hash

HELP = "write an edge bundle (bundle.json, psf.npy, ONNX/plan models, preprocessing, provenance)"

PACKAGES = ("nsdd-edge", "numpy", "opencv-python-headless", "onnx", "onnxruntime", "onnxscript", "torch",
            "safetensors")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return out


def _same(a: GraphSpec, b: GraphSpec) -> list[str]:
    diffs = []
    if a.psf_sha256 != b.psf_sha256:
        diffs.append("PSF")
    if abs(a.lam - b.lam) > 1e-12 * max(abs(a.lam), 1.0):
        diffs.append(f"λ ({a.lam:g} vs {b.lam:g})")
    if a.geometry != b.geometry:
        diffs.append(f"geometry ({a.geometry.to_dict()} vs {b.geometry.to_dict()})")
    if a.channels != b.channels:
        diffs.append(f"channels ({a.channels} vs {b.channels})")
    if a.projector != b.projector:
        diffs.append(f"pseudo-inverse ({a.projector} vs {b.projector})")
    if a.objective != b.objective:
        diffs.append(f"objective ({a.objective} vs {b.objective})")
    if a.support_shape != b.support_shape:
        diffs.append(f"support window ({a.support_shape} vs {b.support_shape})")
    if a.spectra != b.spectra:
        diffs.append(f"spectra ({a.spectra} vs {b.spectra}: one takes them as inputs, the other holds them)")
    if a.support_taper != b.support_taper:
        diffs.append(f"support taper ({a.support_taper} vs {b.support_taper} px)")
    return diffs


def _preprocess_settings(value: str | Path) -> tuple[Path, dict, Path | None]:
    """``--preprocess``: a JSON file of PreprocessConfig fields, an inline JSON object, or a camera profile
    (its directory or ``camera.json``; its ``preprocess`` section is used and the profile is embedded).
    Returns (the path errors name, the settings, the profile directory or None)."""
    text = str(value)
    if text.lstrip().startswith("{"):
        try:
            settings = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ExportError(f"--preprocess: inline JSON is invalid ({exc})") from None
        if not isinstance(settings, dict):
            raise ExportError("--preprocess: inline JSON must be an object of PreprocessConfig fields")
        return Path.cwd() / "--preprocess", settings, None
    path = Path(text)
    if path.is_dir():
        path = path / "camera.json"
    try:
        settings = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: no such preprocessing file or camera profile") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(settings, dict):
        raise ExportError(f"{path}: expected a JSON object")
    if settings.get("format") == "nsdd-camera-profile":
        from nsdd_edge.camera import ProfileError, load_profile

        try:
            profile = load_profile(path)
        except ProfileError as exc:
            raise ExportError(str(exc)) from None
        from dataclasses import asdict

        return path, asdict(profile.preprocess), path.parent
    return path, settings, None


def make_bundle(onnx_files: list[str | Path], psf: Any, out: str | Path, *, engine: str | Path | None = None,
                preprocess_json: str | Path | None = None, name: str | None = None,
                psf_source: str | None = None, preprocess: PreprocessConfig | None = None,
                provenance_extra: dict | None = None) -> Any:
    """Check the models against each other and the PSF, then write the bundle; returns the loaded Bundle.

    The models' ``nsdd.support_shape`` and ``nsdd.support_taper`` become the bundle's ``geometry.support_shape``
    and ``geometry.support_taper``. ``preprocess``
    (a :class:`PreprocessConfig`) may be given instead of ``preprocess_json``; ``provenance_extra`` is
    merged into the recorded provenance."""
    if not onnx_files:
        raise ExportError("give at least one ONNX file (--onnx)")
    models: dict[str, dict] = {}
    specs: list[tuple[Path, GraphSpec, dict]] = []
    for f in onnx_files:
        path = Path(f)
        meta = read_metadata(path)
        try:
            spec = GraphSpec.from_metadata(meta)
        except ExportError as exc:
            raise ExportError(f"{path}: {exc}") from None
        if specs:
            diffs = _same(specs[0][1], spec)
            if diffs:
                raise ExportError(f"{path}: does not match {specs[0][0]}: different {', '.join(diffs)}")
        specs.append((path, spec, meta))
        kind = f"onnx_{meta.get('nsdd.precision', 'fp32')}"
        if kind in models:
            raise ExportError(f"{path}: a second {kind} model (first: {models[kind]['path']})")
        if any(Path(m["path"]).name == path.name for m in models.values()):
            raise ExportError(f"{path}: another model has the same file name; rename one (bundle files are flat)")
        if path.with_name(path.name + ".data").exists():
            raise ExportError(f"{path}: has an external-data sidecar; bundles hold single-file models")
        models[kind] = {"path": str(path), "precision": meta.get("nsdd.precision", "fp32"),
                        "dft": meta.get("nsdd.dft"), "objective": meta.get("nsdd.objective")}
    first_path, spec, first_meta = specs[0]
    psf_hash = array_hash(psf)
    if psf_hash != spec.psf_sha256:
        raise ExportError(f"{psf_source or 'PSF'}: hash {psf_hash[:12]}… is not the PSF {first_path} was exported "
                          f"for ({spec.psf_sha256[:12]}…); use the same file and --psf-* options as nsdd-export onnx")
    g = spec.geometry
    try:  # the PSF must fit the grid it is convolved on (the sensor, or the crop model's convolution grid)
        LenslessGeometry.make(g.model, g.sensor_shape, psf.shape[-2:], g.scene_shape if g.model == "crop" else None,
                              g.conv_shape if g.model == "crop" else None)
    except OpticsError as exc:
        raise ExportError(f"{psf_source or 'PSF'}: {exc}") from None
    if engine is not None:
        plan = Path(engine)
        if not plan.exists():
            raise ExportError(f"{plan}: no such TensorRT plan")
        record_path = Path(str(plan) + ".json")
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        plan_psf = record.get("onnx_metadata", {}).get("nsdd.psf_sha256")
        if plan_psf and plan_psf != spec.psf_sha256:
            raise ExportError(f"{plan}: built from a model for another PSF ({plan_psf[:12]}…)")
        plan_spectra = record.get("onnx_metadata", {}).get("nsdd.spectra", "fixed") if record else spec.spectra
        if plan_spectra != spec.spectra:
            raise ExportError(f"{plan}: built from a model with {plan_spectra} spectra, the ONNX models' are "
                              f"{spec.spectra} (build the plan from the same export)")
        models["engine"] = {"path": str(plan), "precision": record.get("precision"),
                            "tensorrt_version": record.get("tensorrt_version"), "gpu": record.get("gpu")}
    if preprocess is not None and preprocess_json is not None:
        raise ExportError("give the preprocessing settings once (preprocess or preprocess_json)")
    preprocess = preprocess or PreprocessConfig()
    extra_files: dict[str, str] = {}
    if preprocess_json is not None:
        pj, settings, profile_dir = _preprocess_settings(preprocess_json)
        try:
            preprocess = PreprocessConfig.from_dict(settings)
        except (BundleError, TypeError) as exc:
            raise ExportError(f"{pj}: {exc}") from exc
        if profile_dir is not None:  # the bundle embeds the camera profile it was made for
            extra_files["camera/camera.json"] = str(profile_dir / "camera.json")
            extra_files["camera/psf.npy"] = str(profile_dir / "psf.npy")
        if preprocess.background_file:
            bg = (pj.parent / preprocess.background_file).resolve()
            if not bg.exists():
                raise ExportError(f"{pj}: background_file {preprocess.background_file} not found at {bg}")
            extra_files[Path(preprocess.background_file).name] = str(bg)
            preprocess.background_file = Path(preprocess.background_file).name
    student_cfg = {}
    if "nsdd.student_config" in first_meta:
        try:
            student_cfg = json.loads(first_meta["nsdd.student_config"])
        except json.JSONDecodeError:
            student_cfg = {"unreadable": first_meta["nsdd.student_config"]}
    # nsdd-train distill records {"training": {data, targets, ids_sha256, teacher, ...}} and, for the paper
    # student, {"prior": {...}}
    training_data = {k: student_cfg[k] for k in ("training", "prior") if k in student_cfg}
    provenance = {
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "psf": {"sha256": psf_hash, "source": psf_source},
        "objective": spec.objective, "dft": spec.dft,
        "models": {kind: {"source": m["path"], "sha256": file_sha256(m["path"])} for kind, m in models.items()},
        "student": {"dir": first_meta.get("nsdd.student"), "config": student_cfg, "training_data": training_data},
        "packages": package_versions(),
        **(provenance_extra or {}),
    }
    try:
        return write_bundle(out, psf=psf, geometry=spec.geometry, lam=spec.lam, channels=spec.channels,
                            preprocess=preprocess, models=models, name=name, provenance=provenance,
                            extra_files=extra_files, support_shape=spec.support_shape, projector=spec.projector,
                            spectra=spec.spectra, support_taper=spec.support_taper)
    except BundleError as exc:
        raise ExportError(str(exc)) from exc


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--onnx", required=True, help="ONNX file(s), comma-separated (FP32, FP16, INT8)")
    p.add_argument("--engine", metavar="PLAN", help="TensorRT plan from nsdd-export engine")
    add_psf_arguments(p)
    p.add_argument("--preprocess", metavar="JSON|PROFILE",
                   help="raw frame → y settings: a JSON file or an inline JSON object of PreprocessConfig fields "
                        "(black_level, white_level, bayer_pattern, demosaic, background_file, raw_crop, downsample, "
                        "crop, flip_vertical, flip_horizontal, channel_order, grayscale, normalization, scale, "
                        "reference_exposure_us; see nsdd_edge.bundle.PreprocessConfig), or a camera profile "
                        "(directory or camera.json from nsdd-edge calibrate), which the bundle then embeds")
    p.add_argument("--name", help="bundle name (default: the output directory's name)")
    p.add_argument("--out", required=True, help="bundle directory (replaced atomically)")


def main(args: argparse.Namespace) -> int:
    try:
        psf = psf_from_args(args)
        files = [f.strip() for f in args.onnx.split(",") if f.strip()]
        bundle = make_bundle(files, psf, args.out, engine=args.engine, preprocess_json=args.preprocess,
                             name=args.name, psf_source=str(Path(args.psf).resolve()))
    except (ExportError, OpticsError) as exc:
        print(f"nsdd-export bundle: {exc}", file=sys.stderr)
        return 2
    g = bundle.geometry
    grids = f"{g.sensor_shape}" if g.model == "circular" else f"crop: sensor {g.sensor_shape} → scene {g.scene_shape}"
    print(f"wrote bundle {bundle.root}: {grids} C={bundle.channels} λ={bundle.lam:g} "
          f"models={sorted(bundle.models)}" + (f" support={bundle.support_shape}" if bundle.support_shape else "")
          + (" spectra=input (refocusable: nsdd-edge run --refocus)" if bundle.spectra == "input" else ""))
    return 0
