"""Export of a student with a support window: crop (Slice) → net → zero-pad (Concat) inside the ONNX graph.

Sensor 32, support 16 (centred), our own simulated contour PSF (no ../shared), a tiny random EdgeUNet.
ONNX Runtime must match the training-time ``train.students.Student`` and ``nsdd-export verify`` must agree.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_export_helpers import make_dataset

from export.graph import ExportError, GraphSpec, ReconstructionGraph, reference_reconstruction
from export.onnx_graph import export_graph, load_student_info, main_argv, read_spec
from export.trt_ops import unsupported_nodes
from export.verify import configure_parser
from export.verify import main as verify_main
from nsdd_edge.psf_sim import simulate_psf

SENSOR = (32, 32)
SUPPORT = (16, 16)
LAM = 1e-3


def make_support_student(root, psf, objective="nullspace", support=SUPPORT, seed=0):
    from train.physics import LenslessOperator
    from train.students import build_student, make_config, save_student

    torch.manual_seed(seed)
    op = LenslessOperator(psf, SENSOR, "circular", lam=LAM)
    cfg = make_config("edge", objective, 3, op, architecture={"width": 4, "depth": 2, "max_width": 8, "blocks": 1},
                      support_shape=support, training={"data": "test-made", "num_samples": 6, "seed": seed})
    student = build_student(cfg)
    with torch.no_grad():  # g's output O(1), so a misplaced window shows
        student.net.head.weight.mul_(8.0)
        student.net.head.bias.add_(0.5)
    save_student(root, student.net, cfg)
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("support_export")
    psf = simulate_psf("contour", SENSOR, seed=0)
    np.save(root / "psf.npy", psf)
    return {"root": root, "psf": psf, "psf_file": root / "psf.npy", "data": make_dataset(root / "data", psf, n=3,
                                                                                          size=SENSOR, lam=LAM)}


@pytest.mark.parametrize("objective", ["nullspace", "full"])
def test_support_graph_matches_training_student_and_trt_ops(env, objective, tmp_path):
    student_dir = make_support_student(tmp_path / "student", env["psf"], objective)
    info = load_student_info(student_dir)
    assert info.support_shape == SUPPORT
    out = tmp_path / "m.onnx"
    assert main_argv(["--student", str(student_dir), "--psf", str(env["psf_file"]), "--out", str(out)]) == 0
    spec = read_spec(out)
    assert spec.support_shape == SUPPORT and spec.objective == objective
    model = onnx.load(str(out))
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["nsdd.support_shape"]) == list(SUPPORT)
    assert unsupported_nodes(model) == []
    ops = {n.op_type for n in model.graph.node}
    assert "Slice" in ops and "Concat" in ops and "DFT" not in ops
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert conv.name.startswith("student/")

    y = np.stack([np.load(p) for p in sorted((env["data"] / "measurements").glob("*.npy"))])[:1]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"y": y})[0]
    ref = reference_reconstruction(env["psf"], torch.from_numpy(y), LAM, info.net.float().eval(), objective,
                                   SUPPORT).numpy()
    assert np.abs(got - ref).max() <= 1e-4
    # the window matters: the same net on the whole grid gives another result
    whole = reference_reconstruction(env["psf"], torch.from_numpy(y), LAM, info.net, objective).numpy()
    assert np.abs(whole - ref).max() > 1e-2
    if objective == "full":  # g is zero outside the centred window, top = (32 − 16) // 2 = 8
        assert np.abs(got[..., :8, :]).max() == 0 and np.abs(got[..., 24:, :]).max() == 0
        assert np.abs(got[..., 8:24, 8:24]).max() > 0


def test_verify_agrees_with_support_student(env, tmp_path):
    student_dir = make_support_student(tmp_path / "student", env["psf"])
    out = tmp_path / "m.onnx"
    assert main_argv(["--student", str(student_dir), "--psf", str(env["psf_file"]), "--out", str(out)]) == 0
    p = argparse.ArgumentParser()
    configure_parser(p)
    report = tmp_path / "v.json"
    rc = verify_main(p.parse_args([str(out), "--data", str(env["data"]), "--student", str(student_dir),
                                   "--json", str(report), "--no-quantize", "--require-trt10"]))
    r = json.loads(report.read_text())
    assert rc == 0 and r["ok"] and r["support_shape"] == list(SUPPORT)
    assert r["fp32_vs_torch_max_abs_error"] <= 1e-4 and r["tensorrt_10.3_parseable"]

    # a student of the same PSF/size/λ but with another window is refused as the reference
    other = make_support_student(tmp_path / "other", env["psf"], support=(8, 8))
    rc = verify_main(p.parse_args([str(out), "--data", str(env["data"]), "--student", str(other),
                                   "--json", str(tmp_path / "o.json"), "--no-quantize"]))
    assert rc == 2


def test_support_metadata_is_optional_and_checked(env, tmp_path):
    from train.students import EdgeUNet

    net = EdgeUNet(6, 3, width=4, depth=1, max_width=4, blocks=1).eval()
    g = ReconstructionGraph(env["psf"], SENSOR, LAM, net=net, channels=3)
    assert g.spec.support_shape is None and "nsdd.support_shape" not in g.spec.metadata()
    assert GraphSpec.from_metadata(g.spec.metadata()).support_shape is None  # older models: full grid
    # the whole grid as "support" is the full graph (no crop/pad nodes)
    assert ReconstructionGraph(env["psf"], SENSOR, LAM, net=net, support_shape=SENSOR).spec.support_shape is None
    for bad in ((40, 16), (0, 16), (16,), (16.5, 16)):
        with pytest.raises(ExportError, match="support_shape"):
            ReconstructionGraph(env["psf"], SENSOR, LAM, net=net, support_shape=bad)
    with pytest.raises(ExportError, match="Wiener-only"):
        ReconstructionGraph(env["psf"], SENSOR, LAM, net=None, objective="wiener", support_shape=SUPPORT)
    props = ReconstructionGraph(env["psf"], SENSOR, LAM, net=net, support_shape=(16, 8)).spec.metadata()
    assert GraphSpec.from_metadata(props).support_shape == (16, 8)
    with pytest.raises(ExportError, match="nsdd.support_shape"):
        GraphSpec.from_metadata({**props, "nsdd.support_shape": "[64, 64]"})
    # odd sizes: top = (32 − 15) // 2 = 8, left = (32 − 17) // 2 = 7, as train.physics.center_crop
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 3, 3, padding=1).eval()
    with torch.no_grad():
        conv.bias.fill_(1.0)
    path = export_graph(ReconstructionGraph(env["psf"], SENSOR, LAM, net=conv, objective="full",
                                            support_shape=(15, 17)), tmp_path / "odd.onnx")
    assert read_spec(path).support_shape == (15, 17) and unsupported_nodes(onnx.load(str(path))) == []
    y = torch.rand((1, 3, *SENSOR), generator=torch.Generator().manual_seed(0))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"y": y.numpy()})[0]
    ref = reference_reconstruction(env["psf"], y, LAM, conv, "full", (15, 17)).numpy()
    assert np.abs(got - ref).max() <= 1e-5
    nz = np.argwhere(np.abs(got[0, 0]) > 0)
    assert (nz[:, 0].min(), nz[:, 0].max(), nz[:, 1].min(), nz[:, 1].max()) == (8, 22, 7, 23)


def make_tapered_student(root, psf, taper=4, objective="nullspace"):
    from train.physics import LenslessOperator
    from train.students import build_student, make_config, save_student

    torch.manual_seed(0)
    op = LenslessOperator(psf, SENSOR, "circular", lam=LAM)
    cfg = make_config("edge", objective, 3, op, architecture={"width": 4, "depth": 2, "max_width": 8, "blocks": 1},
                      support_shape=SUPPORT, support_taper=taper)
    student = build_student(cfg)
    with torch.no_grad():
        student.net.head.bias.add_(0.5)
    save_student(root, student.net, cfg)
    return root


def test_soft_support_fades_g_out_instead_of_a_box_edge(env):
    """``g`` is 0 at the window's border and rises smoothly (raised cosine) to the network's value inside."""
    from nsdd_edge.camera import support_mask
    from train.physics import LenslessOperator
    from train.students import Student, StudentError

    class Ones(torch.nn.Module):
        def forward(self, x):
            return torch.ones(x.shape[0], 3, *x.shape[-2:])

    op = LenslessOperator(env["psf"], SENSOR, "circular", lam=LAM)
    y = torch.rand(1, 3, *SENSOR)
    hard = Student(Ones(), "full", SUPPORT)(y, op)[0, 0].numpy()
    soft = Student(Ones(), "full", SUPPORT, support_taper=4)(y, op)[0, 0].numpy()
    assert np.array_equal(hard, support_mask(SENSOR, SUPPORT, 0))
    assert np.allclose(soft, support_mask(SENSOR, SUPPORT, 4))
    row = soft[SENSOR[0] // 2]
    inside = row[8:24]
    assert inside[0] < 0.05 and np.all(np.diff(inside[:5]) > 0) and inside[4:12].min() == 1.0
    for bad, match in ((-1, "integer ≥ 0"), (8, "does not fit"), (2.5, "integer")):
        with pytest.raises(StudentError, match=match):
            Student(Ones(), "full", SUPPORT, support_taper=bad)
    with pytest.raises(StudentError, match="needs a support window"):
        Student(Ones(), "full", None, support_taper=2)


@pytest.mark.parametrize("objective", ["nullspace", "full"])
def test_soft_support_graph_matches_training_student_and_verifies(env, objective, tmp_path):
    student_dir = make_tapered_student(tmp_path / "student", env["psf"], objective=objective)
    info = load_student_info(student_dir)
    assert info.support_taper == 4
    out = tmp_path / "m.onnx"
    assert main_argv(["--student", str(student_dir), "--psf", str(env["psf_file"]), "--out", str(out)]) == 0
    spec = read_spec(out)
    assert spec.support_taper == 4 and spec.support_shape == SUPPORT
    assert unsupported_nodes(onnx.load(str(out))) == []
    y = np.stack([np.load(p) for p in sorted((env["data"] / "measurements").glob("*.npy"))])[:1]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"y": y})[0]
    ref = reference_reconstruction(env["psf"], torch.from_numpy(y), LAM, info.net.float().eval(), objective,
                                   SUPPORT, support_taper=4).numpy()
    hard = reference_reconstruction(env["psf"], torch.from_numpy(y), LAM, info.net.float().eval(), objective,
                                    SUPPORT).numpy()
    assert np.abs(got - ref).max() <= 1e-4 and np.abs(got - hard).max() > 1e-2
    p = argparse.ArgumentParser()
    configure_parser(p)
    assert verify_main(p.parse_args([str(out), "--data", str(env["data"]), "--student", str(student_dir),
                                     "--json", str(tmp_path / "r.json"), "--no-quantize"])) == 0
    hard_dir = make_support_student(tmp_path / "hard", env["psf"], objective)
    assert verify_main(p.parse_args([str(out), "--data", str(env["data"]), "--student", str(hard_dir),
                                     "--json", str(tmp_path / "r2.json"), "--no-quantize"])) == 2


def test_taper_metadata_round_trips_and_is_checked():
    from nsdd_edge.optics import LenslessGeometry

    spec = GraphSpec("0" * 64, 1e-3, LenslessGeometry.make("circular", SENSOR), 3, "nullspace", "matmul", SUPPORT,
                     support_taper=3)
    assert GraphSpec.from_metadata(spec.metadata()) == spec
    assert "nsdd.support_taper" not in GraphSpec("0" * 64, 1e-3, spec.geometry, 3, "nullspace", "matmul",
                                                 SUPPORT).metadata()
    with pytest.raises(ExportError, match="support_taper"):
        GraphSpec.from_metadata({**spec.metadata(), "nsdd.support_taper": "soft"})
