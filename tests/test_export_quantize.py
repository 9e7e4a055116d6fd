# ruff: noqa: F811  (pytest fixtures imported from test_export_helpers)
"""``nsdd-export quantize``: FP16 (whole / student-only, measured and chosen) and INT8 Q/DQ on convolutions."""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from test_export_helpers import export_env, exported  # noqa: F401

from export.quantize import configure_parser, main, quantize_weight, to_fp16
from export.trt_ops import unsupported_nodes


def _cli(argv):
    p = argparse.ArgumentParser()
    configure_parser(p)
    return main(p.parse_args(argv))


def _props(path):
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_fp16_auto_measures_both_forms_and_keeps_fp32_io(export_env, exported, tmp_path, capsys):
    out = tmp_path / "m16.onnx"
    assert _cli([str(exported["student"]), "--precision", "fp16", "--data", str(export_env["data"]),
                 "--out", str(out)]) == 0
    report = json.loads(_props(out)["nsdd.quantize_report"])
    assert set(report["psnr_vs_fp32_db"]) == {"all", "conv"}
    assert all(v > 50 for v in report["psnr_vs_fp32_db"].values())
    assert report["fp16_mode"] in ("all", "conv")
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert any(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer)
    assert unsupported_nodes(model) == []
    assert _props(out)["nsdd.precision"] == "fp16"


def test_fp16_conv_mode_keeps_the_physics_in_fp32(exported):
    model = onnx.load(str(exported["student"]))
    m16 = to_fp16(model, "conv")
    types = {i.name: i.data_type for i in m16.graph.initializer}
    physics_inputs = {i for n in m16.graph.node if n.name.startswith("physics/") for i in n.input if i in types}
    student_inputs = {i for n in m16.graph.node if n.op_type == "Conv" for i in n.input if i in types}
    assert {"dft_module.w_fwd", "dft_module.h_stack", "dft_module.w_inv", "null_spec"} <= physics_inputs
    assert all(types[i] != TensorProto.FLOAT16 for i in physics_inputs)
    assert types["dft_module.w_fwd"] == TensorProto.FLOAT
    assert student_inputs and all(types[i] == TensorProto.FLOAT16 for i in student_inputs)
    wiener = onnx.load(str(exported["wiener"]))
    with pytest.raises(ValueError, match="needs a graph with a student"):
        to_fp16(wiener, "conv")


@pytest.mark.parametrize("calibration", ["max", "mse"])
def test_int8_quantizes_convolutions_only(export_env, exported, tmp_path, calibration):
    out = tmp_path / "m8.onnx"
    assert _cli([str(exported["student"]), "--precision", "int8", "--data", str(export_env["data"]),
                 "--calibration", calibration, "--out", str(out)]) == 0
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    nodes = list(model.graph.node)
    producers = {o: n for n in nodes for o in n.output}
    convs = [n for n in nodes if n.op_type == "Conv"]
    assert convs
    for conv in convs:  # activation and weight both come through DequantizeLinear
        assert producers[conv.input[0]].op_type == "DequantizeLinear"
        assert producers[conv.input[1]].op_type == "DequantizeLinear"
    for mm in (n for n in nodes if n.op_type in ("MatMul", "Mul")):  # DFT/Wiener/projector stay float
        assert all(i not in producers or producers[i].op_type != "DequantizeLinear" for i in mm.input)
    int8_inits = [i for i in model.graph.initializer if i.data_type == TensorProto.INT8 and len(i.dims) == 4]
    assert len(int8_inits) == len(convs)
    report = json.loads(_props(out)["nsdd.quantize_report"])
    assert report["quantized_convolutions"] == len(convs) and report["skipped_convolutions"] == []
    assert report["psnr_vs_fp32_db"] > 25
    assert report["calibration"]["method"] == calibration and report["weight_scales"] == "per-channel"
    assert _props(out)["nsdd.int8_calibration"] == calibration
    assert unsupported_nodes(model) == []


def test_int8_needs_measurements_with_the_right_shape(export_env, exported, tmp_path, capsys):
    assert _cli([str(exported["student"]), "--precision", "int8", "--out", str(tmp_path / "a.onnx")]) == 2
    assert "--data" in capsys.readouterr().err
    bad = tmp_path / "bad" / "measurements"
    bad.mkdir(parents=True)
    np.save(bad / "0.npy", np.zeros((3, 16, 16), np.float32))
    assert _cli([str(exported["student"]), "--precision", "int8", "--data", str(tmp_path / "bad"),
                 "--out", str(tmp_path / "a.onnx")]) == 2
    err = capsys.readouterr().err
    assert "0.npy" in err and "(3, 16, 16)" in err
    assert _cli([str(exported["wiener"]), "--precision", "int8", "--data", str(export_env["data"]),
                 "--out", str(tmp_path / "a.onnx")]) == 2
    assert "no convolutions" in capsys.readouterr().err
    assert not (tmp_path / "a.onnx").exists()


def test_per_channel_symmetric_weight_quantisation():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32) * np.array([1, 10, 0.1, 0], np.float32)[:, None, None, None]
    q, scale = quantize_weight(w, axis=0)
    assert q.dtype == np.int8 and scale.shape == (4,)
    assert np.all(np.abs(q).reshape(4, -1).max(axis=1)[:3] == 127)
    assert np.all(q[3] == 0) and scale[3] == 1.0
    back = q.astype(np.float32) * scale[:, None, None, None]
    assert np.all(np.abs(back - w) <= scale[:, None, None, None] / 2 + 1e-7)
    deq = numpy_helper.to_array(numpy_helper.from_array(q)).astype(np.float32)
    assert np.array_equal(deq, q.astype(np.float32))


def test_fp16_emulation_rounds_like_float16_storage():
    import onnxruntime as ort
    from onnx import helper

    from export.quantize import fp16_emulation

    c = np.float32(1.0 / 3.0)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    graph = helper.make_graph([helper.make_node("Mul", ["y", "c"], ["x"], name="physics/mul")], "g", [y], [x],
                              [numpy_helper.from_array(np.array(c, np.float32), "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(fp16_emulation(model, "all").SerializeToString(), opts, providers=["CPUExecutionProvider"])
    v = np.array([1.0001, 3.14159, 1000.123, 1e-3], np.float32)
    got = s.run(None, {"y": v})[0]

    def f16(a):
        return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)

    assert np.array_equal(got, f16(f16(v) * f16(c)))
    assert not np.array_equal(got, v * c)
    with pytest.raises(ValueError, match="no nodes"):
        fp16_emulation(model, "conv")  # no student nodes in this graph


@pytest.mark.parametrize("threshold, expected", [(0.0, "all"), (500.0, "conv")])
def test_fp16_auto_choice_follows_the_measured_psnr(export_env, exported, tmp_path, threshold, expected):
    from export.quantize import quantize_file

    report = quantize_file(exported["student"], "fp16", tmp_path / "m.onnx", data=export_env["data"],
                           fp16_min_psnr=threshold)
    assert report["fp16_mode"] == expected
    assert set(report["psnr_vs_fp32_db_ort_cpu_fp16_model"]) == {"all", "conv"}
    assert _props(tmp_path / "m.onnx")["nsdd.fp16_mode"] == expected


def _tiny_conv_graph(seed=0):
    """x (1, 1, 64, 64) → Conv 3x3 (4 ch) → Relu → Conv 3x3 (1 ch): two activation tensors to calibrate."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(1, 4, 3, 3)).astype(np.float32) * 0.3, "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1], name="student/c1"),
             helper.make_node("Relu", ["h"], ["r"], name="student/relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1], name="student/c2")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 64, 64])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _frames_with_one_outlier(count=16, seed=1):
    rng = np.random.default_rng(seed)
    frames = rng.uniform(-1, 1, size=(count, 1, 64, 64)).astype(np.float32)
    frames[0, 0, 5, 5] = 12.0  # one value in 65536: max calibration spends its range on it
    return frames


def test_calibration_methods_give_finite_clips_below_max():
    from export.quantize import calibrate

    model, frames = _tiny_conv_graph(), _frames_with_one_outlier()
    top = calibrate(model, frames, 1, "max")
    assert set(top) == {"x", "r"} and top["x"] == pytest.approx(12.0)
    for method in ("percentile", "mse"):
        amax = calibrate(model, frames, 1, method)
        assert set(amax) == set(top)
        for name, a in amax.items():
            assert np.isfinite(a) and 0 < a <= top[name] + 1e-6
    assert calibrate(model, frames, 1, "percentile")["x"] < 2.0  # the outlier lies above the 99.99th percentile
    assert calibrate(model, frames, 1, "mse")["x"] < 0.8 * 12.0
    assert calibrate(model, frames, 1, "percentile", 100.0)["x"] == pytest.approx(12.0)
    with pytest.raises(ValueError, match="unknown calibration"):
        calibrate(model, frames, 1, "entropy")


def test_mse_clip_minimises_the_quantisation_error():
    from export.quantize import HIST_BINS, mse_amax

    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(size=100_000))
    x[0] = 40.0  # one huge outlier
    hist = np.histogram(x, bins=HIST_BINS, range=(0.0, 40.0))[0]
    clip, errors = mse_amax(hist, 40.0, candidates=64)
    assert errors.shape == (64,) and np.all(np.isfinite(errors)) and 0.3 * 40.0 <= clip < 0.75 * 40.0

    def qerr(c):
        s = c / 127.0
        return float(np.mean((x - np.clip(np.round(x / s), 0, 127) * s) ** 2))

    exact = [qerr(c) for c in np.linspace(0.3 * 40.0, 40.0, 64)]  # on the data, not on the histogram
    assert qerr(clip) <= 1.05 * min(exact) and qerr(clip) < 0.75 * qerr(40.0)
    assert mse_amax(np.zeros(HIST_BINS, np.int64), 0.0)[0] == 0.0


def test_int8_with_percentile_or_mse_beats_max_clip_on_an_outlier():
    from export.quantize import calibrate, make_session, psnr, run_model, to_int8

    model, frames = _tiny_conv_graph(), _frames_with_one_outlier()
    held_out = np.random.default_rng(7).uniform(-1, 1, size=(4, 1, 64, 64)).astype(np.float32)
    ref = run_model(make_session(model, 1), held_out, 1)[0]
    score = {}
    for method in ("max", "percentile", "mse"):
        q, info = to_int8(model, calibrate(model, frames, 1, method))
        assert info["quantized_convolutions"] == 2
        score[method] = psnr(ref, run_model(make_session(q, 1), held_out, 1)[0])
    assert score["percentile"] > score["max"] + 3 and score["mse"] > score["max"] + 1, score


def test_per_tensor_weight_scales_are_a_scalar_without_axis():
    from export.quantize import calibrate, to_int8

    model = _tiny_conv_graph()
    q, info = to_int8(model, calibrate(model, _frames_with_one_outlier(4), 1), per_channel_weights=False)
    assert info["weight_scales"] == "per-tensor"
    dq = [n for n in q.graph.node if n.name.endswith("weight_dq")]
    assert len(dq) == 2 and all(not n.attribute for n in dq)
    scales = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    assert all(scales[n.input[1]].shape == () for n in dq)
