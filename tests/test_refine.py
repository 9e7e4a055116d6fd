"""PSF warps and the ground-truth-free PSF refinement (issue 18): simulated mismatch is recovered."""

from __future__ import annotations

import json

import glob
from pathlib import Path

import cv2
import numpy as np
import pytest

from nsdd_edge.optics import ForwardModel, LenslessGeometry, OpticsError, box_downsample, normalize, read_image01
from nsdd_edge.psf_warp import PsfWarp, psf_with_snr, warp_psf
from nsdd_edge.refine import RefineError, SelfConsistency, fft_size, refine_warp, search_geometry

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
RADIAL = SHARED / "data" / "psf" / "radial_6per_256.npy"
FACES = sorted(glob.glob(str(SHARED / "data" / "faces" / "utkface" / "*.jpg")))


def point(shape=(33, 33), at=(16, 26)) -> np.ndarray:
    p = np.zeros((1,) + shape, np.float32)
    p[0, at[0], at[1]] = 1.0
    return p


def peak(a: np.ndarray) -> tuple[int, int]:
    return tuple(int(v) for v in np.unravel_index(np.argmax(a[0]), a.shape[-2:]))


def test_warp_moves_a_point_as_documented():
    assert peak(warp_psf(point(), PsfWarp(shift=(2, -3)))) == (18, 23)
    assert peak(warp_psf(point(), PsfWarp(rotation_deg=90))) == (6, 16)  # counter-clockwise on screen
    assert peak(warp_psf(point(), PsfWarp(scale=1.5))) == (16, 31)
    assert peak(warp_psf(point(), PsfWarp(scale=0.5))) == (16, 21)
    assert np.array_equal(warp_psf(point(), PsfWarp()), point())


def test_warp_keeps_the_light_of_a_smooth_psf_and_normalises_on_request():
    yy, xx = np.mgrid[:64, :64]
    blob = np.exp(-((yy - 32.0) ** 2 + (xx - 30.0) ** 2) / (2 * 5.0**2)).astype(np.float32)[None]
    for s in (0.8, 1.25):
        assert warp_psf(blob, PsfWarp(scale=s)).sum() == pytest.approx(blob.sum(), rel=0.01)
    assert warp_psf(blob, PsfWarp(scale=1.2, rotation_deg=3), normalize="sum").sum() == pytest.approx(1.0, abs=1e-5)
    assert warp_psf(blob[0], PsfWarp(scale=1.1)).shape == (64, 64)


@pytest.mark.parametrize("bad", [dict(scale=0), dict(scale=float("nan")), dict(shift=(np.inf, 0)),
                                 dict(rotation_deg=float("nan"))])
def test_bad_warps_are_named(bad):
    with pytest.raises(OpticsError, match="PSF warp"):
        PsfWarp(**bad)


def test_warp_round_trips_through_json_and_rejects_garbage():
    w = PsfWarp(1.07, (0.5, -1.25), 2.0)
    assert PsfWarp.from_dict(w.to_dict()) == w
    with pytest.raises(OpticsError, match="not a warp"):
        PsfWarp.from_dict({"scale": "big"})


def test_psf_with_snr_adds_noise_at_the_requested_level():
    rng = np.random.default_rng(0)
    psf = normalize(np.random.default_rng(1).random((1, 64, 64)).astype(np.float32), "sum")
    for snr in (20.0, 0.0):
        noisy = psf_with_snr(psf, snr, np.random.default_rng(2))
        assert noisy.min() >= 0 and noisy.sum() == pytest.approx(psf.sum(), rel=1e-4)
    noise = psf_with_snr(psf, 20.0, rng) - psf
    measured = 10 * np.log10(np.mean(psf.astype(np.float64) ** 2) / np.var(noise))
    assert measured == pytest.approx(20.0, abs=1.0)  # the clip at 0 and the renormalisation move it a little


@pytest.mark.parametrize("geometry", [LenslessGeometry.make("crop", (16, 16), (9, 9), (8, 8), (24, 24)),
                                      LenslessGeometry.make("crop", (16, 16), (9, 9)),
                                      LenslessGeometry.make("circular", (16, 16), (9, 9))])
def test_forward_model_adjoint_is_the_transpose(geometry):
    rng = np.random.default_rng(0)
    A = ForwardModel(rng.random((1, 9, 9)), geometry)
    x, y = rng.random((2,) + geometry.scene_shape), rng.random((2,) + geometry.sensor_shape)
    assert np.sum(A(x) * y) == pytest.approx(np.sum(x * A.adjoint(y)), rel=1e-5)
    with pytest.raises(OpticsError, match="sensor grid"):
        A.adjoint(np.zeros((1, 5, 5)))


def test_search_geometry_makes_room_for_the_largest_scale():
    psf = np.ones((1, 40, 40), np.float32)
    p, g = search_geometry(psf, LenslessGeometry.make("crop", (64, 64), (40, 40), (32, 32), (128, 128)), 1.5)
    assert p.shape == (1, 60, 60) and g.scene_shape == (32, 32) and g.conv_shape == (128, 128)
    p, g = search_geometry(psf, LenslessGeometry.make("crop", (64, 64), (40, 40), (104, 104), (104, 104)), 1.5)
    assert p.shape == (1, 60, 60) and g.conv_shape == (fft_size(124),) * 2 and g.scene_shape == g.conv_shape
    assert fft_size(124) == 125 and fft_size(128) == 128


def small_camera(true: PsfWarp, n: int = 3, noise: float = 0.005):
    """A 64² sensor behind the shared radial PSF (at 1/4 size), 32² face scenes, y made with the warped PSF."""
    if not RADIAL.exists() or len(FACES) < n:
        pytest.skip("needs ../shared (radial PSF and face crops)")
    psf = np.load(RADIAL).astype(np.float32)
    psf = normalize(box_downsample(psf[None] if psf.ndim == 2 else psf, 4), "sum")
    geometry = LenslessGeometry.make("crop", (64, 64), psf.shape[-2:], (32, 32), (128, 128))
    scenes = [cv2.resize(read_image01(f).transpose(1, 2, 0), (32, 32), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)
              for f in FACES[:n]]
    A, rng = ForwardModel(warp_psf(psf, true), geometry), np.random.default_rng(0)
    ys = [A(x) + noise * rng.standard_normal(A(x).shape).astype(np.float32) for x in scenes]
    return psf, geometry, ys


def test_refinement_recovers_scale_shift_and_rotation():
    true = PsfWarp(1.1, (1.5, -1.0), 2.0)
    psf, geometry, ys = small_camera(true)
    result, _ = refine_warp(psf, geometry, ys, iters=80)
    w = result.warp
    assert abs(w.scale / true.scale - 1) < 0.02
    assert max(abs(a - b) for a, b in zip(w.shift, true.shift)) < 0.5
    assert abs(w.rotation_deg - true.rotation_deg) < 0.5
    assert result.criterion < 0.6 * result.start_criterion
    assert result.notes == []


@pytest.mark.parametrize("depth_scale", [0.86, 1.18])
def test_a_depth_change_is_recovered_by_the_scale_search_alone(depth_scale):
    psf, geometry, ys = small_camera(PsfWarp(depth_scale), n=2)
    result, crit = refine_warp(psf, geometry, ys, parameters=("scale",), iters=60, rounds=2)
    assert abs(result.warp.scale / depth_scale - 1) < 0.02
    assert min(result.scale_curve, key=lambda e: e.criterion).criterion >= result.criterion
    assert len(crit.evaluations) == len(result.evaluations)


def test_full_field_geometry_does_not_pretend_to_find_a_shift():
    rng = np.random.default_rng(0)
    psf = normalize(rng.random((1, 16, 16)).astype(np.float32) ** 8, "sum")
    geometry = LenslessGeometry.make("crop", (32, 32), (16, 16))  # scene = conv grid: full field
    y = ForwardModel(psf, geometry)(rng.random((1,) + geometry.scene_shape).astype(np.float32))
    result, _ = refine_warp(psf, geometry, [y], n_scales=3, iters=5, rounds=1)
    assert any("shift not refined" in n for n in result.notes)
    assert all(e.warp.shift == (0.0, 0.0) for e in result.evaluations)


def test_bad_refinement_input_is_named():
    psf = np.ones((1, 8, 8), np.float32)
    geometry = LenslessGeometry.make("crop", (16, 16), (8, 8))
    with pytest.raises(RefineError, match="no captures"):
        SelfConsistency(psf, geometry, [])
    with pytest.raises(RefineError, match="capture 0 has shape"):
        SelfConsistency(psf, geometry, [np.ones((1, 9, 9))])
    with pytest.raises(RefineError, match="empty or not finite"):
        SelfConsistency(psf, geometry, [np.full((1, 16, 16), np.nan)])
    with pytest.raises(RefineError, match="scale_min"):
        refine_warp(psf, geometry, [np.ones((1, 16, 16))], scale_range=(1.2, 0.8))
    with pytest.raises(RefineError, match="unknown parameter"):
        refine_warp(psf, geometry, [np.ones((1, 16, 16))], parameters=("gain",))


def test_refine_psf_command_finds_the_depth_of_a_profile_and_writes_a_refined_profile(tmp_path):
    """``nsdd-train refine-psf`` on a camera whose captures were made at another depth (PSF ×1.12)."""
    from nsdd_edge.bundle import PreprocessConfig
    from nsdd_edge.camera import CameraProfile, NoiseModel, load_profile
    from nsdd_edge.optics import array_hash
    from train.cli import main as train_main

    true = PsfWarp(1.12)
    psf, geometry, ys = small_camera(true, n=2)
    profile = CameraProfile(name="sim", preprocess=PreprocessConfig(normalization="none"), psf=psf, geometry=geometry,
                            lam=1e-3, noise=NoiseModel(0.005))
    profile.save(tmp_path / "camera")
    captures = tmp_path / "captures"
    captures.mkdir()
    for i, y in enumerate(ys):
        np.save(captures / f"scene{i}.npy", y)
    out = tmp_path / "refined"
    rc = train_main(["refine-psf", "--profile", str(tmp_path / "camera"), "--captures", str(captures), "--out",
                     str(out), "--scales", "0.9:1.3:7", "--parameters", "scale", "--iters", "50", "--rounds", "2",
                     "--recon-iters", "10", "--compare-scale", "1.3"])
    assert rc == 0
    summary = json.loads((out / "refine.json").read_text())
    assert abs(summary["result"]["warp"]["scale"] / 1.12 - 1) < 0.02
    assert all(abs(s / 1.12 - 1) < 0.05 for s in summary["best_scale_per_capture"].values())
    refined = load_profile(out)
    assert refined.psf_recipe["refined"]["warp"]["scale"] == summary["result"]["warp"]["scale"]
    assert refined.psf_recipe["refined"]["from_psf_sha256"] == array_hash(profile.psf)
    assert refined.geometry.scene_shape == geometry.scene_shape and refined.psf.sum() == pytest.approx(1.0, rel=1e-5)
    # the refined profile explains the captures better than the calibrated one did
    crit = SelfConsistency(refined.psf, refined.geometry, ys, iters=50)
    assert crit(PsfWarp()).criterion < summary["result"]["start_criterion"]
    assert (out / "refine.png").stat().st_size > 10_000 and "θ" in (out / "report.md").read_text()


def test_refine_psf_command_names_bad_input(tmp_path, capsys):
    from train.cli import main as train_main

    assert train_main(["refine-psf", "--profile", str(tmp_path / "nope"), "--captures", str(tmp_path),
                       "--out", str(tmp_path / "o")]) == 2
    assert "refine-psf:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main(["refine-psf", "--profile", "p", "--captures", "c", "--out", "o", "--scales", "0.8-1.2"])


def test_saturated_pixels_left_out_keep_the_scale_right():
    """A capture clipped in one channel (70% of its red pixels): the clipped pixels are not ``A x``; scored as they
    are they bias the scale, left out (weight 0, each channel its own measurement) they do not."""
    true = PsfWarp(1.12)
    psf, geometry, ys = small_camera(true, n=3)
    clipped, masks = [], []
    for y in ys:
        y = y.copy()
        level = np.percentile(y[0], 30)
        mask = np.zeros(y.shape, bool)
        mask[0] = y[0] >= level
        y[0] = np.minimum(y[0], level)
        clipped.append(y)
        masks.append(mask)
    plain, _ = refine_warp(psf, geometry, clipped, parameters=("scale",), iters=60, rounds=2)
    left_out, crit = refine_warp(psf, geometry, clipped, parameters=("scale",), iters=60, rounds=2,
                                 excluded=[masks[0], None, masks[2]])
    assert abs(left_out.warp.scale / true.scale - 1) < 0.01 < abs(plain.warp.scale / true.scale - 1)
    assert crit.ys.shape[0] == 9 and crit.weight is not None and crit.weight[3:6].all()  # capture 1: all kept
    with pytest.raises(RefineError, match="exclusion masks for"):
        SelfConsistency(psf, geometry, clipped, excluded=[None])
    with pytest.raises(RefineError, match="no pixel left"):
        SelfConsistency(psf, geometry, clipped[:1], excluded=[np.ones((3, 64, 64), bool)])


def test_saturation_map_follows_the_profiles_own_raw_to_y_path(tmp_path):
    from nsdd_edge.bundle import PreprocessConfig
    from nsdd_edge.camera import CameraProfile, NoiseModel
    from nsdd_edge.profile_estimate import saturation_map

    geometry = LenslessGeometry.make("crop", (8, 8), (4, 4))
    profile = CameraProfile(name="sat", preprocess=PreprocessConfig(downsample=2, normalization="none"),
                            psf=np.ones((1, 4, 4), np.float32) / 16, geometry=geometry, lam=1e-3,
                            noise=NoiseModel(0.01), root=tmp_path)
    raw = np.full((16, 16, 3), 100, np.uint8)  # RGB order on disk via OpenCV (BGR): channel 2 of the file is R
    cv2.imwrite(str(tmp_path / "clean.png"), raw)
    raw[0:3, 4:8, 2] = 255  # red saturated in rows 0–2, columns 4–7
    cv2.imwrite(str(tmp_path / "sat.png"), raw)
    assert saturation_map(profile, tmp_path / "clean.png") is None
    mask = saturation_map(profile, tmp_path / "sat.png")
    assert mask.shape == (3, 8, 8) and not mask[1:].any()
    assert np.array_equal(np.argwhere(mask[0]), [[0, 2], [0, 3], [1, 2], [1, 3]])
    np.save(tmp_path / "float.npy", raw[..., ::-1].astype(np.float32))  # RGB floats: no level known unless the
    assert saturation_map(profile, tmp_path / "float.npy") is None      # profile has one
    profile.preprocess.white_level = 255.0
    assert np.array_equal(saturation_map(profile, tmp_path / "float.npy"), mask)


def test_an_odd_psf_keeps_its_optical_axis_on_a_larger_canvas():
    """Padding a 15² PSF to the 64² convolution grid must not move the measurement (center_pad would, by 1 px)."""
    from nsdd_edge.optics import center_pad
    from nsdd_edge.psf_warp import psf_at_scale, psf_on_canvas

    psf = np.zeros((1, 15, 15), np.float32)
    psf[0, 7, 7] = 1.0
    geometry = LenslessGeometry.make("crop", (32, 32), (15, 15), (32, 32), (64, 64))
    x = np.zeros((1, 32, 32), np.float32)
    x[0, 16, 16] = 1.0
    direct = ForwardModel(psf, geometry)(x)
    assert np.allclose(ForwardModel(psf_on_canvas(psf, (64, 64)), geometry)(x), direct, atol=1e-6)
    assert np.allclose(ForwardModel(psf_at_scale(psf, geometry, 1.0), geometry)(x), direct, atol=1e-6)
    assert not np.allclose(ForwardModel(center_pad(psf, (64, 64)), geometry)(x), direct, atol=1e-3)
    with pytest.raises(OpticsError, match="does not fit"):
        psf_on_canvas(psf, (8, 8))


def test_every_scale_tried_stays_in_the_searched_range_and_start_is_the_fallback():
    psf, geometry, ys = small_camera(PsfWarp(1.3), n=1)
    result, crit = refine_warp(psf, geometry, ys, scale_range=(0.9, 1.2), n_scales=4, parameters=("scale",),
                               iters=30, rounds=2)
    assert all(0.9 - 1e-9 <= e.warp.scale <= 1.2 + 1e-9 for e in crit.evaluations)
    assert result.warp.scale == pytest.approx(1.2) and result.notes  # the edge, and it says so
    again, crit2 = refine_warp(psf, geometry, ys, scale_range=(1.1, 1.2), n_scales=3, parameters=("scale",),
                               iters=30, rounds=1, start=PsfWarp(1.15))
    assert crit2.evaluations[0].warp == PsfWarp(1.15) and again.start_criterion == crit2.evaluations[0].criterion


def test_refine_psf_refuses_a_scale_that_is_not_one():
    from train.cli import main as train_main

    for bad in ("0", "-1", "nan", "big"):
        with pytest.raises(SystemExit):
            train_main(["refine-psf", "--profile", "p", "--captures", "c", "--out", "o", "--compare-scale", bad])
