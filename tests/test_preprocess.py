"""Raw frame → y: recovery of the simulated measurement, Bayer binning/demosaic, every config step, rejects."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from nsdd_edge.bundle import PreprocessConfig
from nsdd_edge.optics import box_downsample
from nsdd_edge.preprocess import (
    BAYER_PATTERNS,
    FrameRejected,
    Preprocessor,
    ProfileMismatch,
    bin_bayer,
    demosaic_bilinear,
    preprocess_capture,
)
from nsdd_edge.psf_sim import simulate_psf
from nsdd_edge.sources import open_source


@pytest.fixture(scope="module")
def psf48() -> np.ndarray:
    return simulate_psf("caustic", (48, 48), 2)


def mosaic(rgb: np.ndarray, pattern: str, g2: np.ndarray | None = None) -> np.ndarray:
    """(3, h, w) → (2h, 2w) mosaic; the second green site takes ``g2`` if given."""
    h, w = rgb.shape[1:]
    out = np.zeros((2 * h, 2 * w), rgb.dtype)
    greens = 0
    for k, letter in enumerate(pattern):
        plane = rgb["RGB".index(letter)]
        if letter == "G":
            if greens == 1 and g2 is not None:
                plane = g2
            greens += 1
        out[k // 2 :: 2, k % 2 :: 2] = plane
    return out


@pytest.mark.parametrize("query", ["format=rgb", "format=bayer&bayer=RGGB", "format=bayer&bayer=GBRG",
                                   "channels=1"])
def test_sim_frame_with_matching_config_recovers_y(psf48, query):
    src = open_source(f"sim://?realtime=0&noise=0&photons=0&{query}", psf=psf48)
    frame = src.read()
    config = PreprocessConfig(**src.matching_preprocess())
    y = Preprocessor(config)(frame.data)
    y_clean = src.measurement(frame.index)
    assert y.shape == y_clean.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, y_clean, atol=0.5 / src.gain + 1e-6)  # only the 12-bit rounding remains

    noisy = open_source(f"sim://?realtime=0&noise=0.005&photons=20000&{query}", psf=psf48)
    err = Preprocessor(config)(noisy.read().data) - y_clean
    assert abs(float(err.mean())) < 1e-3  # zero-mean noise: negative values below black are kept
    expected = np.sqrt(0.005**2 + float(y_clean.mean()) / 20000 + 1 / (12 * src.gain**2))
    if "bayer" in query:  # the two green sites are averaged
        assert 0.7 * expected < float(err.std()) < 1.2 * expected
    else:
        assert float(err.std()) == pytest.approx(expected, rel=0.15)


@pytest.mark.parametrize("pattern", BAYER_PATTERNS)
def test_bin_bayer_on_a_synthetic_mosaic(pattern):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 4096, size=(3, 5, 6)).astype(np.uint16)
    g2 = rng.integers(0, 4096, size=(5, 6)).astype(np.uint16)
    out = bin_bayer(mosaic(rgb, pattern, g2), pattern)
    np.testing.assert_array_equal(out[0], rgb[0])
    np.testing.assert_array_equal(out[2], rgb[2])
    np.testing.assert_allclose(out[1], (rgb[1].astype(np.float32) + g2) / 2)


@pytest.mark.parametrize("pattern", BAYER_PATTERNS)
def test_bilinear_demosaic_colours_match_the_pattern(pattern):
    colour = np.array([300, 1200, 2500], np.uint16)
    rgb = np.broadcast_to(colour[:, None, None], (3, 8, 8)).copy()
    out = demosaic_bilinear(mosaic(rgb, pattern), pattern)
    assert out.shape == (3, 16, 16)
    np.testing.assert_allclose(out[:, 2:-2, 2:-2].reshape(3, -1).T, np.tile(colour, (144, 1)), atol=1)
    # a smooth ramp in red is interpolated linearly in the interior
    ramp = np.tile(np.arange(16, dtype=np.float32) * 100, (16, 1))
    full = np.stack([ramp, np.full_like(ramp, 1000), np.full_like(ramp, 2000)])
    raw = np.zeros((16, 16), np.uint16)
    for k, letter in enumerate(pattern):
        raw[k // 2 :: 2, k % 2 :: 2] = full["RGB".index(letter)][k // 2 :: 2, k % 2 :: 2]
    out = demosaic_bilinear(raw, pattern)
    np.testing.assert_allclose(out[0, 2:-2, 2:-2], ramp[2:-2, 2:-2], atol=1)


def test_bilinear_pipeline_via_config():
    rgb = np.broadcast_to(np.array([400, 800, 1600], np.uint16)[:, None, None], (3, 8, 8)).copy()
    raw = mosaic(rgb, "GRBG") + 100
    pre = Preprocessor(PreprocessConfig(black_level=100, bayer_pattern="GRBG", demosaic="bilinear",
                                        normalization="none", downsample=2))
    y = pre(raw)
    assert y.shape == (3, 8, 8) == pre.output_shape(raw.shape)
    np.testing.assert_allclose(y[:, 1:-1, 1:-1].mean(axis=(1, 2)), [400, 800, 1600], atol=1)
    # float frames holding integer counts are accepted (saved captures), fractional ones are not
    np.testing.assert_array_equal(Preprocessor(pre.config)(raw.astype(np.float32)), y)
    with pytest.raises(FrameRejected, match="integer raw counts"):
        Preprocessor(pre.config)(raw.astype(np.float32) + 0.25)


def test_every_step_in_order(tmp_path):
    rng = np.random.default_rng(1)
    raw = rng.integers(200, 4000, size=(24, 32, 3)).astype(np.uint16)
    dark = rng.integers(0, 50, size=(24, 32, 3)).astype(np.uint16) + 64
    np.save(tmp_path / "dark.npy", dark)
    config = PreprocessConfig(black_level=64, background_file="dark.npy", downsample=2, crop=[1, 2, 8, 12],
                              flip_vertical=True, flip_horizontal=True, channel_order="BGR",
                              normalization="fixed", scale=1000.0)
    pre = Preprocessor(config, bundle_root=tmp_path)
    y = pre(raw)
    x = np.moveaxis(raw.astype(np.float32), -1, 0) - 64
    x -= np.moveaxis(dark.astype(np.float32), -1, 0) - 64
    x = box_downsample(x, 2)[:, 1:9, 2:14][:, ::-1, ::-1][::-1] / 1000.0
    np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-6)
    assert y.flags.c_contiguous and pre.output_shape(raw.shape) == y.shape == (3, 8, 12)

    gray = Preprocessor(PreprocessConfig(grayscale=True, normalization="max"))(raw)
    ref = np.moveaxis(raw.astype(np.float32), -1, 0).mean(axis=0, keepdims=True)
    np.testing.assert_allclose(gray, ref / ref.max(), rtol=1e-6)
    assert Preprocessor(PreprocessConfig(normalization="none"))(raw[..., 0]).shape == (1, 24, 32)


def test_bayer_background_frame_goes_through_the_same_steps(tmp_path):
    rng = np.random.default_rng(2)
    rgb = rng.integers(500, 3000, size=(3, 6, 8)).astype(np.uint16)
    dark = rng.integers(250, 270, size=(12, 16)).astype(np.uint16)
    np.save(tmp_path / "dark.npy", dark)
    raw = mosaic(rgb, "RGGB") + dark
    pre = Preprocessor(PreprocessConfig(black_level=256, bayer_pattern="RGGB", background_file="dark.npy",
                                        normalization="none"), bundle_root=tmp_path)
    np.testing.assert_allclose(pre(raw), rgb.astype(np.float32), atol=1e-3)
    np.save(tmp_path / "small.npy", dark[:10])
    bad = Preprocessor(PreprocessConfig(bayer_pattern="RGGB", background_file="small.npy"), bundle_root=tmp_path)
    with pytest.raises(ValueError, match="small.npy"):
        bad(raw)
    with pytest.raises(ValueError, match="missing.npy"):
        Preprocessor(PreprocessConfig(background_file="missing.npy"), bundle_root=tmp_path)


def test_bad_frames_are_rejected_with_the_reason():
    pre = Preprocessor(PreprocessConfig(normalization="max"))
    good = np.ones((8, 8), np.uint16)
    pre(good)
    cases = [
        (np.ones((8, 9), np.uint16), "differs"),
        (np.ones((8, 8), bool), "dtype"),
        (np.ones((8, 8), complex), "dtype"),
        ([[1, 2], [3, 4]], "not a numpy array"),
    ]
    for frame, reason in cases:
        with pytest.raises(FrameRejected, match=reason):
            pre(frame)
    nan = np.ones((8, 8), np.float32)
    nan[2, 3] = np.nan
    with pytest.raises(FrameRejected, match="NaN"):
        pre(nan)
    with pytest.raises(FrameRejected, match="all dark"):
        pre(np.zeros((8, 8), np.uint16))
    with pytest.raises(FrameRejected, match="mono .* or RGB"):
        Preprocessor(PreprocessConfig())(np.ones((8, 8, 4), np.uint8))
    bayer = Preprocessor(PreprocessConfig(bayer_pattern="RGGB"))
    with pytest.raises(FrameRejected, match="even"):
        bayer(np.ones((7, 8), np.uint16))
    with pytest.raises(FrameRejected, match="2-D Bayer"):
        Preprocessor(PreprocessConfig(bayer_pattern="RGGB"))(np.ones((8, 8, 3), np.uint16))
    assert issubclass(FrameRejected, ValueError)
    pre(good)  # still works after rejects


def test_bad_settings_are_errors():
    for kwargs, reason in [({"bayer_pattern": "RGBG"}, "bayer_pattern"), ({"demosaic": "ahd"}, "demosaic"),
                           ({"normalization": "mean"}, "normalization"), ({"downsample": 0}, "downsample"),
                           ({"crop": [0, 0, 4]}, "crop"), ({"channel_order": "RGR"}, "channel_order"),
                           ({"normalization": "fixed", "scale": 0.0}, "scale"), ({"background_file": "bg.npy"},
                                                                                  "bundle directory")]:
        with pytest.raises(ValueError, match=reason):
            Preprocessor(PreprocessConfig(**kwargs))
    cropped = Preprocessor(PreprocessConfig(crop=[0, 0, 20, 20]))
    for _ in range(2):  # a crop outside the frame is an error for every frame, not only the first
        with pytest.raises(ValueError, match="crop"):
            cropped(np.ones((8, 8), np.uint16))


def test_saturation_fraction_is_measured():
    pre = Preprocessor(PreprocessConfig(white_level=4095, normalization="none"))
    frame = np.full((10, 10), 1000, np.uint16)
    frame[0, :5] = 4095
    pre(frame)
    assert pre.saturated_fraction == pytest.approx(0.05)


def test_preprocess_capture_matches_the_live_path(tmp_path):
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 4096, size=(16, 20)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "cap.png"), raw)
    np.save(tmp_path / "cap.npy", raw)
    config = PreprocessConfig(black_level=64, bayer_pattern="BGGR", downsample=2, normalization="fixed", scale=4031)
    live = Preprocessor(config)(raw)
    np.testing.assert_allclose(preprocess_capture(tmp_path / "cap.png", config), live, rtol=1e-6)
    np.testing.assert_allclose(preprocess_capture(tmp_path / "cap.npy", config), live, rtol=1e-6)
    with pytest.raises(ValueError, match="nope.png"):
        preprocess_capture(tmp_path / "nope.png", config)


PI4_PROFILE = PreprocessConfig(black_level=256.0, white_level=4095.0, bayer_pattern="BGGR", normalization="fixed",
                               scale=3800.0)


def test_camera_profile_is_checked_against_the_bundle():
    """issue 14 #11: a bundle calibrated on a Pi 4 (12-bit, black 256, BGGR) refuses 16-bit words (a Pi 5
    without the shift: ×16), another Bayer order and another black level, naming both sides."""
    pre = Preprocessor(PI4_PROFILE)
    raw = np.full((8, 8), 300, np.uint16)
    pi4 = {"bit_depth": 12, "white_level": 4095.0, "black_level": 256.0, "bayer_pattern": "BGGR"}
    assert pre(raw, pi4).shape == (3, 4, 4)
    with pytest.raises(ProfileMismatch, match=r"white level is 65535 \(16-bit\).*4095: every value would be ×16"):
        pre(raw, {**pi4, "bit_depth": 16, "white_level": 65535.0, "black_level": 4096.0})
    with pytest.raises(ProfileMismatch, match="×16"):  # bit depth alone, no white level given
        Preprocessor(PI4_PROFILE)(raw, {"bit_depth": 16})
    with pytest.raises(ProfileMismatch, match="Bayer order is RGGB but the bundle expects BGGR"):
        Preprocessor(PI4_PROFILE)(raw, {**pi4, "bayer_pattern": "RGGB"})
    with pytest.raises(ProfileMismatch, match="black level is 64 but the bundle subtracts 256"):
        Preprocessor(PI4_PROFILE)(raw, {**pi4, "black_level": 64.0})
    assert Preprocessor(PI4_PROFILE)(raw, {**pi4, "black_level": 260.0}).shape == (3, 4, 4)  # within 5 %
    assert Preprocessor(PI4_PROFILE)(raw, {"source": "file"}).shape == (3, 4, 4)  # nothing to compare
    assert Preprocessor(PI4_PROFILE)(raw).shape == (3, 4, 4)  # no meta: no check
    assert issubclass(ProfileMismatch, ValueError)


def test_a_capture_hosts_preprocessed_frame_passes_only_with_the_same_settings():
    pre = Preprocessor(PI4_PROFILE)
    raw = np.random.default_rng(0).integers(256, 4000, size=(8, 8)).astype(np.uint16)
    y = pre(raw)
    same = pre(y, {"preprocessed": {"digest": pre.digest, "bundle": "b"}})
    np.testing.assert_array_equal(same, y)
    other = Preprocessor(PreprocessConfig(**{**vars(PI4_PROFILE), "downsample": 2}))
    assert other.digest != pre.digest
    with pytest.raises(ProfileMismatch, match="other settings"):
        pre(other(raw), {"preprocessed": {"digest": other.digest, "bundle": "b"}})
    with pytest.raises(FrameRejected, match="float32"):
        pre(y.astype(np.float64), {"preprocessed": {"digest": pre.digest}})


def test_run_refuses_a_camera_the_bundle_was_not_calibrated_for(tmp_path, capsys):
    """End to end: the default bundle (12-bit sim camera) fed a 16-bit camera stops at the first frame."""
    from nsdd_edge.cli import main

    rc = main(["run", "--source", "sim://?realtime=0&bits=16&black_level=4096", "--frames", "3", "--quiet",
               "--stats", str(tmp_path / "s.json"), "--snapshot", ""])
    err = capsys.readouterr().err
    assert rc == 2 and "×16" in err and "black level is 4096" in err


def test_frame_meta_supplies_the_exposure_and_a_positional_number_is_refused():
    """The loop passes each frame's meta: with reference_exposure_us the exposure comes from meta (a 20 ms frame
    of a 10 ms reference is halved); exposure_us= still overrides it."""
    config = PreprocessConfig(normalization="fixed", scale=1.0, reference_exposure_us=10000.0)
    raw = np.full((4, 4), 100.0, np.float32)
    assert Preprocessor(config)(raw, {"exposure_us": 20000})[0, 0, 0] == pytest.approx(50.0)
    assert Preprocessor(config)(raw, {"exposure_us": 20000}, exposure_us=5000)[0, 0, 0] == pytest.approx(200.0)
    with pytest.raises(FrameRejected, match="exposure_us"):
        Preprocessor(config)(raw, {"exposure_us": "fast"})
    with pytest.raises(TypeError, match="exposure_us="):
        Preprocessor(config)(raw, 20000.0)


def test_raw_crop_of_a_bayer_mosaic_bins_the_cropped_part():
    """raw_crop then 2x2 binning: the binning buffer has the cropped size (found by the fuzz corpus: it had the
    uncropped one and numpy raised at the first frame)."""
    rng = np.random.default_rng(4)
    raw = rng.integers(0, 4096, size=(8, 12)).astype(np.uint16)
    pre = Preprocessor(PreprocessConfig(bayer_pattern="RGGB", raw_crop=[2, 4, 4, 6], normalization="none"))
    want = Preprocessor(PreprocessConfig(bayer_pattern="RGGB", normalization="none"))(raw[2:6, 4:10].copy())
    for _ in range(2):  # the reused buffer stays right
        np.testing.assert_array_equal(pre(raw), want)
