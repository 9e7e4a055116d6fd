"""nsdd_edge.optics: PSF/capture I/O in every format, preprocessing, spectra, and clear errors."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from nsdd_edge.optics import (
    LenslessGeometry,
    OpticsError,
    WienerFilter,
    WienerSpectra,
    array_hash,
    box_downsample,
    center_crop,
    center_pad,
    center_psf,
    corner_background,
    fit_to,
    load_psf,
    normalize,
    psf_transfer_function,
    read_array,
    read_image01,
    subtract_background,
)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------
# reading every format
# ---------------------------------------------------------------------------------------------


def test_npy_gray_and_hwc_and_chw(tmp_path, rng):
    a = rng.random((12, 10)).astype(np.float32)
    np.save(tmp_path / "g.npy", a)
    assert np.array_equal(read_array(tmp_path / "g.npy"), a[None])
    hwc = rng.random((12, 10, 3)).astype(np.float64)
    np.save(tmp_path / "hwc.npy", hwc)
    out = read_array(tmp_path / "hwc.npy")
    assert out.shape == (3, 12, 10) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.moveaxis(hwc, -1, 0), rtol=1e-6)
    np.save(tmp_path / "chw.npy", np.moveaxis(hwc, -1, 0))
    np.testing.assert_allclose(read_array(tmp_path / "chw.npy"), out)


def test_npz_keys(tmp_path, rng):
    a = rng.random((8, 9)).astype(np.float32)
    np.savez(tmp_path / "psf.npz", psf=a, other=np.zeros(3))
    assert np.array_equal(read_array(tmp_path / "psf.npz"), a[None])
    np.savez(tmp_path / "one.npz", whatever=a)
    assert np.array_equal(read_array(tmp_path / "one.npz"), a[None])
    np.savez(tmp_path / "two.npz", first=a, second=a)
    with pytest.raises(OpticsError, match=r"two\.npz.*key="):
        read_array(tmp_path / "two.npz")
    assert np.array_equal(read_array(tmp_path / "two.npz", key="second"), a[None])
    with pytest.raises(OpticsError, match=r"no array 'third'"):
        read_array(tmp_path / "two.npz", key="third")


@pytest.mark.parametrize("suffix,dtype", [(".png", np.uint8), (".png", np.uint16), (".tif", np.uint16),
                                          (".tiff", np.uint16)])
def test_images_gray_native_counts_and_01(tmp_path, rng, suffix, dtype):
    top = np.iinfo(dtype).max
    img = rng.integers(0, top, size=(20, 24), endpoint=True).astype(dtype)
    path = tmp_path / f"gray{suffix}"
    assert cv2.imwrite(str(path), img)
    a = read_array(path)
    assert a.shape == (1, 20, 24) and a.dtype == np.float32
    assert np.array_equal(a[0], img.astype(np.float32))  # native counts, not rescaled
    np.testing.assert_allclose(read_image01(path)[0], img / top, rtol=1e-6)


@pytest.mark.parametrize("suffix,dtype", [(".png", np.uint8), (".png", np.uint16), (".tiff", np.uint16)])
def test_images_rgb_order(tmp_path, suffix, dtype):
    top = np.iinfo(dtype).max
    rgb = np.zeros((6, 7, 3), dtype=dtype)
    rgb[..., 0] = top  # red
    rgb[..., 2] = top // 3  # a little blue
    path = tmp_path / f"rgb{suffix}"
    assert cv2.imwrite(str(path), rgb[..., ::-1])  # OpenCV writes BGR
    a = read_array(path)
    assert a.shape == (3, 6, 7)
    assert np.all(a[0] == top) and np.all(a[1] == 0) and np.all(a[2] == top // 3)


# ---------------------------------------------------------------------------------------------
# clear errors
# ---------------------------------------------------------------------------------------------


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(OpticsError, match=r"nope\.npy: no such file"):
        load_psf(tmp_path / "nope.npy")
    with pytest.raises(OpticsError, match="is a directory"):
        read_array(tmp_path)


@pytest.mark.parametrize("name", ["bad.png", "bad.tif", "bad.npy", "bad.npz"])
def test_unreadable_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"this is not a valid file at all")
    with pytest.raises(OpticsError, match=rf"{name}: (not a readable image|unreadable)"):
        read_array(tmp_path / name)


@pytest.mark.parametrize("name", ["empty.png", "empty.npy", "empty.tiff"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(OpticsError, match=rf"{name}: file is empty"):
        load_psf(tmp_path / name)


def test_empty_array_and_unsupported_type(tmp_path):
    np.save(tmp_path / "zero.npy", np.zeros((0, 5)))
    with pytest.raises(OpticsError, match=r"zero\.npy: array is empty"):
        read_array(tmp_path / "zero.npy")
    (tmp_path / "psf.txt").write_text("1 2 3")
    with pytest.raises(OpticsError, match=r"psf\.txt: unsupported file type"):
        read_array(tmp_path / "psf.txt")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf(tmp_path, bad):
    a = np.ones((16, 16), dtype=np.float32)
    a[3, 4] = bad
    np.save(tmp_path / "nan.npy", a)
    with pytest.raises(OpticsError, match=r"nan\.npy: 1 NaN/Inf values"):
        load_psf(tmp_path / "nan.npy")


def test_all_zero_psf(tmp_path):
    np.save(tmp_path / "zero.npy", np.zeros((16, 16), np.float32))
    with pytest.raises(OpticsError, match=r"zero\.npy: PSF is all zero"):
        load_psf(tmp_path / "zero.npy")
    # a PSF that is only background becomes all zero after the background is removed
    np.save(tmp_path / "flat.npy", np.full((32, 32), 7.0, np.float32))
    with pytest.raises(OpticsError, match=r"flat\.npy: PSF is all zero"):
        load_psf(tmp_path / "flat.npy", background="corner")


@pytest.mark.parametrize("shape", [(5,), (2, 3, 8, 8), (5, 8, 8)])
def test_wrong_dimensions(tmp_path, shape):
    np.save(tmp_path / "dims.npy", np.ones(shape, np.float32))
    with pytest.raises(OpticsError, match=r"dims\.npy: (expected a 2-D or 3-D|cannot tell the channel)"):
        load_psf(tmp_path / "dims.npy")


def test_psf_larger_than_sensor_needs_crop_model():
    with pytest.raises(OpticsError, match=r"larger than the sensor grid.*crop model"):
        LenslessGeometry.make("circular", (32, 32), psf_shape=(64, 64))
    g = LenslessGeometry.make("crop", (32, 32), psf_shape=(64, 64))
    assert g.conv_shape == (64, 64) and g.scene_shape == (64, 64)
    with pytest.raises(OpticsError, match="larger than the convolution grid"):
        LenslessGeometry.make("crop", (32, 32), psf_shape=(80, 64))
    with pytest.raises(OpticsError, match="unknown forward model"):
        LenslessGeometry.make("valid", (32, 32))


# ---------------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------------


def test_dark_frame_subtraction(tmp_path, rng):
    dark = rng.uniform(90, 110, size=(32, 32)).astype(np.float32)
    spot = np.zeros((32, 32), np.float32)
    spot[10:14, 20:22] = 500.0
    np.save(tmp_path / "raw.npy", dark + spot)
    np.save(tmp_path / "dark.npy", dark)
    psf = load_psf(tmp_path / "raw.npy", dark=tmp_path / "dark.npy")
    np.testing.assert_allclose(psf[0], spot / spot.sum(), atol=1e-6)
    psf2 = load_psf(tmp_path / "raw.npy", dark=dark[None])
    np.testing.assert_allclose(psf2, psf)
    with pytest.raises(OpticsError, match="does not match"):
        subtract_background(spot[None], np.zeros((16, 16), np.float32))


def test_corner_background(tmp_path):
    img = np.full((3, 40, 40), 12.0, np.float32)
    img[1] += 3.0
    img[:, 25:30, 25:30] += 100.0
    assert corner_background(img).ravel().tolist() == [12.0, 15.0, 12.0]
    out = subtract_background(img)
    assert out.min() == 0.0 and np.all(out[:, 25:30, 25:30] == 100.0)
    np.save(tmp_path / "c.npy", img)
    psf = load_psf(tmp_path / "c.npy", background="corner")
    assert np.count_nonzero(psf) == 3 * 25 and psf.sum(axis=(1, 2)) == pytest.approx([1.0, 1.0, 1.0])
    with pytest.raises(OpticsError, match="too small for the corner"):
        corner_background(np.ones((1, 10, 40), np.float32))


def test_box_downsample():
    a = np.arange(2 * 5 * 7, dtype=np.float32).reshape(2, 5, 7)
    d = box_downsample(a, 2)
    assert d.shape == (2, 2, 3)  # trailing row/column dropped
    assert d[1, 1, 2] == pytest.approx(a[1, 2:4, 4:6].mean())
    assert box_downsample(a, 1) is a
    assert np.array_equal(box_downsample(a, 2.0), d)
    for bad in (0, -2, 1.5):
        with pytest.raises(OpticsError, match="positive integer"):
            box_downsample(a, bad)
    with pytest.raises(OpticsError, match="leaves nothing"):
        box_downsample(a, 8)


def test_crop_pad_fit_center(rng):
    a = rng.random((3, 5, 6)).astype(np.float32)
    p = center_pad(a, (9, 11))
    assert p.shape == (3, 9, 11) and np.array_equal(p[:, 2:7, 2:8], a) and p.sum() == pytest.approx(a.sum())
    assert np.array_equal(center_crop(p, (5, 6)), a)
    f = fit_to(a, (3, 10))
    assert f.shape == (3, 3, 10) and np.array_equal(f[:, :, 2:8], a[:, 1:4])
    with pytest.raises(OpticsError, match="cannot crop"):
        center_crop(a, (6, 6))
    with pytest.raises(OpticsError, match="cannot pad"):
        center_pad(a, (4, 6))
    psf = np.zeros((1, 9, 12), np.float32)
    psf[0, 1, 2] = 1.0
    psf[0, 2, 2] = 0.5
    assert np.unravel_index(np.argmax(center_psf(psf)[0]), (9, 12)) == (4, 6)
    c = center_psf(psf, by="centroid")[0]
    assert np.unravel_index(np.argmax(c), (9, 12)) == (4, 6)


def test_normalisation():
    a = np.stack([np.full((4, 4), 2.0), np.full((4, 4), 5.0)]).astype(np.float32)
    s = normalize(a, "sum")
    assert s.sum(axis=(1, 2)) == pytest.approx([1.0, 1.0])
    assert np.linalg.norm(normalize(a, "l2")) == pytest.approx(1.0)
    assert normalize(a, "max").max() == pytest.approx(1.0)
    assert np.array_equal(normalize(a, "none"), a)
    with pytest.raises(OpticsError, match="unit sum"):
        normalize(np.zeros((1, 4, 4)), "sum")
    with pytest.raises(OpticsError, match="all zero"):
        normalize(np.zeros((1, 4, 4)), "l2")
    with pytest.raises(OpticsError, match="unknown normalisation"):
        normalize(a, "median")


def test_load_psf_pipeline(tmp_path, rng):
    raw = rng.uniform(0, 1, size=(64, 48, 3)).astype(np.float32)
    np.save(tmp_path / "rgb.npy", raw)
    psf = load_psf(tmp_path / "rgb.npy", downsample=4, grayscale=True, shape=(20, 20), normalization="l2")
    assert psf.shape == (1, 20, 20) and np.linalg.norm(psf) == pytest.approx(1.0, rel=1e-5)
    expected = fit_to(box_downsample(np.moveaxis(raw, -1, 0), 4).mean(axis=0, keepdims=True), (20, 20))
    np.testing.assert_allclose(psf, expected / np.linalg.norm(expected), rtol=1e-5)
    per_channel = load_psf(tmp_path / "rgb.npy", downsample=2)
    assert per_channel.shape == (3, 32, 24) and per_channel.sum(axis=(1, 2)) == pytest.approx([1, 1, 1])


def test_real_psfs(shared, radial_psf):
    assert radial_psf.shape == (1, 256, 256) and radial_psf.sum() == pytest.approx(1.0, rel=1e-5)
    dc = load_psf(shared / "data/lensless/diffusercam/psf_sample.tif", background="corner", downsample=8)
    assert dc.shape == (1, 150, 200) and dc.min() >= 0 and dc.sum() == pytest.approx(1.0, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# spectra
# ---------------------------------------------------------------------------------------------


def test_transfer_function_and_wiener_spectra(rng):
    delta = np.zeros((1, 7, 8), np.float32)
    delta[0, 3, 4] = 1.0  # centred at (H // 2, W // 2): no shift, H ≡ 1
    np.testing.assert_allclose(psf_transfer_function(delta, (16, 20)), 1.0, atol=1e-12)
    psf = normalize(rng.random((1, 8, 8)).astype(np.float32))
    H = psf_transfer_function(psf, (16, 16))
    assert H[0, 0, 0].real == pytest.approx(1.0, abs=1e-6)
    s = WienerSpectra.from_psf(psf, (16, 16), 1e-3)
    np.testing.assert_allclose(s.G, np.conj(s.H) / (np.abs(s.H) ** 2 + 1e-3))
    np.testing.assert_allclose(s.R, np.abs(s.G * s.H))
    assert s.half("G").shape == (1, 16, 9)
    with pytest.raises(OpticsError, match="λ must be finite and > 0"):
        WienerSpectra.from_psf(psf, (16, 16), 0.0)


def test_wiener_filter_inverts_circular_convolution(rng):
    psf = normalize(rng.random((1, 16, 16)).astype(np.float32) ** 4)
    g = LenslessGeometry.make("circular", (16, 16))
    x = rng.random((2, 3, 16, 16)).astype(np.float32)
    H = psf_transfer_function(psf, (16, 16))
    y = np.fft.ifft2(np.fft.fft2(x) * H).real.astype(np.float32)
    x_hat = WienerFilter(psf, g, lam=1e-9)(y)
    assert x_hat.shape == x.shape
    np.testing.assert_allclose(x_hat, x, atol=2e-3)
    with pytest.raises(OpticsError, match="does not match the sensor"):
        WienerFilter(psf, g, lam=1e-3)(y[..., :8])


def test_array_hash():
    a = np.ones((1, 4, 4), np.float32)
    assert array_hash(a) == array_hash(a.astype(np.float64))
    b = a.copy()
    b[0, 0, 0] = 1.0001
    assert array_hash(a) != array_hash(b)
    assert array_hash(a) != array_hash(a.reshape(1, 2, 8))
