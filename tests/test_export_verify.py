# ruff: noqa: F811  (pytest fixtures imported from test_export_helpers)
"""``nsdd-export verify`` and the TensorRT 10.3 operator allow-list."""

from __future__ import annotations

import argparse
import json

import numpy as np
from onnx import TensorProto, helper
from test_export_helpers import export_env, exported  # noqa: F401

from export.trt_ops import TRT_10_3_SUPPORTED_OPS, unsupported_nodes
from export.verify import configure_parser, main


def _cli(argv):
    p = argparse.ArgumentParser()
    configure_parser(p)
    return main(p.parse_args(argv))


def test_verify_student_writes_every_figure(export_env, exported, tmp_path, capsys):
    out = tmp_path / "verify.json"
    rc = _cli([str(exported["student"]), "--data", str(export_env["data"]), "--json", str(out)])
    r = json.loads(out.read_text())
    assert rc == 0 and r["ok"]
    # no --student: the student recorded in the model's metadata, said so; and a line per stage as it starts
    err = capsys.readouterr().err
    assert f"using {export_env['student'].resolve()}, the student this model was exported from" in err
    assert r["student"] == str(export_env["student"].resolve())
    for stage in ("ONNX checker", "torch reference", "FP16: quantising here", "INT8: quantising here",
                  "FP16 emulation in torch"):
        assert f"] {stage}" in err, stage
    assert r["onnx_checker"] == "ok"
    assert r["fp32_vs_torch_max_abs_error"] <= 1e-4 and r["fp32_vs_torch_ok"]
    assert r["tensorrt_10.3_unsupported"] == [] and r["tensorrt_10.3_parseable"]
    assert r["fp16_psnr_vs_fp32_db"] > 50 and r["int8_psnr_vs_fp32_db"] > 25
    assert r["fp16_psnr_vs_fp32_db"] > r["int8_psnr_vs_fp32_db"]
    emulated = r["fp16_torch_emulation_psnr_vs_fp32_db"]
    assert set(emulated) == {"whole_graph", "student_only"} and all(30 < v < 200 for v in emulated.values())
    assert set(r["consistency"]) == {"torch_reference", "fp32", "fp16", "int8"}
    assert abs(r["consistency"]["fp32"] - r["consistency"]["torch_reference"]) < 1e-4
    assert all(0 < v < 1 for v in r["consistency"].values())
    assert r["frames"] == 6 and r["opset"] == 17 and not r["external_data_sidecar"]


def test_verify_refuses_missing_student_and_wrong_psf(export_env, exported, tmp_path, capsys):
    import onnx

    out = tmp_path / "v.json"
    model = onnx.load(str(exported["student"]))  # a model whose student directory is gone
    props = {p.key: p.value for p in model.metadata_props}
    onnx.helper.set_model_props(model, {**props, "nsdd.student": str(tmp_path / "gone")})
    onnx.save(model, str(tmp_path / "moved.onnx"))
    assert _cli([str(tmp_path / "moved.onnx"), "--data", str(export_env["data"]), "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs --student DIR" in err and "gone, which is no longer there" in err
    np.save(tmp_path / "other.npy", np.roll(export_env["psf"], 2, axis=-2))
    assert _cli([str(exported["wiener"]), "--data", str(export_env["data"]), "--psf", str(tmp_path / "other.npy"),
                 "--json", str(out), "--no-quantize"]) == 2
    assert "does not match the model" in capsys.readouterr().err
    assert not out.exists()


def test_wiener_verify_scores_fp16_and_skips_int8(export_env, exported, tmp_path):
    out = tmp_path / "w.json"
    assert _cli([str(exported["wiener"]), "--data", str(export_env["data"]), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["fp32_vs_torch_max_abs_error"] <= 1e-5
    assert set(r["consistency"]) == {"torch_reference", "fp32", "fp16"}
    assert r["fp16_psnr_vs_fp32_db"] > 55  # FP16 DFT-by-matmul Wiener (EDGE.md: ~66-67 dB at 256²)
    assert "not applicable" in r["int8"]


# Operators marked "N" (unsupported) in onnx-tensorrt docs/operators.md of the TensorRT 10.0-GA and 10.1-GA
# releases (copied from those tables by name).
TRT_10_UNSUPPORTED = (
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "BlackmanWindow",
    "CenterCropPad", "Col2Im", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det", "DynamicQuantizeLinear",
    "HammingWindow", "HannWindow", "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix",
    "Multinomial", "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement", "OptionalHasElement", "QLinearConv",
    "QLinearMatMul", "RegexFullMatch", "STFT", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
    "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringConcat",
    "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique",
)


def test_no_operator_the_tensorrt_10_table_marks_unsupported_is_accepted():
    """issue 14 #10: the allow-list named 15 operators the 10.x table marks "N" (AffineGrid, the windows, the
    Sequence ops, …); each must be reported, with a reason."""
    assert not set(TRT_10_UNSUPPORTED) & TRT_10_3_SUPPORTED_OPS
    nodes = [helper.make_node(op, ["x"], ["y"], name=op) for op in ("SequenceAt", "HannWindow", "AffineGrid", "Compress")]
    model = helper.make_model(helper.make_graph(nodes, "g", [], []))
    found = {p["op_type"]: p["reason"] for p in unsupported_nodes(model)}
    assert set(found) == {"SequenceAt", "HannWindow", "AffineGrid", "Compress"}
    assert "sequence" in found["SequenceAt"] and "window" in found["HannWindow"]


def test_allow_list_reports_dft_custom_ops_and_fp64():
    assert {"MatMul", "Conv", "QuantizeLinear", "DequantizeLinear", "Slice", "Concat", "Resize"} <= TRT_10_3_SUPPORTED_OPS
    assert "DFT" not in TRT_10_3_SUPPORTED_OPS and "STFT" not in TRT_10_3_SUPPORTED_OPS
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("DFT", ["x"], ["f"], name="fft"),
             helper.make_node("Cast", ["f"], ["d"], to=TensorProto.DOUBLE, name="to64"),
             helper.make_node("Custom", ["d"], ["y"], domain="my.ops", name="plugin"),
             helper.make_node("Relu", ["x"], ["r"], name="ok")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]))
    bad = unsupported_nodes(model)
    assert {(b["name"], b["op_type"]) for b in bad} == {("fft", "DFT"), ("to64", "Cast"), ("plugin", "my.ops::Custom")}
    assert "TensorRT 11.2" in next(b["reason"] for b in bad if b["op_type"] == "DFT")
