# ruff: noqa: F811  (pytest fixtures imported from test_export_helpers)
"""``nsdd-export onnx``: single-file ONNX, metadata, static/dynamic batch, both DFT forms, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_export_helpers import LAM, SIZE, export_env, exported, make_student  # noqa: F401

from export.graph import reference_reconstruction
from export.onnx_graph import main_argv, read_spec
from export.trt_ops import unsupported_nodes
from nsdd_edge.optics import array_hash
from train.students import load_student


def _run(path, y):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"y": y})[0]


def _frames(export_env, n):
    return np.stack([np.load(p) for p in sorted((export_env["data"] / "measurements").glob("*.npy"))[:n]])


def test_student_export_is_one_file_with_metadata_and_trt10_ops(export_env, exported):
    path = exported["student"]
    assert not path.with_name(path.name + ".data").exists()
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    props = {p.key: p.value for p in model.metadata_props}
    assert props["nsdd.psf_sha256"] == array_hash(export_env["psf"])
    assert float(props["nsdd.lam"]) == LAM
    assert json.loads(props["nsdd.geometry"])["sensor_shape"] == list(SIZE)
    assert props["nsdd.objective"] == "nullspace" and props["nsdd.dft"] == "matmul"
    assert props["nsdd.precision"] == "fp32"
    assert unsupported_nodes(model) == []
    ops = {n.op_type for n in model.graph.node}
    assert "MatMul" in ops and "Conv" in ops and "DFT" not in ops
    assert any(n.name.startswith("student/") for n in model.graph.node)
    assert any(n.name.startswith("physics/") for n in model.graph.node)


def test_ort_matches_torch_student_and_operator_static_and_dynamic(export_env, exported):
    net = load_student(export_env["student"]).net
    y = _frames(export_env, 3)
    ref = reference_reconstruction(export_env["psf"], torch.from_numpy(y), LAM, net, "nullspace").numpy()
    for n in (1, 3):  # dynamic batch
        out = _run(exported["student"], y[:n])
        assert out.shape == (n, 3, *SIZE)
        assert np.abs(out - ref[:n]).max() <= 1e-4


def test_static_batch_wiener_only_graph_equals_a_dagger(export_env, exported):
    y = _frames(export_env, 3)
    ref = reference_reconstruction(export_env["psf"], torch.from_numpy(y), LAM, None, "wiener").numpy()
    assert np.abs(_run(exported["wiener"], y[:2]) - ref[:2]).max() <= 1e-5
    assert read_spec(exported["wiener"]).objective == "wiener"
    model = onnx.load(str(exported["wiener"]))
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [2, 3, *SIZE]
    assert unsupported_nodes(model) == []
    with pytest.raises(Exception, match="(?i)dimension|shape"):  # a static model refuses another batch size
        _run(exported["wiener"], y)


def test_onnx_dft_form_runs_in_ort_and_is_flagged_for_trt10(export_env, tmp_path):
    out = tmp_path / "dft.onnx"
    assert main_argv(["--student", str(export_env["student"]), "--psf", str(export_env["psf_file"]), "--dft", "onnx",
                      "--batch", "1", "--out", str(out)]) == 0  # size and λ from the student's config
    model = onnx.load(str(out))
    assert "DFT" in {n.op_type for n in model.graph.node}
    bad = unsupported_nodes(model)
    assert bad and {b["op_type"] for b in bad} == {"DFT"}
    net = load_student(export_env["student"]).net
    y = _frames(export_env, 1)
    ref = reference_reconstruction(export_env["psf"], torch.from_numpy(y), LAM, net, "nullspace").numpy()
    assert np.abs(_run(out, y) - ref).max() <= 1e-4


def test_refuses_student_for_another_psf_size_or_lambda(export_env, tmp_path, capsys):
    other = np.roll(export_env["psf"], 3, axis=-1)
    np.save(tmp_path / "other.npy", other)
    args = ["--student", str(export_env["student"]), "--out", str(tmp_path / "x.onnx")]
    assert main_argv([*args, "--psf", str(tmp_path / "other.npy")]) == 2
    assert "trained for PSF" in capsys.readouterr().err
    assert main_argv([*args, "--psf", str(export_env["psf_file"]), "--size", "64", "64"]) == 2
    assert "trained at size (32, 32)" in capsys.readouterr().err
    assert main_argv([*args, "--psf", str(export_env["psf_file"]), "--lam", "0.5"]) == 2
    assert "λ" in capsys.readouterr().err
    assert main_argv([*args, "--psf", str(export_env["psf_file"]), "--batch", "zero"]) == 2
    assert "--batch" in capsys.readouterr().err
    assert main_argv([*args, "--psf", str(export_env["psf_file"]), "--opset", "16"]) == 2
    assert "opset ≥ 17" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_clear_errors_for_bad_inputs(export_env, tmp_path, capsys):
    assert main_argv(["--wiener-only", "--psf", str(export_env["psf_file"]), "--out", str(tmp_path / "w.onnx")]) == 2
    assert "--size" in capsys.readouterr().err
    assert main_argv(["--wiener-only", "--psf", str(tmp_path / "missing.npy"), "--size", "32", "32",
                      "--out", str(tmp_path / "w.onnx")]) == 2
    assert "missing.npy: no such file" in capsys.readouterr().err
    assert main_argv(["--student", str(tmp_path / "nostudent"), "--psf", str(export_env["psf_file"]),
                      "--out", str(tmp_path / "w.onnx")]) == 2
    assert "nostudent" in capsys.readouterr().err
    crop = make_student(tmp_path / "student_full", export_env["psf"], objective="full")
    assert main_argv(["--student", str(crop), "--psf", str(export_env["psf_file"]),
                      "--out", str(tmp_path / "full.onnx")]) == 0
    assert read_spec(tmp_path / "full.onnx").objective == "full"


def test_export_prints_no_torchvision_notices(export_env, tmp_path):
    """A fresh process (the exporter's op registry is built once per process): no "torchvision is not
    installed. Skipping torchvision::nms" lines (issue 16, item 10)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "export.cli", "onnx", "--student", str(export_env["student"]),
                           "--psf", str(export_env["psf_file"]), "--out", str(tmp_path / "m.onnx")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "torchvision" not in done.stderr + done.stdout
