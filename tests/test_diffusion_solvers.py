"""DDNM/DDNM+, DPS and DiffPIR on a tiny seeded prior and the real radial PSF (downsampled to 32 px)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from train.physics import LenslessOperator
from train.prior.base import DiffusionPrior, linear_alphas_cumprod
from train.solvers import make_solver
from train.solvers.diffusion_common import (
    measurement_to_model_space,
    network_calls,
    quadratic_timesteps,
    repaint_schedule,
    uniform_timesteps,
    wiener_half_spectrum,
)

SIZE = 32


class TinyEpsNet(nn.Module):
    """ε of a Gaussian image prior ``x0 ~ N(0, c²)`` (exact denoiser) plus a small random conv net."""

    def __init__(self, alphas_cumprod: torch.Tensor, channels: int = 3, c: float = 0.5):
        super().__init__()
        self.register_buffer("ab", alphas_cumprod.float(), persistent=False)
        self.c = c
        self.conv = nn.Sequential(nn.Conv2d(channels + 1, 8, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(8, channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.ab[t.long()].view(-1, 1, 1, 1)
        gaussian = (1 - ab).sqrt() * x / (ab * self.c ** 2 + 1 - ab)
        t_map = (t.float() / len(self.ab)).view(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[-2:])
        return gaussian + 0.1 * self.conv(torch.cat([x, t_map], dim=1))


def tiny_prior(seed: int = 0, channels: int = 3) -> DiffusionPrior:
    torch.manual_seed(seed)
    ac = linear_alphas_cumprod()
    return DiffusionPrior(TinyEpsNet(ac, channels), ac, SIZE, channels)


def smooth_scenes(n: int, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=size, mode="bilinear")


@pytest.fixture(scope="module")
def psf32(shared) -> np.ndarray:
    from nsdd_edge.optics import load_psf

    return load_psf(shared / "data/psf/radial_6per_256.npy", downsample=8)  # (1, 32, 32), sums to 1


@pytest.fixture(scope="module")
def prior() -> DiffusionPrior:
    return tiny_prior()


def measure(op: LenslessOperator, n: int = 2, seed: int = 0) -> torch.Tensor:
    x = smooth_scenes(n, seed, op.scene_shape[0])
    return op.measure(x, generator=torch.Generator().manual_seed(seed + 100))


# ---- helpers ------------------------------------------------------------------------------------
def test_schedules_and_measurement_mapping(psf32):
    assert uniform_timesteps(1000, 100)[:2] == [990, 980] and uniform_timesteps(1000, 100)[-1] == 0
    q = quadratic_timesteps(1000, 100)
    assert q[0] == 999 and q[-1] == 0 and len(q) == 100 and all(a > b for a, b in itertools.pairwise(q))
    assert network_calls(repaint_schedule(100, 10, 3)) == 280
    assert network_calls(repaint_schedule(100)) == 100
    with pytest.raises(ValueError, match="steps"):
        uniform_timesteps(1000, 0)
    op = LenslessOperator(psf32, (SIZE, SIZE), "circular", lam=1e-6)
    x = smooth_scenes(1)
    y_m, s = measurement_to_model_space(op.A(x), op, 0.01)
    assert s == pytest.approx(0.02)
    torch.testing.assert_close(y_m, op.A(2 * x - 1), atol=1e-6, rtol=0)


# ---- DDNM / DDNM+ -------------------------------------------------------------------------------
def test_ddnm_consistency_matches_wiener_circular(psf32, prior):
    op = LenslessOperator(psf32, (SIZE, SIZE), "circular", lam=1e-6)
    y = measure(op)
    solver = make_solver("ddnm", prior=prior, steps=20)
    x_hat = solver(y, op)
    assert x_hat.shape == y.shape and solver.nfe == 20
    wiener = op.consistency(op.A_dagger(y), y)
    ddnm = op.consistency(x_hat, y)
    assert torch.all(ddnm <= 1.01 * wiener), (ddnm, wiener)
    # the null space is the prior's, not Wiener's: the outputs differ there
    assert float((op.null_project(x_hat) - op.null_project(op.A_dagger(y))).abs().max()) > 1e-3


def test_ddnm_same_seed_same_output_and_batch_independent(psf32, prior):
    op = LenslessOperator(psf32, (SIZE, SIZE), "circular", lam=1e-6)
    y = measure(op, n=3)
    a = make_solver("ddnm", prior=prior, steps=10, seed=7)(y, op)
    b = make_solver("ddnm", prior=prior, steps=10, seed=7)(y, op)
    c = make_solver("ddnm", prior=prior, steps=10, seed=8)(y, op)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # sample 2 alone with its per-sample seed (7 + 2) gives the batched result
    alone = make_solver("ddnm", prior=prior, steps=10, seeds=[9])(y[2:3], op)
    torch.testing.assert_close(alone, a[2:3], atol=1e-5, rtol=0)


def test_ddnm_plus_only_differs_when_noisy(psf32, prior):
    noisy_op = LenslessOperator(psf32, (SIZE, SIZE), "circular", lam=1e-6, noise_std=0.005)
    clean_op = LenslessOperator(psf32, (SIZE, SIZE), "circular", lam=1e-6, noise_std=0.0)
    y = measure(noisy_op)
    free = make_solver("ddnm", prior=prior, steps=10)(y, clean_op)
    forced_zero = make_solver("ddnm", prior=prior, steps=10, sigma_y=0.0)(y, noisy_op)
    aware = make_solver("ddnm", prior=prior, steps=10)(y, noisy_op)  # σ_y from the operator
    assert torch.equal(free, forced_zero)
    assert float((aware - free).abs().max()) > 1e-2
    x = smooth_scenes(2)
    # with noise, DDNM+ does not fit the noise like the λ = 1e-6 Wiener filter does
    assert float(((aware - x) ** 2).mean()) < float(((noisy_op.A_dagger(y) - x) ** 2).mean())


def test_ddnm_plus_correction_matches_dense_svd():
    """Σ_t A†(A x0 − y) in the Fourier domain equals the dense-matrix SVD version on an 8×8 circulant."""
    rng = np.random.default_rng(0)
    n = 8
    psf = rng.random((1, n, n)).astype(np.float32) ** 4
    psf /= psf.sum()
    op = LenslessOperator(psf, (n, n), "circular", lam=1e-3)  # float64 inputs use the complex128 spectra
    basis = torch.eye(n * n, dtype=torch.float64).reshape(n * n, 1, n, n)
    A = op.A(basis).reshape(n * n, n * n).T  # column k = A e_k
    U, s, Vt = torch.linalg.svd(A)
    a, sigma_t, sigma_y, eta = 0.9, 0.3, 0.05, 0.85
    prior = tiny_prior(channels=1)
    solver = make_solver("ddnm", prior=prior, steps=10, eta=eta)
    spectral = solver._spectral_setup(op, torch.zeros(1, dtype=torch.float64))
    x0 = torch.from_numpy(rng.standard_normal((1, 1, n, n)))
    y = torch.from_numpy(rng.standard_normal((1, 1, n, n)))
    gens = [torch.Generator().manual_seed(0)]
    x0_hat, _ = solver._ddnm_plus_step(x0, torch.zeros_like(x0), y, op, spectral, a, sigma_t, sigma_y, gens, 1)
    null = s < math.sqrt(op.lam)
    partial = s * sigma_t * math.sqrt(1 - eta ** 2) / (a * sigma_y)
    lam_t = torch.where(s * sigma_t >= a * sigma_y, torch.ones_like(s), partial)
    lam_t = torch.where(null, torch.zeros_like(s), lam_t)
    pinv = Vt.T @ torch.diag(lam_t * s / (s ** 2 + op.lam)) @ U.T
    dense = x0.flatten() - pinv @ (A @ x0.flatten() - y.flatten())
    torch.testing.assert_close(x0_hat.flatten(), dense, atol=1e-9, rtol=1e-9)
    assert bool(null.any()) and bool((~null).any()) and bool((lam_t < 1).any()) and bool((lam_t[~null] == 1).any())
    assert wiener_half_spectrum(op, x0).dtype == torch.complex128


def test_ddnm_plus_renoising_spectrum(psf32):
    """Re-noising per frequency: √(σ_t² − a²σ_y²/s²) z, σ_t η z, and σ_t η z + σ_t √(1−η²) ε in the null space."""
    op = LenslessOperator(psf32, (SIZE, SIZE), "circular", lam=1e-3)  # 313 null, 36 above, 195 partial bins
    a, sigma_t, sigma_y, eta = 0.8, 0.2, 0.02, 0.85
    solver = make_solver("ddnm", prior=tiny_prior(channels=1), steps=10, eta=eta)
    spectral = solver._spectral_setup(op, torch.zeros(1))
    n = 400
    zeros = torch.zeros(n, 1, SIZE, SIZE)
    y = torch.zeros(n, 1, SIZE, SIZE)

    def gens():
        return [torch.Generator().manual_seed(k) for k in range(n)]

    _, noise = solver._ddnm_plus_step(zeros, zeros, y, op, spectral, a, sigma_t, sigma_y, gens(), 1)
    s = spectral["s"][0].double()
    null = s < math.sqrt(op.lam)
    above = (s * sigma_t > a * sigma_y) & ~null
    expected = torch.where(above, sigma_t ** 2 - (a * sigma_y / s.clamp_min(1e-30)) ** 2,
                           torch.full_like(s, (sigma_t * eta) ** 2))
    power = (torch.fft.rfft2(noise[:, 0].double()).abs() ** 2).mean(0) / (SIZE * SIZE)
    assert bool(above.any()) and bool((~above & ~null).any()) and bool(null.any())
    for region in (above, ~above & ~null, null):
        ratio = float(power[region].sum() / expected[region].sum())
        assert abs(ratio - 1) < 0.03, ratio  # ≥ 36 bins × 400 samples: statistical error ≈ 1%
    eps = torch.randn(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(99))
    _, noise_eps = solver._ddnm_plus_step(zeros, eps, y, op, spectral, a, sigma_t, sigma_y, gens(), 1)
    m_eps = torch.where(null, sigma_t * math.sqrt(1 - eta ** 2), 0.0).float()
    want = torch.fft.irfft2(torch.fft.rfft2(eps) * m_eps, s=(SIZE, SIZE))
    torch.testing.assert_close(noise_eps - noise, want, atol=1e-5, rtol=0)


def test_ddnm_time_travel_counts_calls(psf32, prior):
    op = LenslessOperator(psf32, (SIZE, SIZE), "circular", lam=1e-6, noise_std=0.005)
    y = measure(op, n=1)
    plain = make_solver("ddnm", prior=prior, steps=10)
    travel = make_solver("ddnm", prior=prior, steps=10, travel_length=2, travel_repeat=2)
    x_plain, x_travel = plain(y, op), travel(y, op)
    assert plain.nfe == 10 and travel.nfe == network_calls(repaint_schedule(10, 2, 2)) == 18
    assert torch.isfinite(x_travel).all() and not torch.allclose(x_plain, x_travel)


def test_ddnm_crop_model_runs(psf32, prior):
    op = LenslessOperator(psf32, (SIZE, SIZE), "crop", lam=1e-6, scene_shape=(16, 16), conv_shape=(64, 64),
                          noise_std=0.005)
    y = measure(op)
    small_prior = DiffusionPrior(prior.net, prior.alphas_cumprod, 16, 3)
    for sigma_y in (0.0, None):
        x_hat = make_solver("ddnm", prior=small_prior, steps=10, sigma_y=sigma_y)(y, op)
        assert x_hat.shape == (2, 3, 16, 16) and torch.isfinite(x_hat).all()
        # the crop model's A† is approximate, yet the result explains y far better than a flat grey image
        flat = op.consistency(torch.full_like(x_hat, 0.5), y)
        assert torch.all(op.consistency(x_hat, y) < 0.5 * flat)


def test_solvers_reject_bad_input(psf32, prior):
    op = LenslessOperator(psf32, (SIZE, SIZE), "circular", lam=1e-6)
    with pytest.raises(ValueError, match="channels"):
        make_solver("ddnm", prior=prior, steps=5)(torch.zeros(1, 1, SIZE, SIZE), op)
    with pytest.raises(ValueError, match="per-sample seeds"):
        make_solver("ddnm", prior=prior, steps=5, seeds=[1, 2, 3])(measure(op, n=2), op)
    with pytest.raises(ValueError, match="eta"):
        make_solver("ddnm", prior=prior, eta=1.5)


# ---- DPS and DiffPIR ----------------------------------------------------------------------------
@pytest.mark.parametrize("name, settings", [("dps", {"steps": 50}), ("diffpir", {"steps": 30})])
def test_dps_diffpir_reduce_residual_and_are_seeded(psf32, prior, name, settings):
    op = LenslessOperator(psf32, (SIZE, SIZE), "circular", lam=1e-6, noise_std=0.005)
    y = measure(op)
    solver = make_solver(name, prior=prior, seed=3, **settings)
    x_hat = solver(y, op)
    assert solver.nfe == settings["steps"] and x_hat.shape == y.shape
    start = op.consistency(solver.last_start, y)
    end = op.consistency(x_hat, y)
    assert torch.all(end < 0.9 * start), (start, end)
    again = make_solver(name, prior=prior, seed=3, **settings)(y, op)
    assert torch.equal(x_hat, again)


def test_dps_gradient_step_matters(psf32, prior):
    op = LenslessOperator(psf32, (SIZE, SIZE), "circular", lam=1e-6, noise_std=0.005)
    y = measure(op)
    guided = make_solver("dps", prior=prior, steps=30, zeta=0.3)(y, op)
    unguided = make_solver("dps", prior=prior, steps=30, zeta=0.0)(y, op)
    assert torch.all(op.consistency(guided, y) < op.consistency(unguided, y))


def test_diffpir_crop_model_uses_cg(psf32, prior):
    op = LenslessOperator(psf32, (SIZE, SIZE), "crop", lam=1e-6, scene_shape=(16, 16), conv_shape=(64, 64),
                          noise_std=0.005)
    y = measure(op)
    small_prior = DiffusionPrior(prior.net, prior.alphas_cumprod, 16, 3)
    solver = make_solver("diffpir", prior=small_prior, steps=10, cg_iters=10)
    x_hat = solver(y, op)
    assert x_hat.shape == (2, 3, 16, 16)
    assert torch.all(op.consistency(x_hat, y) < 0.5 * op.consistency(solver.last_start, y))
