"""Export of the crop-model reconstruction: ``y`` on the sensor grid → ``x̂`` on the scene grid, one graph.

Tiny data made here: our own simulated contour PSF as large as the sensor (16×20, the DiffuserCam situation),
the crop model on the 2× convolution grid with the scene grid = the convolution grid (32×40, DiffuserCam's
``--recon-support grid``), and a second geometry with odd grids and a scene smaller than the sensor. The
graph (both DFT forms) must equal :class:`train.physics.LenslessOperator` ``model="crop"`` and the
training-time :class:`train.students.Student` (edge and paper networks, with and without a support window)
in torch and in ONNX Runtime; the CLI exports a crop student from its own recorded geometry, verifies it
(TensorRT-10 ops, FP16/INT8, FP16 emulation, consistency under the crop operator) and bundles it.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.graph import ExportError, GraphSpec, ReconstructionGraph, reference_reconstruction
from export.make_bundle import main as bundle_main
from export.onnx_graph import export_graph, load_student_info, main_argv, read_spec
from export.quantize import emulated_psnr, psnr
from export.trt_ops import unsupported_nodes
from export.verify import configure_parser as verify_parser
from export.verify import main as verify_main
from nsdd_edge.optics import LenslessGeometry, WienerFilter, array_hash
from nsdd_edge.psf_sim import simulate_psf

SENSOR = (16, 20)
GRID = (32, 40)  # scene = convolution grid = 2× the sensor
SUPPORT = (16, 16)  # on the scene grid
LAM = 1e-3
EDGE = {"width": 4, "depth": 2, "max_width": 8, "blocks": 1}


def crop_geometry(psf: np.ndarray) -> LenslessGeometry:
    return LenslessGeometry.make("crop", SENSOR, psf.shape[-2:], scene_shape=GRID, conv_shape=GRID)


def crop_operator(psf: np.ndarray, geometry: LenslessGeometry):
    from train.physics import LenslessOperator

    return LenslessOperator(psf, geometry.sensor_shape, "crop", lam=LAM, scene_shape=geometry.scene_shape,
                            conv_shape=geometry.conv_shape)


def smooth_scenes(n: int, shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand((n, 3, 4, 5), generator=g), size=tuple(shape),
                                           mode="bilinear", align_corners=False)


def make_crop_dataset(root, psf: np.ndarray, n: int = 4, seed: int = 0):
    """measurements/*.npy (sensor grid), ground_truth/*.npy (scene grid), psf.npy, dataset.json (crop recon)."""
    geometry = crop_geometry(psf)
    op = crop_operator(psf, geometry)
    x = smooth_scenes(n, GRID, seed)
    y = op.measure(x, noise_std=0.005, generator=torch.Generator().manual_seed(seed + 1))
    for sub in ("measurements", "ground_truth"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"{k:04d}" for k in range(n)]
    for k, i in enumerate(ids):
        np.save(root / "measurements" / f"{i}.npy", y[k].numpy().astype(np.float32))
        np.save(root / "ground_truth" / f"{i}.npy", x[k].numpy().astype(np.float32))
    np.save(root / "psf.npy", psf)
    meta = {"psf": {"file": "psf.npy", "sha256": array_hash(psf), "source": "test"}, "forward": geometry.to_dict(),
            "recon": {"model": "crop", "lam": LAM, "scene_shape": list(GRID), "conv_shape": list(GRID)},
            "noise_std": 0.005, "seed": seed, "channels": 3, "splits": {"train": ids}, "skipped": []}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def paper_prior(root):
    """A tiny diffusion prior with the real attention UNet (random weights, so the UNet's part shows), saved
    and loaded back so that its config is recorded as ``nsdd-train distill`` records it."""
    from train.prior.base import DiffusionPrior, linear_alphas_cumprod
    from train.prior.io import load_prior, save_prior
    from train.prior.unet import UNet

    torch.manual_seed(0)
    unet = UNet(image_size=16, base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attention_resolutions=[8],
                dropout=0.0)
    for p in unet.parameters():  # the zero-initialised output layers would hide the UNet from the check
        torch.nn.init.normal_(p, std=0.05)
    save_prior(DiffusionPrior(unet, linear_alphas_cumprod(1000), image_size=16), root)
    return load_prior(root)


def make_crop_student(root, psf: np.ndarray, kind: str = "edge", support=SUPPORT, objective: str = "nullspace",
                      seed: int = 0):
    """A student directory trained (random weights, seeded) for the crop operator of ``psf``."""
    from train.students import build_student, make_config, save_student

    torch.manual_seed(seed)
    op = crop_operator(psf, crop_geometry(psf))
    extra = {}
    prior = None
    if kind == "paper":
        prior = paper_prior(root.parent / f"{root.name}_prior")
        extra["prior"] = {"dir": None, "config": prior.config, "image_size": prior.image_size}
    arch = {**EDGE, "t_fixed": 100} if kind == "paper" else EDGE
    cfg = make_config(kind, objective, 3, op, architecture=arch, support_shape=support,
                      training={"data": "test-made", "num_samples": 4, "seed": seed}, **extra)
    student = build_student(cfg, prior=prior)
    net = student.net.adapter if kind == "paper" else student.net
    with torch.no_grad():  # g's output O(1), so a misplaced window or grid shows
        net.head.weight.mul_(8.0)
        net.head.bias.add_(0.5)
    save_student(root, student.net, cfg)
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("crop_export")
    psf = simulate_psf("contour", SENSOR, seed=3)  # as large as the sensor
    np.save(root / "psf.npy", psf)
    return {"root": root, "psf": psf, "psf_file": root / "psf.npy", "data": make_crop_dataset(root / "data", psf),
            "student": make_crop_student(root / "student", psf)}


def _frames(env, n=2) -> np.ndarray:
    return np.stack([np.load(p) for p in sorted((env["data"] / "measurements").glob("*.npy"))])[:n]


def _verify(argv):
    p = argparse.ArgumentParser()
    verify_parser(p)
    return verify_main(p.parse_args(argv))


@pytest.mark.parametrize("dft", ["matmul", "onnx"])
@pytest.mark.parametrize("shapes", [(SENSOR, GRID, GRID), ((24, 24), (16, 16), (49, 48)), ((24, 20), (30, 17), (49, 41))])
def test_crop_graph_operators_equal_the_crop_lensless_operator(dft, shapes):
    sensor, scene, conv = shapes
    psf = simulate_psf("contour", sensor, seed=1)
    geometry = LenslessGeometry.make("crop", sensor, psf.shape[-2:], scene_shape=scene, conv_shape=conv)
    op = crop_operator(psf, geometry)
    graph = ReconstructionGraph(psf, geometry, LAM, objective="wiener", dft=dft)
    assert graph.spec.geometry == geometry and graph.crop
    y = op.A(smooth_scenes(2, scene))
    x = torch.rand(2, 3, *scene, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        scale = float(op.A_dagger(y).abs().max())
        assert graph(y).shape == (2, 3, *scene)
        assert float((graph.pseudo_inverse(y) - op.A_dagger(y)).abs().max()) <= 1e-5 * scale
        assert float((graph.forward_model(x) - op.A(x)).abs().max()) <= 1e-5
        assert float((graph.null_project(x) - op.null_project(x)).abs().max()) <= 2e-5
    # the Wiener-only graph is the runtime's numpy Wiener filter (the fallback engine of a crop bundle)
    numpy_wiener = WienerFilter(psf, geometry, LAM)(y.numpy())
    assert np.abs(graph(y).numpy() - numpy_wiener).max() <= 1e-5 * scale


CASES = [("edge", None, "matmul"), ("edge", SUPPORT, "onnx"), ("paper", SUPPORT, "matmul"), ("paper", None, "onnx")]


@pytest.mark.parametrize(("kind", "support", "dft"), CASES)
def test_crop_student_graph_in_onnx_runtime_equals_the_training_student(env, tmp_path, kind, support, dft):
    student_dir = make_crop_student(tmp_path / "s", env["psf"], kind, support)
    info = load_student_info(student_dir)
    geometry = crop_geometry(env["psf"])
    assert info.geometry == geometry and info.support_shape == support
    net = info.net.float().eval()
    graph = ReconstructionGraph(env["psf"], geometry, LAM, net=net, objective="nullspace", dft=dft,
                                support_shape=support)
    path = export_graph(graph, tmp_path / "m.onnx", batch=None if dft == "matmul" else 1)
    spec = read_spec(path)
    assert spec.geometry == geometry and spec.support_shape == support
    model = onnx.load(str(path))
    dims = [[d.dim_value for d in v.type.tensor_type.shape.dim] for v in (model.graph.input[0], model.graph.output[0])]
    assert [d[1:] for d in dims] == [[3, *SENSOR], [3, *GRID]]  # y on the sensor, x̂ on the scene grid
    ops = {n.op_type for n in model.graph.node}
    if dft == "matmul":
        assert unsupported_nodes(model) == [] and "DFT" not in ops
    else:
        assert "DFT" in ops and {b["op_type"] for b in unsupported_nodes(model)} == {"DFT"}

    y = _frames(env)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"y": y[:1] if dft == "onnx"
                                                                                       else y})[0]
    yt = torch.from_numpy(y[: len(got)])
    ref = reference_reconstruction(env["psf"], yt, LAM, net, "nullspace", support, geometry=geometry).numpy()
    assert got.shape == ref.shape == (len(got), 3, *GRID)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))
    with torch.no_grad():
        assert np.abs(graph(yt).numpy() - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))
    # the student matters, and the window and the grid do: other choices give other results
    wiener = reference_reconstruction(env["psf"], yt, LAM, None, "wiener", geometry=geometry).numpy()
    assert np.abs(got - wiener).max() > 1e-2
    other = SUPPORT if support is None else None
    if kind == "edge":  # the edge net runs on any window; another window gives another x̂
        moved = reference_reconstruction(env["psf"], yt, LAM, net, "nullspace", other, geometry=geometry).numpy()
        assert np.abs(got - moved).max() > 1e-2
    if dft == "matmul" and kind == "edge":  # FP16 emulation of the whole graph and of the student alone
        whole = emulated_psnr(model, "all", y, None, got)
        part = emulated_psnr(model, "conv", y, None, got)
        assert 35 < whole < 200 and 35 < part < 200


def test_crop_graph_rejects_bad_geometry_and_support(env):
    psf = env["psf"]
    net = torch.nn.Conv2d(6, 3, 1)
    big = np.pad(psf, ((0, 0), (12, 12), (12, 12)))  # 40×44: does not fit the 32×40 convolution grid
    with pytest.raises(ValueError, match="larger than the convolution grid"):
        ReconstructionGraph(big, LenslessGeometry("crop", SENSOR, GRID, GRID), LAM, objective="wiener")
    with pytest.raises(ExportError, match="support_shape"):  # the window lies on the scene grid
        ReconstructionGraph(psf, crop_geometry(psf), LAM, net=net, support_shape=(40, 16))
    with pytest.raises(ExportError, match="crop-model graph only"):
        ReconstructionGraph(psf, SENSOR, LAM, objective="wiener").forward_model(torch.zeros(1, 3, *SENSOR))
    props = ReconstructionGraph(psf, crop_geometry(psf), LAM, net=net, support_shape=(30, 36)).spec.metadata()
    spec = GraphSpec.from_metadata(props)
    assert spec.geometry == crop_geometry(psf) and spec.support_shape == (30, 36)  # larger than the sensor: fine
    assert json.loads(props["nsdd.geometry"]) == {"model": "crop", "sensor_shape": list(SENSOR),
                                                  "scene_shape": list(GRID), "conv_shape": list(GRID)}


def test_cli_exports_verifies_quantizes_and_bundles_a_crop_student(env, tmp_path, capsys):
    out = tmp_path / "crop.onnx"
    assert main_argv(["--student", str(env["student"]), "--psf", str(env["psf_file"]), "--out", str(out)]) == 0
    assert "model=crop sensor=(16, 20) scene=(32, 40)" in capsys.readouterr().out
    spec = read_spec(out)
    assert spec.geometry == crop_geometry(env["psf"]) and spec.support_shape == SUPPORT

    report = tmp_path / "v.json"
    rc = _verify([str(out), "--data", str(env["data"]), "--student", str(env["student"]), "--json", str(report),
                  "--require-trt10"])
    r = json.loads(report.read_text())
    assert rc == 0 and r["ok"] and r["tensorrt_10.3_parseable"] and r["geometry"]["model"] == "crop"
    assert r["fp32_vs_torch_max_abs_error"] <= 1e-4
    assert r["fp16_psnr_vs_fp32_db"] > 50 and r["int8_psnr_vs_fp32_db"] > 25
    assert r["fp16_tensorrt_10.3_unsupported"] == [] and r["int8_tensorrt_10.3_unsupported"] == []
    emulated = r["fp16_torch_emulation_psnr_vs_fp32_db"]
    assert set(emulated) == {"whole_graph", "student_only"} and all(30 < v < 200 for v in emulated.values())
    # consistency under the crop operator: the ONNX output fits y as well as the torch student does
    assert abs(r["consistency"]["fp32"] - r["consistency"]["torch_reference"]) < 1e-4
    assert all(0 < v < 1 for v in r["consistency"].values())

    # the Wiener-only crop graph from the CLI: the default grid is 2× the sensor, the scene = that grid
    wiener = tmp_path / "wiener.onnx"
    assert main_argv(["--wiener-only", "--model", "crop", "--size", *map(str, SENSOR), "--lam", str(LAM),
                      "--psf", str(env["psf_file"]), "--out", str(wiener)]) == 0
    assert read_spec(wiener).geometry == crop_geometry(env["psf"])
    report = tmp_path / "w.json"
    assert _verify([str(wiener), "--data", str(env["data"]), "--json", str(report), "--require-trt10"]) == 0
    r = json.loads(report.read_text())
    assert r["fp32_vs_torch_max_abs_error"] <= 1e-5 and r["fp16_psnr_vs_fp32_db"] > 50 and "not applicable" in r["int8"]

    fp16 = tmp_path / "crop_fp16.onnx"
    from export.quantize import quantize_file

    quantize_file(out, "fp16", fp16, data=env["data"])
    assert bundle_main(argparse.Namespace(onnx=f"{out},{fp16}", engine=None, psf=str(env["psf_file"]),
                                          psf_downsample=1, psf_background="none", psf_normalization="sum",
                                          preprocess=None, name=None, out=str(tmp_path / "bundle"))) == 0
    assert "crop: sensor (16, 20) → scene (32, 40)" in capsys.readouterr().out
    from nsdd_edge.bundle import load_bundle

    b = load_bundle(tmp_path / "bundle")
    assert b.geometry == crop_geometry(env["psf"]) and b.support_shape == SUPPORT
    assert b.input_shape == (3, *SENSOR) and b.output_shape == (3, *GRID)
    # the Wiener-only and the student graphs differ in objective: one bundle cannot mix them
    assert bundle_main(argparse.Namespace(onnx=f"{out},{wiener}", engine=None, psf=str(env["psf_file"]),
                                          psf_downsample=1, psf_background="none", psf_normalization="sum",
                                          preprocess=None, name=None, out=str(tmp_path / "mixed"))) == 2


def test_cli_refuses_a_crop_student_with_another_geometry(env, tmp_path, capsys):
    base = ["--student", str(env["student"]), "--psf", str(env["psf_file"]), "--out", str(tmp_path / "x.onnx")]
    assert main_argv([*base, "--model", "circular"]) == 2
    assert "trained with the 'crop' reconstruction model" in capsys.readouterr().err
    assert main_argv([*base, "--conv-size", "34", "40"]) == 2
    assert "convolution grid (32, 40)" in capsys.readouterr().err
    assert main_argv([*base, "--scene-size", "24", "24"]) == 2
    assert "scene (32, 40)" in capsys.readouterr().err
    assert main_argv(["--wiener-only", "--size", *map(str, SENSOR), "--conv-size", "32", "40",
                      "--psf", str(env["psf_file"]), "--out", str(tmp_path / "w.onnx")]) == 2
    assert "--model crop" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "w.onnx").exists()

    # verify refuses, as the torch reference, a student trained for the circular model of the same PSF and size
    from train.physics import LenslessOperator
    from train.students import build_student, make_config, save_student

    circ = LenslessOperator(env["psf"], SENSOR, "circular", lam=LAM)
    cfg = make_config("edge", "nullspace", 3, circ, architecture=EDGE, support_shape=(8, 8))
    save_student(tmp_path / "circular", build_student(cfg).net, cfg)
    out = tmp_path / "crop.onnx"
    assert main_argv(["--student", str(env["student"]), "--psf", str(env["psf_file"]), "--out", str(out)]) == 0
    assert _verify([str(out), "--data", str(env["data"]), "--student", str(tmp_path / "circular"),
                    "--json", str(tmp_path / "v.json"), "--no-quantize"]) == 2
    assert "'circular' reconstruction model" in capsys.readouterr().err


def test_fp16_whole_graph_of_the_crop_model_stays_finite_and_close(env, tmp_path):
    """The crop graph's DFTs on the convolution grid in float16 (torch CPU, the verify emulation's method)."""
    geometry = crop_geometry(env["psf"])
    graph = ReconstructionGraph(env["psf"], geometry, LAM, objective="wiener")
    y = torch.from_numpy(_frames(env, 4))
    with torch.no_grad():
        ref = graph(y).numpy()
        half = graph.half()(y.half()).float().numpy()
    assert np.isfinite(half).all() and psnr(ref, half) > 40


@pytest.mark.parametrize(("grid", "window"), [((8, 10), (8, 10)), ((9, 12), (4, 5)), ((12, 9), (7, 9))])
def test_centred_rdft_is_rfft2_of_the_padded_image_and_its_cropped_inverse(grid, window):
    from export.dft import CentredRDFT2, MatmulRDFT2, centred_rdft_matrices
    from nsdd_edge.optics import center_crop, center_pad

    dft = CentredRDFT2(grid, window).double()
    for name, m in centred_rdft_matrices(grid, window).items():  # float64 matrices for an exact comparison
        getattr(dft, name).copy_(torch.from_numpy(m))
    x = torch.randn(2, 3, *window, dtype=torch.float64)
    ref = torch.fft.rfft2(torch.from_numpy(center_pad(x.numpy(), grid)), norm="ortho")
    wr = grid[1] // 2 + 1
    z = dft(x)
    assert torch.allclose(z[..., :wr], ref.real, atol=1e-12) and torch.allclose(z[..., wr:], ref.imag, atol=1e-12)
    spec = torch.randn(2, 3, grid[0], wr, dtype=torch.complex128)
    full = torch.fft.irfft2(spec, s=grid, norm="ortho").numpy()
    got = dft.inverse(torch.cat([spec.real, spec.imag], dim=-1)).numpy()
    assert np.abs(got - center_crop(full, window)).max() < 1e-12
    assert torch.allclose(dft.inverse(z), x, atol=1e-12)  # crop ∘ inverse ∘ forward ∘ pad = identity
    if window == grid:  # the whole grid: the same transform as the circular graph's
        assert torch.allclose(MatmulRDFT2(*grid).double()(x).float(), dft(x).float(), atol=1e-5)
