"""The edge runtime with a crop-model bundle: measurements on the sensor grid, reconstructions on the scene grid.

A tiny crop bundle made here (our own contour PSF as large as the 16×20 sensor, scene = convolution grid =
32×40): the exported student with a 16×16 support window (ONNX Runtime) and, separately, the Wiener-only crop
graph; ``sim://`` simulates through the bundle's own crop geometry and PSF; ``nsdd-edge run`` records the whole
scene-grid reconstruction and shows the support window; ``info`` and ``bench`` report the output shape; an
engine whose output is not the bundle's scene grid is refused.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from nsdd_edge.bundle import PreprocessConfig, load_bundle, write_bundle
from nsdd_edge.cli import main as edge_main
from nsdd_edge.commands.run import open_camera
from nsdd_edge.engines import EngineError, NumpyWienerEngine, OnnxRuntimeEngine, select_engine
from nsdd_edge.loop import LoopConfig, ReconstructionLoop
from nsdd_edge.optics import LenslessGeometry, center_pad
from nsdd_edge.preprocess import Preprocessor
from nsdd_edge.psf_sim import simulate_psf
from nsdd_edge.recorder import read_recorded_raw
from nsdd_edge.sources import open_source

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

SENSOR = (16, 20)
GRID = (32, 40)
SUPPORT = (16, 16)
LAM = 1e-3


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def psf() -> np.ndarray:
    return simulate_psf("contour", SENSOR, seed=3)


def _geometry(psf) -> LenslessGeometry:
    return LenslessGeometry.make("crop", SENSOR, psf.shape[-2:], scene_shape=GRID, conv_shape=GRID)


def _preprocess(psf) -> PreprocessConfig:
    return PreprocessConfig(**open_source("sim://?realtime=0", psf=psf, channels=3).matching_preprocess())


@pytest.fixture(scope="module")
def wiener_bundle(tmp_path_factory, psf):
    """The Wiener-only crop graph (DFT-by-matmul) in a bundle without a support window."""
    from export.graph import ReconstructionGraph
    from export.onnx_graph import export_graph

    root = tmp_path_factory.mktemp("crop_wiener")
    path = export_graph(ReconstructionGraph(psf, _geometry(psf), LAM, objective="wiener"), root / "wiener.onnx")
    return write_bundle(root / "bundle", psf=psf, geometry=_geometry(psf), lam=LAM, channels=3,
                        preprocess=_preprocess(psf), models={"onnx_fp32": path})


@pytest.fixture(scope="module")
def student_bundle(tmp_path_factory, psf):
    """A crop student (random weights, support 16×16) exported with nsdd-export onnx, bundled with make_bundle."""
    from test_export_crop import make_crop_student

    from export.make_bundle import make_bundle
    from export.onnx_graph import main_argv

    root = tmp_path_factory.mktemp("crop_student")
    np.save(root / "psf.npy", psf)
    student = make_crop_student(root / "student", psf)
    assert main_argv(["--student", str(student), "--psf", str(root / "psf.npy"), "--out",
                      str(root / "student.onnx")]) == 0
    return make_bundle([root / "student.onnx"], psf, root / "bundle", preprocess=_preprocess(psf))


def test_sim_simulates_through_the_bundles_own_crop_geometry(wiener_bundle, student_bundle, psf):
    from train.physics import LenslessOperator

    op = LenslessOperator(psf, SENSOR, "crop", lam=LAM, scene_shape=GRID, conv_shape=GRID)
    for bundle, scene_shape in ((wiener_bundle, GRID), (student_bundle, SUPPORT)):
        assert bundle.sim_geometry() == bundle.geometry == _geometry(psf)
        cam = open_camera("sim://?realtime=0&noise=0&photons=0&seed=2", bundle)
        assert cam.geometry == bundle.geometry and cam.scene_window == scene_shape
        prep = Preprocessor(bundle.preprocess, bundle.root)
        cam.open()
        for _ in range(2):
            frame = cam.read()
            assert frame.truth.shape == (3, *scene_shape) and frame.truth.std() > 0.05
            # the support-size scene zero-padded (centred) into the scene grid, then A = C F⁻¹ H F P
            ref = op.A(torch.from_numpy(center_pad(frame.truth, GRID))[None])[0].numpy()
            np.testing.assert_allclose(cam.measurement(frame.index), ref, rtol=0, atol=2e-6)
            assert np.abs(prep(frame.data) - ref).max() <= 0.5 / cam.gain + 1e-6
        cam.close()
    with pytest.raises(ValueError, match="support"):
        open_source("sim://?realtime=0", psf=psf, geometry=_geometry(psf), support=(40, 16))


def test_engines_return_the_scene_grid(wiener_bundle, student_bundle, psf):
    cam = open_camera("sim://?realtime=0&seed=1", wiener_bundle)
    cam.open()
    y = Preprocessor(wiener_bundle.preprocess, wiener_bundle.root)(cam.read().data)[None]
    cam.close()
    assert y.shape == (1, 3, *SENSOR)
    onnx_engine, choice = select_engine(wiener_bundle, "auto", threads=1)
    assert choice.kind == "onnx" and onnx_engine.output_shape == (3, *GRID)
    numpy_engine = NumpyWienerEngine(wiener_bundle)
    x_onnx, x_numpy = onnx_engine.infer(y), numpy_engine.infer(y)
    assert x_onnx.shape == x_numpy.shape == (1, 3, *GRID)
    assert np.abs(x_onnx - x_numpy).max() <= 1e-4 * np.abs(x_numpy).max()
    assert "sensor (16, 20) → scene (32, 40)" in numpy_engine.describe()
    student, choice = select_engine(student_bundle, "onnx", threads=1)
    x = student.infer(y)
    assert x.shape == (1, 3, *GRID) and np.abs(x - x_numpy).max() > 1e-2  # the student's null-space part

    # a model made for the circular geometry (sensor-size output) in a crop bundle is refused by name
    from export.graph import ReconstructionGraph
    from export.onnx_graph import export_graph

    circular = export_graph(ReconstructionGraph(psf, SENSOR, LAM, objective="wiener"),
                            wiener_bundle.root.parent / "circular.onnx")
    with pytest.raises(EngineError, match="scene grid"):
        OnnxRuntimeEngine(circular, input_shape=wiener_bundle.input_shape, output_shape=wiener_bundle.output_shape)
    with pytest.raises(EngineError, match="scene grid"):  # a dynamic output shape is checked on the first frame
        OnnxRuntimeEngine(circular, input_shape=wiener_bundle.input_shape)._check_output(
            np.zeros((1, 3, *SENSOR), np.float32), wiener_bundle.output_shape, "onnx engine")


def test_loop_shows_the_support_window_of_the_scene_grid(student_bundle):
    source = open_camera("sim://?realtime=0&frames=3&seed=4", student_bundle)
    engine, _ = select_engine(student_bundle, "onnx", threads=1)
    loop = ReconstructionLoop(source, Preprocessor(student_bundle.preprocess, student_bundle.root), engine,
                              config=LoopConfig(max_frames=3, lossless=True, console_interval=0.0,
                                                expected_input_shape=student_bundle.input_shape,
                                                display_support=student_bundle.support_shape),
                              log=lambda m: None)
    summary = loop.run()
    assert summary["frames_out"] == 3 and summary["rejected"] == 0
    y, shown = loop.last_pair
    assert y.shape == (3, *SENSOR) and shown.shape == (3, *SUPPORT) and loop.last_truth.shape == (3, *SUPPORT)


def test_nsdd_edge_run_info_and_bench_with_a_crop_bundle(student_bundle, tmp_path, capsys):
    snap, stats, rec = tmp_path / "preview.png", tmp_path / "stats.json", tmp_path / "rec"
    assert edge_main(["run", "--model", str(student_bundle.root), "--source", "sim://?realtime=0", "--frames", "3",
                      "--quiet", "--threads", "1", "--snapshot", str(snap), "--stats", str(stats),
                      "--record", str(rec)]) == 0
    err = capsys.readouterr().err
    assert "crop model → scene (32, 40)" in err and "ONNX Runtime" in err and "3 frames reconstructed" in err
    figures = json.loads(stats.read_text())
    assert figures["frames_out"] == 3
    # the live ‖A x̂ − y‖/‖y‖ with the bundle's crop forward model (scene-grid x̂, sensor-grid y): the first frame
    assert figures["consistency"]["count"] == 1 and 0 < figures["consistency"]["last"] < 0.5
    img = cv2.imread(str(snap), cv2.IMREAD_COLOR)
    # measurement (16×20, shown 256×320) | support crop of x̂ (16×16) | sim truth (16×16), 256 px tall
    assert img is not None and img.shape[1] == 320 + 256 + 256 + 2 * 4
    metas = sorted(rec.glob("0*.json"))
    assert len(metas) == 3
    meta = json.loads(metas[0].read_text())
    assert read_recorded_raw(rec / meta["raw"]["file"]).shape == (*SENSOR, 3)
    assert np.load(rec / meta["recon"]["file"]).shape == (3, *GRID)  # the whole scene-grid output, lossless
    assert meta["recon"]["view_shape"] == [3, *SUPPORT]

    assert edge_main(["info", "--model", str(student_bundle.root), "--json"]) == 0
    b = json.loads(capsys.readouterr().out)["bundle"]
    assert b["input_shape"] == [3, *SENSOR] and b["output_shape"] == [3, *GRID]
    assert b["display_shape"] == [3, *SUPPORT] and b["geometry"]["model"] == "crop"
    assert edge_main(["info", "--model", str(student_bundle.root)]) == 0
    assert "output        [3, 32, 40] (scene grid, crop model); shown [3, 16, 16]" in capsys.readouterr().out

    assert edge_main(["bench", "--model", str(student_bundle.root), "--frames", "3", "--warmup", "1",
                      "--threads", "1", "--json", str(tmp_path / "bench.json")]) == 0
    assert "3x16x20→3x32x40" in capsys.readouterr().out
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["frames_out"] == 3 and result["output_shape"] == [3, *GRID]


def test_wiener_fallback_of_a_crop_bundle_without_models(psf, tmp_path, capsys):
    bundle = write_bundle(tmp_path / "plain", psf=psf, geometry=_geometry(psf), lam=LAM, channels=3,
                          preprocess=_preprocess(psf))
    assert bundle.output_shape == (3, *GRID)
    assert edge_main(["run", "--model", str(bundle.root), "--source", "sim://?realtime=0", "--frames", "2",
                      "--quiet", "--snapshot", "", "--stats", ""]) == 0
    err = capsys.readouterr().err
    assert "numpy Wiener A† (crop, sensor (16, 20) → scene (32, 40)" in err and "2 frames reconstructed" in err
    assert load_bundle(bundle.root).display_crop(np.zeros((3, *GRID))).shape == (3, *GRID)  # the whole scene
