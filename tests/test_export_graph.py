"""DFT-by-matmul and the reconstruction graph against torch.fft and LenslessOperator (no ONNX here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_export_helpers import LAM, SIZE, small_psf, smooth_scenes

from export.dft import MatmulRDFT2, rdft_matrices
from export.graph import ExportError, ReconstructionGraph, reference_reconstruction
from train.physics import LenslessOperator


@pytest.mark.parametrize("shape", [(8, 8), (6, 9), (5, 7)])
def test_matmul_rdft_matches_torch_fft_both_ways(shape):
    h, w = shape
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    mats = rdft_matrices(h, w)
    dft = MatmulRDFT2(h, w).double()
    for name, m in mats.items():  # float64 matrices for an exact comparison
        getattr(dft, name).copy_(torch.from_numpy(m))
    z = dft(x)
    ref = torch.fft.rfft2(x, norm="ortho")
    wr = w // 2 + 1
    assert torch.allclose(z[..., :wr], ref.real, atol=1e-12)
    assert torch.allclose(z[..., wr:], ref.imag, atol=1e-12)
    # inverse equals irfft2 (Hermitian completion), also for a spectrum that is not Hermitian on DC/Nyquist
    spec = torch.randn(2, 3, h, wr, dtype=torch.complex128)
    packed = torch.cat([spec.real, spec.imag], dim=-1)
    assert torch.allclose(dft.inverse(packed), torch.fft.irfft2(spec, s=(h, w), norm="ortho"), atol=1e-12)
    assert torch.allclose(dft.inverse(z), x, atol=1e-12)


def test_scaled_dft_keeps_a_white_256_frame_finite_in_fp16():
    dft = MatmulRDFT2(256, 256)
    white = torch.ones(1, 1, 256, 256)
    z16 = dft.half()(white.half())
    assert torch.isfinite(z16.float()).all()
    assert abs(float(z16[0, 0, 0, 0]) - 256.0) < 0.5  # DC = 65536 / √(256·256)


@pytest.mark.parametrize("dft", ["matmul", "onnx"])
def test_graph_operators_equal_lensless_operator(shared, dft):
    psf = small_psf(shared)
    op = LenslessOperator(psf, SIZE, "circular", lam=LAM)
    graph = ReconstructionGraph(psf, SIZE, LAM, objective="wiener", dft=dft)
    y = op.A(smooth_scenes(3))
    x = torch.rand(3, 3, *SIZE)
    with torch.no_grad():
        scale = float(op.A_dagger(y).abs().max())
        assert float((graph.pseudo_inverse(y) - op.A_dagger(y)).abs().max()) <= 1e-5 * scale
        assert float((graph.null_project(x) - op.null_project(x)).abs().max()) <= 1e-5
        assert float((graph(y) - op.A_dagger(y)).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize("objective", ["nullspace", "full"])
@pytest.mark.parametrize("dft", ["matmul", "onnx"])
def test_student_graph_equals_reference(shared, objective, dft):
    psf = small_psf(shared)
    net = torch.nn.Sequential(torch.nn.Conv2d(6, 5, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(5, 3, 3, padding=1))
    y = LenslessOperator(psf, SIZE, "circular", lam=LAM).A(smooth_scenes(2))
    graph = ReconstructionGraph(psf, SIZE, LAM, net=net, objective=objective, dft=dft).eval()
    with torch.no_grad():
        out = graph(y)
    ref = reference_reconstruction(psf, y, LAM, net, objective)
    assert out.shape == ref.shape == y.shape
    assert float((out - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))
    if objective == "nullspace":  # g only enters through I − A†A: ‖A(x̂ − A†y)‖ ≤ max|H|λ/(|H|²+λ) ‖g‖ = √λ/2 ‖g‖
        op = LenslessOperator(psf, SIZE, "circular", lam=LAM)
        with torch.no_grad():
            g = net(torch.cat([y, op.A_dagger(y)], dim=1))
            moved = float((op.A(out) - op.A(op.A_dagger(y))).norm())
            assert moved <= 0.5 * LAM**0.5 * float(g.norm()) * (1 + 1e-4)
            assert float((out - op.A_dagger(y)).norm()) > 0.01 * float(g.norm())  # the student did change x̂


def test_graph_rejects_inconsistent_requests(shared):
    psf = small_psf(shared)
    net = torch.nn.Conv2d(6, 3, 1)
    with pytest.raises(ExportError, match="student network is required"):
        ReconstructionGraph(psf, SIZE, LAM, net=None, objective="nullspace")
    with pytest.raises(ExportError, match="must be absent"):
        ReconstructionGraph(psf, SIZE, LAM, net=net, objective="wiener")
    with pytest.raises(ExportError, match="DFT form"):
        ReconstructionGraph(psf, SIZE, LAM, net=net, dft="fftw")
    with pytest.raises(ExportError, match="channels"):
        ReconstructionGraph(np.concatenate([psf, psf]), SIZE, LAM, objective="wiener", channels=4)
    with pytest.raises(ValueError, match="larger than the sensor"):
        ReconstructionGraph(psf, (16, 16), LAM, objective="wiener")
