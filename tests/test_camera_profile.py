"""Camera profiles (issue 12): estimation from files, the one raw → y path, exposure, bad profiles, solve --capture."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch

from nsdd_edge.camera import (
    CameraProfile,
    NoiseModel,
    ProfileError,
    load_profile,
    locate_psf_center,
    noise_std_immerkaer,
    support_mask,
)
from nsdd_edge.optics import array_hash, load_psf
from nsdd_edge.preprocess import Preprocessor, exposure_from_name

H, W = 180, 240  # raw frames


def radial_pattern(center: tuple[float, float], shape=(H, W), spokes: int = 12) -> np.ndarray:
    """A point-symmetric spoke pattern (a radial mask's PSF) centred at ``center``, larger than the frame."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    theta = np.arctan2(yy - center[0], xx - center[1])
    return (np.cos(spokes * theta) > 0.3).astype(np.float64) * 200 + 5


def scene_capture(psf_img: np.ndarray, center, scale: float, rng, noise: float = 1.0) -> np.ndarray:
    """A capture: a blob scene convolved with the (cut) pattern, in 8-bit-like counts, RGB (H, W, 3)."""
    blob = np.zeros((H, W))
    r, c = int(center[0]), int(center[1])
    blob[r - 6 : r + 6, c - 9 : c + 9] = 1.0
    k = psf_img[r - 20 : r + 20, c - 20 : c + 20]
    img = cv2.filter2D(blob, -1, k / k.sum()) * scale
    img = np.stack([img, 0.8 * img, 0.6 * img], axis=-1) + noise * rng.standard_normal((H, W, 3))
    return np.clip(img, 0, 255)


@pytest.fixture(scope="module")
def camera_files(tmp_path_factory):
    """An off-centre radial PSF image and captures of one scene at 15 ms and 2 ms (+ a second scene)."""
    root = tmp_path_factory.mktemp("cam")
    center = (84.0, 131.0)
    psf_img = radial_pattern(center)
    cv2.imwrite(str(root / "psf.tiff"), np.clip(psf_img, 0, 255).astype(np.uint8))
    caps = root / "captures"
    caps.mkdir()
    rng = np.random.default_rng(0)
    bright = scene_capture(psf_img, center, 180.0, rng, noise=0.0)
    for name, exposure in (("face_15000us", 15000), ("face_2000us", 2000)):
        img = bright * exposure / 15000 + rng.standard_normal(bright.shape) * 0.5
        np.save(caps / f"{name}.npy", img.astype(np.float32))  # float counts: no 8-bit quantisation of the dim one
    np.save(caps / "other_15000us.npy", scene_capture(psf_img, (center[0] + 5, center[1] - 7), 150.0, rng)
            .astype(np.float32))
    return root, center


@pytest.fixture(scope="module")
def profile_dir(camera_files, tmp_path_factory):
    from nsdd_edge.profile_estimate import profile_from_captures

    root, _ = camera_files
    profile, report = profile_from_captures(root / "psf.tiff", root / "captures", sensor=32, name="test-cam")
    out = tmp_path_factory.mktemp("profile")
    profile.save(out)
    return out, report


def test_off_centre_psf_is_found_and_cropped_around_its_centre(camera_files, profile_dir):
    root, center = camera_files
    img = cv2.imread(str(root / "psf.tiff"), cv2.IMREAD_UNCHANGED).astype(np.float32)
    cy, cx = locate_psf_center(img, "symmetry")
    assert abs(cy - center[0]) <= 1.0 and abs(cx - center[1]) <= 1.0
    assert abs(locate_psf_center(img, "auto")[0] - center[0]) <= 1.0
    _, report = profile_dir
    top, left, h, w = report["crop"]
    assert abs(top + h // 2 - center[0]) <= 1 and abs(left + w // 2 - center[1]) <= 1  # the crop is centred on it
    assert h == w == 32 * report["downsample"]
    with pytest.raises(ProfileError, match="unknown PSF centring"):
        locate_psf_center(img, "middle")


def test_profile_round_trip_and_one_raw_to_y_path(camera_files, profile_dir):
    root, _ = camera_files
    out, _ = profile_dir
    profile = load_profile(out)
    assert profile.name == "test-cam" and profile.sensor_shape == (32, 32)
    assert profile.geometry.model == "crop" and profile.geometry.conv_shape[0] >= 32 + profile.psf.shape[-1]
    assert math.isclose(float(profile.psf.sum()), 1.0, rel_tol=1e-5) and profile.lam > 0
    again = load_profile(out / "camera.json")
    assert again.to_dict() == profile.to_dict()
    # the capture through the profile (solve, fit) == the live Preprocessor on the raw frame (runtime) to 1e-6
    cap = root / "captures" / "face_15000us.npy"
    y_offline = profile.measurement(cap)
    raw = np.load(cap)
    y_live = Preprocessor(profile.preprocess, profile.root)(raw, exposure_us=15000.0)
    np.testing.assert_allclose(y_offline, y_live, rtol=0, atol=1e-6)
    assert y_offline.shape == (3, 32, 32)


def test_short_and_long_exposures_give_the_same_brightness(camera_files, profile_dir):
    root, _ = camera_files
    profile = load_profile(profile_dir[0])
    assert profile.reference_exposure_us == 15000.0 and exposure_from_name(root / "x_2000us.npy") == 2000.0
    long_y = profile.measurement(root / "captures" / "face_15000us.npy")
    short_y = profile.measurement(root / "captures" / "face_2000us.npy")
    assert short_y.mean() / long_y.mean() == pytest.approx(1.0, abs=0.02)
    # without the exposure normalisation the 2 ms capture is 7.5× darker
    raw = np.load(root / "captures" / "face_2000us.npy")
    unscaled = Preprocessor(profile.preprocess, profile.root)(raw)
    assert long_y.mean() / unscaled.mean() == pytest.approx(7.5, rel=0.05)


def test_noise_model_from_captures_alone():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:64, :64] / 64.0
    smooth = 0.5 + 0.3 * np.sin(3 * xx) * np.cos(2 * yy)
    noisy = smooth[None] + 0.01 * rng.standard_normal((1, 64, 64))
    assert noise_std_immerkaer(noisy) == pytest.approx(0.01, rel=0.15)
    m = NoiseModel(read_std=0.01, shot_gain=4e-4)
    assert m.std(np.array([0.0]))[0] == pytest.approx(0.01) and m.std(np.array([1.0]))[0] == pytest.approx(0.0224, 1e-2)


def test_soft_support_mask():
    hard = support_mask((16, 16), (8, 8), 0)
    assert hard.sum() == 64 and hard[4:12, 4:12].min() == 1 and hard[:4].max() == 0
    soft = support_mask((16, 16), (8, 8), 3)
    assert soft[8, 8] == 1 and 0 < soft[4, 8] < soft[6, 8] < 1 and soft[:4].max() == 0
    assert np.allclose(soft, soft[::-1, ::-1])
    with pytest.raises(ProfileError, match="larger than the grid"):
        support_mask((8, 8), (9, 8))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d.update(version=99), "version"),
    (lambda d: d.update(name=""), "name"),
    (lambda d: d["recon"].update(lam=float("nan")), "recon.lam"),
    (lambda d: d["recon"].update(lam=-1.0), "recon.lam"),
    (lambda d: d["recon"].update(projector="svd"), "projector"),
    (lambda d: d["noise"].update(read_std=-0.1), "noise.read_std"),
    (lambda d: d["noise"].update(read_std="a"), "noise.read_std"),
    (lambda d: d["geometry"].update(sensor_shape=[200000, 200000]), "geometry.sensor_shape"),
    (lambda d: d.update(support={"shape": [9999, 9999], "taper": 0}), "support.shape"),
    (lambda d: d.update(support={"shape": [16, 16], "taper": 99}), "support.taper"),
    (lambda d: d["psf"].update(sha256="0" * 64), "sha256"),
    (lambda d: d["psf"].update(file="../psf.npy"), "psf.file"),
    (lambda d: d["preprocess"].update(background_file="/etc/passwd"), "background_file"),
    (lambda d: d["preprocess"].update(bogus=1), "unknown settings"),
    (lambda d: d.update(exposure={"reference_us": 0}), "exposure.reference_us"),
    (lambda d: d.pop("geometry"), "geometry"),
])
def test_bad_profiles_get_named_errors(profile_dir, tmp_path, edit, message):
    import shutil

    src, _ = profile_dir
    d = tmp_path / "p"
    shutil.copytree(src, d)
    record = json.loads((d / "camera.json").read_text())
    edit(record)
    (d / "camera.json").write_text(json.dumps(record))
    with pytest.raises(ProfileError, match=message):
        load_profile(d)


def test_not_json_and_missing_profile(tmp_path):
    (tmp_path / "camera.json").write_text("[" * 100000)
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile(tmp_path)
    with pytest.raises(ProfileError, match="no camera profile"):
        load_profile(tmp_path / "nope")


def test_unit_sum_psf_keeps_its_hash_through_the_loader(tmp_path):
    """A dataset's psf.npy (already unit sum) loaded again must keep its float bits, or export refuses it."""
    rng = np.random.default_rng(1)
    psf = (rng.random((1, 17, 23)) ** 4).astype(np.float32)
    psf = (psf / psf.sum()).astype(np.float32)
    assert abs(float(psf.sum(dtype=np.float64)) - 1) < 1e-6
    np.save(tmp_path / "psf.npy", psf)
    assert array_hash(load_psf(tmp_path / "psf.npy")) == array_hash(psf)
    assert math.isclose(float(load_psf(tmp_path / "psf.npy").sum()), 1.0, rel_tol=1e-6)


def test_calibrate_command_writes_profile_and_picture(camera_files, tmp_path):
    from nsdd_edge.cli import main as edge_main

    root, _ = camera_files
    out = tmp_path / "prof"
    rc = edge_main(["calibrate", "--psf-image", str(root / "psf.tiff"), "--captures", str(root / "captures"),
                    "--sensor", "32", "--out", str(out)])
    assert rc == 0
    assert (out / "camera.json").exists() and (out / "psf.npy").exists()
    picture = cv2.imread(str(out / "calibration.png"))
    assert picture is not None and picture.shape[1] > 3 * picture.shape[0] - 20
    assert edge_main(["calibrate", "--psf-image", str(root / "psf.tiff"), "--out", str(out)]) == 2  # no captures


def test_solve_capture_folder_with_a_profile_and_colliding_names(camera_files, profile_dir, tmp_path):
    import shutil

    from train.cli import main as train_main

    root, _ = camera_files
    caps = tmp_path / "caps"
    for sub in ("a", "b"):
        (caps / sub).mkdir(parents=True)
        shutil.copy(root / "captures" / "face_15000us.npy", caps / sub / "face_15000us.npy")
    out = tmp_path / "fista"
    rc = train_main(["solve", "--method", "fista", "--set", "iters=20", "--capture", str(caps / "*" / "*.npy"),
                     "--profile", str(profile_dir[0]), "--out", str(out)])
    assert rc == 0
    record = json.loads((out / "recon.json").read_text())
    assert sorted(record["images"]) == ["a__face_15000us", "b__face_15000us"]
    profile = load_profile(profile_dir[0])
    x = np.load(out / "a__face_15000us.npy")
    assert x.shape == (3, *profile.geometry.scene_shape) and x.min() >= 0  # FISTA keeps x ≥ 0
    assert record["source"]["noise_std"] > 0 and record["physics"]["model"] == "crop"


def test_fista_lowers_the_residual_and_stays_non_negative():
    from train.physics import LenslessOperator
    from train.solvers.fista import FISTA

    rng = np.random.default_rng(2)
    psf = (rng.random((1, 9, 9)) ** 3).astype(np.float32)
    psf /= psf.sum()
    op = LenslessOperator(psf, (24, 24), "crop", scene_shape=(32, 32), conv_shape=(34, 34))
    x = torch.zeros(1, 1, 32, 32)
    x[..., 10:20, 12:22] = 1.0
    y = op.A(x)
    few, many = FISTA(iters=5)(y, op), FISTA(iters=200)(y, op)
    assert float(op.consistency(many, y)) < 0.5 * float(op.consistency(few, y)) < 0.5
    assert float(many.min()) >= 0.0
    with pytest.raises(ValueError, match="iters"):
        FISTA(iters=0)


def test_bundle_takes_inline_preprocessing_json_and_a_camera_profile(tmp_path, profile_dir):
    from export.make_bundle import _preprocess_settings

    _, settings, prof = _preprocess_settings('{"downsample": 2, "normalization": "fixed", "scale": 3.0}')
    assert settings["downsample"] == 2 and prof is None
    _, settings, prof = _preprocess_settings(profile_dir[0])
    assert prof == profile_dir[0] and settings["raw_crop"] is not None
    from export.graph import ExportError

    with pytest.raises(ExportError, match="inline JSON is invalid"):
        _preprocess_settings("{not json")


def test_profile_to_dict_is_json(profile_dir):
    profile = load_profile(profile_dir[0])
    assert isinstance(profile, CameraProfile)
    json.dumps(profile.to_dict())


def test_simulate_through_a_profile_matches_its_signal_level(profile_dir, tmp_path, shared):
    from train.cli import main as train_main

    faces = shared / "data" / "faces" / "utkface"
    out = tmp_path / "sim"
    rc = train_main(["simulate", "--images", str(faces), "--profile", str(profile_dir[0]), "--size", "16",
                     "--limit", "6", "--n-test", "2", "--out", str(out)])
    assert rc == 0
    meta = json.loads((out / "dataset.json").read_text())
    profile = load_profile(profile_dir[0])
    assert meta["forward"]["sensor_shape"] == list(profile.sensor_shape)
    assert meta["noise_model"]["read_std"] == pytest.approx(profile.noise.read_std)
    match = meta["profile_match"]
    assert match["simulated"]["p99"] == pytest.approx(profile.signal["p99"], rel=0.1)
    y = np.load(out / "measurements" / f"{meta['splits']['train'][0]}.npy")
    assert y.shape == (3, *profile.sensor_shape) and y.min() >= 0
    assert train_main(["simulate", "--images", str(faces), "--out", str(tmp_path / "x")]) == 2  # no PSF, no profile
