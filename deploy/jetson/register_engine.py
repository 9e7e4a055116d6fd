"""Record a TensorRT engine built on the device in a bundle (used by deploy/jetson/setup.sh and entrypoint.sh).

    python register_engine.py BUNDLE_DIR ENGINE.plan --precision fp16 --tensorrt 10.3.0 ...
    python register_engine.py BUNDLE_DIR --needs-build [--tensorrt 10.3.0]   # exit 0: build one, 1: up to date

Registration uses :func:`nsdd_edge.bundle.register_model`: the engine is moved/copied into the bundle as
``engine.plan`` and ``bundle.json`` is rewritten in place with only ``models.engine`` added (its SHA-256 and
how it was built) — every other field (``geometry.support_shape``, provenance, …) stays as it was, and
nothing is written outside the bundle directory (a bind-mounted ``/bundle`` in a container works).

``--needs-build`` answers "must this device build an engine?": yes when the bundle registers none, when a
stray ``engine.plan`` is not the registered one, or when the registered engine was built by another
TensorRT version than ``--tensorrt`` (an engine only runs on the TensorRT that built it).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from nsdd_edge.bundle import BundleError, file_sha256, load_bundle, register_model

ENGINE_FILE = "engine.plan"


def needs_build(bundle_dir: Path, tensorrt: str | None) -> tuple[bool, str]:
    """``(True, why)`` when ``bundle_dir`` has no usable engine for TensorRT ``tensorrt``."""
    bundle = load_bundle(bundle_dir)
    engine = bundle.models.get("engine")
    if engine is None:
        stray = bundle.root / ENGINE_FILE
        return True, ("an engine.plan lies in the bundle but is not registered (an interrupted build?)"
                      if stray.exists() else "the bundle registers no TensorRT engine")
    if tensorrt and engine.get("tensorrt") not in (None, "unknown") and engine["tensorrt"] != tensorrt:
        return True, f"the engine was built by TensorRT {engine['tensorrt']}, this device has {tensorrt}"
    return False, f"engine {engine['file']} (TensorRT {engine.get('tensorrt')}, {engine.get('precision')}) is registered"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("engine", type=Path, nargs="?", help="the engine file to register")
    p.add_argument("--needs-build", action="store_true", help="exit 0 if an engine must be built, 1 if not")
    p.add_argument("--precision", default="fp16")
    p.add_argument("--source-model", default="onnx_fp32", help="the bundle model the engine was built from")
    p.add_argument("--typing", default="strongly-typed", help="how the network was built (strongly-typed|weakly-typed)")
    p.add_argument("--tensorrt", default="unknown", help="TensorRT version that built the engine")
    p.add_argument("--jetpack", default="unknown")
    p.add_argument("--l4t", default="unknown")
    args = p.parse_args(argv)
    try:
        if args.needs_build:
            build, why = needs_build(args.bundle, None if args.tensorrt == "unknown" else args.tensorrt)
            print(f"register_engine: {args.bundle}: {why}")
            return 0 if build else 1
        if args.engine is None:
            p.error("ENGINE is required unless --needs-build is given")
        if not args.engine.is_file():
            print(f"register_engine: {args.engine}: no such engine file", file=sys.stderr)
            return 2
        sha = file_sha256(args.engine)
        bundle = register_model(args.bundle, "engine", args.engine, file_name=ENGINE_FILE,
                                precision=args.precision, built_from=args.source_model, typing=args.typing,
                                tensorrt=args.tensorrt, jetpack=args.jetpack, l4t=args.l4t,
                                device=platform.node(), built=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    except BundleError as exc:
        print(f"register_engine: {exc}", file=sys.stderr)
        return 2
    print(f"register_engine: {bundle.root}: engine {bundle.models['engine']['file']} registered "
          f"({args.precision}, {args.typing}, TensorRT {args.tensorrt}, sha256 {sha[:12]}…)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
