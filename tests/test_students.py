"""NSDD students: shapes, the null-space structure, save/load, PSF checks, parameter budget, ONNX export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from train.physics import LenslessOperator
from train.prior.base import DiffusionPrior, linear_alphas_cumprod
from train.solvers import make_solver
from train.students import (
    EdgeUNet,
    Student,
    StudentError,
    StudentSolver,
    build_student,
    count_parameters,
    fit_to_grid,
    load_student,
    make_config,
    save_student,
    student_inputs,
)

SIZE = 32


def blur_psf(size: int = 16, sigma: float = 2.0, seed: int = 0) -> np.ndarray:
    """A seeded lensless-like PSF: a few Gaussian blobs (large null space at high frequencies)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    psf = np.zeros((size, size))
    for _ in range(5):
        cy, cx = rng.uniform(2, size - 2, 2)
        psf += rng.uniform(0.5, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    return (psf / psf.sum()).astype(np.float32)[None]


def scenes(n: int, channels: int = 3, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    """Smooth random scenes in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, channels, size // 4, size // 4), generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


class TinyEps(nn.Module):
    """A tiny ε-network ``net(x_t, t)`` standing in for a pretrained diffusion UNet."""

    def __init__(self, channels: int = 3, hidden: int = 8):
        super().__init__()
        self.inp = nn.Conv2d(channels, hidden, 3, padding=1)
        self.emb = nn.Linear(2, hidden)
        self.out = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        f = t.float()[:, None] / 1000.0
        e = self.emb(torch.cat([torch.sin(f), torch.cos(f)], dim=1))[:, :, None, None]
        return self.out(torch.nn.functional.silu(self.inp(x) + e))


def tiny_prior(channels: int = 3) -> DiffusionPrior:
    return DiffusionPrior(TinyEps(channels), linear_alphas_cumprod(1000), image_size=SIZE, channels=channels)


SMALL_EDGE = {"width": 8, "depth": 2, "max_width": 16, "blocks": 1}


@pytest.fixture(scope="module")
def physics() -> LenslessOperator:
    return LenslessOperator(blur_psf(), (SIZE, SIZE), "circular", lam=1e-6)


@pytest.fixture(scope="module")
def measurement(physics) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return physics.measure(scenes(2), noise_std=0.01, generator=g)


def make_student(kind: str, objective: str, physics: LenslessOperator, channels: int = 3, **arch) -> Student:
    cfg = make_config(kind, objective, channels, physics, {**SMALL_EDGE, **arch})
    return build_student(cfg, prior=tiny_prior(channels) if kind == "paper" else None)


@pytest.mark.parametrize("kind", ["edge", "paper"])
@pytest.mark.parametrize("objective", ["nullspace", "full"])
def test_shapes_both_students_both_objectives(kind, objective, physics, measurement):
    student = make_student(kind, objective, physics)
    x_hat, x_dag = student(measurement, physics, return_parts=True)
    assert x_hat.shape == x_dag.shape == (2, 3, SIZE, SIZE)
    inputs, _ = student_inputs(measurement, physics)
    assert inputs.shape == (2, 6, SIZE, SIZE)
    assert student.net(inputs).shape == (2, 3, SIZE, SIZE)
    assert torch.isfinite(x_hat).all()


def test_crop_model_fits_y_to_the_scene_grid():
    psf = blur_psf(16)
    phys = LenslessOperator(psf, (16, 16), "crop", lam=1e-4, scene_shape=(24, 24), conv_shape=(32, 32))
    y = phys.measure(scenes(1, size=24))
    inputs, x_dag = student_inputs(y, phys)
    assert inputs.shape == (1, 6, 24, 24) and x_dag.shape == (1, 3, 24, 24)
    # y sits centred in the scene grid, zero around it
    assert torch.equal(inputs[:, :3, 4:20, 4:20], y)
    assert inputs[:, :3, :4].abs().sum() == 0 and inputs[:, :3, :, 20:].abs().sum() == 0
    # larger sensor than scene: centre crop
    assert torch.equal(fit_to_grid(torch.arange(36.).reshape(1, 1, 6, 6), (4, 4))[0, 0, 0], torch.tensor([7., 8., 9., 10.]))
    student = build_student(make_config("edge", "nullspace", 3, phys, {**SMALL_EDGE}))
    assert student(y, phys).shape == (1, 3, 24, 24)


class RandomG(nn.Module):
    """An arbitrary ``g``: fixed random images unrelated to the input."""

    def __init__(self, scale: float, seed: int):
        super().__init__()
        self.scale, self.seed = scale, seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return self.scale * torch.randn((x.shape[0], x.shape[1] // 2) + tuple(x.shape[-2:]), generator=g)


def test_nullspace_student_keeps_wiener_consistency_for_any_g(physics, measurement):
    """``A x̂ − y = (A A†y − y) + A(I − A†A) g``; the second term is ``F⁻¹[H λ/(|H|²+λ) F(g)]``, at most
    ``√λ/2 · ‖g‖`` (1e-6 here): negligible for any ``g`` of image scale, whatever its content."""
    wiener = physics.consistency(physics.A_dagger(measurement), measurement)
    edge = make_student("edge", "nullspace", physics).net
    with torch.no_grad():
        for p in edge.parameters():  # another random g than the default initialisation
            p.add_(0.1 * torch.randn_like(p))

    class SceneG(nn.Module):
        def forward(self, x):
            return 4.0 * scenes(x.shape[0], seed=7)

    ratios = []
    for net in (edge, RandomG(1.0, 0), RandomG(2.0, 1), SceneG()):
        with torch.no_grad():
            x_hat = Student(net, "nullspace")(measurement, physics)
            g = net(student_inputs(measurement, physics)[0])
        assert g.abs().mean() > 0.1
        assert (x_hat - physics.A_dagger(measurement)).abs().mean() > 0.01  # g really changed x̂
        ratios.append(physics.consistency(x_hat, measurement) / wiener)
    ratios_t = torch.stack(ratios)
    assert torch.allclose(ratios_t, torch.ones_like(ratios_t), rtol=0, atol=0.01), ratios_t


def test_full_ablation_is_not_consistent(physics, measurement):
    wiener = physics.consistency(physics.A_dagger(measurement), measurement)
    student = make_student("edge", "full", physics)
    with torch.no_grad():
        x_hat = student(measurement, physics)
    assert (physics.consistency(x_hat, measurement) / wiener > 1.5).all()


def test_edge_student_default_width_has_1_to_5_million_parameters():
    for channels in (1, 3):
        net = EdgeUNet(2 * channels, channels, **{k: v for k, v in
                                                  make_config_defaults().items() if k != "skip_input"})
        assert 1_000_000 <= count_parameters(net) <= 5_000_000, count_parameters(net)


def make_config_defaults() -> dict:
    from train.students import default_architecture

    return default_architecture("edge", "nullspace")


def test_input_size_must_be_divisible_by_2_pow_depth(physics):
    net = EdgeUNet(6, 3, width=4, depth=3)
    with pytest.raises(StudentError, match="not divisible by 2\\^3 = 8"):
        net(torch.zeros(1, 6, 36, 36))
    phys = LenslessOperator(blur_psf(), (36, 36), "circular", lam=1e-6)
    with pytest.raises(StudentError, match="36x36 is not divisible"):
        build_student(make_config("edge", "nullspace", 3, phys, {"depth": 4, "width": 4}))


@pytest.mark.parametrize("kind", ["edge", "paper"])
def test_save_load_round_trip_identical_outputs(tmp_path, kind, physics, measurement):
    student = make_student(kind, "nullspace", physics)
    cfg = make_config(kind, "nullspace", 3, physics, SMALL_EDGE)
    save_student(tmp_path / "s", student.net, cfg)
    loaded = load_student(tmp_path / "s", prior=tiny_prior() if kind == "paper" else None)
    assert isinstance(loaded, StudentSolver)
    assert loaded.objective == "nullspace" and loaded.config["kind"] == kind
    assert loaded.config["psf_sha256"] == physics.psf_hash and loaded.config["lam"] == physics.lam
    with torch.no_grad():
        want = student.eval()(measurement, physics)
    got = loaded(measurement, physics)
    assert torch.equal(got, want)
    inputs, _ = student_inputs(measurement, physics)
    with torch.no_grad():
        assert torch.equal(loaded.net(inputs), student.net(inputs))


def test_fp16_weights_and_make_solver(tmp_path, physics, measurement):
    student = make_student("edge", "full", physics)
    save_student(tmp_path / "s16", student.net, make_config("edge", "full", 3, physics, SMALL_EDGE), fp16=True)
    from safetensors.torch import load_file

    assert all(v.dtype == torch.float16 for v in load_file(str(tmp_path / "s16/model.safetensors")).values())
    solver = make_solver("student", path=str(tmp_path / "s16"))
    with torch.no_grad():
        want = student.eval()(measurement, physics)
    got = solver(measurement, physics)
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 2e-2
    assert solver.settings()["path"] == str(tmp_path / "s16")


def test_mismatched_psf_or_geometry_is_refused(tmp_path, physics, measurement):
    student = make_student("edge", "nullspace", physics)
    save_student(tmp_path / "s", student.net, make_config("edge", "nullspace", 3, physics, SMALL_EDGE))
    loaded = load_student(tmp_path / "s")
    other_psf = LenslessOperator(blur_psf(seed=5), (SIZE, SIZE), "circular", lam=1e-6)
    with pytest.raises(StudentError, match="PSF sha256"):
        loaded(measurement, other_psf)
    other_geometry = LenslessOperator(blur_psf(), (SIZE, SIZE), "crop", lam=1e-6, scene_shape=(SIZE, SIZE),
                                      conv_shape=(2 * SIZE, 2 * SIZE))
    with pytest.raises(StudentError, match="geometry"):
        loaded(measurement, other_geometry)

def test_student_uses_its_own_lambda(tmp_path, physics, measurement):
    student = make_student("edge", "nullspace", physics)
    save_student(tmp_path / "s", student.net, make_config("edge", "nullspace", 3, physics, SMALL_EDGE))
    loaded = load_student(tmp_path / "s")
    other_lam = LenslessOperator(blur_psf(), (SIZE, SIZE), "circular", lam=1e-2)
    got = loaded(measurement, other_lam)
    assert torch.equal(got, loaded(measurement, physics))
    assert not torch.allclose(got, Student(loaded.net, "nullspace")(measurement, other_lam))
    assert other_lam.lam == 1e-2  # the caller's operator is not modified
    assert other_lam.with_lam(physics.lam).psf_hash == physics.psf_hash


def test_bad_student_directories(tmp_path, physics):
    with pytest.raises(StudentError, match="no such student directory"):
        load_student(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StudentError, match="no config.json"):
        load_student(tmp_path / "empty")
    student = make_student("edge", "nullspace", physics)
    save_student(tmp_path / "s", student.net, make_config("edge", "nullspace", 3, physics, SMALL_EDGE))
    (tmp_path / "s/model.safetensors").write_bytes(b"garbage")
    with pytest.raises(StudentError, match="model.safetensors"):
        load_student(tmp_path / "s")
    save_student(tmp_path / "w", student.net, make_config("edge", "nullspace", 3, physics, {**SMALL_EDGE, "width": 4}))
    save_student(tmp_path / "w2", student.net, make_config("edge", "nullspace", 3, physics, SMALL_EDGE))
    (tmp_path / "w2/model.safetensors").replace(tmp_path / "w/model.safetensors")
    with pytest.raises(StudentError, match="do not match the architecture"):
        load_student(tmp_path / "w")


def test_paper_student_uses_and_finetunes_the_prior(physics, measurement):
    prior = tiny_prior()
    student = make_student("paper", "nullspace", physics)
    student = build_student(make_config("paper", "nullspace", 3, physics, {**SMALL_EDGE, "t_fixed": 100}), prior=prior)
    # the student fine-tunes its own copy of g_θ: it starts from the prior's weights, and the prior is never changed
    assert student.net.prior_net is not prior.net
    for a, b in zip(student.net.prior_net.parameters(), prior.net.parameters()):
        assert torch.equal(a, b)
    assert math.isclose(student.net.alpha_bar, float(prior.alphas_cumprod[100]))
    x_hat = student(measurement, physics)
    x_hat.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.net.prior_net.parameters())
    assert all(p.grad is None for p in prior.net.parameters())


def test_loading_a_paper_student_leaves_the_given_prior_untouched(tmp_path, physics, measurement):
    """evaluate passes one cached prior to every method: a paper student loaded with it must not write its
    fine-tuned weights into it (DDNM+ after the student would otherwise run the student's UNet)."""
    prior = tiny_prior()
    student = make_student("paper", "nullspace", physics)
    with torch.no_grad():
        for p in student.net.prior_net.parameters():  # a "fine-tuned" g_θ that differs from the prior
            p.add_(0.5)
    cfg = make_config("paper", "nullspace", 3, physics, SMALL_EDGE)
    save_student(tmp_path / "s", student.net, cfg)
    before = {k: v.clone() for k, v in prior.net.state_dict().items()}
    loaded = load_student(tmp_path / "s", prior=prior)
    assert all(torch.equal(before[k], v) for k, v in prior.net.state_dict().items())
    for a, b in zip(loaded.net.prior_net.parameters(), student.net.prior_net.parameters()):
        assert torch.equal(a, b)


def test_default_edge_net_exports_to_onnx_and_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    from train.students import default_architecture

    net = EdgeUNet(6, 3, **default_architecture("edge", "full")).eval()  # the shipped default (with input skip)
    x = torch.randn(1, 6, SIZE, SIZE)
    path = tmp_path / "g.onnx"
    torch.onnx.export(net, (x,), str(path), dynamo=True, input_names=["inputs"], output_names=["g"],
                      external_data=False)
    import onnx

    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ops <= {"Conv", "Sigmoid", "Mul", "Resize", "Concat", "Add", "Relu", "LeakyRelu", "Slice", "Constant",
                   "Identity", "Reshape", "Shape", "Cast"}, ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    xt = torch.randn(1, 6, SIZE, SIZE)
    (got,) = sess.run(None, {sess.get_inputs()[0].name: xt.numpy()})
    with torch.no_grad():
        want = net(xt).numpy()
    assert np.abs(got - want).max() <= 1e-4


def test_paper_student_with_the_real_unet_exports_as_one_graph(tmp_path, physics, measurement):
    """The paper student (g_φ + the attention UNet of ``train.prior.unet``) inside the export graph: only
    TensorRT-10 operators, and ONNX Runtime equals the torch student (with a support window)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import onnx

    from export.graph import ReconstructionGraph
    from export.onnx_graph import export_graph
    from export.trt_ops import unsupported_nodes
    from train.prior.unet import UNet

    torch.manual_seed(0)
    unet = UNet(image_size=16, base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attention_resolutions=[8],
                dropout=0.0)
    for p in unet.parameters():  # the zero-initialised output layers would hide the UNet from the check
        torch.nn.init.normal_(p, std=0.05)
    prior = DiffusionPrior(unet, linear_alphas_cumprod(1000), image_size=16)
    cfg = make_config("paper", "nullspace", 3, physics, {**SMALL_EDGE, "t_fixed": 100}, support_shape=(16, 16))
    student = build_student(cfg, prior=prior).eval()
    graph = ReconstructionGraph(blur_psf(), physics.sensor_shape, physics.lam, net=student.net,
                                objective="nullspace", dft="matmul", channels=3, support_shape=(16, 16))
    path = export_graph(graph, tmp_path / "paper.onnx", batch=None)
    model = onnx.load(str(path))
    assert unsupported_nodes(model) == []
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: measurement.numpy()})
    with torch.no_grad():
        want = student(measurement, physics).numpy()
    assert got.shape == want.shape == (2, 3, SIZE, SIZE)
    assert np.abs(want).max() > 0.05  # the network's part is not negligible
    assert np.abs(got - want).max() <= 1e-4
