"""train.mask.propagation against analytic optics: energy conservation, the on-axis intensity behind a
circular pinhole, the focus of a Fresnel zone aperture, and the geometric-shadow fast path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nsdd_edge.optics import OpticsError
from train.mask.propagation import MaskOptics, MaskToPsf, angular_spectrum, mask_psf

N = 512  # samples per side, pitch 1 µm


def radius_sq(n: int = N) -> torch.Tensor:
    r = torch.arange(n, dtype=torch.float64) - n / 2 + 0.5
    return r[:, None] ** 2 + r[None, :] ** 2


def on_axis(u: torch.Tensor) -> float:
    c = u.shape[-1] // 2
    return float(u[c - 1 : c + 1, c - 1 : c + 1].abs().pow(2).mean())


def test_energy_is_conserved():
    """Parseval: a field whose spectrum lies inside the propagating band keeps its power."""
    beam = torch.exp(-radius_sq() / (2 * 8.0 ** 2)).to(torch.complex128)
    for z in (100.0, 500.0, 2000.0):
        u = angular_spectrum(beam, 1.0, z, 0.55)
        assert float(u.abs().pow(2).sum() / beam.abs().pow(2).sum()) == pytest.approx(1.0, abs=1e-9)
    # a mask's field also keeps its power (up to the few evanescent/aliased components cut off)
    mask = (torch.rand(N, N, generator=torch.Generator().manual_seed(0)) > 0.5).double() * (radius_sq() < 150 ** 2)
    u = angular_spectrum(mask.to(torch.complex128), 2.0, 500.0, 0.55)
    assert float(u.abs().pow(2).sum() / mask.pow(2).sum()) == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("fresnel_number", [0.5, 1.0, 1.5, 2.0, 3.0])
def test_pinhole_on_axis_intensity(fresnel_number):
    """Circular aperture of radius a: ``I(0, z) / I₀ = 4 sin²(π N_F / 2)``, ``N_F = a² / (λ z)`` (Fresnel)."""
    aperture = (radius_sq() <= 40.0 ** 2).double()
    a_sq = float(aperture.sum()) / math.pi  # the discretised disk's effective radius²
    wavelength = 0.5
    z = a_sq / (wavelength * fresnel_number)
    u = angular_spectrum(aperture.to(torch.complex128), 1.0, z, wavelength)
    # within 3 % of the range [0, 4]: the pixelated disk edge is the error
    assert on_axis(u) == pytest.approx(4 * math.sin(math.pi * fresnel_number / 2) ** 2, abs=0.12)


@pytest.mark.parametrize("wavelength", [0.46, 0.62])
def test_fresnel_zone_aperture_focuses_at_its_focal_length(wavelength):
    """Gabor zone plate ``t = (1 + cos(π r² / (λ₀ f))) / 2`` focuses at ``f λ₀ / λ``: the on-axis
    intensity over z peaks there, far above the plane wave's."""
    f0, design_wavelength = 2000.0, 0.54
    r2 = radius_sq()
    plate = 0.5 * (1 + torch.cos(math.pi * r2 / (design_wavelength * f0))) * (r2 <= 100.0 ** 2)
    focus = f0 * design_wavelength / wavelength
    zs = np.linspace(0.6 * focus, 1.4 * focus, 33)
    intensity = [on_axis(angular_spectrum(plate.to(torch.complex128), 1.0, z, wavelength)) for z in zs]
    peak = zs[int(np.argmax(intensity))]
    assert peak == pytest.approx(focus, rel=0.04)
    assert max(intensity) > 20.0


def test_geometric_shadow_fast_path():
    rng = np.random.default_rng(3)
    mask = np.zeros((32, 32))
    mask[8:24, 8:24] = rng.random((16, 16)) > 0.5
    optics = MaskOptics(distance_mm=0.5, sensor_pitch_um=20.0, feature_um=10.0, oversample=2)
    shadow = mask_psf(mask, optics, (16, 16), "shadow")
    # the shadow is the mask itself, integrated over each sensor pixel (2 × 2 cells), for every colour
    expected = mask.reshape(16, 2, 16, 2).sum(axis=(1, 3))
    np.testing.assert_allclose(shadow, np.broadcast_to(expected / expected.sum(), shadow.shape), atol=1e-7)
    # at a large Fresnel number the angular spectrum agrees with the shadow, and auto picks the shadow
    near = MaskOptics(distance_mm=0.005, sensor_pitch_um=20.0, feature_um=10.0, oversample=4)
    assert MaskToPsf(near, (16, 16)).method == "shadow" and MaskToPsf(optics, (16, 16)).method == "fresnel"
    fresnel = mask_psf(mask, near, (16, 16), "fresnel")
    assert np.corrcoef(fresnel[1].ravel(), shadow[1].ravel())[0, 1] > 0.99
    # at the design distance diffraction matters, more in red than in blue
    psf = mask_psf(mask, optics, (16, 16), "fresnel")
    err = [np.abs(psf[c] - shadow[c]).sum() for c in range(3)]
    assert err[0] > err[1] > err[2] > 0.05
    assert psf.shape == (3, 16, 16) and np.allclose(psf.sum(axis=(1, 2)), 1.0, atol=1e-6)


def test_psf_is_differentiable_and_sums_to_one():
    optics = MaskOptics()
    to_psf = MaskToPsf(optics, (16, 16), "fresnel")
    theta = torch.zeros(16, 16, requires_grad=True)
    psf = to_psf(torch.sigmoid(theta))
    assert torch.allclose(psf.sum(dim=(-2, -1)), torch.ones(3, dtype=torch.float64))
    (psf[1] * torch.arange(16.0, dtype=torch.float64)).sum().backward()
    assert theta.grad is not None and float(theta.grad.abs().sum()) > 0


def test_bad_optics_are_refused():
    with pytest.raises(OpticsError, match="whole number of simulation samples"):
        MaskOptics(sensor_pitch_um=15.0, feature_um=10.0, oversample=1)
    with pytest.raises(OpticsError, match="must be > 0"):
        MaskOptics(distance_mm=0.0)
    with pytest.raises(OpticsError, match="no light"):
        mask_psf(np.zeros((8, 8)), MaskOptics(), (8, 8))
