"""Verify an exported graph: ONNX checker, TensorRT 10.3 operator check, ONNX Runtime vs torch,
FP16/INT8 PSNR against FP32 and measurement consistency ``‖A x̂ − y‖ / ‖y‖`` per precision.

The torch reference is the student's network in :class:`train.students.Student` with
:class:`train.physics.LenslessOperator` of the model's geometry (``nsdd.geometry``: circular, or crop with its
scene and convolution grids) (``A†y + (I − A†A) g``, ``g`` on the support window when the model's
``nsdd.support_shape`` says so), i.e. the training-time computation, not the exported graph. Consistency is
measured with the same operator.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from export.graph import ExportError, GraphSpec, reconstruction_operator, reference_reconstruction
from export.onnx_graph import (
    add_psf_arguments,
    check_student_matches,
    load_student_info,
    psf_from_args,
    read_metadata,
    read_spec,
)
from export.quantize import input_shape, load_measurements, make_session, psnr, quantize_file, run_model
from export.trt_ops import TENSORRT_VERSION, unsupported_nodes
from nsdd_edge.graph_spectra import graph_spectra
from nsdd_edge.optics import OpticsError, array_hash, load_psf, read_array

HELP = "check an exported graph: ONNX checker, TensorRT 10.3 ops, ORT vs torch, FP16/INT8 PSNR, consistency"

FP32_TOLERANCE = 1e-4  # relative to the reference's scale: max |ORT − torch| ≤ 1e-4 · max(1, max |reference|)


def resolve_psf(spec: GraphSpec, data_dir: Path, args: argparse.Namespace) -> np.ndarray:
    """The PSF the graph was exported for: ``--psf`` (same loading options) or the dataset's ``psf.npy``."""
    candidates: list[tuple[str, np.ndarray]] = []
    if args.psf:
        candidates.append((args.psf, psf_from_args(args)))
    else:
        path = data_dir / "psf.npy"
        if not path.exists():
            raise ExportError(f"{data_dir}: no psf.npy; pass --psf FILE")
        candidates += [(str(path), read_array(path)), (f"{path} (renormalised)", load_psf(path))]
    for name, psf in candidates:
        if array_hash(psf) == spec.psf_sha256:
            return psf
    raise ExportError(f"{candidates[0][0]}: PSF hash {array_hash(candidates[0][1])[:12]}… does not match the "
                      f"model's {spec.psf_sha256[:12]}… (exported for another PSF)")


def consistency(psf: np.ndarray, spec: GraphSpec, y: np.ndarray, x_hat: np.ndarray) -> float:
    """Mean ``‖A x̂ − y‖ / ‖y‖`` with the model's own operator (circular at sensor size, or the crop model)."""
    import torch

    op = reconstruction_operator(psf, spec.geometry, spec.lam, spec.projector)
    with torch.no_grad():
        return float(op.consistency(torch.from_numpy(np.ascontiguousarray(x_hat, dtype=np.float32)),
                                    torch.from_numpy(y)).mean())


def _half_net(net: Any) -> Any:
    """``g`` evaluated in float16 with float32 in/out (student-only FP16 emulation)."""
    import torch

    class HalfNet(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner.half()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x.half()).float()

    return HalfNet(net)


def torch_fp16_emulation(psf: np.ndarray, spec: GraphSpec, net: Any, frames: np.ndarray,
                         reference: np.ndarray) -> dict[str, float]:
    """PSNR vs the FP32 reference of the graph computed in float16 by torch (whole graph / student only).

    ONNX Runtime CPU runs float16 convolutions by casting to float32 (only the weights are rounded), so
    its FP16 figures understate the error of an FP16 GPU engine; this emulation computes in float16.
    """
    import copy

    import torch

    from export.graph import ReconstructionGraph

    y = torch.from_numpy(frames)
    out: dict[str, float] = {}
    with torch.no_grad():
        whole = ReconstructionGraph(psf, spec.geometry, spec.lam,
                                    net=copy.deepcopy(net) if net is not None else None,
                                    objective=spec.objective, channels=spec.channels,
                                    support_shape=spec.support_shape, projector=spec.projector,
                                    support_taper=spec.support_taper).half()
        out["whole_graph"] = psnr(reference, whole(y.half()).float().numpy())
        if net is not None:
            part = ReconstructionGraph(psf, spec.geometry, spec.lam, net=_half_net(copy.deepcopy(net)),
                                       objective=spec.objective, channels=spec.channels,
                                       support_shape=spec.support_shape, projector=spec.projector,
                                       support_taper=spec.support_taper)
            out["student_only"] = psnr(reference, part(y).numpy())
    return out


def student_dir(model_path: Path, spec: GraphSpec, given: str | None, log: Callable[[str], None]) -> str | None:
    """The student directory the torch reference needs: ``--student``, else the one the model was exported
    from (metadata ``nsdd.student``) when it is still there; ``None`` for a Wiener-only graph."""
    if spec.objective == "wiener":
        return None
    if given:
        return given
    recorded = read_metadata(model_path).get("nsdd.student")
    if recorded and Path(recorded).is_dir():
        log(f"--student not given: using {recorded}, the student this model was exported from (its metadata)")
        return recorded
    where = f" (it was exported from {recorded}, which is no longer there)" if recorded else ""
    raise ExportError(f"{model_path}: objective {spec.objective!r} needs --student DIR, the student directory the "
                      f"model was exported from, for the torch reference{where}")


def verify(model_path: str | Path, data_dir: str | Path, args: argparse.Namespace,
           log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Every figure of the module docstring as a dict; ``log`` gets one line per stage as it starts."""
    import onnx
    import torch

    model_path, data_dir = Path(model_path), Path(data_dir)
    report: dict[str, Any] = {"model": str(model_path), "data": str(data_dir)}
    log(f"ONNX checker (full check) on {model_path}")
    try:
        onnx.checker.check_model(str(model_path), full_check=True)
        report["onnx_checker"] = "ok"
    except Exception as exc:  # noqa: BLE001 - ValidationError, shape-inference errors: reported, not raised
        report["onnx_checker"] = f"failed: {exc}"
    spec = read_spec(model_path)
    meta = read_metadata(model_path)
    report["metadata"] = meta
    model = onnx.load(str(model_path))
    report["opset"] = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    report["size_bytes"] = model_path.stat().st_size
    report["external_data_sidecar"] = model_path.with_name(model_path.name + ".data").exists()
    batch, c, h, w = input_shape(model)
    report["input_shape"] = [batch if batch else "dynamic", c, h, w]
    frames = load_measurements(data_dir, (c, h, w), limit=args.limit)
    report["frames"] = len(frames)
    psf = resolve_psf(spec, data_dir, args)

    net = None
    student = student_dir(model_path, spec, args.student, log)
    if student is not None:
        info = load_student_info(student)
        check_student_matches(info, spec.psf_sha256, spec.geometry, spec.lam, student)
        if info.support_taper != spec.support_taper:
            raise ExportError(f"{student}: student's support taper {info.support_taper} px is not the model's "
                              f"{spec.support_taper} (nsdd.support_taper): exported from another student?")
        if info.support_shape != spec.support_shape:
            raise ExportError(f"{student}: student's support window {info.support_shape} is not the model's "
                              f"{spec.support_shape} (nsdd.support_shape): exported from another student?")
        net = info.net.float().eval()
        report["student"] = str(student)
    report["support_shape"] = list(spec.support_shape) if spec.support_shape else None
    report["geometry"] = spec.geometry.to_dict()
    log(f"torch reference and ONNX Runtime FP32 on {len(frames)} measurements of {data_dir}")
    with torch.no_grad():
        reference = reference_reconstruction(psf, torch.from_numpy(frames), spec.lam, net, spec.objective,
                                             spec.support_shape, spec.projector, spec.geometry,
                                             spec.support_taper).numpy()

    outputs: dict[str, np.ndarray] = {}
    feeds = None
    report["spectra"] = spec.spectra
    if spec.spectra == "input":  # fed the spectra of the PSF it was exported for (what the runtime feeds at scale 1)
        feeds = graph_spectra(psf, spec.geometry, spec.lam, spec.projector)  # type: ignore[arg-type]
        if args.fp16 or args.int8:
            raise ExportError(f"{model_path}: takes its spectra as inputs; such graphs are not quantised (drop "
                              "--fp16/--int8)")
    outputs["fp32"] = run_model(make_session(model_path), frames, batch, feeds=feeds)[0]
    err = float(np.abs(outputs["fp32"] - reference).max())
    scale = max(1.0, float(np.abs(reference).max()))  # scenes of a camera profile are in y's units, not [0, 1]
    tolerance = FP32_TOLERANCE * scale
    if spec.projector == "cg":  # iterations amplify float32 rounding: allow what torch itself shows, fp32 vs fp64
        with torch.no_grad():
            exact = reference_reconstruction(psf, torch.from_numpy(frames).double(), spec.lam,
                                             None if net is None else net.double(), spec.objective,
                                             spec.support_shape, spec.projector, spec.geometry,
                                             spec.support_taper).float().numpy()
        if net is not None:
            net.float()
        report["torch_fp32_vs_fp64_max_abs_error"] = float(np.abs(reference - exact).max())
        tolerance = max(tolerance, 2.0 * report["torch_fp32_vs_fp64_max_abs_error"])
    report["fp32_vs_torch_max_abs_error"] = err
    report["fp32_vs_torch_tolerance"] = tolerance
    report["fp32_vs_torch_ok"] = bool(err <= tolerance)
    report["reference_range"] = [float(reference.min()), float(reference.max())]

    with tempfile.TemporaryDirectory(prefix="nsdd-verify-") as tmp:
        files = {"fp16": args.fp16, "int8": args.int8}
        report["quantized_here"] = []
        for precision in ("fp16", "int8"):
            path = files[precision]
            if path is None and precision == "int8" and not any(n.op_type in ("Conv", "ConvTranspose")
                                                                for n in model.graph.node):
                report["int8"] = "not applicable: the graph has no convolutions (INT8 is for the student only)"
                continue
            if feeds is not None:
                report[precision] = "not applicable: a spectra-input graph is not quantised (nsdd-export quantize)"
                continue
            if path is None and not args.no_quantize:
                path = str(Path(tmp) / f"model.{precision}.onnx")
                log(f"{precision.upper()}: quantising here (no --{precision} FILE given)"
                    + (", calibrated on the same measurements" if precision == "int8" else ""))
                quantize_file(model_path, precision, path, data=data_dir)
                report["quantized_here"].append(precision)  # INT8 calibrated on the same frames it is scored on
            if path is None:
                continue
            if read_spec(path).psf_sha256 != spec.psf_sha256:
                raise ExportError(f"{path}: made for another PSF than {model_path}")
            m = onnx.load(str(path))
            log(f"{precision.upper()}: ONNX Runtime on {len(frames)} measurements ({path})")
            outputs[precision] = run_model(make_session(m), frames, input_shape(m)[0])[0]
            report[f"{precision}_psnr_vs_fp32_db"] = psnr(outputs["fp32"], outputs[precision])
            report[f"{precision}_max_abs_error_vs_fp32"] = float(np.abs(outputs[precision] - outputs["fp32"]).max())
            report[f"{precision}_tensorrt_{TENSORRT_VERSION}_unsupported"] = unsupported_nodes(m)

    log("FP16 emulation in torch float16 (slow on a CPU)")
    report["fp16_torch_emulation_psnr_vs_fp32_db"] = torch_fp16_emulation(psf, spec, net, frames, reference)
    report["fp16_note"] = ("ONNX Runtime CPU upcasts float16 Conv to float32 (weights rounded only): the ORT FP16 "
                           "PSNR understates an FP16 engine's error in g; fp16_torch_emulation computes everything in "
                           "torch CPU float16 (its GEMM accumulation may be coarser than TensorRT's). Confirm on the "
                           "device.")
    report["consistency"] = {"torch_reference": consistency(psf, spec, frames, reference),
                             **{p: consistency(psf, spec, frames, x) for p, x in outputs.items()}}
    bad = unsupported_nodes(model)
    report[f"tensorrt_{TENSORRT_VERSION}_unsupported"] = bad
    report[f"tensorrt_{TENSORRT_VERSION}_parseable"] = not bad
    report["ok"] = bool(report["onnx_checker"] == "ok" and report["fp32_vs_torch_ok"]
                        and (not args.require_trt10 or not bad))
    return report


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="FP32 ONNX file written by nsdd-export onnx")
    p.add_argument("--data", required=True, metavar="DIR", help="dataset directory (measurements/*.npy, psf.npy)")
    p.add_argument("--json", required=True, metavar="FILE", help="write every figure here")
    p.add_argument("--student", metavar="DIR",
                   help="the student directory the model was exported from, for the torch reference (default: the "
                        "one recorded in the model's metadata, if it is still there; not needed for --wiener-only)")
    add_psf_arguments(p, required=False)
    p.add_argument("--fp16", metavar="FILE", help="FP16 model to score (default: quantised here)")
    p.add_argument("--int8", metavar="FILE", help="INT8 model to score (default: quantised here, calibrated on --data)")
    p.add_argument("--no-quantize", action="store_true", help="score only the FP16/INT8 files given")
    p.add_argument("--limit", type=int, default=16, help="use at most this many measurements")
    p.add_argument("--require-trt10", action="store_true",
                   help=f"fail when an op is not parseable by TensorRT {TENSORRT_VERSION}")


def main(args: argparse.Namespace) -> int:
    started = time.monotonic()

    def log(line: str) -> None:
        print(f"nsdd-export verify [{time.monotonic() - started:5.1f} s] {line} …", file=sys.stderr, flush=True)

    try:
        report = verify(args.model, args.data, args, log=log)
    except (ExportError, OpticsError) as exc:
        print(f"nsdd-export verify: {exc}", file=sys.stderr)
        return 2
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float))
    print(f"ONNX checker: {report['onnx_checker']}")
    print(f"ORT fp32 vs torch: max abs error {report['fp32_vs_torch_max_abs_error']:.3g} "
          f"({'ok' if report['fp32_vs_torch_ok'] else 'FAILED'}, tolerance {report['fp32_vs_torch_tolerance']:.3g})")
    for p in ("fp16", "int8"):
        if f"{p}_psnr_vs_fp32_db" in report:
            print(f"{p.upper()} PSNR vs FP32 (ONNX Runtime CPU): {report[f'{p}_psnr_vs_fp32_db']:.2f} dB")
    print("FP16 PSNR vs FP32 (torch float16 emulation): " + ", ".join(
        f"{k} {v:.2f} dB" for k, v in report["fp16_torch_emulation_psnr_vs_fp32_db"].items()))
    print("consistency ‖A x̂ − y‖/‖y‖: " + ", ".join(f"{k} {v:.4g}" for k, v in report["consistency"].items()))
    bad = report[f"tensorrt_{TENSORRT_VERSION}_unsupported"]
    print(f"TensorRT {TENSORRT_VERSION}: " + ("all ops supported" if not bad else
                                              f"{len(bad)} unsupported nodes: " +
                                              ", ".join(f"{b['name']} ({b['op_type']})" for b in bad)))
    print(f"wrote {out}")
    return 0 if report["ok"] else 1
