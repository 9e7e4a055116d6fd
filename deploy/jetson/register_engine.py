"""Record a TensorRT engine built on the device in a bundle (used by deploy/jetson/setup.sh).

    python register_engine.py BUNDLE_DIR ENGINE.plan --precision fp16 --tensorrt 10.3.0 ...

Rewrites the bundle atomically with :func:`nsdd_edge.bundle.write_bundle`, keeping its PSF, geometry,
preprocessing, models, background file and provenance, and adds ``models.engine`` with the engine's
SHA-256 and how it was built, so ``load_bundle`` verifies it like any other model.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from nsdd_edge.bundle import BundleError, load_bundle, write_bundle


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("engine", type=Path)
    p.add_argument("--precision", default="fp16")
    p.add_argument("--source-model", default="onnx_fp32", help="the bundle model the engine was built from")
    p.add_argument("--tensorrt", default="unknown", help="TensorRT version that built the engine")
    p.add_argument("--jetpack", default="unknown")
    p.add_argument("--l4t", default="unknown")
    args = p.parse_args(argv)
    try:
        bundle = load_bundle(args.bundle)
    except BundleError as exc:
        print(f"register_engine: {exc}", file=sys.stderr)
        return 1
    if not args.engine.is_file():
        print(f"register_engine: {args.engine}: no such engine file", file=sys.stderr)
        return 1
    models: dict[str, dict] = {}
    for kind, m in bundle.models.items():
        if kind == "engine":
            continue
        extra = {k: v for k, v in m.items() if k not in ("file", "sha256")}
        models[kind] = {"path": bundle.root / m["file"], **extra}
    models["engine"] = {"path": args.engine, "precision": args.precision, "built_from": args.source_model,
                        "tensorrt": args.tensorrt, "jetpack": args.jetpack, "l4t": args.l4t,
                        "device": platform.node(), "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    extra_files = {}
    if bundle.preprocess.background_file:
        extra_files[bundle.preprocess.background_file] = bundle.root / bundle.preprocess.background_file
    # write_bundle copies every file into a new directory before it replaces the old one, so the engine and
    # models may live inside the bundle being rewritten.
    write_bundle(bundle.root, psf=bundle.psf, geometry=bundle.geometry, lam=bundle.lam, channels=bundle.channels,
                 preprocess=bundle.preprocess, models=models, name=bundle.name, provenance=bundle.provenance,
                 extra_files=extra_files)
    print(f"register_engine: {bundle.root}: engine registered ({args.precision}, TensorRT {args.tensorrt})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
