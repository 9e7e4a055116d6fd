"""``nsdd-train robustness`` (issue 18): the PSF-mismatch study at tiny size — a data set simulated in the test, a
tiny random prior and students, two levels of two kinds, two faces."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_students import SMALL_EDGE, blur_psf

from nsdd_edge.psf_warp import PsfWarp, psf_with_snr, warp_psf
from train.cli import main as train_cli
from train.data import LenslessDataset
from train.robustness import (
    Perturbation,
    RobustnessError,
    load_faces,
    parse_level_options,
    simulate_measurements,
    true_forward,
)

SENSOR, SCENE = 48, 32


@pytest.fixture(scope="module")
def study_inputs(tmp_path_factory, shared) -> dict:
    """A simulated data set (circular model, σ = 0.01), a tiny DDNM+ prior and null-space / full edge students."""
    from train.prior.io import save_prior
    from train.prior.unet import UNet
    from train.students import build_student, make_config, save_student

    root = tmp_path_factory.mktemp("robustness")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for k in range(4):  # smooth colour blobs
        img = cv2.resize(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), (40, 40), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(images / f"face{k}.png"), img)
    psf = blur_psf(SENSOR, sigma=1.5)
    np.save(root / "psf.npy", psf)
    data = root / "data"
    assert train_cli(["simulate", "--images", str(images), "--psf", str(root / "psf.npy"), "--size", str(SCENE),
                      "--noise-std", "0.01", "--n-test", "2", "--model", "circular", "--threads", "1", "--out", str(data)]) == 0
    ds = LenslessDataset(data)
    net = UNet(image_size=SCENE, base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attention_resolutions=[],
               mid_attention=False, num_heads=1, dropout=0.0)
    torch.manual_seed(0)
    prior = save_prior(net, root / "prior")
    students = {}
    for objective in ("nullspace", "full"):
        cfg = make_config("edge", objective, 3, ds.physics(), SMALL_EDGE, support_shape=(SCENE, SCENE))
        students[objective] = save_student(root / objective, build_student(cfg).net, cfg)
    return {"data": data, "prior": prior, "students": students,
            "lpips": str(shared / "weights/lpips/lpips_alex_full_v0.1.pth")}


def study_args(inputs: dict, out: Path, *extra: str) -> list[str]:
    s = inputs["students"]
    return ["robustness", "--data", str(inputs["data"]), "--prior", str(inputs["prior"]),
            "--methods", f"wiener,ddnm,student:{s['nullspace']},student:{s['full']}",
            "--names", "wiener,ddnm,null-space,full", "--diffusion-steps", "2", "--kinds", "scale,shift",
            "--levels", "scale=1,1.1", "--levels", "shift=0,2", "--limit", "2", "--batch-size", "2",
            "--lpips-weights", inputs["lpips"], "--threads", "1", "--out", str(out), *extra]


def test_study_runs_resumes_and_matches_an_unperturbed_evaluation(study_inputs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "study"
    assert train_cli(study_args(study_inputs, out)) == 0
    assert "12 cells computed, 0 resumed" in capsys.readouterr().out  # 4 methods × {none, scale 1.1, shift 2}
    for name in ("results.json", "results.csv", "table.md", "robustness_psnr.png", "robustness_lpips.png",
                 "robustness_consistency.png", "grid.png"):
        assert (out / name).exists(), name
    for png in ("robustness_psnr.png", "grid.png"):
        img = cv2.imread(str(out / png))
        assert img is not None and img.shape[1] > img.shape[0] > 100, png
    res = json.loads((out / "results.json").read_text())
    assert res["levels"] == {"scale": ["1", "1.1"], "shift": ["0", "2"]} and res["n"] == 2
    r = res["results"]
    methods = ["wiener", "ddnm", "null-space", "full"]
    for kind, identity, other in (("scale", "1", "1.1"), ("shift", "0", "2")):
        for m in methods:
            assert r[kind][identity][m] == r["scale"]["1"][m]  # one no-mismatch cell for every kind
            for key in ("psnr", "ssim", "lpips", "consistency", "consistency_calibrated"):
                assert math.isfinite(r[kind][other][m][key]), (kind, m, key)
            no_mismatch = r[kind][identity][m]
            assert no_mismatch["consistency_calibrated"] == pytest.approx(no_mismatch["consistency"], rel=1e-6)
        # Wiener fits y with the calibrated PSF: under the true model a mismatched PSF leaves a larger residual
        assert r[kind][other]["wiener"]["consistency"] > 1.2 * r[kind][identity]["wiener"]["consistency"], kind
        floor = res["reference"][kind]
        assert floor[identity] == pytest.approx(floor[other], rel=0.2)  # the noise floor does not move
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert csv_rows[0].startswith("kind,level,method,psnr") and len(csv_rows) == 1 + 4 * len(methods)
    assert "| null-space |" in (out / "table.md").read_text()

    # the no-mismatch cell is nsdd-train evaluate on the data set's own measurements, number for number
    ev = tmp_path / "eval"
    s = study_inputs["students"]
    assert train_cli(["evaluate", "--data", str(study_inputs["data"]), "--prior", str(study_inputs["prior"]),
                      "--methods", f"wiener,ddnm,student:{s['nullspace']},student:{s['full']}",
                      "--names", ",".join(methods), "--set", "ddnm.steps=2", "--limit", "2", "--threads", "1",
                      "--lpips-weights", study_inputs["lpips"], "--no-save-recon", "--out", str(ev)]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    for m in methods:
        for key in ("psnr", "ssim", "lpips", "consistency"):
            assert r["scale"]["1"][m][key] == pytest.approx(metrics[m][key], rel=1e-4, abs=1e-6), (m, key)

    # a rerun does no work: every cell is read back, no method is even built
    def refuse(*a, **k):
        raise AssertionError("a resumed study built a method")

    monkeypatch.setattr("train.robustness.build_method", refuse)
    capsys.readouterr()
    assert train_cli(study_args(study_inputs, out)) == 0
    assert "0 cells computed, 12 resumed" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["results"] == r


def test_cells_of_another_study_are_refused_by_name(study_inputs, tmp_path, capsys):
    out = tmp_path / "study"
    base = study_args(study_inputs, out)
    base[base.index("--methods") + 1] = "wiener"
    base[base.index("--names") + 1] = "wiener"
    assert train_cli(base) == 0
    capsys.readouterr()
    assert train_cli([*base, "--set", "wiener.lam=0.1"]) == 2
    err = capsys.readouterr().err
    assert "nsdd-train robustness: error:" in err and "cells/wiener/none.json" in err and "--overwrite" in err
    assert train_cli([*base, "--set", "wiener.lam=0.1", "--overwrite"]) == 0


def test_identity_reproduces_the_data_sets_measurements_and_perturbations_follow_psf_warp(study_inputs):
    ds = LenslessDataset(study_inputs["data"])
    faces = load_faces(ds, "test", 0, 2)
    y = simulate_measurements(true_forward(ds, Perturbation("shift", 0).true_psf(ds.psf, 0)), faces)
    assert torch.equal(y, ds.measurements(faces.ids))
    np.testing.assert_array_equal(Perturbation("shift", 2).true_psf(ds.psf, 0),
                                  warp_psf(ds.psf, PsfWarp(shift=(0.0, 2.0))))
    np.testing.assert_array_equal(Perturbation("rotation", 3).true_psf(ds.psf, 0),
                                  warp_psf(ds.psf, PsfWarp(rotation_deg=3.0)))
    np.testing.assert_array_equal(Perturbation("psf_snr", 10).true_psf(ds.psf, 5),
                                  psf_with_snr(ds.psf, 10, np.random.default_rng(5)))
    assert Perturbation("psf_snr", math.inf).is_identity and Perturbation("psf_snr", math.inf).label == "none"
    y_scaled = simulate_measurements(true_forward(ds, Perturbation("scale", 1.25).true_psf(ds.psf, 0)), faces)
    assert not torch.allclose(y_scaled, y, atol=1e-3)


@pytest.mark.parametrize("kind, level, match", [
    ("zoom", 1.0, "unknown perturbation kind 'zoom'"),
    ("scale", 0.0, "scale level 0: must be > 0"),
    ("shift", math.inf, "shift level inf: must be a finite number"),
    ("rotation", math.nan, "must be a finite number"),
    ("psf_snr", -math.inf, "or inf"),
])
def test_bad_kind_or_level_is_a_named_error(kind, level, match):
    with pytest.raises(RobustnessError, match=match):
        Perturbation(kind, level)
    assert issubclass(RobustnessError, ValueError)


def test_bad_options_end_in_one_line(study_inputs, tmp_path, capsys):
    with pytest.raises(RobustnessError, match="kind 'rotation' is not among --kinds"):
        parse_level_options(["rotation=1,2"], ["scale"])
    assert parse_level_options(["psf_snr=inf,0"], ["psf_snr"]) == {"psf_snr": (math.inf, 0.0)}
    for extra, message in ((["--levels", "scale=big"], "--levels 'scale=big': levels must be numbers"),
                           (["--kinds", "scale,zoom"], "unknown perturbation kind 'zoom'"),
                           (["--grid", "scale"], "--grid 'scale': expected KIND=LEVEL"),
                           (["--levels", "shift=-inf"], "shift level -inf")):
        assert train_cli(study_args(study_inputs, tmp_path / "bad", *extra)) == 2, extra  # the last --kinds wins
        err = capsys.readouterr().err
        assert err.startswith("nsdd-train robustness: error:") and message in err and "Traceback" not in err, err
    assert not (tmp_path / "bad").exists()
