#!/usr/bin/env python3
"""FLOPs of an exported graph (physics vs student) and the Jetson frame-time *estimates* derived from them.

Counts ``2 × MACs`` of every Conv, ConvTranspose, MatMul and Gemm node from ONNX shape inference (batch 1;
element-wise ops, normalisation and activations are not counted), split by node name into ``physics/…`` (the
DFT-by-matmul pseudo-inverse and projector) and the student. The estimate assumes a fraction (``--efficiency``,
default 25 %) of each module's FP32 CUDA-core peak (cores × 2 × clock; figures from NVIDIA's module
specifications, from review). Nothing here runs on a Jetson: the frame times are estimates, not measurements.

    python bench/bench_flops.py [MODEL.onnx] [--efficiency 0.25]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "nsdd_edge/assets/default_bundle/student_nullspace.onnx"
# module: (CUDA cores, GPU clock in GHz)
JETSONS = {"Orin Nano 8 GB": (1024, 0.625), "Orin Nano 8 GB (JetPack 6.2 super)": (1024, 1.02),
           "Orin NX 16 GB": (1024, 0.918), "AGX Orin 64 GB": (2048, 1.3)}


def graph_flops(path: Path) -> dict[str, float]:
    """``{"physics": FLOPs, "student": FLOPs}`` of the ONNX at ``path`` (batch 1)."""
    import onnx
    from onnx import shape_inference

    model = shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = {vi.name: [d.dim_value or 1 for d in vi.type.tensor_type.shape.dim]
              for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    shapes.update({init.name: list(init.dims) for init in model.graph.initializer})
    flops = {"physics": 0.0, "student": 0.0}
    for node in model.graph.node:
        part = "physics" if node.name.startswith("physics/") else "student"
        out = shapes.get(node.output[0])
        if node.op_type in ("Conv", "ConvTranspose"):
            w = shapes.get(node.input[1])
            if out and w:
                per_output = np.prod(w[1:]) if node.op_type == "Conv" else np.prod(w[2:]) * w[0] / max(out[1], 1)
                flops[part] += 2.0 * float(np.prod(out)) * float(per_output)
        elif node.op_type in ("MatMul", "Gemm"):
            a = shapes.get(node.input[0])
            if out and a:
                k = a[-2] if node.op_type == "Gemm" and any(x.name == "transA" and x.i for x in node.attribute) else a[-1]
                flops[part] += 2.0 * float(np.prod(out)) * float(k)
    return flops


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    p.add_argument("--efficiency", type=float, default=0.25, help="fraction of the FP32 peak assumed reached")
    args = p.parse_args(argv)
    f = graph_flops(Path(args.model))
    total = f["physics"] + f["student"]
    print(f"{Path(args.model).name}: {total / 1e9:.2f} GFLOP per frame "
          f"(student {f['student'] / 1e9:.2f}, physics {f['physics'] / 1e9:.2f})")
    print(f"{'module (estimate, not measured)':<38} {'FP32 peak TFLOPS':>17} {'ms/frame':>9} {'fps':>7}")
    for name, (cores, ghz) in JETSONS.items():
        peak = 2.0 * cores * ghz * 1e9
        ms = total / (peak * args.efficiency) * 1e3
        print(f"{name:<38} {peak / 1e12:>17.2f} {ms:>9.1f} {1e3 / ms:>7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
