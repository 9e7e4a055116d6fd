"""Build a TensorRT plan from an exported ONNX graph (run this on the target device, e.g. the Jetson).

TensorRT 10.x: a network from the ONNX parser; precision by builder flags (``FP16``; ``INT8`` for the
explicit Q/DQ graph of ``nsdd-export quantize --precision int8``; ``best`` = FP16 + INT8), no
calibrator (deprecated in 10.1). TensorRT 11.x: the builder flags and calibrators are gone; the network
is created ``STRONGLY_TYPED`` and precision comes from the ONNX types, so give it the FP16 or INT8 ONNX.
The version is read from ``tensorrt.__version__`` and decides which path is taken
(:func:`build_settings`, a pure function tested without TensorRT).

Writes ``model.plan`` and ``model.plan.json`` (TensorRT version, GPU, flags, precision, shapes, timing).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from export.graph import ExportError
from nsdd_edge.atomic import atomic_write_bytes

HELP = "build a TensorRT plan (10.x builder flags or 11.x strongly typed) from an exported ONNX graph"

PRECISIONS = ("fp32", "fp16", "int8", "best")


def parse_version(text: str) -> tuple[int, int, int]:
    """``"10.3.0.30"`` → ``(10, 3, 0)``; raises :class:`ExportError` on anything else."""
    parts = str(text).strip().split(".")
    try:
        nums = [int(p) for p in parts[:3]]
    except ValueError:
        raise ExportError(f"cannot read a TensorRT version from {text!r}") from None
    if not nums:
        raise ExportError(f"cannot read a TensorRT version from {text!r}")
    while len(nums) < 3:
        nums.append(0)
    return nums[0], nums[1], nums[2]


@dataclass
class BuildSettings:
    """What the builder is told: network creation flags, builder flags, notes for the record."""

    strongly_typed: bool
    builder_flags: list[str] = field(default_factory=list)
    network_flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def build_settings(version: str, precision: str, *, model_precision: str = "fp32",
                   has_qdq: bool = False) -> BuildSettings:
    """Decide network/builder flags from the TensorRT version and the requested precision.

    - < 10: refused (this project targets JetPack 6.x = TensorRT 10.3 and later).
    - 10.x: weakly typed network; ``fp16`` → FP16 flag, ``int8`` → INT8 (+FP16 for the layers left in
      float; the graph must carry Q/DQ nodes), ``best`` → FP16 + INT8, ``fp32`` → none.
    - ≥ 11: ``STRONGLY_TYPED`` network, no precision flags; the ONNX's own types decide, so the requested
      precision must match the model's (``nsdd.precision`` metadata).
    """
    major, minor, _ = parse_version(version)
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; use one of {PRECISIONS}")
    if major < 10:
        raise ExportError(f"TensorRT {version} is too old: need 10.x (JetPack 6) or newer")
    if major >= 11:
        if precision == "best":
            raise ExportError(f"TensorRT {version} builds strongly typed networks only: 'best' is not available; "
                              "pass the FP16 or INT8 ONNX with --precision fp16|int8")
        if precision != model_precision:
            raise ExportError(f"TensorRT {version} takes precision from the ONNX types: the model is "
                              f"{model_precision}, not {precision} (run nsdd-export quantize --precision {precision})")
        return BuildSettings(strongly_typed=True, network_flags=["STRONGLY_TYPED"],
                             notes=["TensorRT >= 11: builder precision flags removed; strongly typed network"])
    flags: list[str] = []
    notes: list[str] = []
    if precision in ("fp16", "best"):
        flags.append("FP16")
    if precision in ("int8", "best"):
        if not has_qdq:
            raise ExportError("INT8 needs an explicitly quantised graph (Q/DQ nodes): "
                              "run nsdd-export quantize --precision int8 first (calibrators are deprecated)")
        flags.append("INT8")
        if "FP16" not in flags:
            flags.append("FP16")
            notes.append("FP16 enabled for the layers outside Q/DQ (DFT, projector)")
    if model_precision == "fp16" and "FP16" not in flags:
        flags.append("FP16")
        notes.append("model has float16 tensors: FP16 flag needed")
    if (major, minor) >= (10, 12) and flags:
        notes.append("precision builder flags are deprecated from TensorRT 10.12; prefer strongly typed models")
    return BuildSettings(strongly_typed=False, builder_flags=flags, notes=notes)


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ExportError("TensorRT is not installed here (python module 'tensorrt'). Build the plan on the target "
                          "device: on a Jetson with JetPack 6.x it comes with the system "
                          "(sudo apt install python3-libnvinfer); on x86 `pip install tensorrt`. "
                          f"Import error: {exc}") from exc
    return trt


def gpu_name() -> str:
    """The GPU's name (cuda-python, else nvidia-smi, else the Jetson device-tree model)."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]
        except ImportError:
            cudart = None
    if cudart is not None:
        try:
            err, props = cudart.cudaGetDeviceProperties(0)
            if int(err) == 0:
                return props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        except Exception:  # noqa: BLE001, S110 - fall through to the other probes
            pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, check=False,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    model = Path("/proc/device-tree/model")
    if model.exists():
        return model.read_text(errors="replace").strip("\x00 \n")
    return "unknown"


def model_facts(onnx_path: Path) -> dict[str, Any]:
    """Precision, Q/DQ presence, input name and shape of an ONNX file (no weights loaded)."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    props = {p.key: p.value for p in m.metadata_props}
    inp = m.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in inp.type.tensor_type.shape.dim]
    return {"precision": props.get("nsdd.precision", "fp32"), "input": inp.name, "input_shape": dims,
            "has_qdq": any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node),
            "metadata": props}


def build_engine(onnx_path: str | Path, out: str | Path, precision: str, *, workspace_mb: int = 1024,
                 timing_cache: str | Path | None = None, batch_range: tuple[int, int, int] = (1, 1, 4)) -> dict:
    """Parse, build and serialise; returns the record written to ``out + '.json'``."""
    onnx_path, out = Path(onnx_path), Path(out)
    if not onnx_path.exists():
        raise ExportError(f"{onnx_path}: no such ONNX file")
    facts = model_facts(onnx_path)
    trt = import_tensorrt()
    settings = build_settings(trt.__version__, precision, model_precision=facts["precision"],
                              has_qdq=facts["has_qdq"])
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    net_flags = 0
    for name in settings.network_flags:
        net_flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"{onnx_path}: TensorRT {trt.__version__} cannot parse it:\n  " + "\n  ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    for flag in settings.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    shapes: dict[str, Any] = {}
    inp = network.get_input(0)
    dims = list(inp.shape)
    if dims[0] == -1:
        profile = builder.create_optimization_profile()
        lo, opt, hi = batch_range
        profile.set_shape(inp.name, [lo, *dims[1:]], [opt, *dims[1:]], [hi, *dims[1:]])
        config.add_optimization_profile(profile)
        shapes[inp.name] = {"min": [lo, *dims[1:]], "opt": [opt, *dims[1:]], "max": [hi, *dims[1:]]}
    else:
        shapes[inp.name] = dims
    cache = None
    if timing_cache is not None:
        blob = Path(timing_cache).read_bytes() if Path(timing_cache).exists() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t0
    if plan is None:
        raise ExportError(f"{onnx_path}: TensorRT {trt.__version__} failed to build the engine (see the log above)")
    atomic_write_bytes(out, bytes(plan))
    if cache is not None:
        Path(timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    record = {"tensorrt_version": trt.__version__, "gpu": gpu_name(), "host": platform.node(),
              "machine": platform.machine(), "precision": precision, "model_precision": facts["precision"],
              "settings": asdict(settings), "workspace_mb": int(workspace_mb), "input_shapes": shapes,
              "build_seconds": round(build_s, 3), "onnx": str(onnx_path.resolve()),
              "onnx_metadata": facts["metadata"], "timing_cache": str(timing_cache) if timing_cache else None}
    Path(str(out) + ".json").write_text(json.dumps(record, indent=2))
    return record


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX file (FP32/FP16 from nsdd-export onnx|quantize; INT8 with Q/DQ nodes)")
    p.add_argument("--precision", choices=PRECISIONS, required=True)
    p.add_argument("--out", required=True, help="output .plan file (a .plan.json record is written beside it)")
    p.add_argument("--workspace", type=int, default=1024, metavar="MB", help="builder workspace limit")
    p.add_argument("--timing-cache", metavar="FILE", help="reuse/update a TensorRT timing cache")
    p.add_argument("--batch-range", type=int, nargs=3, default=(1, 1, 4), metavar=("MIN", "OPT", "MAX"),
                   help="optimisation profile for a dynamic-batch model")


def main(args: argparse.Namespace) -> int:
    if args.workspace < 1:
        print(f"nsdd-export engine: --workspace {args.workspace}: must be ≥ 1 MB", file=sys.stderr)
        return 2
    lo, opt, hi = args.batch_range
    if not 1 <= lo <= opt <= hi:
        print(f"nsdd-export engine: --batch-range {lo} {opt} {hi}: need 1 ≤ MIN ≤ OPT ≤ MAX", file=sys.stderr)
        return 2
    try:
        record = build_engine(args.model, args.out, args.precision, workspace_mb=args.workspace,
                              timing_cache=args.timing_cache, batch_range=(lo, opt, hi))
    except ExportError as exc:
        print(f"nsdd-export engine: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (TensorRT {record['tensorrt_version']}, {record['gpu']}, "
          f"flags {record['settings']['builder_flags'] or record['settings']['network_flags']}, "
          f"built in {record['build_seconds']:.1f} s)")
    return 0
