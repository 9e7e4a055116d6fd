"""Bundles with a scene support window, the sim:// camera they imply, and the default bundle with a student.

- ``geometry.support_shape``: optional (the shipped Wiener-only bundle has none), malformed values refused.
- ``sim://`` with such a bundle renders scenes at the support size and simulates them with the crop model on
  a 2× sensor grid: its measurement equals ``train.physics.LenslessOperator`` (crop) ``A x``.
- ``scripts/make_default_bundle.py --student DIR`` with a tiny random student (support 64 on a 128 sensor,
  our own contour PSF): the bundle builds, loads, and ``nsdd-edge run`` uses the student (ONNX Runtime) or,
  without ONNX Runtime, the Wiener filter and says so; the preview shows the support crop and the sim truth.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from nsdd_edge.bundle import BundleError, PreprocessConfig, load_bundle, write_bundle
from nsdd_edge.cli import main as edge_main
from nsdd_edge.commands.run import default_bundle_path, open_camera
from nsdd_edge.optics import LenslessGeometry, array_hash, normalize
from nsdd_edge.preprocess import Preprocessor
from nsdd_edge.preview import compose
from nsdd_edge.psf_sim import simulate_psf
from nsdd_edge.sources import open_source

ROOT = Path(__file__).resolve().parents[1]
SENSOR = (128, 128)
SUPPORT = (64, 64)
LAM = 1e-3


@pytest.fixture(scope="module")
def psf() -> np.ndarray:
    return simulate_psf("contour", SENSOR, 0)


@pytest.fixture(scope="module")
def support_bundle(tmp_path_factory, psf):
    """A Wiener-only bundle (no model) whose scenes fill the centred 64² of the 128² grid."""
    cam = open_source("sim://?realtime=0", psf=psf, channels=3)
    return write_bundle(tmp_path_factory.mktemp("sb") / "bundle", psf=psf,
                        geometry=LenslessGeometry.make("circular", SENSOR), lam=LAM, channels=3,
                        preprocess=PreprocessConfig(**cam.matching_preprocess()), support_shape=SUPPORT)


def _script():
    spec = importlib.util.spec_from_file_location("make_default_bundle", ROOT / "scripts/make_default_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_bundle_psf_is_our_simulated_contour_psf():
    """The shipped PSF is recomputed bit for bit from its recorded recipe (never data from ../shared)."""
    b = load_bundle(default_bundle_path())
    recipe = json.loads((b.root / "bundle.json").read_text())["provenance"]["psf"]
    assert recipe["kind"] == "contour"
    ours = normalize(simulate_psf("contour", tuple(recipe["shape"][-2:]), recipe["seed"],
                                  fill=recipe.get("fill", 0.8)), "sum")
    np.testing.assert_array_equal(b.psf, ours)
    assert abs(float(ours.sum()) - 1.0) < 1e-6 and b.psf_sha256 == array_hash(ours)


def test_support_is_optional_recorded_and_checked(support_bundle, tmp_path):
    assert support_bundle.support_shape == SUPPORT
    meta = json.loads((support_bundle.root / "bundle.json").read_text())
    assert meta["geometry"]["support_shape"] == list(SUPPORT)
    plain = write_bundle(tmp_path / "plain", psf=support_bundle.psf, geometry=support_bundle.geometry, lam=LAM,
                         channels=3)  # no support: no key (bundles written before it existed load the same)
    assert "support_shape" not in json.loads((plain.root / "bundle.json").read_text())["geometry"]
    assert plain.support_shape is None and plain.sim_geometry() == plain.geometry
    g = support_bundle.sim_geometry()
    assert (g.model, g.sensor_shape, g.scene_shape, g.conv_shape) == ("crop", SENSOR, SUPPORT, (256, 256))
    x = np.arange(3 * 128 * 128, dtype=np.float32).reshape(3, 128, 128)
    np.testing.assert_array_equal(support_bundle.display_crop(x), x[:, 32:96, 32:96])

    for bad in ([200, 64], [64], "64x64", [0, 64], [64.5, 64], [True, 64], {"h": 64}):
        broken = tmp_path / f"broken{len(list(tmp_path.glob('broken*')))}"
        broken.mkdir()
        for f in support_bundle.root.iterdir():
            (broken / f.name).write_bytes(f.read_bytes())
        meta["geometry"]["support_shape"] = bad
        (broken / "bundle.json").write_text(json.dumps(meta))
        with pytest.raises(BundleError, match="support_shape"):
            load_bundle(broken)
    meta["geometry"]["support_shape"] = None
    (broken / "bundle.json").write_text(json.dumps(meta))
    assert load_bundle(broken).support_shape is None
    with pytest.raises(BundleError, match="support_shape"):
        write_bundle(tmp_path / "w", psf=support_bundle.psf, geometry=support_bundle.geometry, lam=LAM, channels=3,
                     support_shape=(256, 64))


def test_a_soft_edged_window_is_recorded_and_sim_renders_the_scenes_inside_it(support_bundle, tmp_path):
    """``geometry.support_taper``: a student window τ wider than the scenes on every side. The bundle records it,
    ``scene_support`` is the window less 2τ, ``sim://`` renders scenes that size (never under the fade), and a
    taper that leaves no scene is a named error, on writing and on loading."""
    soft = write_bundle(tmp_path / "soft", psf=support_bundle.psf, geometry=support_bundle.geometry, lam=LAM,
                        channels=3, support_shape=(80, 80), support_taper=8)
    meta = json.loads((soft.root / "bundle.json").read_text())
    assert meta["geometry"]["support_taper"] == 8 and meta["geometry"]["support_shape"] == [80, 80]
    assert soft.support_taper == 8 and soft.scene_support == (64, 64)
    assert soft.sim_geometry().scene_shape == (64, 64)  # the scenes, not the window
    assert soft.display_crop(np.zeros((3, 128, 128), np.float32)).shape == (3, 80, 80)  # shown: the window
    assert "support_taper" not in json.loads((support_bundle.root / "bundle.json").read_text())["geometry"]
    assert support_bundle.support_taper == 0 and support_bundle.scene_support == SUPPORT
    for bad in (40, -1, 2.5, True):
        with pytest.raises(BundleError, match="support_taper"):
            write_bundle(tmp_path / f"w{bad}", psf=support_bundle.psf, geometry=support_bundle.geometry, lam=LAM,
                         channels=3, support_shape=(80, 80), support_taper=bad)
    meta["geometry"]["support_taper"] = 40
    (soft.root / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="support_taper"):
        load_bundle(soft.root)


def test_sim_with_support_is_the_training_crop_model(support_bundle, psf):
    torch = pytest.importorskip("torch")
    from train.physics import LenslessOperator

    cam = open_camera("sim://?realtime=0&noise=0&photons=0&seed=2", support_bundle)
    assert cam.geometry == support_bundle.sim_geometry()
    op = LenslessOperator(psf, SENSOR, "crop", lam=LAM, scene_shape=SUPPORT, conv_shape=(256, 256))
    prep = Preprocessor(support_bundle.preprocess, support_bundle.root)
    cam.open()
    for _ in range(3):
        frame = cam.read()
        scene = cam.scene(frame.index)
        assert scene.shape == (3, *SUPPORT) and scene.std() > 0.05
        np.testing.assert_array_equal(frame.truth, scene)
        ref = op.A(torch.from_numpy(scene)[None])[0].numpy()
        # before quantisation: the same linear model (float32 FFTs on the 256² grid)
        np.testing.assert_allclose(cam.measurement(frame.index), ref, rtol=0, atol=2e-6)
        # after the 12-bit counts and preprocessing: within half a count
        assert 0.0 <= ref.min() and ref.max() < (cam.white_level - cam.black_level) / cam.gain
        assert np.abs(prep(frame.data) - ref).max() <= 0.5 / cam.gain + 1e-6
    cam.close()
    # = the scene zero-padded (centred) to the 128² reconstruction grid, through the same crop model
    op128 = LenslessOperator(psf, SENSOR, "crop", lam=LAM, scene_shape=SENSOR, conv_shape=(256, 256))
    padded = np.pad(scene, ((0, 0), (32, 32), (32, 32)))
    np.testing.assert_allclose(op128.A(torch.from_numpy(padded)[None])[0].numpy(), ref, rtol=0, atol=1e-6)


def test_compose_adds_the_truth_panel():
    y = np.random.default_rng(0).random((3, 128, 128)).astype(np.float32)
    two = compose(y, y[:, 32:96, 32:96], ["x"], height=64)
    three = compose(y, y[:, 32:96, 32:96], ["x"], height=64, truth=y[:, 32:96, 32:96])
    assert two.shape[1] == 2 * 64 + 4 and three.shape[1] == 3 * 64 + 2 * 4
    # below the labels, the truth panel shows what it was given (here the same image as the reconstruction)
    np.testing.assert_array_equal(three[24:64, 64 + 4 : 2 * 64 + 4], three[24:64, 2 * 64 + 8 :])


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory, psf):
    torch = pytest.importorskip("torch")
    from train.physics import LenslessOperator
    from train.students import build_student, make_config, save_student

    torch.manual_seed(0)
    op = LenslessOperator(psf, SENSOR, "circular", lam=LAM)
    cfg = make_config("edge", "nullspace", 3, op, architecture={"width": 4, "depth": 2, "max_width": 8, "blocks": 1},
                      support_shape=SUPPORT, training={"data": "test-made", "num_samples": 4, "steps": 0})
    student = build_student(cfg)
    root = tmp_path_factory.mktemp("student") / "student"
    save_student(root, student.net, cfg)
    (root / "loss.json").write_text(json.dumps({"step": [1, 2], "loss": [0.5, 0.25], "lr": [1e-4, 1e-4]}))
    return root


@pytest.fixture(scope="module")
def student_bundle(tmp_path_factory, tiny_student):
    pytest.importorskip("onnx")
    out = tmp_path_factory.mktemp("default") / "default_bundle"
    assert _script().main(["--student", str(tiny_student), "--out", str(out), "--frames", "2"]) == 0
    return load_bundle(out)


def test_default_bundle_with_a_student(student_bundle, tiny_student, psf):
    b = student_bundle
    assert set(b.models) == {"onnx_fp32"} and b.models["onnx_fp32"]["dft"] == "matmul"
    assert b.support_shape == SUPPORT and b.lam == LAM and b.channels == 3
    np.testing.assert_array_equal(b.psf, psf)
    cam = open_source("sim://?realtime=0", psf=psf, channels=3)
    assert vars(b.preprocess) == vars(PreprocessConfig(**cam.matching_preprocess()))
    p = b.provenance
    assert p["psf"]["kind"] == "contour" and p["psf"]["seed"] == 0 and p["psf"]["sha256"] == array_hash(psf)
    assert p["student"]["config"]["support_shape"] == list(SUPPORT)
    assert p["training_summary"]["final_loss"] == 0.25 and p["training_summary"]["parameters"] > 0
    assert "shared" not in json.dumps(p["psf"])
    size = sum(f.stat().st_size for f in b.root.iterdir())
    assert size < 3e6  # a few MB at most (this tiny student: well under one)

    import onnx

    from export.onnx_graph import read_spec

    model = onnx.load(str(b.model_path("onnx_fp32")))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1  # static batch 1
    spec = read_spec(b.model_path("onnx_fp32"))
    assert spec.support_shape == SUPPORT and spec.dft == "matmul" and spec.psf_sha256 == b.psf_sha256
    if importlib.util.find_spec("onnxruntime") is not None:
        assert set(p["sim_scores"]["psnr_db"]) == {"student", "wiener"}


def test_nsdd_edge_run_uses_the_student_and_shows_the_support(student_bundle, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    snap, stats, rec = tmp_path / "preview.png", tmp_path / "stats.json", tmp_path / "rec"
    assert edge_main(["run", "--model", str(student_bundle.root), "--frames", "3", "--quiet", "--snapshot", str(snap),
                      "--stats", str(stats), "--record", str(rec)]) == 0
    err = capsys.readouterr().err
    assert "ONNX Runtime" in err and "scene support (64, 64)" in err
    figures = json.loads(stats.read_text())
    assert figures["frames_out"] == 3 and figures["info"]["engine_kind"] == "onnx"
    img = cv2.imread(str(snap), cv2.IMREAD_COLOR)
    assert img.shape[1] == 3 * 256 + 2 * 4  # measurement | support crop of x̂ | sim ground truth
    meta = json.loads(min(rec.glob("0*.json")).read_text())
    assert np.load(rec / meta["recon"]["file"]).shape == (3, *SENSOR)  # the whole engine output, lossless
    assert cv2.imread(str(rec / meta["recon"]["view"])).shape[:2] == SUPPORT  # the view: the support crop
    assert meta["recon"]["view_shape"] == [3, *SUPPORT]


def test_without_onnxruntime_the_wiener_filter_runs_and_says_so(student_bundle, tmp_path, capsys, monkeypatch):
    from nsdd_edge import engines

    real = engines.module_available
    monkeypatch.setattr(engines, "module_available",
                        lambda name: (False, f"{name} is not installed") if name == "onnxruntime" else real(name))
    stats = tmp_path / "stats.json"
    assert edge_main(["run", "--model", str(student_bundle.root), "--frames", "2", "--quiet", "--snapshot", "",
                      "--stats", str(stats)]) == 0
    err = capsys.readouterr().err
    assert "fallback to the numpy Wiener filter" in err and "NOT used" in err and "nsdd-edge[onnxruntime]" in err
    assert json.loads(stats.read_text())["info"]["engine_kind"] == "wiener"


def test_script_refuses_a_student_of_another_psf_and_shared_files(tmp_path, tiny_student, capsys):
    script = _script()
    assert script.main(["--student", str(tiny_student), "--seed", "1", "--out", str(tmp_path / "b")]) == 2
    assert "trained for PSF" in capsys.readouterr().err
    shared_psf = script.SHARED / "data/psf/radial_6per_256.npy"
    assert script.main(["--student", str(tiny_student), "--psf", str(shared_psf), "--out", str(tmp_path / "b")]) == 2
    assert "must not go into a bundle" in capsys.readouterr().err
    assert script.main(["--student", str(tiny_student), "--max-mb", "0.1", "--frames", "0",
                        "--out", str(tmp_path / "b")]) == 2
    assert "--max-mb" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
