# ruff: noqa: F811  (pytest fixtures imported from test_export_helpers)
"""``nsdd-export engine``: the version-dependent build decisions (pure functions) and the missing-TensorRT path.

TensorRT cannot be installed here; no build is faked. The builder itself runs only where tensorrt imports.
"""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest
from test_export_helpers import export_env, exported  # noqa: F401

from export.engine import PRECISIONS, build_settings, configure_parser, main, model_facts, parse_version
from export.graph import ExportError

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


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


def test_tensorrt_10_uses_builder_flags():
    assert build_settings("10.3.0", "fp32").builder_flags == []
    assert build_settings("10.3.0", "fp16").builder_flags == ["FP16"]
    s = build_settings("10.3.0", "int8", has_qdq=True)
    assert s.builder_flags == ["INT8", "FP16"] and not s.strongly_typed and s.network_flags == []
    assert build_settings("10.3.0", "best", has_qdq=True).builder_flags == ["FP16", "INT8"]
    assert build_settings("10.3.0", "fp32", model_precision="fp16").builder_flags == ["FP16"]
    with pytest.raises(ExportError, match="Q/DQ"):
        build_settings("10.3.0", "int8", has_qdq=False)
    assert any("deprecated" in n for n in build_settings("10.12.0", "fp16").notes)


def test_tensorrt_11_is_strongly_typed_without_precision_flags():
    s = build_settings("11.2.0", "fp16", model_precision="fp16")
    assert s.strongly_typed and s.network_flags == ["STRONGLY_TYPED"] and s.builder_flags == []
    assert build_settings("11.0.0", "int8", model_precision="int8", has_qdq=True).builder_flags == []
    with pytest.raises(ExportError, match="ONNX types"):
        build_settings("11.2.0", "fp16", model_precision="fp32")
    with pytest.raises(ExportError, match="strongly typed"):
        build_settings("11.2.0", "best", model_precision="fp32")


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
    assert facts["precision"] == "fp32" and not facts["has_qdq"] and facts["input_shape"] == [-1, 3, 32, 32]
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
