"""ONNX operators the TensorRT 10.x ONNX parser accepts (JetPack 6.1/6.2 ship TensorRT 10.3).

The operators marked "Y" in onnx-tensorrt's ``docs/operators.md`` of the TensorRT 10 releases (ONNX opsets
9–20). Checked against the 10.0-GA and 10.1-GA tables (the newest 10.x tables available here; no 10.3 branch
was at hand): the earlier list also named 15 operators those tables mark "N" — AffineGrid, BitShift,
BlackmanWindow, Compress, ConcatFromSequence, HammingWindow, HannWindow, MaxRoiPool and the seven Sequence ops
(SequenceAt, SequenceConstruct, SequenceEmpty, SequenceErase, SequenceInsert, SequenceLength,
SplitToSequence); they are removed and :data:`KNOWN_UNSUPPORTED` says why. Issue 14 counted 17 such
operators; the two others could not be identified in those tables. Every "N" of the 10.x tables is listed in
``tests/test_export_verify.py``, which checks that none is accepted. TensorRT has no FP64: double tensors are
reported too.
"""

from __future__ import annotations

from typing import Any

TENSORRT_VERSION = "10.3"

TRT_10_3_SUPPORTED_OPS: frozenset[str] = frozenset([
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "AveragePool",
    "BatchNormalization", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat", "Constant", "ConstantOfShape",
    "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DeformConv", "DepthToSpace", "DequantizeLinear", "Div",
    "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "Gather",
    "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater",
    "GreaterOrEqual", "GridSample", "GroupNormalization", "GRU", "HardSigmoid", "HardSwish", "Hardmax", "Identity",
    "If", "ImageScaler", "InstanceNormalization", "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Less",
    "LessOrEqual", "Log", "LogSoftmax", "Loop", "LpNormalization", "LpPool", "LRN", "LSTM", "MatMul", "Max",
    "MaxPool", "Mean", "MeanVarianceNormalization", "Min", "Mish", "Mod", "Mul", "Neg", "NonMaxSuppression",
    "NonZero", "Not", "OneHot", "Or", "Pad", "ParametricSoftplus", "Pow", "PRelu", "QuantizeLinear", "RandomNormal",
    "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
    "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RNN", "RoiAlign", "Round", "ScaledTanh",
    "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh",
    "Size", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum",
    "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where", "Xor",
])

# For the report: why an op is missing (from the same table's comments).
KNOWN_UNSUPPORTED = {
    "DFT": "no FFT layer before TensorRT 11.2: use --dft matmul",
    "STFT": "unsupported in TensorRT 10.x",
    "ConvInteger": "integer convolution unsupported: use Q/DQ around Conv",
    "MatMulInteger": "integer matmul unsupported: use Q/DQ around MatMul",
    "QLinearConv": "QOperator format unsupported: use Q/DQ (QDQ format)",
    "QLinearMatMul": "QOperator format unsupported: use Q/DQ (QDQ format)",
    "DynamicQuantizeLinear": "dynamic quantisation unsupported",
    **{op: "sequence types unsupported in TensorRT 10.x" for op in (
        "ConcatFromSequence", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
        "SequenceLength", "SplitToSequence", "SequenceMap")},
    **{op: "window functions unsupported in TensorRT 10.x: precompute the window as a constant"
       for op in ("BlackmanWindow", "HammingWindow", "HannWindow")},
    "AffineGrid": "unsupported in TensorRT 10.x",
    "BitShift": "unsupported in TensorRT 10.x",
    "Compress": "unsupported in TensorRT 10.x (data-dependent output shape): use a mask",
    "MaxRoiPool": "unsupported in TensorRT 10.x (RoiAlign is supported)",
}


def unsupported_nodes(model: Any) -> list[dict[str, str]]:
    """Every node (including those in subgraphs) whose op TensorRT 10.3 cannot parse, plus FP64 tensors.

    Returns ``[{"name", "op_type", "reason"}]`` (empty when the graph is parseable op-wise).
    """
    from onnx import TensorProto

    problems: list[dict[str, str]] = []

    def walk(graph: Any) -> None:
        for node in graph.node:
            domain = node.domain or ""
            if domain not in ("", "ai.onnx"):
                problems.append({"name": node.name, "op_type": f"{domain}::{node.op_type}",
                                 "reason": "custom-domain op (needs a TensorRT plugin)"})
            elif node.op_type not in TRT_10_3_SUPPORTED_OPS:
                problems.append({"name": node.name, "op_type": node.op_type,
                                 "reason": KNOWN_UNSUPPORTED.get(node.op_type,
                                                                 f"not in the TensorRT {TENSORRT_VERSION} ONNX operator table")})
            if node.op_type == "Cast":
                for a in node.attribute:
                    if a.name == "to" and a.i == TensorProto.DOUBLE:
                        problems.append({"name": node.name, "op_type": "Cast",
                                         "reason": "cast to float64: TensorRT has no FP64"})
            for a in node.attribute:
                if a.g is not None and a.g.node:
                    walk(a.g)
                for sub in a.graphs:
                    walk(sub)
        for init in graph.initializer:
            if init.data_type == TensorProto.DOUBLE:
                problems.append({"name": init.name, "op_type": "initializer",
                                 "reason": "float64 initializer: TensorRT has no FP64"})

    walk(model.graph)
    return problems
