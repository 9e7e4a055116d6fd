"""Graphs that take the pseudo-inverse spectra as inputs (``nsdd-export onnx --spectra-input``): the same numbers as
the fixed graph, the training code's student under a warped PSF's operator, bundles that say so, engines that swap
them between frames, and named errors for models and bundles that do not fit."""

from __future__ import annotations

import argparse
import json
import threading

import numpy as np
import pytest
import torch

from export.graph import GraphSpec, ReconstructionGraph, reference_reconstruction
from export.make_bundle import make_bundle
from export.onnx_graph import configure_parser as onnx_parser
from export.onnx_graph import export_graph, read_metadata
from export.onnx_graph import main as onnx_main
from nsdd_edge.bundle import BundleError, load_bundle, write_bundle
from nsdd_edge.engines import EngineError, NumpyWienerEngine, select_engine
from nsdd_edge.graph_spectra import SpectraFeed, graph_spectra, spectra_names
from nsdd_edge.optics import LenslessGeometry, WienerFilter
from nsdd_edge.psf_warp import PsfWarp, warp_psf
from nsdd_edge.trt_runner import TrtRunner, TrtUnavailable
from nsdd_edge.validate import check_onnx_model

ort = pytest.importorskip("onnxruntime")

LAM = 1e-3


def tiny_psf(size: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    psf = np.zeros((size, size))
    for _ in range(5):
        cy, cx = rng.uniform(3, size - 3, 2)
        psf += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 2.0)
    return (psf / psf.sum()).astype(np.float32)[None]


def tiny_net(seed: int = 0) -> torch.nn.Module:
    from train.students import EdgeUNet

    torch.manual_seed(seed)
    net = EdgeUNet(6, 3, width=4, depth=1, max_width=8, blocks=1).eval()
    with torch.no_grad():  # make g's output O(1) so its errors show
        net.head.weight.mul_(8.0)
    return net


def run_onnx(path, y, feeds=None) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"y": y, **(feeds or {})})[0]


@pytest.mark.parametrize("model", ["circular", "crop"])
def test_fed_spectra_give_the_fixed_graph_and_the_warped_psf_gives_the_student_under_its_operator(tmp_path, model):
    psf = tiny_psf()
    geometry = (LenslessGeometry.make("circular", (16, 16)) if model == "circular"
                else LenslessGeometry.make("crop", (16, 16), (16, 16), scene_shape=(24, 24), conv_shape=(32, 32)))
    net = tiny_net()
    fixed = export_graph(ReconstructionGraph(psf, geometry, LAM, net=net), tmp_path / "fixed.onnx")
    graph = ReconstructionGraph(psf, geometry, LAM, net=net, spectra_input=True)
    fed = export_graph(graph, tmp_path / "fed.onnx")
    names = spectra_names(geometry)
    session = ort.InferenceSession(str(fed), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["y", *names]
    spec = GraphSpec.from_metadata(read_metadata(fed))
    assert spec.spectra == "input" and GraphSpec.from_metadata(read_metadata(fixed)).spectra == "fixed"
    assert "nsdd.spectra" not in read_metadata(fixed)  # a fixed graph's metadata is what it always was

    y = np.random.default_rng(1).random((1, 3, 16, 16)).astype(np.float32)
    a = run_onnx(fixed, y)
    b = run_onnx(fed, y, graph_spectra(psf, geometry, LAM))
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())

    warped = warp_psf(psf, PsfWarp(1.12))
    c = run_onnx(fed, y, graph_spectra(warped, geometry, LAM))
    reference = reference_reconstruction(warped, torch.from_numpy(y), LAM, net, "nullspace", geometry=geometry).numpy()
    np.testing.assert_allclose(c, reference, rtol=0, atol=1e-4 * np.abs(reference).max())
    assert np.abs(c - a).max() > 1e-2 * np.abs(a).max()  # another PSF really gives another reconstruction

    with pytest.raises(Exception, match="spectra"):  # the torch graph says what it takes
        graph(torch.from_numpy(y))


def export_cli(argv) -> int:
    p = argparse.ArgumentParser()
    onnx_parser(p)
    return onnx_main(p.parse_args(argv))


@pytest.fixture(scope="module")
def wiener_models(tmp_path_factory):
    """A Wiener-only graph exported both ways through the CLI, and its PSF file."""
    root = tmp_path_factory.mktemp("spectra")
    psf = tiny_psf()
    np.save(root / "psf.npy", psf)
    common = ["--wiener-only", "--psf", str(root / "psf.npy"), "--size", "16", "16", "--lam", str(LAM)]
    assert export_cli([*common, "--out", str(root / "fixed.onnx")]) == 0
    assert export_cli([*common, "--spectra-input", "--out", str(root / "fed.onnx")]) == 0
    return {"root": root, "psf": psf, "psf_file": root / "psf.npy", "fixed": root / "fixed.onnx",
            "fed": root / "fed.onnx"}


def test_bundle_records_the_kind_and_the_engine_swaps_the_psf_between_frames(wiener_models, tmp_path):
    psf = wiener_models["psf"]
    bundle = make_bundle([wiener_models["fed"]], psf, tmp_path / "bundle")
    assert bundle.spectra == "input" and json.loads((tmp_path / "bundle/bundle.json").read_text())["spectra"] == "input"
    assert "spectra input" in " ".join(bundle.verification)
    assert "fed the spectra" in check_onnx_model(bundle, "onnx_fp32")
    engine, choice = select_engine(bundle, "onnx")
    assert choice.kind == "onnx" and engine.refocusable
    y = np.random.default_rng(2).random((1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(engine.infer(y)[0], WienerFilter(psf, bundle.geometry, LAM)(y[0]), atol=1e-4)
    warped = warp_psf(psf, PsfWarp(0.9))
    engine.set_psf(warped)
    np.testing.assert_allclose(engine.infer(y)[0], WienerFilter(warped, bundle.geometry, LAM)(y[0]), atol=1e-4)

    fixed = make_bundle([wiener_models["fixed"]], psf, tmp_path / "fixed_bundle")
    assert fixed.spectra == "fixed" and "spectra" not in json.loads((tmp_path / "fixed_bundle/bundle.json").read_text())
    fixed_engine, _ = select_engine(fixed, "onnx")
    assert not fixed_engine.refocusable
    with pytest.raises(EngineError, match="fixed spectra"):
        fixed_engine.set_psf(warped)
    wiener = NumpyWienerEngine(fixed)  # the numpy filter computes its own spectra: it can always refocus
    assert wiener.refocusable
    wiener.set_psf(warped)
    np.testing.assert_allclose(wiener.infer(y)[0], WienerFilter(warped, fixed.geometry, LAM)(y[0]), atol=1e-6)


def test_models_and_bundles_that_do_not_fit_are_refused_by_name(wiener_models, tmp_path):
    psf, fed, fixed = wiener_models["psf"], wiener_models["fed"], wiener_models["fixed"]
    with pytest.raises(Exception, match="spectra"):  # one bundle, one kind
        make_bundle([fixed, fed], psf, tmp_path / "mixed")
    # a spectra-input model in a bundle that does not say so
    b = write_bundle(tmp_path / "unsaid", psf=psf, geometry=LenslessGeometry.make("circular", (16, 16)), lam=LAM,
                     channels=3, models={"onnx_fp32": fed})
    with pytest.raises(BundleError, match="spectra: input"):
        select_engine(b, "onnx")
    # a fixed model in a bundle that says input
    b = write_bundle(tmp_path / "wrong", psf=psf, geometry=LenslessGeometry.make("circular", (16, 16)), lam=LAM,
                     channels=3, models={"onnx_fp32": fixed}, spectra="input")
    with pytest.raises(BundleError, match="g_spec"):
        select_engine(b, "onnx")
    meta = json.loads((tmp_path / "wrong/bundle.json").read_text())
    meta["spectra"] = "sometimes"
    (tmp_path / "wrong/bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="spectra"):
        load_bundle(tmp_path / "wrong")
    good = make_bundle([fed], psf, tmp_path / "good")
    engine, _ = select_engine(good, "onnx")
    with pytest.raises(EngineError, match="all zero"):
        engine.set_psf(np.zeros((1, 8, 8), np.float32))  # not a PSF of the bundle's box


class _FakeCuda:
    """Records the copies :class:`TrtRunner` enqueues (the calls of its CUDA backends)."""

    def __init__(self):
        self.copies: list[str] = []

    def htod(self, dev, host):
        self.copies.append(f"htod {dev}")


def test_tensorrt_runner_stages_spectra_and_applies_them_before_the_next_frame():
    """The staging logic of :meth:`TrtRunner.set_inputs` (no TensorRT here: the runner's state is set up as its
    constructor would for a plan with inputs y, g_spec, null_spec)."""
    from nsdd_edge.trt_runner import TensorSpec

    runner = TrtRunner.__new__(TrtRunner)
    runner.plan_path = "fake.plan"
    runner.input = TensorSpec("y", True, (1, 3, 4, 4), np.dtype(np.float32))
    runner.extra_inputs = {n: TensorSpec(n, True, (1, 4, 6), np.dtype(np.float32)) for n in ("g_spec", "null_spec")}
    runner._extra_values, runner._pending, runner._pending_lock = {}, None, threading.Lock()
    runner.memory, runner.cuda = "pinned", _FakeCuda()
    runner._buffers = {n: (np.zeros((1, 4, 6), np.float32), k) for k, n in enumerate(runner.extra_inputs)}
    runner._buffers_have_extra = False
    with pytest.raises(TrtUnavailable, match="set_inputs first"):
        runner._apply_pending()
    with pytest.raises(TrtUnavailable, match="extra inputs"):
        runner.set_inputs({"g_spec": np.ones((1, 4, 6))})
    with pytest.raises(TrtUnavailable, match="shape"):
        runner.set_inputs({"g_spec": np.ones((1, 4, 6)), "null_spec": np.ones((2, 4, 6))})
    runner.set_inputs({"g_spec": np.full((1, 4, 6), 2.0), "null_spec": np.full((1, 4, 6), 3.0)})
    assert not runner._buffers["g_spec"][0].any()  # staged only: a frame in flight keeps its spectra
    runner._apply_pending()  # what infer does before it enqueues the next frame
    assert runner._buffers["g_spec"][0].min() == 2.0 and runner._buffers["null_spec"][0].max() == 3.0
    assert runner.cuda.copies == ["htod 0", "htod 1"]
    runner._apply_pending()  # nothing new: no copies
    assert runner.cuda.copies == ["htod 0", "htod 1"]
    runner.memory, runner.cuda = "mapped", _FakeCuda()  # zero-copy: a host write between frames is the copy
    runner.set_inputs({"g_spec": np.full((1, 4, 6), 5.0), "null_spec": np.full((1, 4, 6), 5.0)})
    runner._apply_pending()
    assert runner._buffers["null_spec"][0].min() == 5.0 and runner.cuda.copies == []


def test_spectra_feed_names_and_shapes():
    circular = LenslessGeometry.make("circular", (16, 16))
    crop = LenslessGeometry.make("crop", (16, 16), (16, 16), scene_shape=(24, 24), conv_shape=(32, 30))
    feeds = SpectraFeed(crop, LAM).feeds(tiny_psf())
    assert SpectraFeed(circular, LAM).names == ("g_spec", "null_spec")
    assert set(feeds) == {"g_spec", "h_spec"} and feeds["h_spec"].shape == (1, 32, 2 * 16) == feeds["g_spec"].shape
    assert feeds["g_spec"].dtype == np.float32


def test_verify_feeds_the_spectra_and_quantize_refuses_by_name(wiener_models, tmp_path, capsys):
    from test_export_helpers import make_dataset

    from export.quantize import quantize_file
    from export.verify import configure_parser as verify_parser
    from export.verify import main as verify_main

    data = make_dataset(tmp_path / "data", wiener_models["psf"], n=3, size=(16, 16), lam=LAM)
    p = argparse.ArgumentParser()
    verify_parser(p)
    report = tmp_path / "verify.json"
    assert verify_main(p.parse_args([str(wiener_models["fed"]), "--data", str(data), "--json", str(report)])) == 0
    r = json.loads(report.read_text())
    assert r["spectra"] == "input" and r["fp32_vs_torch_ok"] and "not applicable" in r["fp16"]
    with pytest.raises(Exception, match="spectra as inputs"):
        quantize_file(wiener_models["fed"], "fp16", tmp_path / "fp16.onnx")


class _FakeOrtValue:
    uploads = 0

    def __init__(self, array):
        self.array = array

    @classmethod
    def ortvalue_from_numpy(cls, array, device_type="cpu", device_id=0):
        assert device_type == "cuda" and device_id == 0
        cls.uploads += 1
        return cls(np.array(array))


class _FakeBinding:
    """ONNX Runtime's IOBinding methods that the CUDA path of OnnxRuntimeEngine.infer calls, over a CPU session."""

    def __init__(self):
        self.inputs, self.calls = {}, []

    def bind_ortvalue_input(self, name, value):
        self.calls.append(("ortvalue", name))
        self.inputs[name] = value.array

    def bind_cpu_input(self, name, value):
        self.calls.append(("cpu", name))
        self.inputs[name] = value

    def bind_output(self, name, device):
        self.output = name

    def copy_outputs_to_cpu(self):
        return self.result


class _BindingSession:
    def __init__(self, session):
        self.session = session

    def run_with_iobinding(self, b):
        b.result = self.session.run([b.output], b.inputs)


def test_cuda_binding_uploads_the_spectra_once_per_swap_not_per_frame(wiener_models, tmp_path):
    """The CUDA path (no GPU here: ONNX Runtime's IOBinding and OrtValue stood in for, same method names): the
    spectra go to the device when the PSF is set, each frame binds them by reference and uploads y only."""
    import types

    psf = wiener_models["psf"]
    bundle = make_bundle([wiener_models["fed"]], psf, tmp_path / "bundle")
    engine, _ = select_engine(bundle, "onnx")
    engine.ort = types.SimpleNamespace(OrtValue=_FakeOrtValue, __version__=engine.ort.__version__)
    engine._binding, engine.session = _FakeBinding(), _BindingSession(engine.session)
    _FakeOrtValue.uploads = 0
    engine.set_psf(psf)
    assert _FakeOrtValue.uploads == 2  # g_spec and null_spec
    y = np.random.default_rng(2).random((1, 3, 16, 16)).astype(np.float32)
    for _ in range(3):
        x = engine.infer(y)
    assert _FakeOrtValue.uploads == 2
    assert sorted({c for c in engine._binding.calls if c[0] == "cpu"}) == [("cpu", engine.input_name)]
    np.testing.assert_allclose(x[0], WienerFilter(psf, bundle.geometry, LAM)(y[0]), atol=1e-4)
    warped = warp_psf(psf, PsfWarp(0.9))
    engine.set_psf(warped)
    assert _FakeOrtValue.uploads == 4
    np.testing.assert_allclose(engine.infer(y)[0], WienerFilter(warped, bundle.geometry, LAM)(y[0]), atol=1e-4)
