"""``nsdd-train solve`` on datasets and real captures: outputs, consistency, resuming, any registered solver."""

from __future__ import annotations

import json
import sys
import types

import cv2
import numpy as np
import pytest
import torch

from nsdd_edge.psf_sim import simulate_psf
from train.cli import main as train_main
from train.data import LenslessDataset
from train.physics import LenslessOperator
from train.solve import parse_settings, to_png8
from train.solvers import SOLVERS, Solver


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A 5-image simulated dataset: scene 16, sensor 32 (contour PSF), recon circular λ=1e-4."""
    root = tmp_path_factory.mktemp("solve")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for k in range(5):
        img = np.zeros((24, 24, 3), np.uint8)
        r, c = rng.integers(0, 12, 2)
        img[r : r + 10, c : c + 10] = rng.integers(80, 256, 3)
        cv2.imwrite(str(images / f"img{k}.png"), img)
    np.save(root / "psf.npy", simulate_psf("contour", (32, 32), seed=2))
    out = root / "ds"
    assert train_main(["simulate", "--images", str(images), "--psf", str(root / "psf.npy"), "--size", "16",
                       "--lam", "1e-4", "--n-test", "3", "--out", str(out)]) == 0
    return out


def solve(*argv) -> int:
    return train_main(["solve", *map(str, argv)])


def test_wiener_and_admm_on_a_dataset(dataset, tmp_path, capsys):
    ds = LenslessDataset(dataset)
    ids = ds.ids("test")
    for method, extra in (("wiener", []), ("admm", ["--set", "iters=30", "--set", "tau=1e-4"])):
        out = tmp_path / method
        assert solve("--method", method, *extra, "--data", dataset, "--out", out) == 0
        printed = capsys.readouterr().out
        record = json.loads((out / "recon.json").read_text())
        assert record["method"] == method and list(record["images"]) == ids
        if method == "admm":
            assert record["settings"]["iters"] == 30 and record["settings"]["tau"] == 1e-4
        op = ds.physics()
        for i in ids:
            x = np.load(out / f"{i}.npy")
            assert x.dtype == np.float32 and x.shape == (3, 32, 32)
            png = cv2.imread(str(out / f"{i}.png"), cv2.IMREAD_UNCHANGED)
            assert png.dtype == np.uint8 and png.shape == (32, 32, 3)
            np.testing.assert_array_equal(png[..., ::-1], to_png8(x))
            c = float(op.consistency(torch.from_numpy(x)[None], ds.measurements([i]))[0])
            assert record["images"][i]["consistency"] == pytest.approx(c, rel=1e-4)
            assert record["images"][i]["seconds"] >= 0
            assert f"{i}\tconsistency" in printed
        assert record["physics"]["model"] == "circular" and record["physics"]["lam"] == 1e-4


def test_resume_refuse_overwrite_limit_split(dataset, tmp_path, capsys):
    out = tmp_path / "r"
    assert solve("--method", "wiener", "--data", dataset, "--limit", 2, "--out", out) == 0
    first = sorted(p.name for p in out.glob("*.npy"))
    assert len(first) == 2
    stamp = {n: (out / n).stat().st_mtime_ns for n in first}
    assert solve("--method", "wiener", "--data", dataset, "--out", out) == 0
    assert "resuming: 2 of 3 already" in capsys.readouterr().out
    assert all((out / n).stat().st_mtime_ns == t for n, t in stamp.items())  # kept, not recomputed
    assert len(list(out.glob("*.npy"))) == 3
    # other settings into the same directory: refused, nothing overwritten
    assert solve("--method", "wiener", "--set", "clip=true", "--data", dataset, "--out", out) == 2
    assert "use another --out or --overwrite" in capsys.readouterr().err
    assert solve("--method", "wiener", "--set", "clip=true", "--overwrite", "--data", dataset, "--out", out) == 0
    assert json.loads((out / "recon.json").read_text())["settings"]["clip"] is True
    all_out = tmp_path / "all"
    assert solve("--method", "wiener", "--data", dataset, "--split", "all", "--out", all_out) == 0
    assert len(list(all_out.glob("*.png"))) == 5
    assert solve("--method", "wiener", "--data", dataset, "--split", "val", "--out", tmp_path / "v") == 2
    assert "no split 'val'" in capsys.readouterr().err


def test_any_registered_solver_and_prior_plumbing(dataset, tmp_path, monkeypatch):
    """A method registered later (ddnm, student, ...) is built by name with --set and --prior."""
    seen = {}

    class HalfAdjoint(Solver):
        def __init__(self, scale: float = 0.5, prior=None):
            self.scale = scale
            seen["prior"] = prior

        def __call__(self, y, physics):
            return self.scale * physics.A_adjoint(y)

    SOLVERS["_test_half_adjoint"] = HalfAdjoint
    fake_io = types.ModuleType("train.prior.io")
    fake_io.load_prior = lambda path: ("prior loaded from", str(path))
    monkeypatch.setitem(sys.modules, "train.prior.io", fake_io)
    try:
        out = tmp_path / "h"
        assert solve("--method", "_test_half_adjoint", "--set", "scale=0.25", "--prior", tmp_path / "p",
                      "--data", dataset, "--limit", 1, "--out", out) == 0
    finally:
        del SOLVERS["_test_half_adjoint"]
    assert seen["prior"] == ("prior loaded from", str(tmp_path / "p"))
    record = json.loads((out / "recon.json").read_text())
    assert record["settings"]["scale"] == 0.25 and record["prior"] == str(tmp_path / "p")
    ds = LenslessDataset(dataset)
    i = ds.ids("test")[0]
    expected = 0.25 * ds.physics().A_adjoint(ds.measurements([i]))[0].numpy()
    np.testing.assert_allclose(np.load(out / f"{i}.npy"), expected, rtol=1e-6)


def test_refuses_to_write_into_a_foreign_directory(dataset, tmp_path, capsys):
    """--out pointing at the dataset's own measurements must not overwrite them."""
    target = dataset / "measurements"
    before = {p.name: p.read_bytes() for p in target.glob("*.npy")}
    assert solve("--method", "wiener", "--data", dataset, "--out", target) == 2
    assert "not empty and holds no recon.json" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in target.glob("*.npy")} == before


def test_bad_method_and_settings(dataset, tmp_path, capsys):
    assert solve("--method", "nope", "--data", dataset, "--out", tmp_path / "x") == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert solve("--method", "admm", "--set", "bogus=1", "--data", dataset, "--out", tmp_path / "x") == 2
    assert "bogus" in capsys.readouterr().err
    assert parse_settings(["a=1", "b=1e-4", "c=true", "d=fast", "e=[1, 2]", "f=none"]) == {
        "a": 1, "b": 1e-4, "c": True, "d": "fast", "e": [1, 2], "f": None}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_settings(["iters"])


def test_synthetic_capture(tmp_path, capsys):
    """A raw 16-bit capture with a dark level goes through the PSF's preprocessing; crop model 2× grid."""
    psf = simulate_psf("caustic", (64, 64), seed=3)
    scene = np.zeros((1, 1, 128, 128), np.float32)
    scene[..., 50:80, 40:90] = 1.0
    op = LenslessOperator(psf, (64, 64), "crop")
    y = op.A(torch.from_numpy(scene))[0, 0].numpy()
    dark = 200.0
    cv2.imwrite(str(tmp_path / "psf.png"), np.round(dark + 60000 * psf[0] / psf.max()).astype(np.uint16))
    cv2.imwrite(str(tmp_path / "cap.tif"), np.round(dark + 30000 * y / y.max()).astype(np.uint16))
    np.save(tmp_path / "dark.npy", np.full((64, 64), dark, np.float32))
    out = tmp_path / "cap"
    assert solve("--method", "admm", "--set", "iters=60", "--capture", tmp_path / "cap.tif", "--psf",
                  tmp_path / "psf.png", "--dark", tmp_path / "dark.npy", "--downsample", 2, "--out", out) == 0
    x = np.load(out / "cap.npy")
    assert x.shape == (1, 64, 64)  # scene = conv = 2× the 32×32 sensor
    png = cv2.imread(str(out / "cap.png"), cv2.IMREAD_UNCHANGED)
    assert png.shape == (64, 64) and png.max() == 255  # normalised by its max
    record = json.loads((out / "recon.json").read_text())
    assert record["images"]["cap"]["consistency"] < 0.05
    assert record["source"]["downsample"] == 2 and record["physics"]["conv_shape"] == [64, 64]
    # the rectangle is where it should be: the brightest region of the reconstruction
    inside = x[0, 25:40, 20:45].mean()
    assert inside > 3 * x[0, :15].mean()
    # errors name the argument
    assert solve("--method", "wiener", "--capture", tmp_path / "cap.tif", "--out", out) == 2
    assert "--capture needs --psf" in capsys.readouterr().err
    np.save(tmp_path / "small.npy", np.random.default_rng(0).random((40, 40), np.float32))
    assert solve("--method", "wiener", "--capture", tmp_path / "small.npy", "--psf", tmp_path / "psf.png",
                 "--out", tmp_path / "o") == 2
    assert "differs from --psf" in capsys.readouterr().err
    np.save(tmp_path / "flat.npy", np.full((64, 64), 9.0, np.float32))
    assert solve("--method", "wiener", "--capture", tmp_path / "flat.npy", "--psf", tmp_path / "psf.png",
                 "--out", tmp_path / "o") == 2
    assert "the capture is all zero after background subtraction (corner)" in capsys.readouterr().err
    assert solve("--method", "wiener", "--capture", tmp_path / "cap.tif", "--psf", tmp_path / "nope.png",
                 "--out", tmp_path / "o") == 2
    assert "--psf " in (err := capsys.readouterr().err) and "nope.png: no such file" in err


def test_diffusercam_admm_more_consistent_than_wiener(shared, tmp_path, capsys):
    """Real DiffuserCam capture, crop model, ×8: ADMM fits the measurement better than Wiener."""
    d = shared / "data/lensless/diffusercam"
    cons = {}
    for method in ("wiener", "admm"):
        out = tmp_path / method
        assert solve("--method", method, "--capture", d / "rawdata_hand_sample.tif", "--psf", d / "psf_sample.tif",
                     "--downsample", 8, "--out", out) == 0
        record = json.loads((out / "recon.json").read_text())
        cons[method] = record["images"]["rawdata_hand_sample"]["consistency"]
        assert np.load(out / "rawdata_hand_sample.npy").shape == (1, 300, 400)
        assert record["physics"]["model"] == "crop" and record["physics"]["lam"] == 1e-4
    print(f"\nDiffuserCam ×8 consistency: Wiener {cons['wiener']:.5f}, ADMM {cons['admm']:.5f}")
    assert cons["admm"] < cons["wiener"]


def test_diffusercam_capture_through_a_student(shared, tmp_path, capsys):
    """``--method student:DIR`` on the real hand capture at ×16: the capture gets the PSF's preprocessing
    (corner background, ×16 → 75×100), the operator is the student's own (circular at sensor size, its λ),
    the monochrome capture feeds every channel of an RGB student; a PSF with other preprocessing is refused."""
    from nsdd_edge.optics import load_psf
    from train.students import build_student, make_config, save_student

    d = shared / "data/lensless/diffusercam"
    psf = load_psf(d / "psf_sample.tif", background="corner", downsample=16)  # as simulate --psf-background corner
    op = LenslessOperator(psf, (75, 100), "circular", lam=1e-3)
    cfg = make_config("edge", "nullspace", 3, op, {"width": 4, "depth": 3, "max_width": 8, "blocks": 1},
                      support_shape=(64, 64))
    torch.manual_seed(0)
    student_dir = save_student(tmp_path / "student", build_student(cfg).net, cfg)
    args = ("--capture", d / "rawdata_hand_sample.tif", "--psf", d / "psf_sample.tif", "--downsample", 16)
    out = tmp_path / "hand"
    assert solve("--method", f"student:{student_dir}", *args, "--out", out) == 0
    x = np.load(out / "rawdata_hand_sample.npy")
    assert x.shape == (3, 75, 100) and np.isfinite(x).all()
    record = json.loads((out / "recon.json").read_text())
    assert record["physics"] == {"model": "circular", "sensor_shape": [75, 100], "scene_shape": [75, 100],
                                 "conv_shape": [75, 100], "lam": 1e-3}
    assert record["source"]["capture_channels_repeated"] == 3 and record["images"]["rawdata_hand_sample"]["nfe"] == 1
    # null-space student: its residual is (up to λ) the Wiener residual at the student's λ, whatever g does
    assert solve("--method", "wiener", "--model", "circular", "--lam", 1e-3, *args, "--out", tmp_path / "w") == 0
    wiener = json.loads((tmp_path / "w" / "recon.json").read_text())["images"]["rawdata_hand_sample"]["consistency"]
    assert record["images"]["rawdata_hand_sample"]["consistency"] == pytest.approx(wiener, rel=0.2)
    capsys.readouterr()
    assert solve("--method", f"student:{student_dir}", *args, "--background", "none", "--out", tmp_path / "x") == 2
    assert "trained for PSF sha256" in capsys.readouterr().err
    assert solve("--method", f"student:{student_dir}", *args, "--model", "crop", "--out", tmp_path / "y") == 2
    assert "trained for geometry" in capsys.readouterr().err
