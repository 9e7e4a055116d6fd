"""Simulated PSFs: shape, normalisation, centring, determinism, and the look of each kind."""

from __future__ import annotations

import numpy as np
import pytest

from nsdd_edge.psf_sim import PSF_KINDS, binary_mask_psf, caustic_psf, contour_psf, simulate_psf


def circular_centroid(psf: np.ndarray) -> tuple[float, float]:
    e = psf[0].astype(np.float64)
    h, w = e.shape
    r = np.angle((e.sum(axis=1) * np.exp(2j * np.pi * np.arange(h) / h)).sum()) / (2 * np.pi) * h
    c = np.angle((e.sum(axis=0) * np.exp(2j * np.pi * np.arange(w) / w)).sum()) / (2 * np.pi) * w
    return r % h, c % w


@pytest.mark.parametrize("kind", PSF_KINDS)
@pytest.mark.parametrize("shape", [(64, 64), (48, 80)])
def test_psf_contract(kind, shape):
    psf = simulate_psf(kind, shape, seed=3)
    assert psf.shape == (1, *shape) and psf.dtype == np.float32
    assert np.all(np.isfinite(psf)) and psf.min() >= 0
    assert psf.sum() == pytest.approx(1.0, abs=1e-5)
    r, c = circular_centroid(psf)
    assert abs(r - shape[0] // 2) <= 1.0 and abs(c - shape[1] // 2) <= 1.0
    # a lensless PSF spreads light: no single pixel holds a large share of it
    assert psf.max() < 0.05


@pytest.mark.parametrize("kind", PSF_KINDS)
def test_deterministic_per_seed(kind):
    a = simulate_psf(kind, (64, 64), seed=7)
    b = simulate_psf(kind, (64, 64), seed=7)
    c = simulate_psf(kind, (64, 64), seed=8)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_named_functions_match_dispatch():
    assert np.array_equal(contour_psf((40, 40), seed=1), simulate_psf("contour", (40, 40), seed=1))
    assert np.array_equal(caustic_psf(40, seed=1), simulate_psf("caustic", (40, 40), seed=1))
    assert np.array_equal(binary_mask_psf((1, 40, 40), seed=1), simulate_psf("binary", 40, seed=1))


def test_contours_are_thin_lines():
    psf = contour_psf((128, 128), seed=0)[0]
    lit = psf > 0.2 * psf.max()
    # thin curves: a small fraction of the area is lit, and most lit pixels have unlit 4-neighbours
    assert 0.01 < lit.mean() < 0.25
    interior = lit & np.roll(lit, 1, 0) & np.roll(lit, -1, 0) & np.roll(lit, 1, 1) & np.roll(lit, -1, 1)
    assert interior.sum() < 0.5 * lit.sum()


def test_caustic_is_high_contrast():
    psf = caustic_psf((128, 128), seed=0)[0]
    inside = psf[psf > 0]
    # caustics concentrate light on sharp lines: heavy-tailed intensity (max ≫ mean)
    assert psf.max() > 20 * inside.mean()
    # and differ from a plain aperture (non-trivial spectrum)
    assert np.std(psf) > np.mean(psf)


def test_binary_mask_shadow_is_binary_with_density():
    psf = binary_mask_psf((128, 128), seed=0, diffraction=False, density=0.3, cell=4)[0]
    values = np.unique(np.round(psf / psf.max(), 6))
    assert set(values.tolist()) == {0.0, 1.0}
    open_frac = (psf > 0).sum() / (int(0.8 * 128) // 4 * 4) ** 2
    assert 0.22 < open_frac < 0.38
    diffracted = binary_mask_psf((128, 128), seed=0, density=0.3, cell=4)[0]
    assert len(np.unique(diffracted)) > 100  # diffraction makes a continuous pattern


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown PSF kind"):
        simulate_psf("lens", (32, 32))
    with pytest.raises(ValueError, match="at least 8"):
        contour_psf((4, 32))
    with pytest.raises(ValueError, match="density"):
        binary_mask_psf((32, 32), density=1.5)
