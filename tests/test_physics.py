"""train.physics.LenslessOperator on real and simulated PSFs, both models, float32/float64, batched.

Real PSFs are downsampled to keep the tests fast: the radial PSF of ../shared ×4 (64×64) and the
DiffuserCam PSF ×16 (75×100, corner background removed). Simulated PSFs come from nsdd_edge.psf_sim.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from nsdd_edge.optics import WienerFilter, load_psf
from nsdd_edge.psf_sim import simulate_psf
from train.physics import LenslessOperator

MODELS = ("circular", "crop")
PSF_NAMES = ("radial", "diffusercam", "contour", "caustic", "binary", "rgb_contour")


@pytest.fixture(scope="module")
def psfs(shared) -> dict[str, np.ndarray]:
    return {
        "radial": load_psf(shared / "data/psf/radial_6per_256.npy", downsample=4),
        "diffusercam": load_psf(shared / "data/lensless/diffusercam/psf_sample.tif", background="corner",
                                downsample=16),
        "contour": simulate_psf("contour", (48, 48), seed=1),
        "caustic": simulate_psf("caustic", (40, 56), seed=2),
        "binary": simulate_psf("binary", (48, 48), seed=3),
        # a per-channel PSF: a different pattern in each colour channel
        "rgb_contour": np.concatenate([simulate_psf("contour", (32, 32), seed=s) for s in (4, 5, 6)]),
    }


def make_op(psf: np.ndarray, model: str, lam: float = 1e-6, **kw) -> LenslessOperator:
    return LenslessOperator(psf, psf.shape[-2:], model, lam=lam, **kw)


def rand(shape, dtype=torch.float64, seed=0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", PSF_NAMES)
def test_adjointness_float64(psfs, name, model):
    op = make_op(psfs[name], model)
    # RGB images: a one-channel PSF is shared by the three channels, a three-channel one acts per channel
    x = rand((2, 3, *op.scene_shape), seed=1)
    y = rand((2, 3, *op.sensor_shape), seed=2)
    lhs = (op.A(x) * y).sum()
    rhs = (x * op.A_adjoint(y)).sum()
    assert abs(float(lhs - rhs)) <= 1e-12 * abs(float(lhs))


def test_adjointness_crop_small_scene(psfs):
    psf = psfs["radial"]
    op = LenslessOperator(psf, (48, 48), "crop", scene_shape=(32, 32), conv_shape=(112, 112))
    x, y = rand((1, 3, 32, 32), seed=3), rand((1, 3, 48, 48), seed=4)
    assert float((op.A(x) * y).sum()) == pytest.approx(float((x * op.A_adjoint(y)).sum()), rel=1e-12)


@pytest.mark.parametrize("name", PSF_NAMES)
def test_circular_null_space_defects_shrink_with_lambda(psfs, name):
    """(I − A†A) tends to a projector onto null(A): ‖N²x − Nx‖ and ‖A N x‖ shrink as λ → 0."""
    x = rand((2, 3, *psfs[name].shape[-2:]), seed=5)
    idem, leak = [], []
    lams = (1e-4, 1e-6, 1e-8, 1e-10, 1e-12)
    for lam in lams:
        op = make_op(psfs[name], "circular", lam=lam)
        n = op.null_project(x)
        idem.append(float((op.null_project(n) - n).norm() / x.norm()))
        leak.append(float(op.A(n).norm() / op.A(x).norm()))
    print(f"\n{name}: λ {lams}\n  ‖N²x−Nx‖/‖x‖ {np.array(idem)}\n  ‖A N x‖/‖A x‖ {np.array(leak)}")
    assert all(b < a for a, b in itertools.pairwise(leak))
    assert leak[-1] < 1e-6
    assert idem[-1] < idem[1] and idem[-1] < 1e-2
    # and the exact identities of the circular model hold at any λ
    op = make_op(psfs[name], "circular", lam=1e-3)
    np.testing.assert_allclose(op.range_project(x), op.A_dagger(op.A(x)), atol=1e-12)
    np.testing.assert_allclose(op.range_null_combine(op.A(x), x), x, atol=1e-12)


@pytest.mark.parametrize("name", PSF_NAMES)
def test_crop_projector_defect_is_reported(psfs, name):
    """For the crop model the Wiener A† is not a pseudo-inverse: A†A is not a projector. Measure it."""
    circ = make_op(psfs[name], "circular", lam=1e-12).projector_defect()
    crop = make_op(psfs[name], "crop", lam=1e-6).projector_defect()
    print(f"\nprojector_defect {name}: crop (λ=1e-6) {crop:.4g}; circular (λ=1e-12) {circ:.3g}")
    assert np.isfinite(crop) and crop > 0
    assert circ < 1e-2


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", ("radial", "rgb_contour"))
def test_float32_matches_float64(psfs, name, model):
    op = make_op(psfs[name], model, lam=1e-4)
    x64 = rand((2, 3, *op.scene_shape), seed=6)
    for f in ("A", "A_dagger_of_A", "null_project"):
        fn = (lambda t: op.A_dagger(op.A(t))) if f == "A_dagger_of_A" else getattr(op, f)
        out64, out32 = fn(x64), fn(x64.float())
        assert out64.dtype == torch.float64 and out32.dtype == torch.float32
        err = float((out32.double() - out64).norm() / out64.norm())
        assert err < 1e-4, f"{f}: float32 relative error {err}"


@pytest.mark.parametrize("model", MODELS)
def test_batched_equals_per_sample(psfs, model):
    op = make_op(psfs["caustic"], model)
    x = rand((3, 3, *op.scene_shape), seed=7)
    y = op.A(x)
    for i in range(3):
        torch.testing.assert_close(op.A(x[i : i + 1]), y[i : i + 1], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(op.A_dagger(y[i : i + 1]), op.A_dagger(y)[i : i + 1], rtol=1e-12, atol=1e-14)
    assert op.consistency(x, y).shape == (3,)
    assert float(op.consistency(x, y).max()) < 1e-12


@pytest.mark.parametrize("model", MODELS)
def test_per_channel_psf_acts_per_channel(psfs, model):
    psf = psfs["rgb_contour"]
    op = make_op(psf, model)
    x = rand((2, 3, *op.scene_shape), seed=8)
    y = op.A(x)
    for c in range(3):
        single = make_op(psf[c : c + 1], model)
        torch.testing.assert_close(y[:, c : c + 1], single.A(x[:, c : c + 1]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("model", MODELS)
def test_shared_psf_acts_on_every_channel(psfs, model):
    op = make_op(psfs["binary"], model)
    x = rand((1, 1, *op.scene_shape), seed=9).expand(1, 3, *op.scene_shape)
    y = op.A(x)
    torch.testing.assert_close(y[:, 0], y[:, 2])


@pytest.mark.parametrize("model", MODELS)
def test_gradients_flow(psfs, model):
    op = make_op(psfs["radial"], model)
    x = rand((1, 3, *op.scene_shape), seed=10).requires_grad_(True)
    y = rand((1, 3, *op.sensor_shape), seed=11)
    loss = ((op.A(x) - y) ** 2).sum()
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(grad, 2 * op.A_adjoint(op.A(x.detach()) - y), rtol=1e-10, atol=1e-12)
    # and through the pseudo-inverse and the null-space projector: the autograd directional derivative of
    # f(t) = ⟨op(t), w⟩ equals the finite difference along a random direction v (f is linear: exact)
    for fn, t in ((op.null_project, x.detach()), (op.A_dagger, y)):
        t = t.clone().requires_grad_(True)
        w = rand(fn(t).shape, seed=12)
        v = rand(t.shape, seed=13)
        (g,) = torch.autograd.grad((fn(t) * w).sum(), t)
        with torch.no_grad():
            fd = ((fn(t + v) - fn(t - v)) * w).sum() / 2
        assert float((g * v).sum()) == pytest.approx(float(fd), rel=1e-9)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("rho", (1e-2, 0.1))
def test_prox_l2_optimality(psfs, model, rho):
    """x = argmin ‖Ax − y‖² + ρ‖x − z‖²  ⇔  Aᵀ(Ax − y) + ρ(x − z) = 0."""
    op = make_op(psfs["contour"], model)
    z = rand((1, 3, *op.scene_shape), seed=14)
    y = op.A(rand((1, 3, *op.scene_shape), seed=15)) + 0.01 * rand((1, 3, *op.sensor_shape), seed=16)
    x = op.prox_l2(z, y, rho, cg_iters=60)
    grad = op.A_adjoint(op.A(x) - y) + rho * (x - z)
    scale = op.A_adjoint(y).norm() + rho * z.norm()
    assert float(grad.norm() / scale) < 1e-6


@pytest.mark.parametrize("model", MODELS)
def test_a_dagger_is_the_numpy_wiener_filter(psfs, model):
    """The torch operator and the edge runtime's numpy filter are one computation."""
    psf = psfs["diffusercam"]
    op = make_op(psf, model, lam=1e-4)
    y = rand((2, 1, *op.sensor_shape), dtype=torch.float32, seed=17)
    np.testing.assert_allclose(op.A_dagger(y).numpy(), WienerFilter(psf, op.geometry, 1e-4)(y.numpy()),
                               rtol=1e-4, atol=1e-5)


def test_measure_noise_seeded(psfs):
    op = make_op(psfs["radial"], "circular", noise_std=0.05)
    x = rand((4, 3, 64, 64), dtype=torch.float32, seed=18)
    y1 = op.measure(x, generator=torch.Generator().manual_seed(3))
    y2 = op.measure(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(y1, y2)
    assert float((y1 - op.A(x)).std()) == pytest.approx(0.05, rel=0.03)
    assert torch.equal(op.measure(x, noise_std=0.0), op.A(x))


def test_shape_errors(psfs):
    op = make_op(psfs["radial"], "crop")
    with pytest.raises(ValueError, match=r"scene x has spatial size \(64, 64\), expected \(128, 128\)"):
        op.A(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="measurement y"):
        op.A_dagger(torch.zeros(1, 3, 128, 128))


@pytest.mark.parametrize("model", MODELS)
def test_differentiable_operator_matches_and_has_the_right_gradient(psfs, model):
    """differentiable=True: the same A and A† as the numpy-built operator, and d/dpsf, d/dλ agree with
    central finite differences (what mask design relies on)."""
    psf = psfs["rgb_contour"].astype(np.float64)
    kw = {"scene_shape": (16, 16), "conv_shape": (64, 64)} if model == "crop" else {}
    ref = make_op(psf, model, lam=1e-3, **kw)
    psf_t = torch.tensor(psf, requires_grad=True)
    lam_t = torch.tensor(1e-3, dtype=torch.float64, requires_grad=True)
    op = LenslessOperator(psf_t, psf.shape[-2:], model, lam=lam_t, differentiable=True, **kw)
    assert op.lam == pytest.approx(1e-3) and op.psf_hash == ref.psf_hash
    x = rand((2, 3, *ref.scene_shape), dtype=torch.float64, seed=21)
    y = ref.A(x)
    torch.testing.assert_close(op.A(x), ref.A(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(op.A_dagger(y), ref.A_dagger(y), rtol=0, atol=1e-10)
    weight = rand(tuple(op.A_dagger(y).shape), dtype=torch.float64, seed=22)

    def loss(p: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        o = LenslessOperator(p, psf.shape[-2:], model, lam=lam, differentiable=True, **kw)
        return (o.A_dagger(o.A(x) + 0.01 * weight[..., : 1, :1]) * weight).sum()

    value = loss(psf_t, lam_t)
    value.backward()
    idx, eps = (1, 10, 12), 1e-6
    bumped = [psf_t.detach().clone() for _ in range(2)]
    bumped[0][idx] += eps
    bumped[1][idx] -= eps
    fd = (loss(bumped[0], lam_t.detach()) - loss(bumped[1], lam_t.detach())) / (2 * eps)
    assert float(psf_t.grad[idx]) == pytest.approx(float(fd), rel=1e-4)
    fd_lam = (loss(psf_t.detach(), lam_t.detach() * (1 + 1e-6)) - loss(psf_t.detach(), lam_t.detach() * (1 - 1e-6))) / (2e-9)
    assert float(lam_t.grad) == pytest.approx(float(fd_lam), rel=1e-4)


def test_differentiable_operator_needs_a_tensor(psfs):
    with pytest.raises(TypeError, match="torch tensor"):
        LenslessOperator(psfs["contour"], (48, 48), differentiable=True)
