"""Build a TensorRT plan from an exported ONNX graph (run this on the target device, e.g. the Jetson).

Strongly typed by default (TensorRT ≥ 10: network flag ``STRONGLY_TYPED``, ``trtexec --stronglyTyped``): the
ONNX's own types decide every layer's precision, so the ``physics/*`` part (DFT matmuls, spectra, projector),
FP32 in every graph ``nsdd-export onnx|quantize`` writes (``--fp16-mode conv``; ``all`` only when its FP16
emulation passed the threshold), is never run in FP16. The requested ``--precision`` must then match the
model's (``nsdd.precision`` metadata: FP32, FP16 from ``quantize --precision fp16``, INT8 = Q/DQ graph).

``--weakly-typed`` (TensorRT 10.x only; removed in 11): the FP32 graph with builder flags (``FP16``; ``INT8``
for the Q/DQ graph; ``best`` = both) — then every ``physics/*`` layer is pinned to FP32 (layer precision and
output types, ``OBEY_PRECISION_CONSTRAINTS``), since TensorRT would otherwise pick FP16 kernels for the DFT
matmuls (emulated: 48–60 dB for ``A†y`` alone, below the 60 dB we require).

Runs without torch and without the ``onnx`` package (neither is installed on the device): the metadata is
read from the ONNX protobuf directly (:func:`onnx_metadata`), the rest from the parsed TensorRT network.
:func:`build_settings` is a pure function of the TensorRT version and the request (tested without TensorRT).

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

from export.errors import ExportError
from nsdd_edge.atomic import atomic_write_bytes

HELP = "build a TensorRT plan (strongly typed: physics FP32; --weakly-typed for 10.x builder flags) from an ONNX graph"

PRECISIONS = ("fp32", "fp16", "int8", "best")
PHYSICS_PREFIX = "physics/"


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
    """What the builder is told: network creation flags, builder flags, whether ``physics/*`` layers are
    pinned to FP32, notes for the record."""

    strongly_typed: bool
    builder_flags: list[str] = field(default_factory=list)
    network_flags: list[str] = field(default_factory=list)
    pin_physics_fp32: bool = False
    notes: list[str] = field(default_factory=list)


def build_settings(version: str, precision: str, *, model_precision: str = "fp32", has_qdq: bool = False,
                   weakly_typed: bool = False, fp16_mode: str | None = None) -> BuildSettings:
    """Decide network/builder flags from the TensorRT version and the request.

    - < 10: refused (this project targets JetPack 6.1+ = TensorRT 10.3 and later).
    - strongly typed (default): ``STRONGLY_TYPED``, no precision flags; ``precision`` must equal the model's
      (``int8``: a Q/DQ graph); ``best`` needs ``weakly_typed``.
    - ``weakly_typed`` (10.x): ``fp16`` → FP16 flag, ``int8`` → INT8 (+FP16; Q/DQ graph), ``best`` → both,
      ``fp32`` → none; with any reduced-precision flag the ``physics/*`` layers are pinned to FP32
      (``OBEY_PRECISION_CONSTRAINTS``). Refused from TensorRT 11 (no builder precision flags there).
    """
    major, minor, _ = parse_version(version)
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; use one of {PRECISIONS}")
    if major < 10:
        raise ExportError(f"TensorRT {version} is too old: need 10.x (JetPack 6.1 or later) or newer")
    if not weakly_typed:
        if precision == "best":
            raise ExportError("'best' mixes precisions by builder flags: pass --weakly-typed (TensorRT 10.x), or build "
                              "the FP16 or INT8 ONNX strongly typed with --precision fp16|int8")
        if precision == "int8" and not has_qdq:
            raise ExportError("INT8 needs an explicitly quantised graph (Q/DQ nodes): run nsdd-export quantize "
                              "--precision int8 first (calibrators are deprecated)")
        if precision != model_precision:
            raise ExportError(f"strongly typed builds take precision from the ONNX types: the model is "
                              f"{model_precision}, not {precision} (run nsdd-export quantize --precision {precision}, "
                              "or pass --weakly-typed on TensorRT 10.x)")
        notes = ["strongly typed: every layer runs in its ONNX type (physics/* FP32)"]
        if fp16_mode == "all":
            notes.append("this FP16 model was converted with --fp16-mode all: its physics nodes are FP16 by the "
                         "model's own choice (its FP16 emulation passed nsdd-export quantize's threshold)")
        return BuildSettings(strongly_typed=True, network_flags=["STRONGLY_TYPED"], notes=notes)
    if major >= 11:
        raise ExportError(f"TensorRT {version} builds strongly typed networks only: drop --weakly-typed and pass the "
                          "FP16 or INT8 ONNX with --precision fp16|int8")
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
            notes.append("FP16 enabled for the student layers outside Q/DQ")
    if model_precision == "fp16" and "FP16" not in flags:
        flags.append("FP16")
        notes.append("model has float16 tensors: FP16 flag needed")
    pin = bool(flags)
    if pin:
        flags.append("OBEY_PRECISION_CONSTRAINTS")
        notes.append("weakly typed: physics/* layers pinned to FP32 (precision and output types)")
    if (major, minor) >= (10, 12) and pin:
        notes.append("precision builder flags are deprecated from TensorRT 10.12; prefer strongly typed models")
    return BuildSettings(strongly_typed=False, builder_flags=flags, pin_physics_fp32=pin, notes=notes)


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """``metadata_props`` of an ONNX file, read from its protobuf without the ``onnx`` package (not installed
    on the device): ``ModelProto`` field 14 holds ``StringStringEntryProto {key = 1; value = 2}``."""
    data = memoryview(Path(path).read_bytes())
    props: dict[str, str] = {}
    try:
        for number, value in _protobuf_fields(data):
            if number == 14 and isinstance(value, memoryview):
                entry = {n: bytes(v).decode() for n, v in _protobuf_fields(value) if isinstance(v, memoryview)}
                props[entry.get(1, "")] = entry.get(2, "")
    except (IndexError, UnicodeDecodeError, ValueError) as exc:
        raise ExportError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    return props


def _protobuf_fields(buf: memoryview):
    """``(field number, value)`` of a protobuf message: ints for varint/fixed fields, memoryviews for
    length-delimited ones (wire types 0, 1, 2, 5)."""
    i, n = 0, len(buf)

    def varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            b = buf[i]
            i += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result
            shift += 7
            if shift > 63:
                raise ValueError("varint too long")

    while i < n:
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, varint()
        elif wire == 1:
            yield number, int.from_bytes(buf[i:i + 8], "little")
            i += 8
        elif wire == 2:
            length = varint()
            if i + length > n:
                raise ValueError("truncated field")
            yield number, buf[i:i + length]
            i += length
        elif wire == 5:
            yield number, int.from_bytes(buf[i:i + 4], "little")
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ExportError("TensorRT is not installed here (python module 'tensorrt'). Build the plan on the target "
                          "device: on a Jetson with JetPack 6.1 or later it comes with the system "
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
    """Precision (``nsdd.precision``, default fp32), FP16 mode and all metadata of an ONNX file (no weights
    loaded, no ``onnx`` package needed)."""
    props = onnx_metadata(onnx_path)
    return {"precision": props.get("nsdd.precision", "fp32"), "fp16_mode": props.get("nsdd.fp16_mode"),
            "metadata": props}


def pin_physics_to_fp32(network: Any, trt: Any) -> list[str]:
    """Set every ``physics/*`` layer's precision and float outputs to FP32; returns the pinned layer names."""
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if PHYSICS_PREFIX not in layer.name:
            continue
        layer.precision = trt.float32
        for k in range(layer.num_outputs):
            if layer.get_output(k).dtype in (trt.float32, trt.float16):
                layer.set_output_type(k, trt.float32)
        pinned.append(layer.name)
    return pinned


def network_has_qdq(network: Any, trt: Any) -> bool:
    kinds = {trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE}
    return any(network.get_layer(i).type in kinds for i in range(network.num_layers))


def build_engine(onnx_path: str | Path, out: str | Path, precision: str, *, workspace_mb: int = 1024,
                 timing_cache: str | Path | None = None, batch_range: tuple[int, int, int] = (1, 1, 4),
                 weakly_typed: bool = False) -> dict:
    """Parse, build and serialise; returns the record written to ``out + '.json'``."""
    onnx_path, out = Path(onnx_path), Path(out)
    if not onnx_path.exists():
        raise ExportError(f"{onnx_path}: no such ONNX file")
    facts = model_facts(onnx_path)
    trt = import_tensorrt()
    # Q/DQ presence is checked on the parsed network below (the metadata cannot prove it)
    settings = build_settings(trt.__version__, precision, model_precision=facts["precision"],
                              has_qdq=facts["precision"] == "int8" or precision in ("int8", "best"),
                              weakly_typed=weakly_typed, fp16_mode=facts["fp16_mode"])
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
    if ("INT8" in settings.builder_flags or precision == "int8") and not network_has_qdq(network, trt):
        raise ExportError(f"{onnx_path}: INT8 needs an explicitly quantised graph (Q/DQ nodes) and this one has "
                          "none: run nsdd-export quantize --precision int8 first")
    pinned: list[str] = []
    if settings.pin_physics_fp32:
        pinned = pin_physics_to_fp32(network, trt)
        if not pinned:
            raise ExportError(f"{onnx_path}: no physics/* layers to keep in FP32 (not a graph of nsdd-export onnx?); "
                              "a weakly typed reduced-precision build could run the DFT in FP16: build it strongly "
                              "typed instead")
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
    for i in range(1, network.num_inputs):  # a spectra-input graph's spectra: static shapes, fed at run time
        extra = network.get_input(i)
        shapes[extra.name] = list(extra.shape)
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
        atomic_write_bytes(Path(timing_cache), bytes(config.get_timing_cache().serialize()))
    record = {"tensorrt_version": trt.__version__, "gpu": gpu_name(), "host": platform.node(),
              "machine": platform.machine(), "precision": precision, "model_precision": facts["precision"],
              "settings": asdict(settings), "physics_layers_pinned_fp32": len(pinned),
              "workspace_mb": int(workspace_mb), "input_shapes": shapes,
              "build_seconds": round(build_s, 3), "onnx": str(onnx_path.resolve()),
              "onnx_metadata": facts["metadata"], "timing_cache": str(timing_cache) if timing_cache else None}
    atomic_write_bytes(Path(str(out) + ".json"), json.dumps(record, indent=2).encode())
    return record


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX file (FP32/FP16 from nsdd-export onnx|quantize; INT8 with Q/DQ nodes)")
    p.add_argument("--precision", choices=PRECISIONS, required=True,
                   help="strongly typed: must match the model (fp32 ONNX, fp16 / int8 from nsdd-export quantize)")
    p.add_argument("--weakly-typed", action="store_true",
                   help="TensorRT 10.x builder precision flags on the FP32 graph (physics/* layers pinned to FP32)")
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
                              timing_cache=args.timing_cache, batch_range=(lo, opt, hi),
                              weakly_typed=args.weakly_typed)
    except ExportError as exc:
        print(f"nsdd-export engine: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (TensorRT {record['tensorrt_version']}, {record['gpu']}, "
          f"flags {record['settings']['builder_flags'] or record['settings']['network_flags']}, "
          f"built in {record['build_seconds']:.1f} s)")
    return 0
