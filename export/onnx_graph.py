"""Export the reconstruction graph (student + FFT pseudo-inverse, or Wiener only) to one ONNX file.

Nodes are named ``physics/…`` (DFT, spectra, projections) or ``student/…`` (the network ``g``) so that
precision tools can treat the two parts differently. Metadata (``metadata_props``): PSF hash, λ,
geometry, channels, objective, DFT form, precision and, for a student trained with a support window,
``nsdd.support_shape`` (JSON ``[h, w]``; absent: the network covers the whole grid).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.graph import DFT_FORMS, ExportError, GraphSpec, ReconstructionGraph, check_support
from nsdd_edge.atomic import atomic_write
from nsdd_edge.optics import LenslessGeometry, OpticsError, array_hash, load_psf

HELP = "export student + FFT pseudo-inverse (or Wiener only) as one ONNX graph"

INPUT_NAME = "y"
OUTPUT_NAME = "x_hat"
TWO_GB = 2 * 1024**3


# ----------------------------------------------------------------------------------------------
# Students
# ----------------------------------------------------------------------------------------------


@dataclass
class StudentInfo:
    """What the export needs from a trained student (read from ``train.students.load_student``)."""

    net: Any
    objective: str
    psf_sha256: str | None
    sensor_shape: tuple[int, int] | None
    lam: float | None
    channels: int | None
    config: dict = field(default_factory=dict)
    model: str | None = None  # forward model of the training geometry (circular / crop)
    support_shape: tuple[int, int] | None = None  # the centred window g runs on (None: the whole scene grid)
    projector: str = "tikhonov"  # the student's pseudo-inverse kind
    geometry: LenslessGeometry | None = None  # the reconstruction operator's grids (None: not recorded)
    support_taper: int = 0  # px of soft edge of the support window (train.students.Student)


def _config_dict(config: Any) -> dict:
    if config is None:
        return {}
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    if hasattr(config, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(config)
    return dict(vars(config))


def _first(d: dict, *keys: str) -> Any:
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return None


def student_info(student: Any, source: str = "student") -> StudentInfo:
    """Extract objective, PSF hash, sensor shape, λ and channels from a loaded student."""
    cfg = _config_dict(getattr(student, "config", None))
    psf = cfg.get("psf") if isinstance(cfg.get("psf"), dict) else {}
    geometry = _first(cfg, "geometry", "recon_geometry")
    sensor = None
    model = None
    recorded: LenslessGeometry | None = None
    if isinstance(geometry, dict):
        sensor = _first(geometry, "sensor_shape", "scene_shape")
        model = geometry.get("model")
        if model is not None and sensor is not None:
            try:
                recorded = LenslessGeometry.from_dict(geometry)
            except (OpticsError, KeyError, TypeError, ValueError) as exc:
                raise ExportError(f"{source}: the recorded geometry {geometry!r} is not valid ({exc})") from None
    sensor = sensor or _first(cfg, "sensor_shape", "size", "image_size")
    if isinstance(sensor, int):
        sensor = (sensor, sensor)
    objective = getattr(student, "objective", None) or cfg.get("objective")
    if objective not in ("nullspace", "full"):
        raise ExportError(f"{source}: objective {objective!r} is not 'nullspace' or 'full'")
    lam = _first(cfg, "lam", "lambda")
    channels = _first(cfg, "channels", "out_channels")
    inner = getattr(student, "student", None)  # StudentSolver.student is the train.students.Student
    support = cfg.get("support_shape")
    if support is None:
        support = getattr(inner, "support_shape", None) or getattr(student, "support_shape", None)
    grid = recorded.scene_shape if recorded is not None else sensor  # the support lies on the scene grid
    try:
        support = check_support(list(support) if support is not None else None,
                                tuple(int(v) for v in grid) if grid is not None else (1 << 30, 1 << 30))
    except ExportError as exc:
        raise ExportError(f"{source}: {exc}") from None
    return StudentInfo(net=student.net, objective=objective,
                       psf_sha256=_first(cfg, "psf_sha256", "psf_hash") or _first(psf, "sha256"),
                       sensor_shape=tuple(int(v) for v in sensor) if sensor is not None else None,
                       lam=float(lam) if lam is not None else None,
                       channels=int(channels) if channels is not None else None, config=cfg, model=model,
                       support_shape=support, projector=str(cfg.get("projector", "tikhonov")), geometry=recorded,
                       support_taper=int(cfg.get("support_taper") or getattr(inner, "support_taper", 0) or 0))


def load_student_info(directory: str | Path) -> StudentInfo:
    """``train.students.load_student(directory)`` (lazy import) → :class:`StudentInfo`."""
    try:
        from train.students import load_student
    except ImportError as exc:
        raise ExportError(f"--student needs train.students.load_student, which cannot be imported: {exc}") from exc
    try:
        student = load_student(directory)
    except ValueError as exc:  # StudentError: missing/corrupted directory, weights not matching the config
        raise ExportError(f"--student {directory}: {exc}") from exc
    return student_info(student, str(directory))


def check_student_matches(info: StudentInfo, psf_sha256: str, geometry: LenslessGeometry | Sequence[int],
                          lam: float, source: str) -> None:
    """Refuse a student trained for another PSF, geometry (model, sensor, scene or convolution grid) or λ.
    ``geometry``: the graph's :class:`LenslessGeometry`, or a sensor size for the circular model."""
    if not isinstance(geometry, LenslessGeometry):
        geometry = LenslessGeometry("circular", (int(geometry[0]), int(geometry[1])),
                                    (int(geometry[0]), int(geometry[1])), (int(geometry[0]), int(geometry[1])))
    if info.psf_sha256 is not None and info.psf_sha256 != psf_sha256:
        raise ExportError(f"{source}: student was trained for PSF {info.psf_sha256[:12]}…, but the PSF given "
                          f"has hash {psf_sha256[:12]}… (wrong --psf, or different loading options)")
    model = info.geometry.model if info.geometry is not None else (info.model or "circular")
    if model != geometry.model:
        raise ExportError(f"{source}: student was trained with the {model!r} reconstruction model, the graph asked "
                          f"for is {geometry.model!r} (leave --model out: the student's geometry is used)")
    if info.sensor_shape is not None and tuple(info.sensor_shape) != tuple(geometry.sensor_shape):
        raise ExportError(f"{source}: student was trained at size {tuple(info.sensor_shape)}, not "
                          f"{tuple(geometry.sensor_shape)} (--size)")
    if info.geometry is not None and info.geometry != geometry:
        g, s = info.geometry, geometry
        raise ExportError(f"{source}: student was trained on the {g.model} model with scene {g.scene_shape} and "
                          f"convolution grid {g.conv_shape}, not scene {s.scene_shape} and grid {s.conv_shape} "
                          "(--scene-size/--conv-size)")
    if info.lam is not None and not np.isclose(info.lam, lam, rtol=1e-6, atol=0.0):
        raise ExportError(f"{source}: student was trained with Wiener λ = {info.lam:g}, not {lam:g} (--lam)")


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def _scope_prefix(node: Any) -> str:
    import ast

    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")  # e.g. "['', 'net', 'net.0', 'conv2d']"
    try:
        parts = ast.literal_eval(scopes) if scopes else []
    except (ValueError, SyntaxError):
        parts = []
    if len(parts) > 1 and str(parts[1]) == "net":
        return "student/"
    return "physics/"


class _TorchvisionNotice(logging.Filter):
    """Drops the exporter's "torchvision is not installed. Skipping torchvision::nms" notices: torchvision
    is never needed here (the graph has no torchvision ops), and CI's CPU torch has none."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("torchvision is not installed")


@contextmanager
def _without_torchvision_notices() -> Iterator[None]:
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    notice = _TorchvisionNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def export_graph(graph: ReconstructionGraph, out: str | Path, *, batch: int | None = 1, opset: int = 17,
                 extra_metadata: dict[str, str] | None = None) -> Path:
    """Export ``graph`` to ``out`` (one file unless > 2 GB); ``batch=None`` makes the batch axis dynamic."""
    import onnx
    import torch

    if opset < 17:
        raise ExportError(f"--opset {opset}: the graph needs opset ≥ 17 (DFT, LayerNormalization)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    graph = graph.eval()
    h, w = graph.spec.geometry.sensor_shape
    example = torch.zeros((batch or 2, graph.spec.channels, h, w), dtype=torch.float32)
    # a spectra-input graph takes the PSF's packed spectra after y (nsdd_edge.graph_spectra), static shapes
    spectra = tuple(graph.spectra_example[n] for n in graph.spectra_names) if graph.spectra_example else ()
    input_names = [INPUT_NAME, *(graph.spectra_names if spectra else ())]
    dynamic = None
    if batch is None:
        batch_dim = torch.export.Dim("batch", min=1, max=4096)
        dynamic = {INPUT_NAME: {0: batch_dim}, **({"g_spec": None, "aux_spec": None} if spectra else {})}
    import contextlib
    import io
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _without_torchvision_notices():
        warnings.simplefilter("ignore")
        # the exporter's rewriter is quadratic in the node count: minutes on the unrolled cg pseudo-inverse, for
        # no change to what runs (ONNX Runtime and TensorRT fold constants themselves)
        program = torch.onnx.export(graph, (example, *spectra), None, input_names=input_names, output_names=[OUTPUT_NAME],
                                    opset_version=max(opset, 18), dynamo=True, dynamic_shapes=dynamic,
                                    external_data=False, optimize=graph.spec.projector != "cg")
    # name scopes survive only without the exporter's own version conversion: name first, convert after
    for node in program.model.graph:
        node.name = _scope_prefix(node) + (node.name or node.op_type)
    model = program.model_proto
    if opset < 18:
        model = onnx.version_converter.convert_version(model, opset)
    props = {**graph.spec.metadata(), "nsdd.precision": "fp32", "nsdd.input": INPUT_NAME,
             "nsdd.output": OUTPUT_NAME, **(extra_metadata or {})}
    onnx.helper.set_model_props(model, props)
    model.producer_name = "nsdd-export"
    save_model(model, out)
    return out


def save_model(model: Any, out: str | Path) -> Path:
    """Save with weights inside the file; an ``.onnx.data`` sidecar only above the 2 GB protobuf limit."""
    import onnx

    out = Path(out)
    large = model.ByteSize() > TWO_GB - (1 << 20)
    sidecar = out.with_name(out.name + ".data")
    if sidecar.exists():
        sidecar.unlink()
    if large:
        onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=sidecar.name)
        return out
    # atomic: a failed write never leaves a half model behind (f.name is the temporary file's path)
    atomic_write(out, lambda f: onnx.save_model(model, f))
    return out


def read_metadata(path: str | Path) -> dict[str, str]:
    """``metadata_props`` of an ONNX file (weights are not loaded)."""
    import onnx

    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ExportError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    return {p.key: p.value for p in model.metadata_props}


def read_spec(path: str | Path) -> GraphSpec:
    try:
        return GraphSpec.from_metadata(read_metadata(path))
    except ExportError as exc:
        raise ExportError(f"{path}: {exc}") from None


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def add_psf_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--psf", required=required, help="PSF file (.npy/.npz/.png/.tif), loaded with nsdd_edge.optics.load_psf")
    p.add_argument("--psf-downsample", type=int, default=1, help="box-downsample the PSF by this factor first")
    p.add_argument("--psf-background", choices=("none", "corner"), default="none",
                   help="subtract the DiffuserCam corner background from the PSF")
    p.add_argument("--psf-normalization", choices=("sum", "l2", "max", "none"), default="sum",
                   help="scale the PSF to unit sum, unit L2 norm or unit peak (none: as stored)")


def psf_from_args(args: argparse.Namespace) -> np.ndarray:
    return load_psf(args.psf, downsample=args.psf_downsample, background=args.psf_background,
                    normalization=args.psf_normalization)


def configure_parser(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--student", metavar="DIR", help="trained student directory (train.students.load_student)")
    src.add_argument("--wiener-only", action="store_true", help="export A†y alone (no student)")
    add_psf_arguments(p)
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="sensor size of y (default: the student's; required with --wiener-only)")
    p.add_argument("--model", choices=("circular", "crop"), default=None,
                   help="reconstruction model (default: the student's; circular with --wiener-only). crop: y on the "
                        "sensor grid, x̂ on the scene grid, A† and A on the convolution grid")
    p.add_argument("--scene-size", type=int, nargs=2, metavar=("H", "W"),
                   help="crop model: the scene grid of x̂ (default: the student's, else the convolution grid)")
    p.add_argument("--conv-size", type=int, nargs=2, metavar=("H", "W"),
                   help="crop model: the convolution grid (default: the student's, else 2x the sensor)")
    p.add_argument("--lam", type=float, default=None, help="Wiener λ (default: the student's, else 1e-6)")
    p.add_argument("--channels", type=int, default=None, help="image channels C (default: the student's, else 3)")
    p.add_argument("--dft", choices=DFT_FORMS, default="matmul",
                   help="matmul: DFT as cos/sin matrix products (TensorRT 10.x); onnx: ONNX DFT operator")
    p.add_argument("--batch", default="1", help="static batch size N, or 'dynamic'")
    p.add_argument("--spectra-input", action="store_true",
                   help="take the PSF's pseudo-inverse spectra as inputs beside y (g_spec and null_spec, or h_spec for "
                        "the crop model; nsdd_edge.graph_spectra) instead of constants, so the runtime can feed those "
                        "of a warped PSF without re-exporting (nsdd-edge run --refocus); default: fixed spectra")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset of the file (≥ 17; TensorRT 10.3 reads 17)")
    p.add_argument("--out", required=True, help="output .onnx file")


def parse_batch(text: str) -> int | None:
    if str(text).lower() == "dynamic":
        return None
    try:
        n = int(text)
    except ValueError:
        raise ExportError(f"--batch {text!r}: expected a positive integer or 'dynamic'") from None
    if n < 1:
        raise ExportError(f"--batch {n}: must be ≥ 1")
    return n


def geometry_from_args(args: argparse.Namespace, psf_shape: Sequence[int],
                       student: StudentInfo | None = None) -> LenslessGeometry:
    """The graph's geometry: ``--model/--size/--scene-size/--conv-size`` over the student's recorded geometry
    (a student's own geometry when none is given; a mismatch is refused later by :func:`check_student_matches`)."""
    recorded = student.geometry if student is not None else None
    model = args.model or (recorded.model if recorded is not None else None) or "circular"
    size = tuple(args.size) if args.size is not None else (student.sensor_shape if student is not None else None)
    if size is None:
        raise ExportError(f"{args.student}: the student config gives no sensor size; pass --size H W"
                          if student is not None else "--wiener-only needs --size H W")
    if model == "circular":
        if args.scene_size is not None or args.conv_size is not None:
            raise ExportError("--scene-size/--conv-size are for the crop model (--model crop)")
        return LenslessGeometry.make("circular", size, psf_shape)
    same = recorded is not None and recorded.model == "crop"
    scene = args.scene_size or (recorded.scene_shape if same else None)
    conv = args.conv_size or (recorded.conv_shape if same else None)
    return LenslessGeometry.make("crop", size, psf_shape, scene_shape=scene, conv_shape=conv)


def build_from_args(args: argparse.Namespace) -> tuple[ReconstructionGraph, dict[str, str]]:
    psf = psf_from_args(args)
    psf_hash = array_hash(psf)
    extra: dict[str, str] = {"nsdd.psf_source": str(Path(args.psf).resolve())}
    if args.wiener_only:
        geometry = geometry_from_args(args, psf.shape[-2:])
        lam = float(args.lam) if args.lam is not None else 1e-6
        channels = int(args.channels or 3)
        return ReconstructionGraph(psf, geometry, lam, net=None, objective="wiener", dft=args.dft,
                                   channels=channels, spectra_input=args.spectra_input), extra
    info = load_student_info(args.student)
    geometry = geometry_from_args(args, psf.shape[-2:], info)
    lam = float(args.lam) if args.lam is not None else (info.lam if info.lam is not None else 1e-6)
    check_student_matches(info, psf_hash, geometry, lam, str(args.student))
    channels = int(args.channels or info.channels or 3)
    if info.channels is not None and args.channels is not None and info.channels != args.channels:
        raise ExportError(f"{args.student}: student has {info.channels} channels, not {args.channels} (--channels)")
    extra["nsdd.student"] = str(Path(args.student).resolve())
    extra["nsdd.student_config"] = json.dumps(info.config, default=str)
    net = info.net.float().eval()
    return ReconstructionGraph(psf, geometry, lam, net=net, objective=info.objective,  # type: ignore[arg-type]
                               dft=args.dft, channels=channels, support_shape=info.support_shape,
                               projector=info.projector, spectra_input=args.spectra_input,
                               support_taper=info.support_taper), extra


def main(args: argparse.Namespace) -> int:
    try:
        batch = parse_batch(args.batch)
        graph, extra = build_from_args(args)
        out = export_graph(graph, args.out, batch=batch, opset=args.opset, extra_metadata=extra)
    except (ExportError, OpticsError) as exc:
        print(f"nsdd-export onnx: {exc}", file=sys.stderr)
        return 2
    s = graph.spec
    g = s.geometry
    grids = (f"size={g.sensor_shape}" if g.model == "circular" else
             f"model=crop sensor={g.sensor_shape} scene={g.scene_shape} conv={g.conv_shape}")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): objective={s.objective} dft={s.dft} "
          f"{grids} C={s.channels} λ={s.lam:g} batch={'dynamic' if batch is None else batch} "
          f"psf={s.psf_sha256[:12]}" + (f" support={s.support_shape}" if s.support_shape else "")
          + (f" spectra=inputs({', '.join(graph.spectra_names)})" if s.spectra == "input" else ""))
    return 0


def main_argv(argv: Sequence[str]) -> int:  # convenience for tests
    p = argparse.ArgumentParser()
    configure_parser(p)
    return main(p.parse_args(argv))
