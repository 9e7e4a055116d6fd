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


# ---- the cg pseudo-inverse: one computation in numpy (runtime), torch (training) and the exported graph ----------

def _crop_case(seed: int = 0):
    from nsdd_edge.optics import LenslessGeometry

    psf = _psf(34, seed)
    geometry = LenslessGeometry.make("crop", (32, 32), (34, 34), (64, 64), (64, 64))
    y = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return psf, geometry, y


def test_cg_in_float64_is_the_float64_torch_cg_and_other_precisions_are_refused():
    """The numpy forward model and cg in float64 (the reference of bench/bench_cg_precision.py) are torch's cg in
    float64; float32 stays the default; any other precision is a named error."""
    from nsdd_edge.optics import CG_ITERATIONS, ForwardModel, OpticsError, cg_tikhonov

    psf, g, y = _crop_case(1)
    op = LenslessOperator(psf, g.sensor_shape, "crop", lam=1e-4, scene_shape=g.scene_shape, conv_shape=g.conv_shape,
                          projector="cg")
    exact = op.A_dagger(y.double()).numpy()  # (torch keeps H in complex64)
    A64, y64 = ForwardModel(psf, g, np.float64), y.numpy().astype(np.float64)
    x64 = cg_tikhonov(A64, y64, 1e-4, CG_ITERATIONS)
    assert x64.dtype == np.float64 and A64(x64).dtype == np.float64
    assert np.abs(x64 - exact).max() < 1e-3 * np.abs(exact).max()
    assert cg_tikhonov(ForwardModel(psf, g), y.numpy(), 1e-4, CG_ITERATIONS).dtype == np.float32

    def normal_residual(x):  # ‖(AᵀA + λI)x − Aᵀy‖ / ‖Aᵀy‖, in float64
        b = A64.adjoint(y64)
        return np.linalg.norm(A64.adjoint(A64(x)) + 1e-4 * x - b) / np.linalg.norm(b)

    # long enough, float64 solves the normal equations to rounding; float32 stalls at its own rounding floor
    assert normal_residual(cg_tikhonov(A64, y64, 1e-4, 120)) < 1e-12
    assert normal_residual(cg_tikhonov(ForwardModel(psf, g), y.numpy(), 1e-4, 120)) > 1e-9
    with pytest.raises(OpticsError, match="float32 or float64"):
        ForwardModel(psf, g, np.float16)


def test_cg_pseudo_inverse_is_the_same_in_numpy_torch_and_onnx(tmp_path):
    from export.graph import ReconstructionGraph
    from export.onnx_graph import export_graph
    from nsdd_edge.optics import CG_ITERATIONS, ForwardModel, WienerFilter, cg_tikhonov

    psf, g, y = _crop_case()
    op = LenslessOperator(psf, g.sensor_shape, "crop", lam=1e-4, scene_shape=g.scene_shape, conv_shape=g.conv_shape,
                          projector="cg")
    exact = op.A_dagger(y.double()).numpy()
    scale = np.abs(exact).max()
    torch32 = op.A_dagger(y).numpy()
    numpy32 = WienerFilter(psf, g, 1e-4, "cg")(y.numpy())
    assert np.abs(numpy32 - torch32).max() < 1e-3 * scale
    # each sample on its own (per-sample step sizes), and it is the CG of the normal equations, CG_ITERATIONS steps
    assert np.allclose(WienerFilter(psf, g, 1e-4, "cg")(y.numpy()[1]), numpy32[1], atol=1e-6 * scale)
    A = ForwardModel(psf, g)
    assert np.allclose(cg_tikhonov(A, y.numpy(), 1e-4, CG_ITERATIONS), numpy32)
    graph = ReconstructionGraph(psf, g, 1e-4, projector="cg", objective="wiener")
    assert np.abs(graph(y).detach().numpy() - exact).max() < 0.05 * scale  # float32 CG: ~1% of the scale
    import onnxruntime as ort

    path = export_graph(graph, tmp_path / "cg.onnx", batch=None)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: y.numpy()})[0]
    assert np.abs(out - exact).max() < 0.05 * scale
    assert np.abs(out - torch32).max() < 2 * np.abs(torch32 - exact).max() + 1e-4 * scale


def test_cg_is_refused_where_it_does_not_apply():
    from export.errors import ExportError
    from export.graph import ReconstructionGraph
    from nsdd_edge.graph_spectra import graph_spectra
    from nsdd_edge.optics import LenslessGeometry, OpticsError, WienerFilter

    circ = LenslessGeometry.make("circular", (16, 16), (16, 16))
    psf = _psf(16)
    with pytest.raises(ValueError, match="crop model"):
        LenslessOperator(psf, (16, 16), "circular", projector="cg")
    with pytest.raises(OpticsError, match="crop model"):
        WienerFilter(psf, circ, 1e-3, "cg")
    with pytest.raises(OpticsError, match="crop model"):
        graph_spectra(psf, circ, 1e-3, "cg")
    psf, g, _ = _crop_case()
    with pytest.raises(ExportError, match="spectra inputs"):
        ReconstructionGraph(psf, g, 1e-4, projector="cg", objective="wiener", spectra_input=True)


def test_ddnm_with_the_cg_pseudo_inverse_fits_the_measurement():
    """The teacher on a cg operator: the noise-free range–null replacement with A† = CG (DDNM+'s per-frequency
    scaling does not apply); its reconstruction fits y far better than the prior's guess alone."""
    from train.prior.base import DiffusionPrior
    from train.prior.io import alphas_cumprod_from_schedule, default_schedule
    from train.prior.unet import UNet
    from train.solvers.ddnm import DDNM

    psf, g, _ = _crop_case(1)
    op = LenslessOperator(psf, g.sensor_shape, "crop", lam=1e-4, scene_shape=g.scene_shape, conv_shape=g.conv_shape,
                          projector="cg", noise_std=0.01)
    torch.manual_seed(0)
    net = UNet(image_size=64, base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attention_resolutions=[],
               mid_attention=False, num_heads=1, dropout=0.0)
    prior = DiffusionPrior(net, alphas_cumprod_from_schedule(default_schedule()), 64, 3, {})
    scene = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    y = op.A(scene)
    x = DDNM(prior, steps=3)(y, op)
    assert torch.isfinite(x).all() and float(op.consistency(x, y)) < 0.2


def test_calibrate_picks_cg_when_the_psf_is_larger_than_the_sensor():
    from nsdd_edge.profile_estimate import pseudo_inverse_kind

    assert pseudo_inverse_kind((1, 132, 132), (128, 128)) == "cg"
    assert pseudo_inverse_kind((1, 64, 200), (128, 128)) == "cg"
    assert pseudo_inverse_kind((1, 64, 64), (128, 128)) == "tikhonov"
