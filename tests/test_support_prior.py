"""SupportPrior: a prior of small scenes on a larger canvas with a known black surround."""

import math

import numpy as np
import torch

from train.physics import LenslessOperator, center_crop, center_pad
from train.prior.base import DiffusionPrior, SupportPrior, linear_alphas_cumprod, prior_for_scene
from train.solvers.ddnm import DDNM


class ShapeNet(torch.nn.Module):
    """ε = 0.5 x_t on its input (any size): records the sizes it sees."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[int, int]] = []
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t):
        self.seen.append(tuple(x.shape[-2:]))
        return self.scale * x


def make_prior(size=8):
    return DiffusionPrior(ShapeNet(), linear_alphas_cumprod(), image_size=size, channels=1)


def test_inside_is_the_inner_prior_outside_the_exact_eps_of_the_known_fill():
    prior = make_prior(8)
    sp = SupportPrior(prior, (16, 12), fill=-1.0)
    x_t = torch.randn(2, 1, 16, 12, generator=torch.Generator().manual_seed(0))
    t = 300
    eps = sp.eps(x_t, t)
    assert prior.net.seen[-1] == (8, 8)
    inner = center_crop(x_t, (8, 8))
    assert torch.allclose(center_crop(eps, (8, 8)), 0.5 * inner)
    a = float(prior.alphas_cumprod[t])
    outside_expected = (x_t + math.sqrt(a)) / math.sqrt(1 - a)
    mask = center_pad(torch.ones(1, 1, 8, 8), (16, 12)) == 0
    assert torch.allclose(eps[mask.expand_as(eps)], outside_expected[mask.expand_as(eps)], atol=1e-5)
    # per-sample timesteps give the same as scalar ones row by row
    eps_vec = sp.eps(x_t, torch.tensor([t, 10]))
    assert torch.allclose(eps_vec[0], eps[0])
    assert not torch.allclose(eps_vec[1], eps[1])


def test_x0_outside_is_exactly_the_fill_and_gradients_flow():
    prior = make_prior(8)
    sp = SupportPrior(prior, (16, 16))
    x_t = torch.randn(1, 1, 16, 16, requires_grad=True)
    eps = sp.eps(x_t, 500)
    x0 = sp.x0_from_eps(x_t, 500, eps)
    outside = center_pad(torch.ones(1, 1, 8, 8), (16, 16)) == 0
    assert torch.allclose(x0[outside], torch.full_like(x0[outside], -1.0), atol=1e-5)
    x0.sum().backward()  # DPS differentiates through the prior
    assert x_t.grad is not None and torch.isfinite(x_t.grad).all()


def test_prior_for_scene_wraps_only_larger_canvases_and_refuses_too_small_ones():
    prior = make_prior(8)
    assert prior_for_scene(prior, (8, 8)) is prior
    assert prior_for_scene(prior, (6, 8)) is prior
    assert isinstance(prior_for_scene(prior, (16, 16)), SupportPrior)
    try:
        SupportPrior(prior, (4, 16))
    except ValueError as exc:
        assert "smaller" in str(exc)
    else:
        raise AssertionError("a canvas smaller than the support must be refused")


def test_ddnm_on_a_padded_scene_keeps_the_surround_black_and_runs_the_net_on_the_support():
    rng = np.random.default_rng(0)
    psf = rng.random((1, 16, 16)) ** 4
    psf /= psf.sum()
    physics = LenslessOperator(psf, (16, 16), "circular", lam=1e-3)
    x = center_pad(torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(1)), (16, 16))
    y = physics.A(x)
    prior = make_prior(8)
    out = DDNM(prior, steps=5, sigma_y=0.0, seed=0)(y, physics)
    assert out.shape == (1, 1, 16, 16)
    assert set(prior.net.seen) == {(8, 8)}
    assert torch.isfinite(out).all()
