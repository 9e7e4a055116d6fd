"""``nsdd-train fit`` end to end at tiny scale: profile + faces + prior + captures → bundle, report, live run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_camera_profile import camera_files, profile_dir  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def tiny_prior_dir(tmp_path_factory):
    from train.prior.io import save_prior
    from train.prior.unet import UNet

    net = UNet(image_size=16, base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attention_resolutions=[],
               mid_attention=False, num_heads=1, dropout=0.0)
    return save_prior(net, tmp_path_factory.mktemp("prior") / "prior")


def test_fit_goes_from_a_profile_to_a_bundle_that_runs(profile_dir, camera_files, tiny_prior_dir, tmp_path,  # noqa: F811
                                                       shared):
    from nsdd_edge.bundle import load_bundle
    from nsdd_edge.cli import main as edge_main
    from train.cli import main as train_main

    root, _ = camera_files
    out = tmp_path / "fit"
    rc = train_main(["fit", "--profile", str(profile_dir[0]), "--images", str(shared / "data/faces/utkface"),
                     "--prior", str(tiny_prior_dir), "--captures", str(root / "captures"), "--out", str(out),
                     "--budget-minutes", "0.4", "--student", "edge", "--images-limit", "24", "--teacher-steps", "2",
                     "--threads", "1"])
    assert rc == 0
    record = json.loads((out / "fit.json").read_text())
    assert set(record["stages"]) == {"simulate", "teacher", "distill", "export", "heldout", "report"}
    assert all(v >= 0 for v in record["stages"].values())
    bundle = load_bundle(out / "bundle")
    assert bundle.geometry.model == "crop" and (out / "bundle" / "camera" / "camera.json").exists()
    assert bundle.preprocess.raw_crop is not None  # the profile's preprocessing, not a default
    report = (out / "report.md").read_text()
    assert "student" in report and (out / "report.png").exists()
    cons = record["details"]["report"]["consistency"]
    assert {"Wiener", "FISTA", "DDNM+ teacher", "student"} <= set(cons) and all(np.isfinite(v) for v in cons.values())
    # held-out simulated faces of the profile, scored against their ground truth; the gap to the teacher reported
    heldout = record["details"]["heldout"]
    assert heldout["images"] >= 2 and set(heldout["metrics"]) == {"Wiener", "DDNM+ teacher", "student"}
    assert all(np.isfinite(m["psnr"]) for m in heldout["metrics"].values())
    gap = heldout["metrics"]["student"]["psnr"] - heldout["metrics"]["DDNM+ teacher"]["psnr"]
    assert heldout["student_minus_teacher_psnr"] == pytest.approx(gap)
    assert "Held-out simulated faces" in report and "Student − teacher" not in report  # no LPIPS weights given
    # the bundle runs live on the captures folder through its own preprocessing
    assert edge_main(["run", "--model", str(out / "bundle"), "--source", f"file://{root / 'captures'}",
                      "--frames", "3", "--quiet", "--stats", str(tmp_path / "stats.json"),
                      "--record", str(tmp_path / "rec"),
                      "--snapshot", str(tmp_path / "snap.png")]) == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["frames_out"] == 3 and stats["rejected"] == 0


@pytest.mark.parametrize("per_image, budget, available, expected", [
    (10.0, 100.0, 32, 10),   # the budget decides
    (10.0, 1e4, 32, 32),     # never more than the test split
    (10.0, 5.0, 32, 2),      # at least two faces, even over budget
    (10.0, 5.0, 1, 1),       # a one-face test split
])
def test_heldout_images_follow_the_budget(per_image, budget, available, expected):
    from train.fit import heldout_images

    assert heldout_images(per_image, budget, available) == expected


def test_heldout_lines_state_whether_the_lpips_target_is_met():
    from train.fit import heldout_lines

    record = {"images": 4, "metrics": {"DDNM+ teacher": {"psnr": 25.0, "lpips": 0.05},
                                       "student": {"psnr": 24.0, "lpips": 0.08}},
              "student_minus_teacher_lpips": 0.03}
    text = "\n".join(heldout_lines(record))
    assert "| student | 24.00 | — | 0.0800 | — |" in text and "+0.0300" in text and "not met" in text
    record["student_minus_teacher_lpips"] = 0.01
    assert "(target ≤ 0.02: met)" in "\n".join(heldout_lines(record))
    assert heldout_lines(None) == []
