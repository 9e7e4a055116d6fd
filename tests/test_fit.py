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
    assert set(record["stages"]) == {"simulate", "teacher", "distill", "export", "report"}
    assert all(v >= 0 for v in record["stages"].values())
    bundle = load_bundle(out / "bundle")
    assert bundle.geometry.model == "crop" and (out / "bundle" / "camera" / "camera.json").exists()
    assert bundle.preprocess.raw_crop is not None  # the profile's preprocessing, not a default
    report = (out / "report.md").read_text()
    assert "student" in report and (out / "report.png").exists()
    cons = record["details"]["report"]["consistency"]
    assert set(cons) == {"Wiener", "FISTA", "DDNM+ teacher", "student"} and all(np.isfinite(v) for v in cons.values())
    # the bundle runs live on the captures folder through its own preprocessing
    assert edge_main(["run", "--model", str(out / "bundle"), "--source", f"file://{root / 'captures'}",
                      "--frames", "3", "--quiet", "--stats", str(tmp_path / "stats.json"),
                      "--record", str(tmp_path / "rec"),
                      "--snapshot", str(tmp_path / "snap.png")]) == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["frames_out"] == 3 and stats["rejected"] == 0
