# ruff: noqa: F811  (pytest fixtures imported from test_export_helpers)
"""``nsdd-export engine``: the version-dependent build decisions (pure functions), the missing-TensorRT path, and
the builder's calls against a fake ``tensorrt`` module that follows the TensorRT 10 API (tests/fakes/tensorrt.py):
strongly typed by default, ``physics/*`` pinned to FP32 when weakly typed, and no torch/onnx on the device.

TensorRT cannot be installed here: the fake builds nothing and no real engine is claimed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_export_helpers import export_env, exported  # noqa: F401

from export.engine import (
    PRECISIONS,
    build_settings,
    configure_parser,
    main,
    model_facts,
    onnx_metadata,
    parse_version,
)
from export.graph import ExportError

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
ROOT = Path(__file__).resolve().parents[1]
FAKES = Path(__file__).resolve().parent / "fakes"
DEFAULT_ONNX = ROOT / "nsdd_edge/assets/default_bundle/student_nullspace.onnx"


@pytest.fixture
def tiny_onnx(tmp_path):
    """A one-node graph with a dynamic batch and nsdd metadata (enough for everything before the build)."""
    import onnx
    from onnx import TensorProto, helper

    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 32, 32])
    x = helper.make_tensor_value_info("x_hat", TensorProto.FLOAT, ["batch", 3, 32, 32])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["y"], ["x_hat"])], "g", [y], [x]),
                              opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"nsdd.precision": "fp32"})
    path = tmp_path / "tiny.onnx"
    onnx.save(model, str(path))
    return path


def _parse(argv):
    p = argparse.ArgumentParser()
    configure_parser(p)
    return p.parse_args(argv)


@pytest.mark.parametrize("text, expected", [("10.3.0.30", (10, 3, 0)), ("11.2", (11, 2, 0)), ("10", (10, 0, 0)),
                                            ("8.6.1.6", (8, 6, 1))])
def test_parse_version(text, expected):
    assert parse_version(text) == expected


@pytest.mark.parametrize("bad", ["", "ten", "x.1"])
def test_parse_version_rejects_garbage(bad):
    with pytest.raises(ExportError, match="TensorRT version"):
        parse_version(bad)


def test_tensorrt_10_builds_strongly_typed_by_default():
    """issue 14 #5: the ONNX types decide (physics FP32); the request must match the model."""
    for precision, model in (("fp32", "fp32"), ("fp16", "fp16")):
        s = build_settings("10.3.0", precision, model_precision=model)
        assert s.strongly_typed and s.network_flags == ["STRONGLY_TYPED"] and s.builder_flags == []
        assert not s.pin_physics_fp32
    assert build_settings("10.3.0", "int8", model_precision="int8", has_qdq=True).builder_flags == []
    with pytest.raises(ExportError, match="ONNX types"):
        build_settings("10.3.0", "fp16", model_precision="fp32")  # the old weakly typed FP16 build of an FP32 graph
    with pytest.raises(ExportError, match="--weakly-typed"):
        build_settings("10.3.0", "best", model_precision="fp32")
    with pytest.raises(ExportError, match="Q/DQ"):
        build_settings("10.3.0", "int8", model_precision="int8", has_qdq=False)
    assert any("fp16-mode all" in n for n in build_settings("10.3.0", "fp16", model_precision="fp16",
                                                             fp16_mode="all").notes)


def test_weakly_typed_tensorrt_10_pins_the_physics_to_fp32():
    assert build_settings("10.3.0", "fp32", weakly_typed=True).builder_flags == []
    assert not build_settings("10.3.0", "fp32", weakly_typed=True).pin_physics_fp32
    s = build_settings("10.3.0", "fp16", weakly_typed=True)
    assert s.builder_flags == ["FP16", "OBEY_PRECISION_CONSTRAINTS"] and s.pin_physics_fp32 and not s.strongly_typed
    s = build_settings("10.3.0", "int8", has_qdq=True, weakly_typed=True)
    assert s.builder_flags == ["INT8", "FP16", "OBEY_PRECISION_CONSTRAINTS"] and s.network_flags == []
    assert build_settings("10.3.0", "best", has_qdq=True, weakly_typed=True).builder_flags[:2] == ["FP16", "INT8"]
    assert build_settings("10.3.0", "fp32", model_precision="fp16", weakly_typed=True).builder_flags[0] == "FP16"
    with pytest.raises(ExportError, match="Q/DQ"):
        build_settings("10.3.0", "int8", has_qdq=False, weakly_typed=True)
    assert any("deprecated" in n for n in build_settings("10.12.0", "fp16", weakly_typed=True).notes)


def test_old_tensorrt_and_unknown_precision_are_refused():
    with pytest.raises(ExportError, match="too old"):
        build_settings("8.6.1", "fp16")
    with pytest.raises(ExportError, match="unknown precision"):
        build_settings("10.3", "fp8")
    assert PRECISIONS == ("fp32", "fp16", "int8", "best")


def test_cli_arguments_and_model_facts(tiny_onnx, tmp_path):
    args = _parse([str(tiny_onnx), "--precision", "fp16", "--out", str(tmp_path / "m.plan"),
                   "--workspace", "512", "--timing-cache", str(tmp_path / "t.cache")])
    assert args.workspace == 512 and args.batch_range == (1, 1, 4)
    facts = model_facts(tiny_onnx)
    assert facts["precision"] == "fp32" and facts["metadata"] == {"nsdd.precision": "fp32"}
    with pytest.raises(SystemExit):
        _parse([str(tiny_onnx), "--precision", "fp64", "--out", "x.plan"])
    assert main(_parse([str(tiny_onnx), "--precision", "fp16", "--out", "x.plan", "--batch-range",
                        "4", "1", "2"])) == 2


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed: the missing-TensorRT message does not apply")
def test_missing_tensorrt_gives_a_clear_message(tiny_onnx, tmp_path, capsys):
    rc = main(_parse([str(tiny_onnx), "--precision", "fp16", "--out", str(tmp_path / "m.plan")]))
    assert rc == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and "JetPack" in err
    assert not (tmp_path / "m.plan").exists() and not (tmp_path / "m.plan.json").exists()


@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT (a GPU machine with the tensorrt module)")
def test_build_real_engine(exported, tmp_path):
    assert main(_parse([str(exported["wiener"]), "--precision", "fp16", "--out", str(tmp_path / "w.plan")])) == 0
    record = json.loads((tmp_path / "w.plan.json").read_text())
    assert record["input_shapes"] and record["tensorrt_version"] and (tmp_path / "w.plan").stat().st_size > 0


def test_onnx_metadata_reads_the_protobuf_without_onnx(tiny_onnx):
    """The device has no ``onnx`` package: the metadata reader must agree with onnx's own parser."""
    import onnx

    for path in (tiny_onnx, DEFAULT_ONNX):
        want = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        assert onnx_metadata(path) == want and want
    bad = tiny_onnx.with_name("bad.onnx")
    bad.write_bytes(b"\x0a\xff\xff\xff")  # a length-delimited field longer than the file
    with pytest.raises(ExportError, match="not a readable ONNX"):
        onnx_metadata(bad)


_LAYER_TYPES = {"MatMul": "MATRIX_MULTIPLY", "Conv": "CONVOLUTION", "Add": "ELEMENTWISE", "Sub": "ELEMENTWISE",
                "Mul": "ELEMENTWISE", "Div": "ELEMENTWISE", "Slice": "SLICE", "Concat": "CONCATENATION",
                "QuantizeLinear": "QUANTIZE", "DequantizeLinear": "DEQUANTIZE", "Cast": "CAST", "Constant": "CONSTANT"}


def _fake_network(onnx_path: Path, out: Path) -> Path:
    """``out`` = a copy of ``onnx_path`` plus the layer list the fake parser reads (one layer per ONNX node)."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    out.write_bytes(onnx_path.read_bytes())
    dims = [d.dim_value or -1 for d in m.graph.input[0].type.tensor_type.shape.dim]
    layers = [[n.name or f"{n.op_type}_{i}", _LAYER_TYPES.get(n.op_type, "SHUFFLE"), "FLOAT"]
              for i, n in enumerate(m.graph.node)]
    Path(str(out) + ".layers.json").write_text(json.dumps({"input": {"name": m.graph.input[0].name, "shape": dims},
                                                           "layers": layers}))
    return out


@pytest.fixture
def fake_trt(monkeypatch):
    monkeypatch.syspath_prepend(str(FAKES))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    yield
    sys.modules.pop("tensorrt", None)


def test_fake_build_is_strongly_typed_and_pins_physics_when_weakly_typed(fake_trt, tmp_path):
    """The shipped student graph through the builder: strongly typed by default (no layer precision touched);
    with --weakly-typed --precision fp16 every physics/* layer is FP32 (precision and outputs) and the student
    layers are left to TensorRT."""
    model = _fake_network(DEFAULT_ONNX, tmp_path / "student.onnx")
    assert main(_parse([str(model), "--precision", "fp32", "--out", str(tmp_path / "s.plan")])) == 0
    plan = json.loads((tmp_path / "s.plan").read_text())
    assert plan["fake"] and plan["strongly_typed"] and plan["builder_flags"] == []
    assert not any(layer["precision_set"] for layer in plan["layers"].values())
    record = json.loads((tmp_path / "s.plan.json").read_text())
    assert record["settings"]["network_flags"] == ["STRONGLY_TYPED"] and record["model_precision"] == "fp32"

    assert main(_parse([str(model), "--precision", "fp16", "--out", str(tmp_path / "w.plan")])) == 2  # model is FP32
    assert main(_parse([str(model), "--precision", "fp16", "--weakly-typed", "--out", str(tmp_path / "w.plan")])) == 0
    plan = json.loads((tmp_path / "w.plan").read_text())
    assert not plan["strongly_typed"] and plan["builder_flags"] == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
    physics = {k: v for k, v in plan["layers"].items() if "physics/" in k}
    student = {k: v for k, v in plan["layers"].items() if "physics/" not in k}
    assert physics and student
    assert all(v["precision"] == "FLOAT" and v["precision_set"] and v["output_types"] == {"0": "FLOAT"}
               for v in physics.values())
    assert not any(v["precision_set"] for v in student.values())
    assert json.loads((tmp_path / "w.plan.json").read_text())["physics_layers_pinned_fp32"] == len(physics)


def test_fake_weakly_typed_build_without_physics_layers_is_refused(fake_trt, tiny_onnx, tmp_path, capsys):
    model = _fake_network(tiny_onnx, tmp_path / "relu.onnx")
    assert main(_parse([str(model), "--precision", "fp16", "--weakly-typed", "--out", str(tmp_path / "r.plan")])) == 2
    assert "no physics/* layers" in capsys.readouterr().err and not (tmp_path / "r.plan").exists()
    assert main(_parse([str(model), "--precision", "int8", "--weakly-typed", "--out", str(tmp_path / "r.plan")])) == 2
    assert "Q/DQ" in capsys.readouterr().err


BLOCKER = """
import importlib.abc, sys
BLOCKED = {"torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "train"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"blocked on the device: {name}")
sys.meta_path.insert(0, Block())
from export.cli import main
rc = main(["engine", sys.argv[1], "--precision", "fp32", "--out", sys.argv[2]])
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print("rc", rc, "leaked", leaked)
sys.exit(rc or bool(leaked))
"""


def test_engine_builder_runs_without_torch_or_onnx(tmp_path):
    """issue 14 #9: ``nsdd-export engine`` must run on the device, where neither torch nor onnx is installed
    (it used to import torch through export.graph). Both are blocked at import; the build goes through the fake
    TensorRT module."""
    model = _fake_network(DEFAULT_ONNX, tmp_path / "student.onnx")
    r = subprocess.run([sys.executable, "-c", BLOCKER, str(model), str(tmp_path / "d.plan")], check=False,
                       capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(FAKES), str(ROOT)])})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "leaked []" in r.stdout and json.loads((tmp_path / "d.plan").read_text())["strongly_typed"]
