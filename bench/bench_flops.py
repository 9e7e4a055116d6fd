#!/usr/bin/env python3
"""FLOPs and bytes of exported graphs (physics vs student) and the device frame-time *estimates* derived from them.

FLOPs: ``2 × MACs`` of every Conv, ConvTranspose, MatMul and Gemm node from ONNX shape inference (batch 1;
element-wise ops, normalisation and activations are not counted), split by node name into ``physics/…`` (the
DFT-by-matmul pseudo-inverse and projector) and the student.

Bytes per frame: every initializer read once (weights and the DFT matrices) plus every node output written once
and read once (float32, from shape inference) — an upper bound, since small feature maps stay in cache.

Roofline estimate: ``max(FLOPs / (efficiency × peak FP32), bytes / (bw_efficiency × memory bandwidth))`` with
``--efficiency`` (25 %) and ``--bw-efficiency`` (60 %) assumed, not measured. Devices (figures from review):

- Jetson modules: FP32 peak = CUDA cores × 2 × GPU clock, memory bandwidth, from NVIDIA's module specifications.
- Raspberry Pi 5 CPU (BCM2712, 4 × Cortex-A76 at 2.4 GHz): FP32 peak per core = 2 NEON pipes × 4 lanes × 2
  (FMA) × 2.4 GHz = 38.4 GFLOP/s (Arm Cortex-A76 Software Optimization Guide: FMLA on 128-bit vectors, 2 per
  cycle); 153.6 GFLOP/s for the 4 cores (ONNX Runtime on 4 threads, perfect scaling assumed); memory 32-bit
  LPDDR4X-4267 = 17.1 GB/s (Raspberry Pi 5 product brief), shared by the cores.

Nothing here runs on a Jetson or a Pi: the frame times are estimates, not measurements.

    python bench/bench_flops.py [MODEL.onnx ...] [--efficiency 0.25] [--bw-efficiency 0.6]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "nsdd_edge/assets/default_bundle/student_nullspace.onnx"
# module: (CUDA cores, GPU clock in GHz, memory GB/s)
JETSONS = {"Orin Nano 8 GB": (1024, 0.625, 68.0), "Orin Nano 8 GB (JetPack 6.2 super)": (1024, 1.02, 102.0),
           "Orin NX 16 GB": (1024, 0.918, 102.4), "AGX Orin 64 GB": (2048, 1.3, 204.8)}
PI5_CORE_GFLOPS = 2 * 4 * 2 * 2.4  # NEON pipes × FP32 lanes × FMA × GHz
PI5_MEMORY_GBPS = 4.267 * 4  # LPDDR4X-4267 on a 32-bit bus


def devices() -> dict[str, tuple[float, float]]:
    """``{device: (peak FP32 GFLOP/s, memory GB/s)}`` of every estimate's device."""
    table = {name: (2.0 * cores * ghz, gbps) for name, (cores, ghz, gbps) in JETSONS.items()}
    table["Raspberry Pi 5 CPU, 1 core"] = (PI5_CORE_GFLOPS, PI5_MEMORY_GBPS)
    table["Raspberry Pi 5 CPU, 4 cores"] = (4 * PI5_CORE_GFLOPS, PI5_MEMORY_GBPS)
    return table


def _shapes(model) -> dict[str, list[int]]:
    shapes = {vi.name: [d.dim_value or 1 for d in vi.type.tensor_type.shape.dim]
              for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    shapes.update({init.name: list(init.dims) for init in model.graph.initializer})
    return shapes


def _inferred(path: Path):
    import onnx
    from onnx import shape_inference

    return shape_inference.infer_shapes(onnx.load(str(path)))


def graph_flops(path: Path) -> dict[str, float]:
    """``{"physics": FLOPs, "student": FLOPs}`` of the ONNX at ``path`` (batch 1)."""
    model = _inferred(path)
    shapes = _shapes(model)
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


def graph_bytes(path: Path) -> dict[str, float]:
    """``{"weights": bytes, "activations": bytes}`` moved per frame: initializers read once, every node output
    (float32) written once and read once."""
    from onnx import helper

    model = _inferred(path)
    weights = sum(float(np.prod(init.dims)) * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
                  for init in model.graph.initializer)
    shapes = _shapes(model)
    outputs = sum(float(np.prod(shapes[o])) for node in model.graph.node for o in node.output if o in shapes)
    return {"weights": weights, "activations": 2.0 * 4.0 * outputs}


def roofline_ms(flops: float, nbytes: float, peak_gflops: float, gbps: float, efficiency: float,
                bw_efficiency: float) -> float:
    """``max(flops / (efficiency · peak), bytes / (bw_efficiency · bandwidth))`` in milliseconds."""
    return 1e3 * max(flops / (efficiency * peak_gflops * 1e9), nbytes / (bw_efficiency * gbps * 1e9))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=[str(DEFAULT_MODEL)], help="exported graphs (.onnx)")
    p.add_argument("--efficiency", type=float, default=0.25, help="fraction of the FP32 peak assumed reached")
    p.add_argument("--bw-efficiency", type=float, default=0.6, help="fraction of the memory bandwidth assumed reached")
    args = p.parse_args(argv)
    rows = []
    for model in args.models:
        f, b = graph_flops(Path(model)), graph_bytes(Path(model))
        rows.append((Path(model).name, f["student"] + f["physics"], f, b["weights"] + b["activations"], b))
    print("| graph | GFLOP / frame (student + physics) | MB / frame (weights + activations) |")
    print("|---|---:|---:|")
    for name, flops, f, nbytes, b in rows:
        print(f"| {name} | {flops / 1e9:.2f} ({f['student'] / 1e9:.2f} + {f['physics'] / 1e9:.2f}) | "
              f"{nbytes / 1e6:.1f} ({b['weights'] / 1e6:.1f} + {b['activations'] / 1e6:.1f}) |")
    print(f"\nEstimates, not measured: roofline at {100 * args.efficiency:g}% of the FP32 peak and "
          f"{100 * args.bw_efficiency:g}% of the memory bandwidth; ms per frame (fps)\n")
    table = devices()
    print("| device | FP32 peak GFLOP/s | memory GB/s | " + " | ".join(r[0] for r in rows) + " |")
    print("|---|---:|---:|" + "---:|" * len(rows))
    for device, (peak, gbps) in table.items():
        cells = []
        for _, flops, _, nbytes, _ in rows:
            ms = roofline_ms(flops, nbytes, peak, gbps, args.efficiency, args.bw_efficiency)
            cells.append(f"{ms:.1f} ({1e3 / ms:.0f})")
        print(f"| {device} | {peak:,.0f} | {gbps:.1f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
