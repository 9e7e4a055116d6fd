"""Engines: numpy Wiener, ONNX Runtime (a small conv graph built with onnx.helper), engine selection,
TensorRT runner decisions (TensorRT itself is not installable here: never faked, only its pure logic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nsdd_edge.bundle import BundleError, PreprocessConfig, load_bundle, write_bundle
from nsdd_edge.engines import (
    AUTO_ONNX_ORDER,
    EngineError,
    NumpyWienerEngine,
    OnnxRuntimeEngine,
    TensorRTEngine,
    plan_engine,
    runtime_availability,
    select_engine,
)
from nsdd_edge.optics import LenslessGeometry, WienerFilter
from nsdd_edge.psf_sim import simulate_psf
from nsdd_edge.trt_runner import (
    TrtUnavailable,
    choose_cuda_binding,
    is_jetson,
    plan_memory_mode,
    resolve_shape,
    use_cuda_graph,
)

SIZE = 32


def make_conv_onnx(path: Path, channels: int = 3, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """A one-layer 3×3 conv ONNX model (input ``y``, output ``x``); returns its weights (C, C, 3, 3)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).normal(0, 0.3, (channels, channels, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["y", "w"], ["x"], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                            ["N", channels, size, size])],
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, size, size])],
                              initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return w


def conv_reference(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Cross-correlation with zero padding 1 (ONNX Conv semantics), in float64."""
    n, c, h, wd = y.shape
    p = np.pad(y.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd))
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("oc,nchw->nohw", w[:, :, dy, dx], p[:, :, dy : dy + h, dx : dx + wd])
    return out


def make_bundle(tmp_path: Path, models: dict | None = None, name: str = "b") -> object:
    psf = simulate_psf("contour", (SIZE, SIZE), 1)
    geometry = LenslessGeometry.make("circular", (SIZE, SIZE))
    return write_bundle(tmp_path / name, psf=psf, geometry=geometry, lam=1e-3, channels=3,
                        preprocess=PreprocessConfig(), models=models)


def test_wiener_engine_matches_the_one_wiener_filter(tmp_path):
    bundle = make_bundle(tmp_path)
    engine = NumpyWienerEngine(bundle)
    y = np.random.default_rng(0).random((2, 3, SIZE, SIZE), dtype=np.float32)
    x = engine.infer(y)
    ref = WienerFilter(bundle.psf, bundle.geometry, bundle.lam)(y)
    assert x.shape == (2, 3, SIZE, SIZE) and x.dtype == np.float32
    np.testing.assert_array_equal(x, ref)
    assert "Wiener" in engine.describe()
    with pytest.raises(EngineError, match=r"expected measurements of shape \(N, 3, 32, 32\)"):
        engine.infer(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(EngineError, match="batch"):
        engine.infer(np.zeros((3, SIZE, SIZE), np.float32))


def test_onnx_runtime_engine_runs_the_model(tmp_path):
    w = make_conv_onnx(tmp_path / "conv.onnx")
    engine = OnnxRuntimeEngine(tmp_path / "conv.onnx", threads=1, input_shape=(3, SIZE, SIZE))
    y = np.random.default_rng(1).random((2, 3, SIZE, SIZE), dtype=np.float32)
    x = engine.infer(y)
    np.testing.assert_allclose(x, conv_reference(y, w), rtol=1e-4, atol=1e-5)
    assert "ONNX Runtime" in engine.describe() and "CPU" in engine.describe()
    with pytest.raises(EngineError, match="expected measurements"):
        engine.infer(np.zeros((1, 1, SIZE, SIZE), np.float32))
    engine.close()


def test_onnx_engine_clear_errors(tmp_path):
    with pytest.raises(EngineError, match="does not exist"):
        OnnxRuntimeEngine(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(EngineError, match="cannot load the model"):
        OnnxRuntimeEngine(tmp_path / "junk.onnx")
    make_conv_onnx(tmp_path / "c1.onnx", channels=1)
    with pytest.raises(EngineError, match="bundle's measurements"):
        OnnxRuntimeEngine(tmp_path / "c1.onnx", input_shape=(3, SIZE, SIZE))
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        make_conv_onnx(tmp_path / "c3.onnx")
        with pytest.raises(EngineError, match="CUDAExecutionProvider"):
            OnnxRuntimeEngine(tmp_path / "c3.onnx", device="cuda")


AVAIL_ALL = {"trt": (True, "TensorRT 10.3 with cuda-python"), "onnx": (True, "onnxruntime 1.x"),
             "onnx-cuda": (False, "no"), "wiener": (True, "numpy")}
AVAIL_NO_TRT = {**AVAIL_ALL, "trt": (False, "tensorrt not importable (ModuleNotFoundError)")}


def test_plan_engine_priorities_and_reasons():
    plan, onnx32 = {"file": "m.plan"}, {"file": "m.onnx"}
    assert plan_engine({"engine": plan, "onnx_fp32": onnx32}, None, AVAIL_ALL).kind == "trt"
    c = plan_engine({"engine": plan, "onnx_fp32": onnx32}, "auto", AVAIL_NO_TRT)
    assert (c.kind, c.model) == ("onnx", "onnx_fp32")
    assert any("tensorrt not importable" in s for s in c.skipped)
    c = plan_engine({"onnx_int8": onnx32, "onnx_fp16": onnx32}, None, AVAIL_ALL)
    assert c.model == next(k for k in AUTO_ONNX_ORDER["cpu"] if k in ("onnx_int8", "onnx_fp16"))  # what it has
    c = plan_engine({}, None, AVAIL_ALL)
    assert c.kind == "wiener" and "no TensorRT plan" in c.reason and "no ONNX model" in c.reason
    assert plan_engine({"engine": plan}, "wiener", AVAIL_ALL).kind == "wiener"
    with pytest.raises(EngineError, match="tensorrt not importable"):
        plan_engine({"engine": plan}, "trt", AVAIL_NO_TRT)
    with pytest.raises(EngineError, match="no ONNX model"):
        plan_engine({"engine": plan}, "onnx", AVAIL_ALL)
    with pytest.raises(EngineError, match="unknown engine"):
        plan_engine({}, "tpu", AVAIL_ALL)


def test_plan_engine_precision(tmp_path):
    """--precision: auto takes the device's fastest ONNX model and any plan; an explicit precision takes only
    a model of that precision and is an error, not a silent Wiener fallback, where there is none (issue 16, item 7)."""
    m = {"file": "m.onnx"}
    every = {"onnx_fp32": m, "onnx_fp16": m, "onnx_int8": m}
    assert plan_engine(every, None, AVAIL_NO_TRT).model == "onnx_fp32"  # CPU: FP32 first
    c = plan_engine(every, None, AVAIL_NO_TRT, device="cuda")
    assert c.model == "onnx_fp16" and "auto on CUDA: fp16 > fp32 > int8" in c.reason
    for p in ("fp32", "fp16", "int8"):
        c = plan_engine(every, "auto", AVAIL_NO_TRT, precision=p)
        assert (c.kind, c.model) == ("onnx", f"onnx_{p}") and f"--precision {p}" in c.reason
    with pytest.raises(EngineError, match=r"--precision int8: the bundle has no INT8 model .*onnx_fp16, onnx_fp32"):
        plan_engine({"onnx_fp32": m, "onnx_fp16": m}, None, AVAIL_NO_TRT, precision="int8")
    with pytest.raises(EngineError, match="no FP16 model"):
        plan_engine({"onnx_fp32": m}, "onnx", AVAIL_NO_TRT, precision="fp16")
    with pytest.raises(EngineError, match="FP32 only"):
        plan_engine(every, "wiener", AVAIL_NO_TRT, precision="fp16")
    assert plan_engine({}, None, AVAIL_NO_TRT, precision="fp32").kind == "wiener"  # Wiener is FP32
    # a TensorRT plan is taken as built under auto, and only at its own precision otherwise
    plans = {"engine": {"file": "m.plan", "precision": "fp16"}, "onnx_fp32": m, "onnx_int8": m}
    assert plan_engine(plans, None, AVAIL_ALL).kind == "trt"
    assert plan_engine(plans, None, AVAIL_ALL, precision="fp16").kind == "trt"
    c = plan_engine(plans, None, AVAIL_ALL, precision="int8")
    assert c.model == "onnx_int8" and any("plan is fp16, not int8" in s for s in c.skipped)
    with pytest.raises(EngineError, match="--precision"):
        plan_engine(every, None, AVAIL_ALL, precision="fp8")


def test_run_and_bench_use_the_bundle_fp16_and_int8_models(tmp_path, capsys):
    from nsdd_edge.cli import main as edge_main
    from nsdd_edge.sources import open_source

    make_conv_onnx(tmp_path / "fp32.onnx")
    make_conv_onnx(tmp_path / "int8.onnx", seed=1)  # a stand-in: the file name shows which model ran
    psf = simulate_psf("contour", (SIZE, SIZE), 1)
    sim = open_source("sim://", psf=psf, geometry=LenslessGeometry.make("circular", (SIZE, SIZE)))
    bundle = write_bundle(tmp_path / "b", psf=psf, geometry=LenslessGeometry.make("circular", (SIZE, SIZE)),
                          lam=1e-3, channels=3, preprocess=PreprocessConfig(**sim.matching_preprocess()),
                          models={"onnx_fp32": tmp_path / "fp32.onnx", "onnx_int8": tmp_path / "int8.onnx"})
    args = ["--model", str(bundle.root), "--source", "sim://?realtime=0", "--frames", "2", "--quiet",
            "--stats", "", "--snapshot", ""]
    assert edge_main(["run", *args, "--precision", "int8"]) == 0
    err = capsys.readouterr().err
    assert "int8.onnx" in err and "--precision int8" in err
    assert edge_main(["run", *args, "--precision", "fp16"]) == 2
    assert "no FP16 model" in capsys.readouterr().err
    assert edge_main(["bench", "--model", str(bundle.root), "--source", "sim://?realtime=0", "--frames", "3",
                      "--precision", "int8", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "int8.onnx" in out and "1 threads" in out


def test_select_engine_with_real_bundles(tmp_path):
    make_conv_onnx(tmp_path / "student.onnx")
    (tmp_path / "student.plan").write_bytes(b"\x00" * 64)  # a plan this machine cannot run
    bundle = make_bundle(tmp_path, models={"onnx_fp32": tmp_path / "student.onnx",
                                           "engine": tmp_path / "student.plan"})
    avail = runtime_availability()
    engine, choice = select_engine(bundle, "auto", threads=1)
    if not avail["trt"][0]:
        assert isinstance(engine, OnnxRuntimeEngine) and choice.kind == "onnx"
        assert any(s.startswith("trt:") for s in choice.skipped)
        with pytest.raises(EngineError, match="tensorrt"):
            select_engine(bundle, "trt")
    engine.close()
    engine, choice = select_engine(bundle, "wiener")
    assert isinstance(engine, NumpyWienerEngine) and "requested" in choice.reason
    # wiener-only bundle: auto falls back to Wiener and says why
    engine, choice = select_engine(make_bundle(tmp_path, name="w"), None)
    assert isinstance(engine, NumpyWienerEngine) and "fallback" in choice.reason


def test_corrupted_model_is_refused(tmp_path):
    make_conv_onnx(tmp_path / "student.onnx")
    bundle = make_bundle(tmp_path, models={"onnx_fp32": tmp_path / "student.onnx"})
    with open(bundle.root / "student.onnx", "ab") as f:
        f.write(b"tampered")
    with pytest.raises(BundleError, match="corrupted"):
        load_bundle(bundle.root)


@pytest.mark.skipif(runtime_availability()["trt"][0], reason="TensorRT is installed here")
def test_tensorrt_engine_without_tensorrt_says_so(tmp_path):
    (tmp_path / "m.plan").write_bytes(b"\x00")
    with pytest.raises(EngineError, match="tensorrt not importable.*JetPack"):
        TensorRTEngine(tmp_path / "m.plan")


def test_trt_runner_decisions(tmp_path):
    both = {"cuda-python": (True, "ok"), "pycuda": (True, "ok")}
    only_pycuda = {"cuda-python": (False, "missing"), "pycuda": (True, "ok")}
    none = {"cuda-python": (False, "cuda-python not importable"), "pycuda": (False, "pycuda not importable")}
    assert choose_cuda_binding(both) == "cuda-python"
    assert choose_cuda_binding(both, "pycuda") == "pycuda"
    assert choose_cuda_binding(only_pycuda) == "pycuda"
    with pytest.raises(TrtUnavailable, match="pip install cuda-python"):
        choose_cuda_binding(none)
    with pytest.raises(TrtUnavailable, match="unknown CUDA binding"):
        choose_cuda_binding(both, "cupy")
    release = tmp_path / "nv_tegra_release"
    assert not is_jetson(release)
    assert is_jetson(release, integrated_attribute=1)
    release.write_text("# R36 (release), REVISION: 4.0\n")
    assert is_jetson(release, integrated_attribute=0)
    assert plan_memory_mode(True) == "mapped" and plan_memory_mode(False) == "pinned"
    assert plan_memory_mode(True, zero_copy=False) == "pinned"
    assert use_cuda_graph("cuda-python") and not use_cuda_graph("pycuda") and not use_cuda_graph("cuda-python", False)
    assert resolve_shape((-1, 3, 64, 64), (2, 3, 64, 64), "y") == (2, 3, 64, 64)
    with pytest.raises(TrtUnavailable, match="expects shape"):
        resolve_shape((1, 3, 64, 64), (1, 3, 32, 32), "y")
    with pytest.raises(TrtUnavailable, match="rank"):
        resolve_shape((1, 3, 64, 64), (3, 64, 64), "y")


def test_runtime_modules_never_import_torch():
    """The device runtime must run without torch, train/ or export/."""
    import subprocess
    import sys

    code = ("import sys\n"
            "import nsdd_edge.engines, nsdd_edge.trt_runner, nsdd_edge.loop, nsdd_edge.preview, nsdd_edge.recorder\n"
            "import nsdd_edge.telemetry, nsdd_edge.commands.run, nsdd_edge.commands.info, nsdd_edge.commands.bench\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'train', 'export', 'torchvision')]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
