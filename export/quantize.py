"""FP16 and INT8 versions of an exported graph (ONNX in, ONNX out, float32 I/O kept).

FP16, two candidates, both with float32 input/output:
- ``all``: every node in float16 (the DFT matmuls too; safe because the DFT is scaled 1/√N per axis);
- ``conv``: the student ``g`` in float16, the ``physics/`` nodes (DFT, spectra, projector) in float32.
``auto`` (default) builds both, measures PSNR against FP32 on the given measurements and keeps ``all``
when it reaches ``--fp16-min-psnr`` dB (it is the faster one), else ``conv``. The PSNR that decides is
that of an FP16 emulation (every emulated tensor rounded to float16, FP32 accumulation,
:func:`fp16_emulation`): ONNX Runtime CPU runs float16 convolutions in float32, so the real FP16 model
scored there looks better than an FP16 GPU engine will be (both figures are reported).

INT8: explicit QuantizeLinear/DequantizeLinear pairs on the convolutions only (TensorRT explicit
quantisation): weights per-output-channel symmetric int8, activations per-tensor symmetric int8 with
scale ``amax/127`` from calibration over the user's measurements (``--calibration``: ``max`` |x|, the
default; ``percentile``: the P-th percentile of |x|, ``--percentile`` 99.99; ``mse``: the clip in
64 steps from 0.3·max to max minimising the int8 quantisation MSE of the tensor's |x| histogram). The DFT,
Wiener and projection parts stay FP32. Runs in ONNX Runtime CPU. The method is in the report
(``calibration``) and in the metadata (``nsdd.int8_calibration``).

Measured on the trained student ``models/cpu-demo-faces64/student_contour05`` (in git history since issue 17:
``scripts/restore_models.sh``; exported at 128×128 with
``runs/r64/contour05/psf.npy``, support 64×64), calibrated on the first 64 measurements of
``runs/r64/contour05``, scored on 16 test-split measurements (000080…000588, none in the calibration set);
PSNR vs GT on the centre 64×64 clipped to [0, 1], mean over frames:

==================  ===============  ===============  ============
activation clip      weight scales    PSNR vs FP32     PSNR vs GT
==================  ===============  ===============  ============
FP32                 —                —                25.79 dB
max                  per-channel      45.30 dB         25.48 dB
max                  per-tensor       45.19 dB         25.46 dB
percentile 99.99     per-channel      46.13 dB         25.53 dB
percentile 99.9      per-channel      46.76 dB         25.58 dB
mse                  per-channel      45.55 dB         25.50 dB
==================  ===============  ===============  ============

(per-tensor weights with percentile/mse: within 0.12 dB of per-channel.) INT8 costs 0.2–0.3 dB against the
ground truth with every method; percentile and mse gain ≤ 1.5 dB vs FP32 and ≤ 0.1 dB vs GT, so ``max``
stays the default and per-channel weights stay (never worse than 0.1 dB below per-tensor).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from export.graph import ExportError
from export.onnx_graph import read_metadata, save_model
from nsdd_edge.optics import OpticsError, read_array

HELP = "FP16 / INT8 (explicit Q/DQ on convolutions) versions of an exported ONNX graph"

CONV_OPS = ("Conv", "ConvTranspose")


# ----------------------------------------------------------------------------------------------
# Measurements and running models
# ----------------------------------------------------------------------------------------------



def _element_types(model: Any) -> tuple[dict[str, int], dict[str, Any]]:
    """ONNX element type of every tensor (shape inference, initializers win) and the initializers by name."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    elem = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info)
            + list(inferred.graph.input) + list(inferred.graph.output)}
    inits = {i.name: i for i in model.graph.initializer}
    elem.update({name: init.data_type for name, init in inits.items()})
    return elem, inits

def input_shape(model: Any) -> tuple[int | None, int, int, int]:
    """``(N or None, C, H, W)`` of the graph's input."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(shape) != 4 or any(v is None for v in shape[1:]):
        raise ExportError(f"expected an input (N, C, H, W) with static C, H, W, got {shape}")
    return shape[0], shape[1], shape[2], shape[3]  # type: ignore[return-value]


def load_measurements(data_dir: str | Path, chw: Sequence[int], limit: int | None = None) -> np.ndarray:
    """``measurements/*.npy`` of a dataset directory as float32 ``(N, C, H, W)`` (checked against ``chw``)."""
    root = Path(data_dir)
    folder = root / "measurements"
    if not folder.is_dir():
        raise ExportError(f"{root}: no measurements/ directory (expected a dataset directory with measurements/*.npy)")
    files = sorted(folder.glob("*.npy"))
    if not files:
        raise ExportError(f"{folder}: no .npy measurements")
    if limit is not None:
        files = files[:limit]
    frames = []
    for f in files:
        try:
            a = read_array(f)
        except OpticsError as exc:
            raise ExportError(str(exc)) from exc
        if tuple(a.shape) != tuple(chw):
            raise ExportError(f"{f}: measurement of shape {tuple(a.shape)} does not fit the model input {tuple(chw)}")
        frames.append(a)
    return np.stack(frames).astype(np.float32)


def synthetic_measurements(chw: Sequence[int], count: int = 4, seed: int = 0) -> np.ndarray:
    """Seeded smooth positive frames in [0, 1] (a stand-in when no measurements are given; labelled so)."""
    import cv2

    rng = np.random.default_rng(seed)
    c, h, w = (int(v) for v in chw)
    out = np.empty((count, c, h, w), dtype=np.float32)
    for i in range(count):
        for k in range(c):
            small = rng.random((max(h // 16, 2), max(w // 16, 2))).astype(np.float32)
            out[i, k] = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    out -= out.min()
    return out / out.max()


def make_session(model: Any | str | Path, threads: int = 2) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    src = model if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(str(src) if isinstance(src, Path) else src, sess_options=opts,
                                providers=["CPUExecutionProvider"])


def batches(frames: np.ndarray, batch: int | None) -> Iterable[tuple[np.ndarray, int]]:
    """Chunks for a static-batch model (the last one padded by repetition); ``(chunk, valid)``."""
    step = batch or min(len(frames), 8)
    for k in range(0, len(frames), step):
        chunk = frames[k : k + step]
        valid = len(chunk)
        if batch is not None and valid < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - valid, axis=0)])
        yield chunk, valid


def run_model(session: Any, frames: np.ndarray, batch: int | None, outputs: list[str] | None = None,
              feeds: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """Run ``frames`` through a session in batches (``feeds``: the other inputs, e.g. a spectra-input graph's
    spectra); returns the requested outputs stacked."""
    results: list[list[np.ndarray]] = []
    for chunk, valid in batches(frames, batch):
        outs = session.run(outputs, {session.get_inputs()[0].name: chunk, **(feeds or {})})
        if not results:
            results = [[] for _ in outs]
        for acc, o in zip(results, outs):
            acc.append(o[:valid] if o.ndim and o.shape[0] == chunk.shape[0] else o)
    return [np.concatenate(r) if r and r[0].ndim else np.stack(r) for r in results]


def psnr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """``10 log10(range² / MSE)`` with ``range`` the reference's max − min (inf when identical)."""
    ref = reference.astype(np.float64)
    mse = float(np.mean((ref - estimate.astype(np.float64)) ** 2))
    peak = float(ref.max() - ref.min()) or 1.0
    return float("inf") if mse == 0 else 10.0 * np.log10(peak**2 / mse)


# ----------------------------------------------------------------------------------------------
# FP16
# ----------------------------------------------------------------------------------------------


FLOAT_ONLY_INPUTS = {"Resize": (1, 2), "Upsample": (1,)}  # roi/scales stay float32


def student_to_fp16(model: Any) -> Any:
    """Float16 for the ``student/`` nodes only: their float initializers become float16, tensors entering
    the student are cast to float16 and tensors leaving it are cast back to float32."""
    import copy

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out = copy.deepcopy(model)
    g = out.graph
    student = [n for n in g.node if n.name.startswith("student/")]
    if not student:
        raise ExportError("FP16 mode 'conv' needs a graph with a student (node names student/…); "
                          "this graph has none: use --fp16-mode all")
    elem, inits = _element_types(out)
    produced_by_student = {o for n in student for o in n.output}
    student_ids = {id(n) for n in student}
    converted_inits: dict[str, str] = {}
    casts_in: dict[str, str] = {}
    new_nodes: list[Any] = []
    for node in g.node:
        if id(node) in student_ids:
            keep = FLOAT_ONLY_INPUTS.get(node.op_type, ())
            for k, name in enumerate(node.input):
                if not name or k in keep or elem.get(name) != TensorProto.FLOAT:
                    continue
                if name in produced_by_student:
                    continue  # already float16 inside the student
                if name in inits:
                    if name not in converted_inits:
                        arr = numpy_helper.to_array(inits[name]).astype(np.float16)
                        converted_inits[name] = name + "/fp16"
                        g.initializer.append(numpy_helper.from_array(arr, converted_inits[name]))
                    node.input[k] = converted_inits[name]
                else:
                    if name not in casts_in:
                        casts_in[name] = name + "/to_fp16"
                        new_nodes.append(helper.make_node("Cast", [name], [casts_in[name]], to=TensorProto.FLOAT16,
                                                          name=f"student/cast_in/{name}"))
                    node.input[k] = casts_in[name]
        new_nodes.append(node)
    # tensors leaving the student: rename the producer's output and cast back under the original name
    consumers_outside = {i for n in g.node if id(n) not in student_ids for i in n.input}
    consumers_outside |= {o.name for o in g.output}
    final: list[Any] = []
    for node in new_nodes:
        final.append(node)
        if id(node) not in student_ids:
            continue
        for k, name in enumerate(node.output):
            if name in consumers_outside and elem.get(name) == TensorProto.FLOAT:
                inner = name + "/fp16"
                node.output[k] = inner
                for other in new_nodes:
                    if id(other) in student_ids:
                        for j, i in enumerate(other.input):
                            if i == name:
                                other.input[j] = inner
                final.append(helper.make_node("Cast", [inner], [name], to=TensorProto.FLOAT,
                                              name=f"student/cast_out/{name}"))
    del g.node[:]
    g.node.extend(final)
    del g.value_info[:]
    used = {i for n in g.node for i in n.input}
    keep_inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep_inits)
    onnx.checker.check_model(out)
    return out


def fp16_emulation(model: Any, mode: str = "all") -> Any:
    """A float32 graph that rounds like an FP16 engine with FP32 accumulation (run it unoptimised).

    For the emulated nodes (``all``, or the ``student/`` nodes for ``conv``): float weights are rounded to
    float16 values, float inputs from outside are rounded, and every float output is rounded
    (``Cast→float16→Cast→float32``). ONNX Runtime CPU cannot measure this with the real FP16 model: it runs
    float16 Conv/SiLU chains in float32 (only weights rounded), which understates the error.
    """
    import copy

    from onnx import TensorProto, helper, numpy_helper

    out = copy.deepcopy(model)
    g = out.graph
    targets = [n for n in g.node if mode == "all" or n.name.startswith("student/")]
    if not targets:
        raise ExportError(f"no nodes to emulate in FP16 mode {mode!r}")
    elem, inits = _element_types(out)
    target_ids = {id(n) for n in targets}
    produced = {o for n in targets for o in n.output}
    rounded: dict[str, str] = {}
    final: list[Any] = []

    def round_pair(src: str, dst: str, tag: str) -> list[Any]:
        return [helper.make_node("Cast", [src], [dst + "/h"], to=TensorProto.FLOAT16, name=f"emulate/{tag}/h"),
                helper.make_node("Cast", [dst + "/h"], [dst], to=TensorProto.FLOAT, name=f"emulate/{tag}/f")]

    for node in g.node:
        if id(node) not in target_ids:
            final.append(node)
            continue
        keep = FLOAT_ONLY_INPUTS.get(node.op_type, ())
        for k, name in enumerate(node.input):
            if not name or k in keep or name in produced or elem.get(name) != TensorProto.FLOAT:
                continue
            if name not in rounded:
                rounded[name] = name + "/r16"
                if name in inits:
                    arr = numpy_helper.to_array(inits[name]).astype(np.float16).astype(np.float32)
                    g.initializer.append(numpy_helper.from_array(arr, rounded[name]))
                else:
                    final.extend(round_pair(name, rounded[name], f"in/{name}"))
            node.input[k] = rounded[name]
        outs = list(node.output)
        for k, name in enumerate(outs):
            if elem.get(name) == TensorProto.FLOAT:
                node.output[k] = name + "/pre16"
        final.append(node)
        for k, name in enumerate(outs):
            if elem.get(name) == TensorProto.FLOAT:
                final.extend(round_pair(name + "/pre16", name, f"out/{name}"))
    del g.node[:]
    g.node.extend(final)
    del g.value_info[:]
    return out


def emulated_psnr(model: Any, mode: str, frames: np.ndarray, batch: int | None, reference: np.ndarray) -> float:
    """PSNR vs ``reference`` of :func:`fp16_emulation` run without graph optimisations (no cast folding)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    session = ort.InferenceSession(fp16_emulation(model, mode).SerializeToString(), sess_options=opts,
                                   providers=["CPUExecutionProvider"])
    return psnr(reference, run_model(session, frames, batch)[0])


def to_fp16(model: Any, mode: str = "all") -> Any:
    """Float16 copy with float32 I/O: ``all`` nodes, or only the student (``conv``: physics stays FP32)."""
    import copy
    import warnings

    if mode not in ("all", "conv"):
        raise ExportError(f"unknown FP16 mode {mode!r}; use all or conv")
    if mode == "conv":
        out = student_to_fp16(model)
    else:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = convert_float_to_float16(copy.deepcopy(model), keep_io_types=True)
    _set_props(out, {**_props(model), "nsdd.precision": "fp16", "nsdd.fp16_mode": mode})
    return out


# ----------------------------------------------------------------------------------------------
# INT8 (explicit Q/DQ on convolutions)
# ----------------------------------------------------------------------------------------------


def conv_nodes(model: Any) -> list[Any]:
    """Convolutions to quantise (all Conv/ConvTranspose; the physics part has none)."""
    return [n for n in model.graph.node if n.op_type in CONV_OPS]


CALIBRATION_METHODS = ("max", "percentile", "mse")
HIST_BINS = 1 << 14  # |x| histogram of each activation over [0, max |x|] (percentile and mse)


def _activation_probe(model: Any) -> tuple[Any, list[str]]:
    """A copy of ``model`` that also outputs every convolution's (non-initializer) activation input."""
    import copy

    import onnx

    probe = copy.deepcopy(model)
    initializers = {i.name for i in probe.graph.initializer}
    names = sorted({n.input[0] for n in conv_nodes(probe) if n.input[0] not in initializers})
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return probe, names


def percentile_amax(hist: np.ndarray, top: float, percentile: float) -> float:
    """The ``percentile``-th percentile of |x| from its histogram over ``[0, top]`` (upper bin edge)."""
    total = float(hist.sum())
    if total == 0 or top <= 0:
        return 0.0
    cdf = np.cumsum(hist) / total
    k = int(np.searchsorted(cdf, percentile / 100.0, side="left"))
    k = min(k, len(hist) - 1)
    return float(min(top, (k + 1) * top / len(hist)))


def mse_amax(hist: np.ndarray, top: float, candidates: int = 64, low: float = 0.3) -> tuple[float, np.ndarray]:
    """The clip ``c`` in ``linspace(low·top, top, candidates)`` minimising the mean squared error of symmetric
    int8 quantisation (scale ``c/127``, values beyond ``c`` clipped) of the histogrammed |x|; bin centres
    stand for their values. Returns the clip and the error of every candidate."""
    if top <= 0 or hist.sum() == 0:
        return 0.0, np.zeros(candidates)
    centres = (np.arange(len(hist)) + 0.5) * top / len(hist)
    weights = hist / hist.sum()
    clips = np.linspace(low * top, top, candidates)
    errors = np.empty(candidates)
    for k, c in enumerate(clips):
        step = c / 127.0
        q = np.clip(np.round(centres / step), 0, 127) * step
        errors[k] = float(np.sum(weights * (centres - q) ** 2))
    best = int(np.argmin(errors))  # first minimum: ties go to the smaller clip
    return float(clips[best]), errors


def calibrate(model: Any, frames: np.ndarray, batch: int | None, method: str = "max",
              percentile: float = 99.99, mse_candidates: int = 64) -> dict[str, float]:
    """Clip ``amax`` of every convolution's activation input over ``frames`` (runs the FP32 model).

    ``max``: max |x|; ``percentile``: the ``percentile``-th percentile of |x|; ``mse``: the clip minimising
    the int8 quantisation MSE (:func:`mse_amax`). The last two read a :data:`HIST_BINS`-bin histogram of
    |x| over ``[0, max |x|]`` filled batch by batch (a second pass over ``frames``)."""
    if method not in CALIBRATION_METHODS:
        raise ExportError(f"unknown calibration {method!r}; use one of {', '.join(CALIBRATION_METHODS)}")
    if not 0.0 < percentile <= 100.0:
        raise ExportError(f"--percentile must be in (0, 100], got {percentile}")
    probe, names = _activation_probe(model)
    session = make_session(probe)
    top = dict.fromkeys(names, 0.0)
    for chunk, valid in batches(frames, batch):
        for name, o in zip(names, run_model(session, chunk[:valid], batch, outputs=names)):
            top[name] = max(top[name], float(np.abs(o).max()))
    if method == "max":
        return top
    hists = {name: np.zeros(HIST_BINS, np.int64) for name in names}
    for chunk, valid in batches(frames, batch):
        for name, o in zip(names, run_model(session, chunk[:valid], batch, outputs=names)):
            if top[name] > 0:
                hists[name] += np.histogram(np.abs(o), bins=HIST_BINS, range=(0.0, top[name]))[0]
    if method == "percentile":
        return {name: percentile_amax(hists[name], top[name], percentile) for name in names}
    return {name: mse_amax(hists[name], top[name], mse_candidates)[0] for name in names}


def quantize_weight(w: np.ndarray, axis: int, per_channel: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel symmetric int8: ``scale_c = max|w_c| / 127``, ``q = round(w / scale_c)``
    (``per_channel=False``: one scale ``max|w| / 127`` for the tensor, returned as a scalar array)."""
    if not per_channel:
        a = float(np.abs(w).max())
        scale = np.array(a / 127.0 if a > 0 else 1.0, np.float32)
        return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale
    amax = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def to_int8(model: Any, activation_amax: dict[str, float], per_channel_weights: bool = True) -> tuple[Any, dict]:
    """Insert Q/DQ on every convolution's activation input and weight (see the module docstring)."""
    import copy

    import onnx
    from onnx import helper, numpy_helper

    out = copy.deepcopy(model)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    new_nodes: list[Any] = []
    dq_of_activation: dict[str, str] = {}
    quantized = 0
    skipped: list[str] = []
    for node in list(g.node):
        if node.op_type not in CONV_OPS:
            new_nodes.append(node)
            continue
        x_name, w_name = node.input[0], node.input[1]
        if w_name not in inits or x_name not in activation_amax:
            skipped.append(node.name)
            new_nodes.append(node)
            continue
        if x_name not in dq_of_activation:
            amax = max(activation_amax[x_name], 1e-8)
            s_name, z_name = f"{x_name}/act_scale", f"{x_name}/act_zero"
            g.initializer.extend([numpy_helper.from_array(np.array(amax / 127.0, np.float32), s_name),
                                  numpy_helper.from_array(np.array(0, np.int8), z_name)])
            q_out, dq_out = f"{x_name}/q", f"{x_name}/dq"
            new_nodes.append(helper.make_node("QuantizeLinear", [x_name, s_name, z_name], [q_out], name=f"{node.name}/act_q"))
            new_nodes.append(helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out],
                                              name=f"{node.name}/act_dq"))
            dq_of_activation[x_name] = dq_out
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
        axis = 0 if node.op_type == "Conv" else 1
        q, scale = quantize_weight(w, axis, per_channel_weights)
        qw, sw, zw = f"{w_name}/int8", f"{w_name}/scale", f"{w_name}/zero"
        g.initializer.extend([numpy_helper.from_array(q, qw), numpy_helper.from_array(scale, sw),
                              numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), zw)])
        new_nodes.append(helper.make_node("DequantizeLinear", [qw, sw, zw], [f"{w_name}/dq"],
                                          name=f"{node.name}/weight_dq", **({"axis": axis} if scale.ndim else {})))
        node.input[0] = dq_of_activation[x_name]
        node.input[1] = f"{w_name}/dq"
        new_nodes.append(node)
        quantized += 1
    del g.node[:]
    g.node.extend(new_nodes)
    # drop float weights no longer used
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    onnx.checker.check_model(out)
    info = {"quantized_convolutions": quantized, "skipped_convolutions": skipped,
            "activation_tensors": len(dq_of_activation),
            "weight_scales": "per-channel" if per_channel_weights else "per-tensor"}
    return out, info


# ----------------------------------------------------------------------------------------------
# Properties and the command
# ----------------------------------------------------------------------------------------------


def _props(model: Any) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _set_props(model: Any, props: dict[str, str]) -> None:
    del model.metadata_props[:]
    import onnx

    onnx.helper.set_model_props(model, props)


def load_fp32(path: str | Path) -> Any:
    import onnx

    meta = read_metadata(path)
    if meta.get("nsdd.precision", "fp32") != "fp32":
        raise ExportError(f"{path}: is already {meta['nsdd.precision']}; quantise the FP32 export")
    if meta.get("nsdd.spectra") == "input":
        raise ExportError(f"{path}: takes its spectra as inputs (nsdd-export onnx --spectra-input); quantising such a "
                          "graph is not supported yet: quantise the fixed-spectra export")
    return onnx.load(str(path))


def quantize_file(src: str | Path, precision: str, out: str | Path, *, data: str | Path | None = None,
                  fp16_mode: str = "auto", fp16_min_psnr: float = 60.0, calib_frames: int = 64,
                  calibration: str = "max", percentile: float = 99.99) -> dict:
    """Write the ``precision`` version of ``src`` to ``out``; returns a report dict (also in metadata)."""
    model = load_fp32(src)
    batch, c, h, w = input_shape(model)
    if data is not None:
        frames, source = load_measurements(data, (c, h, w), limit=calib_frames), str(Path(data).resolve())
    elif precision == "int8":
        raise ExportError("INT8 needs calibration measurements: --data DIR (a dataset directory with measurements/*.npy)")
    else:
        frames, source = synthetic_measurements((c, h, w)), "synthetic smooth frames (no --data given)"
    report: dict[str, Any] = {"precision": precision, "source": str(src), "frames": len(frames),
                              "frames_from": source}
    ref = run_model(make_session(model), frames, batch)[0]
    if precision == "fp16":
        modes = ["all", "conv"] if fp16_mode == "auto" else [fp16_mode]
        has_student = any(n.name.startswith("student/") for n in model.graph.node)
        if not has_student:
            modes = ["all"]
        candidates = {}
        ort_psnr = {}
        for mode in modes:
            m16 = to_fp16(model, mode)
            ort_psnr[mode] = psnr(ref, run_model(make_session(m16), frames, batch)[0])
            candidates[mode] = (m16, emulated_psnr(model, mode, frames, batch, ref))
        # the choice uses the FP16 emulation (ORT CPU runs float16 convolutions in float32)
        report["psnr_vs_fp32_db"] = {mode: float(round(v[1], 3)) for mode, v in candidates.items()}
        report["psnr_vs_fp32_db_ort_cpu_fp16_model"] = {mode: float(round(v, 3)) for mode, v in ort_psnr.items()}
        report["fp16_min_psnr_db"] = fp16_min_psnr
        if "all" in candidates and (candidates["all"][1] >= fp16_min_psnr or len(candidates) == 1):
            chosen = "all"
        else:
            chosen = "conv"
        report["fp16_mode"] = chosen
        result = candidates[chosen][0]
    elif precision == "int8":
        if not conv_nodes(model):
            raise ExportError(f"{src}: has no convolutions; INT8 applies to the student's convolutions only "
                              "(the DFT/Wiener part stays FP32): use the FP32 or FP16 Wiener-only graph")
        amax = calibrate(model, frames, batch, calibration, percentile)
        result, info = to_int8(model, amax)
        report.update(info)
        report["calibration"] = {"method": calibration, **({"percentile": percentile} if calibration == "percentile"
                                                           else {})}
        report["psnr_vs_fp32_db"] = float(round(psnr(ref, run_model(make_session(result), frames, batch)[0]), 3))
        _set_props(result, {**_props(model), "nsdd.precision": "int8", "nsdd.int8_calibration": calibration})
    else:
        raise ExportError(f"unknown precision {precision!r}; use fp16 or int8")
    props = _props(result)
    props["nsdd.quantize_report"] = json.dumps(report)
    _set_props(result, props)
    save_model(result, out)
    return report


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="FP32 ONNX file written by nsdd-export onnx")
    p.add_argument("--precision", choices=("fp16", "int8"), required=True,
                   help="fp16: float16 graph (see --fp16-mode); int8: Q/DQ on the student's convolutions")
    p.add_argument("--data", metavar="DIR", help="dataset directory with measurements/*.npy (calibration; required for int8)")
    p.add_argument("--fp16-mode", choices=("auto", "all", "conv"), default="auto",
                   help="all: whole graph FP16; conv: student FP16, DFT FP32; auto: measure both and choose")
    p.add_argument("--fp16-min-psnr", type=float, default=60.0,
                   help="auto keeps the whole-FP16 graph when its PSNR vs FP32 reaches this (dB)")
    p.add_argument("--calib-frames", type=int, default=64, help="at most this many calibration measurements")
    p.add_argument("--calibration", choices=CALIBRATION_METHODS, default="max",
                   help="INT8 activation clip: max |x|, a percentile of |x|, or the clip minimising the "
                        "quantisation MSE")
    p.add_argument("--percentile", type=float, default=99.99, help="percentile of |x| for --calibration percentile")
    p.add_argument("--out", required=True, help="output .onnx file")


def main(args: argparse.Namespace) -> int:
    try:
        report = quantize_file(args.model, args.precision, args.out, data=args.data, fp16_mode=args.fp16_mode,
                               fp16_min_psnr=args.fp16_min_psnr, calib_frames=args.calib_frames,
                               calibration=args.calibration, percentile=args.percentile)
    except (ExportError, OpticsError) as exc:
        print(f"nsdd-export quantize: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0
