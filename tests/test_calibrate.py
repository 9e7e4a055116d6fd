"""nsdd-edge calibrate: PSF from a simulated point source (file:// stacks and sim://), refusals, atomic outputs."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from nsdd_edge.cli import main as nsdd_edge
from nsdd_edge.optics import center_psf, normalize
from nsdd_edge.psf_sim import simulate_psf
from nsdd_edge.sources import open_source


@pytest.fixture(scope="module")
def true_psf(tmp_path_factory):
    psf = simulate_psf("contour", (48, 48), 3)
    path = tmp_path_factory.mktemp("psf") / "true_psf.npy"
    np.save(path, psf)
    return psf, path


def frames(uri: str, n: int, **options) -> list[np.ndarray]:
    src = open_source(uri, **options)
    return [src.read().data for _ in range(n)]


def expected(psf: np.ndarray) -> np.ndarray:
    return normalize(center_psf(psf, by="centroid"), "sum")


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_dark_frames_then_point_source(tmp_path, true_psf):
    psf, psf_path = true_psf
    dark = frames("sim://?realtime=0&scene=dark&channels=1&seed=1", 4, psf=psf_path)
    lit = frames("sim://?realtime=0&scene=point&channels=1&seed=2", 8, psf=psf_path)
    np.save(tmp_path / "capture.npy", np.stack(dark + lit))
    out = tmp_path / "cal" / "psf.npy"
    rc = nsdd_edge(["calibrate", "--source", f"file://{tmp_path / 'capture.npy'}?black_level=256&white_level=4095",
                    "--frames", "8", "--background-frames", "4", "--no-prompt", "--out", str(out)])
    assert rc == 0
    est = np.load(out)
    assert est.shape == (1, 48, 48) and est.dtype == np.float32
    assert est.sum() == pytest.approx(1.0, abs=1e-5) and est.min() >= 0
    ref = expected(psf)
    assert corr(est, ref) > 0.995
    assert np.abs(est - ref).sum() < 0.1  # L1 distance of two unit-sum PSFs
    view = cv2.imread(str(out.with_suffix(".png")), cv2.IMREAD_UNCHANGED)
    assert view.shape == (48, 48) and view.dtype == np.uint8 and view.max() == 255
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["frames"] == 8 and info["background"] == "dark frames" and info["preprocess"]["black_level"] == 256
    saved = np.load(out.with_suffix(".capture.npz"))
    assert saved["capture"].shape == (1, 48, 48) and saved["background"].shape == (1, 48, 48)
    assert not list(out.parent.glob(".*"))  # no temporary files left


def test_bayer_point_source_with_background_file_and_size(tmp_path, true_psf):
    psf, psf_path = true_psf
    dark = frames("sim://?realtime=0&scene=dark&format=bayer&bayer=BGGR&seed=4", 6, psf=psf_path)
    np.save(tmp_path / "dark.npy", np.mean(dark, axis=0).astype(np.float32))
    lit = frames("sim://?realtime=0&scene=point&format=bayer&bayer=BGGR&seed=5", 6, psf=psf_path)
    np.save(tmp_path / "lit.npy", np.stack(lit))
    out = tmp_path / "psf.npy"
    rc = nsdd_edge(["calibrate", "--source", f"file://{tmp_path / 'lit.npy'}?black_level=256&bayer=BGGR",
                    "--frames", "6", "--background", str(tmp_path / "dark.npy"), "--size", "40", "40",
                    "--out", str(out)])
    assert rc == 0
    est = np.load(out)
    assert est.shape == (3, 40, 40)
    np.testing.assert_allclose(est.sum(axis=(1, 2)), 1.0, atol=1e-5)  # each colour channel sums to one
    ref = normalize(center_psf(psf, by="centroid")[:, 4:44, 4:44], "sum")
    for c in range(3):
        assert corr(est[c], ref[0]) > 0.99


def test_live_sim_source_with_corner_background(tmp_path, true_psf):
    psf, psf_path = true_psf
    out = tmp_path / "psf.npy"
    rc = nsdd_edge(["calibrate", "--source", f"sim://?realtime=0&scene=point&channels=1&psf={psf_path}",
                    "--frames", "4", "--grayscale", "--out", str(out)])
    assert rc == 0
    est = np.load(out)
    assert est.shape == (1, 48, 48)
    assert corr(est, expected(psf)) > 0.98  # the corner mean removes black level (and a little PSF)
    assert json.loads(out.with_suffix(".json").read_text())["background"].startswith("corner")


def test_saturated_capture_is_refused_and_keeps_the_old_psf(tmp_path, true_psf, capsys):
    _, psf_path = true_psf
    out = tmp_path / "psf.npy"
    np.save(out, np.ones((1, 4, 4), np.float32))
    before = out.read_bytes()
    rc = nsdd_edge(["calibrate", "--source", f"sim://?realtime=0&scene=point&point_level=1.5&psf={psf_path}",
                    "--frames", "2", "--out", str(out)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "saturated" in err and "lower the exposure" in err
    assert out.read_bytes() == before and not out.with_suffix(".png").exists()


def test_dark_capture_is_refused(tmp_path, true_psf, capsys):
    _, psf_path = true_psf
    np.save(tmp_path / "dark.npy", np.stack(frames("sim://?realtime=0&scene=dark&channels=1", 3, psf=psf_path)))
    out = tmp_path / "psf.npy"
    rc = nsdd_edge(["calibrate", "--source", f"file://{tmp_path / 'dark.npy'}?black_level=256&white_level=4095",
                    "--frames", "3", "--out", str(out)])
    assert rc == 1
    assert "dark" in capsys.readouterr().err
    assert not out.exists()


def test_bad_arguments(tmp_path, capsys):
    assert nsdd_edge(["calibrate", "--source", "sim://", "--out", str(tmp_path / "psf.txt")]) == 2
    assert ".npy" in capsys.readouterr().err
    assert nsdd_edge(["calibrate", "--source", "nope://x", "--out", str(tmp_path / "psf.npy")]) == 2
    assert "unknown scheme" in capsys.readouterr().err
    assert nsdd_edge(["calibrate", "--source", f"file://{tmp_path / 'missing.npy'}", "--frames", "2",
                      "--out", str(tmp_path / "psf.npy")]) == 1
    assert "does not exist" in capsys.readouterr().err
    np.save(tmp_path / "short.npy", np.full((2, 8, 8), 3000, np.uint16))
    assert nsdd_edge(["calibrate", "--source", f"file://{tmp_path / 'short.npy'}", "--frames", "5",
                      "--out", str(tmp_path / "psf.npy")]) == 1
    assert "frame 3/5" in capsys.readouterr().err


def test_real_diffusercam_psf_matches_the_core_loader(shared, tmp_path, capsys):
    """The DiffuserCam tutorial PSF (one 1200×1600 16-bit capture): same result as optics.load_psf; its 192
    pixels at the 12-bit ceiling (65520 in 16-bit units) are caught when the white level is given."""
    from nsdd_edge.optics import load_psf

    tif = shared / "data/lensless/diffusercam/psf_sample.tif"
    out = tmp_path / "psf.npy"
    rc = nsdd_edge(["calibrate", "--source", f"file://{tif}?white_level=65520", "--frames", "1",
                    "--downsample", "4", "--center", "peak", "--out", str(out)])
    assert rc == 1 and "saturated" in capsys.readouterr().err and not out.exists()
    rc = nsdd_edge(["calibrate", "--source", f"file://{tif}?white_level=65520", "--frames", "1",
                    "--downsample", "4", "--center", "peak", "--max-saturated", "0.001", "--out", str(out)])
    assert rc == 0
    est = np.load(out)
    ref = load_psf(tif, background="corner", downsample=4, center=True)
    assert est.shape == ref.shape == (1, 300, 400)
    assert corr(est, ref) > 0.9999
