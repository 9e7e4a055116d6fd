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
                                                       shared, capsys):
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

    # a second fit starts its student from the first one's and scores faces kept apart from --images
    unseen = tmp_path / "unseen"
    unseen.mkdir()
    for path in sorted((shared / "data/faces/utkface").iterdir())[-5:]:  # not among the first 24 simulated
        (unseen / path.name).symlink_to(path)
    out2 = tmp_path / "fit2"
    common = ["--profile", str(profile_dir[0]), "--images", str(shared / "data/faces/utkface"), "--prior",
              str(tiny_prior_dir), "--captures", str(root / "captures"), "--out", str(out2), "--budget-minutes", "0.4",
              "--student", "edge", "--images-limit", "24", "--teacher-steps", "2", "--threads", "1"]
    assert train_main(["fit", *common, "--init-student", str(out / "student"), "--heldout-images", str(unseen)]) == 0
    config = json.loads((out2 / "student" / "config.json").read_text())
    init = config["training"]["init_from"]
    # faces (16 px) smaller than the grid: the student fills a window τ wider than them on every side, so its
    # soft edge (the profile's taper) lies on the padding, and the loss is taken on that window
    taper, window = config["support_taper"], config["support_shape"]
    assert taper > 0 and window[0] == window[1] >= 16 + 2 * taper and window[0] < config["scene_shape"][0]
    assert config["training"]["loss_window"] == window
    assert init["dir"] == str((out / "student").resolve()) and len(init["weights_sha256"]) == 64
    heldout = json.loads((out2 / "fit.json").read_text())["details"]["heldout"]
    assert heldout["data"] == str(out2 / "heldout_data") and heldout["images"] >= 2
    meta = json.loads((out2 / "heldout_data" / "dataset.json").read_text())
    assert len(meta["splits"]["test"]) == 5 and not meta["splits"]["train"]
    assert set(meta["sources"].values()) == {p.name for p in unseen.iterdir()}
    assert f"The test split of `{out2 / 'heldout_data'}`" in (out2 / "report.md").read_text()

    # a student trained for this fit elsewhere (here: a copy of its own) takes the distill stage's place; the
    # fit's own moves aside, held-out and report are redone; another camera's student is refused by name and
    # leaves the fit's student as it was; the same command again, or a plain rerun, keeps the adopted one
    longer = tmp_path / "longer"
    longer.mkdir()
    for f in (out2 / "student").iterdir():
        if f.is_file():
            (longer / f.name).write_bytes(f.read_bytes())
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for f in longer.iterdir():
        (foreign / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((foreign / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps({**cfg, "psf_sha256": "0" * 64}))
    own = (out2 / "student" / "model.safetensors").read_bytes()
    scored = out2 / "heldout_unseen" / "metrics.json"
    before = scored.stat().st_mtime_ns
    capsys.readouterr()
    assert train_main(["fit", *common, "--use-student", str(foreign), "--heldout-images", str(unseen)]) == 2
    assert "not a student of this fit's data: psf_sha256" in capsys.readouterr().err
    assert (out2 / "student" / "model.safetensors").read_bytes() == own and not (out2 / "student.previous-1").exists()
    assert train_main(["fit", *common, "--use-student", str(out2 / "student"), "--init-student", str(longer)]) == 2
    assert "give one" in capsys.readouterr().err
    assert train_main(["fit", *common, "--use-student", str(longer), "--heldout-images", str(unseen)]) == 0
    record = json.loads((out2 / "fit.json").read_text())
    distill = record["details"]["distill"]
    assert distill["adopted_from"] == str(longer.resolve()) and len(distill["weights_sha256"]) == 64
    assert distill["replaced"]["steps"] > 0  # the fit's own student's record is kept
    assert (out2 / "student.previous-1" / "config.json").exists() and not (out2 / "student" / "checkpoint.pt").exists()
    assert (out2 / "student" / "model.safetensors").read_bytes() == (longer / "model.safetensors").read_bytes()
    assert scored.stat().st_mtime_ns > before  # scored again, with the adopted student
    scored_after = scored.stat().st_mtime_ns
    for again in (["--use-student", str(longer)], []):  # the same command, then a plain rerun
        assert train_main(["fit", *common, *again, "--heldout-images", str(unseen)]) == 0
        assert not (out2 / "student.previous-2").exists() and scored.stat().st_mtime_ns == scored_after
        assert json.loads((out2 / "fit.json").read_text())["details"]["distill"] == distill


def test_fit_refuses_a_wrong_start_or_held_out_folder_before_any_work(profile_dir, camera_files, tiny_prior_dir,  # noqa: F811
                                                                       tmp_path, shared, capsys):
    from train.cli import main as train_main

    root, _ = camera_files
    common = ["--profile", str(profile_dir[0]), "--images", str(shared / "data/faces/utkface"), "--prior",
              str(tiny_prior_dir), "--captures", str(root / "captures"), "--out", str(tmp_path / "fit"),
              "--threads", "1"]
    assert train_main(["fit", *common, "--init-student", str(tmp_path)]) == 2
    assert "--init-student" in capsys.readouterr().err
    other = tmp_path / "other_student"  # an edge student with another network than fit's
    other.mkdir()
    (other / "config.json").write_text(json.dumps({
        "format": "nsdd-student", "kind": "edge", "objective": "nullspace", "channels": 3, "scene_shape": [32, 32],
        "psf_sha256": "0" * 64, "geometry": {}, "lam": 1e-3,
        "architecture": {"width": 32, "depth": 4, "max_width": 192, "blocks": 2, "activation": "silu",
                         "skip_input": False}}))
    assert train_main(["fit", *common, "--student", "edge", "--init-student", str(other)]) == 2
    err = capsys.readouterr().err
    assert "--init-student" in err and "architecture" in err
    from train.fit import student_architecture

    cfg = json.loads((other / "config.json").read_text())  # fit's network, but 2 channels: RGB and gray fold, 2 not
    (other / "config.json").write_text(json.dumps({**cfg, "channels": 2,
                                                   "architecture": student_architecture("edge")}))
    assert train_main(["fit", *common, "--student", "edge", "--init-student", str(other)]) == 2
    err = capsys.readouterr().err
    assert "channels 2" in err and "multiple of the other" in err
    (tmp_path / "empty").mkdir()
    assert train_main(["fit", *common, "--heldout-images", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "--heldout-images" in err and "no image files" in err
    assert not (tmp_path / "fit" / "data").exists()


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


@pytest.fixture(scope="module")
def mono_camera(camera_files, tmp_path_factory):  # noqa: F811
    """The test camera as a monochrome one: each capture's channel mean as a 2-D frame, profiled (1 channel)."""
    from nsdd_edge.profile_estimate import profile_from_captures

    root, _ = camera_files
    mono = tmp_path_factory.mktemp("mono")
    (mono / "captures").mkdir()
    for path in sorted((root / "captures").glob("*.npy")):
        np.save(mono / "captures" / path.name, np.load(path).mean(axis=-1).astype(np.float32))
    profile, _ = profile_from_captures(root / "psf.tiff", mono / "captures", sensor=32, name="mono-cam")
    profile.save(mono / "profile")
    return mono


def test_fit_on_a_mono_camera_simulates_gray_scenes_and_refuses_an_rgb_prior(mono_camera, tiny_prior_dir, tmp_path,
                                                                             shared, capsys):
    from nsdd_edge.bundle import load_bundle
    from nsdd_edge.camera import load_profile
    from nsdd_edge.cli import main as edge_main
    from train.cli import main as train_main
    from train.prior.io import save_prior
    from train.prior.unet import UNet

    assert load_profile(mono_camera / "profile").channels == 1
    common = ["--profile", str(mono_camera / "profile"), "--images", str(shared / "data/faces/utkface"),
              "--captures", str(mono_camera / "captures"), "--budget-minutes", "0.4", "--student", "edge",
              "--images-limit", "24", "--teacher-steps", "2", "--threads", "1"]
    assert train_main(["fit", *common, "--prior", str(tiny_prior_dir), "--out", str(tmp_path / "rgb")]) == 2
    assert "generates 3-channel scenes, the camera measures 1 channel(s)" in capsys.readouterr().err
    gray = save_prior(UNet(in_channels=1, out_channels=1, image_size=16, base_channels=8, channel_mults=[1, 2],
                           num_res_blocks=1, attention_resolutions=[], mid_attention=False, num_heads=1,
                           dropout=0.0), tmp_path / "gray_prior")
    out = tmp_path / "fit"
    assert train_main(["fit", *common, "--prior", str(gray), "--out", str(out)]) == 0
    meta = json.loads((out / "data" / "dataset.json").read_text())
    assert meta["channels"] == 1 and meta["ground_truth_shape"][0] == 1  # gray scenes for a mono camera
    assert load_bundle(out / "bundle").channels == 1
    assert np.isfinite(list(json.loads((out / "fit.json").read_text())["details"]["report"]["consistency"]
                            .values())).all()
    assert edge_main(["run", "--model", str(out / "bundle"), "--source", f"file://{mono_camera / 'captures'}",
                      "--frames", "3", "--quiet", "--stats", str(tmp_path / "stats.json")]) == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["frames_out"] == 3 and stats["rejected"] == 0


def test_fit_names_a_profile_that_does_not_record_its_channels(mono_camera, tiny_prior_dir, tmp_path, shared, capsys):
    import shutil

    from train.cli import main as train_main

    legacy = tmp_path / "legacy"
    shutil.copytree(mono_camera / "profile", legacy)
    config = json.loads((legacy / "camera.json").read_text())
    del config["signal"]["channels"]  # as calibrate wrote profiles before it recorded them
    (legacy / "camera.json").write_text(json.dumps(config))
    assert train_main(["fit", "--profile", str(legacy), "--images", str(shared / "data/faces/utkface"),
                       "--prior", str(tiny_prior_dir), "--captures", str(mono_camera / "captures"),
                       "--out", str(tmp_path / "fit"), "--threads", "1"]) == 2
    assert "does not record its captures' channels" in capsys.readouterr().err


def test_report_tiles_clip_the_profiles_window_to_a_smaller_grid():
    from train.fit import report_tile

    x = np.zeros((1, 300, 300), np.float32)
    x[:, 120:180, 120:180] = 1.0  # a bright square in the middle of the student's 300² grid
    tile = report_tile(x, (304, 304)).astype(np.float32)  # the profile's window is larger than that grid
    tile = tile if tile.ndim == 2 else tile.mean(axis=-1)
    assert tile.shape == (160, 160)
    assert tile[70:90, 70:90].mean() > 200 and tile[:40, :40].mean() < 20  # the square, centred, on black
    same = report_tile(np.pad(x, ((0, 0), (5, 5), (5, 5))), (300, 300)).astype(np.float32)  # a window inside the grid
    assert np.abs(same.reshape(tile.shape[0], tile.shape[1], -1).mean(-1) - tile).max() < 1.0


def test_fit_resumes_an_older_distillation_with_its_whole_grid_loss(tmp_path):
    import torch

    from train.fit import fit_loss_window

    assert fit_loss_window(tmp_path) == "auto"  # nothing to resume
    torch.save({"signature": {"lr": 2e-4}}, tmp_path / "checkpoint.pt")  # written before --loss-window existed
    assert fit_loss_window(tmp_path) == "grid"
    torch.save({"signature": {"lr": 2e-4, "loss_window": "support"}}, tmp_path / "checkpoint.pt")
    assert fit_loss_window(tmp_path) == "auto"


def test_fit_checks_a_paper_students_diffusion_unet_against_the_prior_up_to_its_channels(tmp_path):
    """--init-student with a paper student: its UNet must be --prior's architecture; only the channel counts
    (which the fold changes, RGB ↔ gray) may differ."""
    from types import SimpleNamespace

    from train.fit import FitError, check_starts, student_architecture

    unet = {"base_channels": 64, "channel_mults": [1, 2, 2], "image_size": 64, "in_channels": 3, "out_channels": 3,
            "num_res_blocks": 2}
    student = tmp_path / "student"
    student.mkdir()

    def write(architecture: dict, channels: int = 3) -> None:
        (student / "config.json").write_text(json.dumps({
            "format": "nsdd-student", "kind": "paper", "objective": "nullspace", "channels": channels,
            "scene_shape": [64, 64], "psf_sha256": "0" * 64, "geometry": {}, "lam": 1e-3,
            "architecture": student_architecture("paper"), "prior": {"config": {"architecture": architecture}}}))

    args = SimpleNamespace(heldout_images=None, init_student=student, student="paper", prior="PRIOR")
    gray_prior = SimpleNamespace(config={"architecture": {**unet, "in_channels": 1, "out_channels": 1}})
    write(unet)
    check_starts(args, 1, gray_prior)  # an RGB student of the same UNet starts a gray camera
    write({**unet, "base_channels": 32})
    with pytest.raises(FitError, match="its diffusion UNet is not --prior PRIOR's"):
        check_starts(args, 1, gray_prior)
