"""ONNX Runtime CPU (2 threads) milliseconds per frame of the exported graphs, side by side in one process.

Variants at each size: Wiener-only graph (matmul DFT), full student graph (matmul DFT), full student graph
(ONNX DFT operator), FP16 (whole graph and student-only), INT8 (Q/DQ on convolutions). The student is the
default edge student of ``train.students`` (EdgeUNet, default architecture) with seeded random weights
(timing does not depend on them); its 1×1 head is rescaled so that ``g`` has standard deviation 0.25 on the
measurements, otherwise an untrained ``g`` is ≈ 0 and FP16/INT8 errors in it would not show in the PSNR. Sessions are timed round-robin (one frame each per round) so
machine load affects all variants alike; the table shows the median.

    python bench/bench_export.py [--sizes 128 256] [--rounds 7] [--threads 2] [--psf FILE]

Crop model (a PSF as large as the sensor, DiffuserCam): the Wiener-only graph ``y`` (sensor) → ``A†y`` (scene
grid = convolution grid = 2× the sensor), DFT-by-matmul and ONNX DFT operator, on the real DiffuserCam PSF and
capture box-downsampled ×16 and ×8 with the corner background removed (as ``nsdd-train solve --capture``),
one channel (the capture is monochrome), ONNX Runtime on ``--crop-threads`` (1) threads; beside it the circular
Wiener-only graph at sensor size (what the export was limited to before) and the runtime's numpy Wiener filter
of the same crop geometry. ``--sizes`` with no value skips the circular student section:

    python bench/bench_export.py --sizes --crop-downsample 16 8 --rounds 21
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.graph import ReconstructionGraph, reference_reconstruction
from export.onnx_graph import export_graph
from export.quantize import calibrate, emulated_psnr, make_session, psnr, to_fp16, to_int8
from nsdd_edge.optics import LenslessGeometry, WienerFilter, load_psf
from train.physics import LenslessOperator
from train.students import build_edge_net, count_parameters, default_architecture


def smooth_measurements(psf: np.ndarray, size: int, count: int, lam: float) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand((count, 3, 8, 8), generator=g), size=(size, size),
                                        mode="bilinear", align_corners=False)
    op = LenslessOperator(psf, (size, size), "circular", lam=lam)
    with torch.no_grad():
        return op.measure(x, noise_std=0.005, generator=g).numpy().astype(np.float32)


def time_round_robin(runners: dict, frame: np.ndarray, rounds: int) -> dict[str, list[float]]:
    """Milliseconds of each ``runner(frame)``, one call each per round (load affects all alike)."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for k, run in runners.items():
            t = time.perf_counter()
            run(frame)
            times[k].append((time.perf_counter() - t) * 1e3)
    return times


def crop_rows(args: argparse.Namespace, tmp: Path) -> list[tuple[str, ...]]:
    """The Wiener-only crop graph on the real DiffuserCam PSF and capture (see the module docstring)."""
    rows = []
    for ds in args.crop_downsample:
        psf = load_psf(args.crop_psf, background="corner", downsample=ds)
        y = load_psf(args.crop_capture, background="corner", downsample=ds, normalization="max")[None]
        sensor = tuple(psf.shape[-2:])
        geometry = LenslessGeometry.make("crop", sensor, sensor)  # scene = convolution grid = 2× the sensor
        reference = reference_reconstruction(psf, torch.from_numpy(y), args.crop_lam, None, "wiener",
                                             geometry=geometry).numpy()
        runners, outputs = {}, {}
        for name, geo, dft in (("crop Wiener-only (matmul DFT)", geometry, "matmul"),
                               ("crop Wiener-only (ONNX DFT op)", geometry, "onnx"),
                               ("circular Wiener-only at sensor size (matmul DFT)", sensor, "matmul")):
            path = export_graph(ReconstructionGraph(psf, geo, args.crop_lam, objective="wiener", dft=dft, channels=1),
                                tmp / f"crop{ds}_{len(runners)}.onnx", batch=1)
            session = make_session(path, threads=args.crop_threads)
            runners[name] = lambda frame, s=session: s.run(None, {"y": frame})[0]
            outputs[name] = runners[name](y)  # warm-up
        numpy_wiener = WienerFilter(psf, geometry, args.crop_lam)
        runners["crop numpy WienerFilter (runtime fallback)"] = numpy_wiener
        outputs["crop numpy WienerFilter (runtime fallback)"] = numpy_wiener(y)
        times = time_round_robin(runners, y, args.rounds)
        scale = float(np.abs(reference).max())
        grids = f"×{ds}: sensor {sensor[0]}×{sensor[1]}, scene = conv {geometry.conv_shape[0]}×{geometry.conv_shape[1]}"
        for k, t in times.items():
            out = outputs[k]
            err = (f"{np.abs(out - reference).max() / scale:.1e}" if out.shape == reference.shape
                   else f"(sensor grid {out.shape[-2]}×{out.shape[-1]})")
            rows.append((grids, k, f"{statistics.median(t):.2f}", f"{min(t):.2f}", err))
        print(f"[crop ×{ds}] {sensor} → {geometry.scene_shape} timed", file=sys.stderr)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[128, 256],
                    help="sensor sizes of the circular student section (none: skip it)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lam", type=float, default=1e-4)
    ap.add_argument("--psf", default=str(ROOT.parent / "shared/data/psf/radial_6per_256.npy"))
    diffusercam = ROOT.parent / "shared/data/lensless/diffusercam"
    ap.add_argument("--crop-psf", default=str(diffusercam / "psf_sample.tif"), help="PSF of the crop-model rows")
    ap.add_argument("--crop-capture", default=str(diffusercam / "rawdata_hand_sample.tif"),
                    help="the measurement timed in the crop-model rows")
    ap.add_argument("--crop-downsample", type=int, nargs="*", default=[16, 8],
                    help="box-downsampling factors of the crop-model rows (none: skip them)")
    ap.add_argument("--crop-lam", type=float, default=1e-4, help="Wiener λ of the crop rows (solve --capture's)")
    ap.add_argument("--crop-threads", type=int, default=1, help="ONNX Runtime threads of the crop rows")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    arch = default_architecture("edge", "nullspace")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        for size in args.sizes:
            raw = load_psf(args.psf)
            factor = max(1, raw.shape[-1] // size)
            psf = load_psf(args.psf, downsample=factor)
            net = build_edge_net(3, arch).eval()
            y = smooth_measurements(psf, size, 4, args.lam)
            op = LenslessOperator(psf, (size, size), "circular", lam=args.lam)
            with torch.no_grad():
                yt = torch.from_numpy(y)
                spread = float(net(torch.cat([yt, op.A_dagger(yt)], dim=1)).std())
                net.head.weight.mul_(0.25 / spread)
                net.head.bias.mul_(0.25 / spread)
            models = {}
            t0 = time.perf_counter()
            for name, kw in (("Wiener-only (matmul DFT)", {"net": None, "objective": "wiener"}),
                             ("student (matmul DFT)", {"net": net, "objective": "nullspace"}),
                             ("student (ONNX DFT op)", {"net": net, "objective": "nullspace", "dft": "onnx"})):
                path = Path(tmp) / f"{size}_{len(models)}.onnx"
                export_graph(ReconstructionGraph(psf, (size, size), args.lam, **kw), path, batch=1)
                import onnx

                models[name] = onnx.load(str(path))
            fp32 = models["student (matmul DFT)"]
            models["student FP16 (whole graph)"] = to_fp16(fp32, "all")
            models["student FP16 (student only)"] = to_fp16(fp32, "conv")
            amax = calibrate(fp32, y, 1)
            models["student INT8 (Q/DQ convs)"] = to_int8(fp32, amax)[0]
            print(f"[{size}²] exported and quantised in {time.perf_counter() - t0:.1f} s; "
                  f"student parameters {count_parameters(net) / 1e6:.2f} M", file=sys.stderr)
            sessions = {k: make_session(m, threads=args.threads) for k, m in models.items()}
            outputs = {k: s.run(None, {"y": y[:1]})[0] for k, s in sessions.items()}  # warm-up
            times: dict[str, list[float]] = {k: [] for k in sessions}
            for r in range(args.rounds):
                for k, s in sessions.items():
                    frame = y[r % len(y)][None]
                    t = time.perf_counter()
                    s.run(None, {"y": frame})
                    times[k].append((time.perf_counter() - t) * 1e3)
            ref = outputs["student (matmul DFT)"]
            wiener_ms = statistics.median(times["Wiener-only (matmul DFT)"])
            for k in sessions:
                ms = statistics.median(times[k])
                if k.startswith("Wiener") or k == "student (matmul DFT)":
                    quality = ""
                elif "FP16" in k:  # ORT CPU runs float16 convs in float32: score the FP16 emulation instead
                    mode = "all" if "whole" in k else "conv"
                    quality = f"{emulated_psnr(fp32, mode, y[:1], 1, ref):.1f} (ORT {psnr(ref, outputs[k]):.1f})"
                else:
                    quality = f"{psnr(ref, outputs[k]):.1f}"
                rows.append((f"{size}²", k, f"{ms:.1f}", f"{min(times[k]):.1f}", f"{ms / wiener_ms:.2f}", quality))
    if rows:
        print(f"\nONNX Runtime CPU, {args.threads} threads, batch 1, 3 channels, median of {args.rounds} rounds; "
              f"student = default edge EdgeUNet ({arch['width']} base channels, depth {arch['depth']}).\n")
        print("PSNR of FP16 rows: FP16 emulation (float16 rounding, FP32 accumulation); in brackets the FP16 model on "
              "ORT CPU, which runs float16 convolutions in float32.\n")
        print("| size | graph | ms / frame (median) | ms (min) | × Wiener-only (median) | PSNR vs FP32 student (dB) |")
        print("|---|---|---:|---:|---:|---:|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    if args.crop_downsample:
        with tempfile.TemporaryDirectory(prefix="bench-export-crop-") as tmp:
            crop = crop_rows(args, Path(tmp))
        print(f"\nCrop model, Wiener-only graph A†y (λ = {args.crop_lam:g}), real DiffuserCam PSF and capture "
              f"({Path(args.crop_psf).name}, {Path(args.crop_capture).name}), 1 channel, batch 1; ONNX Runtime CPU "
              f"{args.crop_threads} thread(s), numpy single-threaded FFT; median of {args.rounds} rounds. "
              "Error: max |x − A†y| / max |A†y| against train.physics.LenslessOperator (crop).\n")
        print("| geometry | graph | ms / frame (median) | ms (min) | rel. error vs torch A†y |")
        print("|---|---|---:|---:|---:|")
        for row in crop:
            print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
