"""Tikhonov by conjugate gradient: the Wiener filter where that is exact (circular), the crop model itself where
the zero-padded Wiener filter is an approximation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train.physics import LenslessOperator
from train.solvers import make_solver


def _psf(side: int, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    psf = (rng.random((1, side, side)) ** 4).astype(np.float32)
    return psf / psf.sum()


def test_on_the_circular_model_it_is_the_wiener_filter():
    op = LenslessOperator(_psf(16), (16, 16), "circular", lam=1e-3)
    y = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x = make_solver("tikhonov")(y, op)
    assert torch.allclose(x, op.A_dagger(y), atol=1e-5)


def test_on_the_crop_model_it_solves_the_normal_equations_and_beats_zero_padding():
    """A scene that fills the whole grid through a PSF larger than the sensor (the full-aperture case): CG
    satisfies (AᵀA + λI) x = Aᵀy, and reconstructs the scene better than the zero-padded A† at the same λ."""
    lam = 1e-4
    op = LenslessOperator(_psf(40), (32, 32), "crop", lam=lam, scene_shape=(72, 72), conv_shape=(72, 72))
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 72), torch.linspace(-1, 1, 72), indexing="ij")
    scene = (0.5 + 0.3 * torch.cos(3 * xx) * torch.sin(2 * yy))[None, None]  # light over the whole field
    y = op.A(scene)
    x = make_solver("tikhonov", iters=300)(y, op)
    residual = op.A_adjoint(op.A(x)) + lam * x - op.A_adjoint(y)
    assert float(residual.norm() / op.A_adjoint(y).norm()) < 1e-3
    err_cg = float(op.consistency(x, y))
    err_padded = float(op.consistency(op.A_dagger(y), y))
    assert err_cg < 0.25 * err_padded
    few = make_solver("tikhonov", iters=3)(y, op)
    assert float(op.consistency(x, y)) < float(op.consistency(few, y))


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="iters"):
        make_solver("tikhonov", iters=0)
    with pytest.raises(ValueError, match="λ"):
        make_solver("tikhonov", lam=-1.0)
