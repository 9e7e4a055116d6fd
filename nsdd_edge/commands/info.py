"""``nsdd-edge info``: versions, the bundle (contents and verification), engines and sources available here."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

HELP = "show versions, a bundle's contents and verification, and which engines and sources work here"


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="BUNDLE", help="bundle directory (default: the shipped bundle)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")


def versions() -> dict[str, str]:
    import cv2
    import numpy as np

    import nsdd_edge
    from nsdd_edge.trt_runner import available_cuda_bindings, is_jetson, module_available

    out = {"nsdd-edge": nsdd_edge.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "numpy": np.__version__, "opencv": cv2.__version__}
    for mod in ("onnxruntime", "tensorrt"):
        ok, why = module_available(mod)
        out[mod] = why if ok else "not installed"
    for name, (ok, why) in available_cuda_bindings().items():
        out[name] = "available" if ok else "not installed"
    out["jetson"] = "yes" if is_jetson() else "no"
    if is_jetson():  # the release table (nsdd_edge/assets/device_versions.json, docs/DEVICES.md)
        from nsdd_edge.devices import DeviceError, detect_jetson

        try:
            l4t, row = detect_jetson()
            out["jetpack"] = f"{row['jetpack']} (L4T R{l4t}; expects TensorRT {row['tensorrt']}, CUDA {row['cuda']})"
        except DeviceError as exc:
            out["jetpack"] = f"unsupported: {exc}"
    return out


def bundle_report(model: str | None) -> dict:
    """The bundle, verified by the same layer ``run`` and ``bench`` use (:mod:`nsdd_edge.validate`), plus what only
    ``info`` checks: the runtime's preprocessor and the Wiener filter build, and ONNX Runtime loads and runs each
    ONNX model once. ``verified`` lists every check that passed, ``not_verified`` what could not be checked here."""
    from nsdd_edge.bundle import BundleError
    from nsdd_edge.commands.run import bundle_sha256, default_bundle_path, make_preprocessor, open_bundle
    from nsdd_edge.engines import EngineError, NumpyWienerEngine, runtime_availability
    from nsdd_edge.validate import check_onnx_model, unhashed_files

    root = Path(model) if model else default_bundle_path()
    try:
        b = open_bundle(model)
        make_preprocessor(b)
        NumpyWienerEngine(b)
    except (BundleError, ValueError) as exc:  # ValueError: the preprocessor's or the optics' named errors
        return {"path": str(root), "verified": False, "error": str(exc)}
    checks = list(b.verification) + ["the runtime's preprocessor and the numpy Wiener filter A† build from it"]
    not_checked: list[str] = []
    trt_ok, trt_why = runtime_availability()["trt"]
    for kind, m in b.models.items():
        if kind.startswith("onnx_"):
            try:
                checks.append(check_onnx_model(b, kind))
            except ImportError as exc:
                not_checked.append(f"{m['file']}: whether ONNX Runtime can load it ({exc})")
            except EngineError as exc:
                return {"path": str(b.root), "verified": False,
                        "error": f"model {kind} matches its SHA-256 but is broken: {exc}"}
        elif kind == "engine":
            not_checked.append(f"{m['file']}: whether TensorRT can deserialize it (" + (
                "run `nsdd-edge run --engine trt` on this device" if trt_ok else trt_why) + ")")
    ignored = unhashed_files(b)
    if ignored:
        not_checked.append(f"files bundle.json does not name (never read by the runtime): {', '.join(ignored)}")
    models = {}
    for kind, m in b.models.items():
        path = b.root / m["file"]
        models[kind] = {**m, "size_bytes": path.stat().st_size}
    return {"path": str(b.root), "verified": True, "checks": checks, "not_verified": not_checked, "name": b.name,
            "bundle_sha256": bundle_sha256(b),
            "geometry": b.geometry.to_dict(), "support_shape": list(b.support_shape) if b.support_shape else None,
            "lam": b.lam, "projector": b.projector, "channels": b.channels,
            "input_shape": list(b.input_shape), "output_shape": list(b.output_shape),
            "display_shape": [b.channels, *(b.support_shape or b.geometry.scene_shape)],
            "psf_shape": list(b.psf.shape), "psf_sha256": b.psf_sha256,
            "preprocess": vars(b.preprocess), "models": models, "provenance": b.provenance}


def main(args: argparse.Namespace) -> int:
    from nsdd_edge.engines import EngineError, plan_engine, runtime_availability
    from nsdd_edge.sources import available_sources

    report: dict = {"versions": versions(), "bundle": bundle_report(args.model)}
    avail = runtime_availability()
    report["engines"] = {k: {"available": ok, "why": why} for k, (ok, why) in avail.items()}
    if report["bundle"]["verified"]:
        try:
            c = plan_engine(report["bundle"]["models"], None, avail)
            report["auto_engine"] = {"kind": c.kind, "model": c.model, "reason": c.reason}
        except EngineError as exc:
            report["auto_engine"] = {"error": str(exc)}
    report["sources"] = {k: {"available": ok, "why": why} for k, (ok, why) in available_sources().items()}
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_text(report)
    return 0 if report["bundle"]["verified"] else 2


def _print_text(r: dict) -> None:
    print("versions")
    for k, v in r["versions"].items():
        print(f"  {k:<13} {v}")
    b = r["bundle"]
    print(f"\nbundle {b['path']}")
    if not b["verified"]:
        print(f"  REFUSED: {b['error']}")
    else:
        g = b["geometry"]
        print(f"  name          {b['name']}")
        print(f"  geometry      {g['model']}, sensor {g['sensor_shape']}, scene {g['scene_shape']}, "
              f"conv {g['conv_shape']}" + (f", scene support {b['support_shape']} (sim:// crop model, shown "
                                            "cropped)" if b.get("support_shape") else ""))
        print(f"  input         {b['input_shape']}  λ={b['lam']:g}  PSF {b['psf_shape']} "
              f"sha256 {b['psf_sha256'][:16]}…")
        print(f"  output        {b['output_shape']} ({'scene grid, crop model' if g['model'] == 'crop' else 'sensor grid'}"
              f"); shown {b['display_shape']} ({'the support window' if b.get('support_shape') else 'whole'})")
        p = b["preprocess"]
        print(f"  preprocess    black {p['black_level']:g}, bayer {p['bayer_pattern']}, downsample {p['downsample']}, "
              f"crop {p['crop']}, normalisation {p['normalization']} (scale {p['scale']:g})")
        if b["models"]:
            for kind, m in b["models"].items():
                extra = {k: v for k, v in m.items() if k not in ("file", "sha256", "size_bytes")}
                print(f"  model         {kind:<10} {m['file']} ({m['size_bytes'] / 1e6:.2f} MB) {extra or ''}")
        else:
            print("  models        none (reconstructs with the numpy Wiener filter)")
        print("  verified:")
        for line in b["checks"]:
            print(f"    - {line}")
        if b["not_verified"]:
            print("  not verified here:")
            for line in b["not_verified"]:
                print(f"    - {line}")
    print("\nengines")
    for k, e in r["engines"].items():
        print(f"  {k:<10} {'yes' if e['available'] else 'no ':<4} {e['why']}")
    if "auto_engine" in r:
        a = r["auto_engine"]
        print(f"  auto → {a.get('kind', '?')}: {a.get('reason', a.get('error'))}")
    print("\nsources")
    for k, s in r["sources"].items():
        print(f"  {k + '://':<13} {'yes' if s['available'] else 'no ':<4} {s['why']}")
    sys.stdout.flush()
