"""What we measure and claim (issue 13): method order, the truncated pseudo-inverse, λ without ground truth,
DPS's schedule and learned variance, noise on the solver's device, scoring against teacher labels."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_evaluate import make_dataset
from test_students import SMALL_EDGE, blur_psf, scenes
from torch import nn

from nsdd_edge.optics import (
    LenslessGeometry,
    OpticsError,
    WienerFilter,
    WienerSpectra,
    discrepancy_lambda,
    wiener_residual,
)
from train.cli import main as train_cli
from train.physics import LenslessOperator
from train.prior.base import DiffusionPrior, linear_alphas_cumprod
from train.solvers.diffusion_common import make_generators, randn_per_sample, respaced_timesteps


# ---- the truncated pseudo-inverse -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def psf() -> np.ndarray:
    return blur_psf(16, sigma=1.5)


def test_truncated_range_projector_is_idempotent_and_tikhonov_is_not(psf):
    lam = 1e-3
    tik = LenslessOperator(psf, (32, 32), "circular", lam=lam)
    trunc = LenslessOperator(psf, (32, 32), "circular", lam=lam, projector="truncated")
    assert trunc.projector == "truncated" and tik.projector == "tikhonov"
    assert trunc.projector_defect() < 1e-6
    assert tik.projector_defect() > 1e-3
    x = scenes(2, size=32).double()
    n = trunc.null_project(x)
    assert torch.allclose(trunc.null_project(n), n, atol=1e-6)  # (I − A†A)² = I − A†A
    assert float(trunc.A(n).norm()) <= math.sqrt(lam) * float(n.norm()) * (1 + 1e-9)  # |H| ≤ √λ there
    # A† inverts H exactly on the kept frequencies: A†A x keeps exactly those of x
    spectra = WienerSpectra.from_psf(psf, (32, 32), lam, "truncated")
    keep = np.abs(spectra.H) ** 2 > lam
    assert set(np.unique(spectra.R)) <= {0.0, 1.0} and np.array_equal(spectra.R == 1.0, keep)
    np.testing.assert_allclose(spectra.G[keep] * spectra.H[keep], 1.0, rtol=1e-9)
    assert np.all(spectra.G[~keep] == 0)


def test_unknown_projector_and_bad_lambda_are_named_errors(psf):
    with pytest.raises(OpticsError, match="unknown pseudo-inverse"):
        WienerSpectra.from_psf(psf, (32, 32), 1e-3, "svd")  # type: ignore[arg-type]
    for lam in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(OpticsError, match="λ must be finite and > 0"):
            WienerSpectra.from_psf(psf, (32, 32), lam)


def test_numpy_filter_torch_operator_and_exported_graph_agree_on_the_truncated_inverse(psf):
    from export.graph import ReconstructionGraph

    lam = 1e-3
    y = LenslessOperator(psf, (32, 32), "circular", lam=lam).A(scenes(1, size=32))
    op = LenslessOperator(psf, (32, 32), "circular", lam=lam, projector="truncated")
    want = op.A_dagger(y)
    geometry = LenslessGeometry.make("circular", (32, 32), psf.shape[-2:])
    got_np = WienerFilter(psf, geometry, lam, "truncated")(y.numpy())
    np.testing.assert_allclose(got_np, want.numpy(), atol=1e-5)
    graph = ReconstructionGraph(psf, (32, 32), lam, net=None, objective="wiener", projector="truncated")
    assert graph.spec.metadata()["nsdd.projector"] == "truncated"
    with torch.no_grad():
        np.testing.assert_allclose(graph(y).numpy(), want.numpy(), atol=1e-4)


def test_student_records_and_uses_its_projector(tmp_path, psf):
    from train.students import build_student, load_student, make_config, save_student

    op = LenslessOperator(psf, (32, 32), "circular", lam=1e-3, projector="truncated")
    cfg = make_config("edge", "nullspace", 3, op, SMALL_EDGE)
    assert cfg["projector"] == "truncated"
    student = build_student(cfg)
    save_student(tmp_path / "s", student.net, cfg)
    loaded = load_student(tmp_path / "s")
    tik = LenslessOperator(psf, (32, 32), "circular", lam=1e-3)  # the caller's operator is Tikhonov
    y = op.A(scenes(1, size=32))
    with torch.no_grad():
        x = loaded(y, tik)
        g = loaded.net(torch.cat([y, op.A_dagger(y)], dim=1))
    want = op.A_dagger(y) + op.null_project(g)
    assert torch.allclose(x, want, atol=1e-5)
    # with the exact projector the student's A x̂ equals the truncated Wiener fit's, whatever g is
    assert torch.allclose(op.A(x), op.A(op.A_dagger(y)), atol=1e-3 * float(y.abs().max()))


# ---- λ by the discrepancy principle ---------------------------------------------------------------------
def test_discrepancy_lambda_matches_the_noise_level(psf):
    geometry = LenslessGeometry.make("circular", (32, 32), psf.shape[-2:])
    op = LenslessOperator(psf, (32, 32), "circular")
    g = torch.Generator().manual_seed(3)
    residuals = []
    for sigma in (0.003, 0.01):
        y = op.measure(scenes(4, size=32), noise_std=sigma, generator=g).numpy()
        lam = discrepancy_lambda(psf, geometry, y, sigma)
        assert wiener_residual(psf, geometry, y, lam) == pytest.approx(sigma, rel=1e-3)
        residuals.append(lam)
    assert residuals[1] > residuals[0]  # more noise → more regularisation
    lams = np.logspace(-7, 0, 8)
    r = [wiener_residual(psf, geometry, y, v) for v in lams]
    assert np.all(np.diff(r) > 0)  # the residual grows with λ: bisection is sound
    with pytest.raises(OpticsError, match="noise level σ must be > 0"):
        discrepancy_lambda(psf, geometry, y, 0.0)
    with pytest.raises(OpticsError, match="outside it"):
        discrepancy_lambda(psf, geometry, y, 10.0)


def test_evaluate_wiener_baseline_takes_lambda_from_the_noise_level(tmp_path):
    data = make_dataset(tmp_path / "noisy", n=4)
    meta = json.loads((data / "dataset.json").read_text())
    rng = np.random.default_rng(1)
    for i in meta["splits"]["test"]:
        y = np.load(data / "measurements" / f"{i}.npy")
        np.save(data / "measurements" / f"{i}.npy", (y + 0.01 * rng.standard_normal(y.shape)).astype(np.float32))
    meta["noise_std"] = 0.01
    (data / "dataset.json").write_text(json.dumps(meta))
    out, report = tmp_path / "eval", tmp_path / "r.md"
    assert train_cli(["evaluate", "--data", str(data), "--methods", "wiener", "--no-lpips", "--out", str(out),
                      "--report", str(report), "--threads", "1"]) == 0
    m = json.loads((out / "metrics.json").read_text())["wiener"]
    from train.data import LenslessDataset

    ds = LenslessDataset(data)
    lam = ds.discrepancy_lambda(ds.ids("test"))
    assert m["settings"]["lam"] == pytest.approx(lam) and lam > 1e-5  # not the data set's straw-man 1e-6
    text = report.read_text()
    assert "discrepancy principle" in text and "1 torch thread" in text


def test_distill_lam_discrepancy_is_resolved_and_recorded(tmp_path):
    from train.distill import DistillSettings, train_student

    data = make_dataset(tmp_path / "d", n=4)
    meta = json.loads((data / "dataset.json").read_text())
    meta["noise_std"] = 0.01
    meta["splits"] = {"train": ["s000", "s001", "s002"], "test": ["s003"]}
    rng = np.random.default_rng(2)
    for i in meta["splits"]["train"]:
        y = np.load(data / "measurements" / f"{i}.npy")
        np.save(data / "measurements" / f"{i}.npy", (y + 0.01 * rng.standard_normal(y.shape)).astype(np.float32))
    (data / "dataset.json").write_text(json.dumps(meta))
    targets = tmp_path / "t"
    targets.mkdir()
    for i in meta["splits"]["train"]:
        np.save(targets / f"{i}.npy", np.load(data / "ground_truth" / f"{i}.npy"))
    s = DistillSettings(data=str(data), targets=str(targets), out=str(tmp_path / "s"), lam="discrepancy",
                        projector="truncated", steps=1, batch=2, checkpoint_every=1, samples=0, progress=False,
                        architecture={"width": 4, "depth": 1, "max_width": 8, "blocks": 1}, device="cpu")
    train_student(s)
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    from train.data import LenslessDataset

    assert cfg["lam"] == pytest.approx(LenslessDataset(data).discrepancy_lambda(meta["splits"]["train"]))
    assert cfg["projector"] == "truncated" and "discrepancy" in cfg["training"]["lam_rule"]


# ---- evaluation order and ground-truth-free scores ----------------------------------------------------
def test_method_order_does_not_change_the_numbers(tmp_path):
    """A paper student listed before DDNM+ must not leave its fine-tuned UNet in the cached prior."""
    from train.data import LenslessDataset
    from train.prior.io import save_prior
    from train.prior.unet import UNet
    from train.students import build_student, make_config, save_student

    data = make_dataset(tmp_path / "data", n=3)
    net = UNet(image_size=32, base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attention_resolutions=[],
               mid_attention=False, num_heads=1, dropout=0.0)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pdir = save_prior(net, tmp_path / "prior")
    from train.prior.io import load_prior

    physics = LenslessDataset(data).physics()
    cfg = make_config("paper", "nullspace", 3, physics, {"width": 4, "depth": 1, "max_width": 8, "blocks": 1},
                      prior={"dir": str(pdir)})
    student = build_student(cfg, prior=load_prior(pdir))
    with torch.no_grad():  # a fine-tuned g_θ that differs from the prior
        for p in student.net.prior_net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    sdir = save_student(tmp_path / "paper", student.net, cfg)
    results = []
    for order in (f"student:{sdir},ddnm", f"ddnm,student:{sdir}"):
        out = tmp_path / f"eval{len(results)}"
        assert train_cli(["evaluate", "--data", str(data), "--methods", order, "--prior", str(pdir), "--set",
                          "ddnm.steps=3", "--no-lpips", "--no-save-recon", "--out", str(out)]) == 0
        results.append(json.loads((out / "metrics.json").read_text()))
    for method in ("ddnm", "student"):
        for key in ("psnr", "ssim", "consistency", "consistency_recon"):
            assert results[0][method][key] == results[1][method][key], (method, key)


def test_scores_against_teacher_labels_instead_of_ground_truth(tmp_path):
    data = make_dataset(tmp_path / "data", n=3)
    labels = tmp_path / "labels"
    labels.mkdir()
    meta = json.loads((data / "dataset.json").read_text())
    for i in meta["splits"]["test"]:  # "teacher labels": the scene plus a known offset → PSNR 40 dB exactly
        np.save(labels / f"{i}.npy", np.load(data / "ground_truth" / f"{i}.npy") + 0.01)
    out = tmp_path / "eval"
    assert train_cli(["evaluate", "--data", str(data), "--recon", str(labels), "--methods", "wiener", "--no-lpips",
                      "--against", str(labels), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labels"]["psnr"] is None and metrics["labels"]["ssim"] == pytest.approx(1.0)  # identical: ∞ → null
    assert 38.0 < metrics["wiener"]["psnr"] < 42.0  # Wiener ≈ the scene, 0.01 from the labels


def test_border_scores_the_inside_of_the_window_alone(tmp_path):
    """--border PX: a reconstruction wrong only on its outer rim (here 0 there) scores badly on the whole window
    and exactly on the inside; a border that leaves less than 16 px is a named error."""
    data = make_dataset(tmp_path / "data", n=3)
    meta = json.loads((data / "dataset.json").read_text())
    rimmed = tmp_path / "rimmed"
    rimmed.mkdir()
    for i in meta["splits"]["test"]:
        x = np.load(data / "ground_truth" / f"{i}.npy").copy()
        x[..., :2, :] = 0
        x[..., -2:, :] = 0
        x[..., :, :2] = 0
        x[..., :, -2:] = 0
        np.save(rimmed / f"{i}.npy", x)
    scores = {}
    for border in (0, 2):
        out = tmp_path / f"eval{border}"
        assert train_cli(["evaluate", "--data", str(data), "--recon", str(rimmed), "--no-lpips", "--border",
                          str(border), "--no-save-recon", "--out", str(out)]) == 0
        scores[border] = json.loads((out / "metrics.json").read_text())["rimmed"]
    assert scores[0]["psnr"] < 30 and scores[0]["ssim"] < 1.0 and "border" not in scores[0]
    assert scores[2]["psnr"] is None and scores[2]["ssim"] == pytest.approx(1.0) and scores[2]["border"] == 2
    assert train_cli(["evaluate", "--data", str(data), "--recon", str(rimmed), "--no-lpips", "--border", "100",
                      "--out", str(tmp_path / "bad")]) == 2


# ---- DPS and the noise ---------------------------------------------------------------------------------
def test_respaced_timesteps_start_at_T_minus_1():
    for steps in (1, 7, 50, 200, 1000):
        ts = respaced_timesteps(1000, steps)
        assert ts[0] == 999 and ts[-1] == (0 if steps > 1 else 999) and len(ts) == steps
        assert all(a > b for a, b in zip(ts, ts[1:]))


class SigmaNet(nn.Module):
    """An ADM-like network with ε = 0 and a constant variance output v (channels 3..5)."""

    def __init__(self, v: float):
        super().__init__()
        self.v = v

    def forward(self, x, t):
        return torch.cat([torch.zeros_like(x), torch.full_like(x, self.v)], dim=1)


@pytest.mark.parametrize("v", [-1.0, 1.0])
def test_dps_uses_the_learned_variance(v):
    """With ε = 0 and ζ = 0, DPS's two-step chain 999 → 0 → end is x_0 = μ̃(x_999) + σ z; the learned
    variance gives σ² = β (v = 1) or β̃ (v = −1)."""
    from train.prior.io import EpsilonOnly
    from train.solvers.dps import DPS

    ac = linear_alphas_cumprod(1000)
    prior = DiffusionPrior(EpsilonOnly(SigmaNet(v), 3), ac, image_size=8, channels=3)
    assert prior.learns_variance
    delta = np.zeros((1, 3, 3), np.float32)
    delta[0, 1, 1] = 1.0
    op = LenslessOperator(delta, (8, 8), "circular")
    y = torch.zeros(1, 3, 8, 8)
    dps = DPS(prior, steps=2, zeta=0.0, seed=4)
    out = dps(y, op)
    gens = make_generators([4])
    x_T = randn_per_sample(gens, (3, 8, 8), y)
    z = randn_per_sample(gens, (3, 8, 8), y)
    ab_t, ab_prev = float(ac[999]), float(ac[0])
    beta = 1 - ab_t / ab_prev
    x0 = (x_T / math.sqrt(ab_t)).clamp(-1, 1)
    mean = math.sqrt(ab_prev) * beta / (1 - ab_t) * x0 + math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t) * x_T
    var = beta if v > 0 else (1 - ab_prev) / (1 - ab_t) * beta
    x1 = mean + math.sqrt(var) * z
    # last step 0 → end: x0 estimate, no noise
    x_end = (x1 / math.sqrt(ab_prev)).clamp(-1, 1)
    b2 = 1 - ab_prev
    mean2 = math.sqrt(1.0) * b2 / (1 - ab_prev) * x_end + math.sqrt(1 - b2) * 0.0 * x1
    assert torch.allclose(out, (mean2 + 1) / 2, atol=1e-5)


def test_noise_is_drawn_on_the_generators_device():
    gens = make_generators([1, 2], "cpu")
    a = randn_per_sample(gens, (2, 3), torch.zeros(1, dtype=torch.float64))
    again = randn_per_sample(make_generators([1, 2]), (2, 3), torch.zeros(1))
    assert a.dtype == torch.float64 and torch.allclose(a.float(), again)
    assert torch.equal(randn_per_sample(make_generators([2]), (2, 3), torch.zeros(1))[0], again[1])
