#!/usr/bin/env python3
"""Score students at other depths: simulated test faces imaged through the PSF scaled by s, reconstructed by each
student's spectra-input ONNX graph (ONNX Runtime) fed either the true A_s† (what live refocus gives it) or the
calibrated A_1† (no refocus), beside the Wiener A_s† of the same graph kind. Used by scripts/refocus_study.sh.

    python3 scripts/refocus_study.py --data runs/r64/radial64 --students DIR_A,DIR_B --names "range,single" \
        --lpips-weights ../shared/weights/lpips/lpips_alex_full_v0.1.pth --limit 30 --out runs/refocus/study

Test faces: the first --limit ground truths of the test split; ``y_s = clip(A_s x + n, 0, 1)`` with the dataset's
forward model and noise level, the PSF zero-padded to the convolution grid then warped (train.scale_range, the
same physics the scale-range student trained on), noise seeded per (image, scale). Metrics (train.metrics) on the
clipped centre crop of x̂ against the ground truth: PSNR, SSIM, LPIPS-Alex; consistency ‖A_s x̂ − y_s‖/‖y_s‖ under
the true forward model (x̂'s scene window, as evaluate's forward column). Writes metrics.json and metrics.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.graph import ReconstructionGraph
from export.onnx_graph import export_graph, load_student_info
from nsdd_edge.graph_spectra import SpectraFeed
from nsdd_edge.psf_warp import PsfWarp, warp_psf
from train import metrics as M
from train.data import LenslessDataset
from train.physics import center_crop, fit_to_grid
from train.scale_range import ScaleOperators


def export_spectra_input(student_dir: str, psf: np.ndarray, out: Path) -> tuple[Path, dict]:
    """The student's graph with spectra inputs (``nsdd-export onnx --student DIR --spectra-input``)."""
    info = load_student_info(student_dir)
    graph = ReconstructionGraph(psf, info.geometry, info.lam, net=info.net.float().eval(), objective=info.objective,
                                channels=info.channels or 3, support_shape=info.support_shape,
                                projector=info.projector, spectra_input=True)
    return export_graph(graph, out), {"lam": info.lam, "projector": info.projector, "geometry": info.geometry,
                                      "config": info.config}


def write_figure(tiles: dict[tuple[str, float], np.ndarray], scales: list[float], path: Path, zoom: int = 2) -> None:
    """One row per scale; columns: the truth, every method fed A_s†, the students fed A_1† (no refocus); each tile
    the face ×``zoom`` (nearest). A ``.jpg`` path is written at quality 82 (a PNG of noisy faces is large)."""
    import cv2

    names = list(dict.fromkeys(name for name, _ in tiles))
    columns = (["truth"] + [n for n in names if n.endswith("A_s†")]
               + [n for n in names if n.endswith("A_1†") and not n.startswith("Wiener")])
    h, w = next(iter(tiles.values())).shape[-2:]
    th, tw, top, left, gap = h * zoom, w * zoom, 34, 52, 4
    grid = np.full((top + len(scales) * (th + gap), left + len(columns) * (tw + gap), 3), 255, np.uint8)
    for c, name in enumerate(columns):
        for k, line in enumerate(name.replace(", ", ",\n").splitlines()):
            cv2.putText(grid, line, (left + c * (tw + gap), 13 + 14 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.36, (0, 0, 0), 1,
                        cv2.LINE_AA)
    for r, s in enumerate(scales):
        y0 = top + r * (th + gap)
        cv2.putText(grid, f"s={s:g}", (2, y0 + th // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        for c, name in enumerate(columns):
            tile = np.clip(np.moveaxis(tiles[(name, s)], 0, -1), 0, 1)
            tile = np.repeat(np.repeat((tile * 255 + 0.5).astype(np.uint8), zoom, 0), zoom, 1)
            x0 = left + c * (tw + gap)
            grid[y0 : y0 + th, x0 : x0 + tw] = tile if tile.shape[-1] == 3 else tile[..., :1]
    cv2.imwrite(str(path), grid[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 82] if path.suffix == ".jpg" else [])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset directory with a test split and ground truth")
    p.add_argument("--students", required=True, help="student directories, comma-separated")
    p.add_argument("--names", required=True, help="their names in the table, comma-separated")
    p.add_argument("--scales", default="0.85,0.9,1.0,1.1,1.2", help="PSF scales to image the test faces at")
    p.add_argument("--limit", type=int, default=30, help="first N test faces")
    p.add_argument("--lpips-weights", required=True, help="LPIPS-Alex v0.1 state dict")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads")
    p.add_argument("--out", required=True, help="output directory (ONNX graphs, metrics.json, metrics.md)")
    p.add_argument("--figure", default=None, metavar="PNG",
                   help="also write a grid (.png or .jpg) of one test face (--figure-image) at every scale: the truth, "
                        "then the methods")
    p.add_argument("--figure-image", type=int, default=0, help="which test face the figure shows")
    args = p.parse_args()
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = LenslessDataset(args.data)
    ids = dataset.ids("test")[: args.limit]
    truth = torch.from_numpy(np.stack([dataset.ground_truth(i) for i in ids]))
    scales = [float(v) for v in args.scales.split(",")]
    names = [n.strip() for n in args.names.split(",")]
    dirs = [d.strip() for d in args.students.split(",")]
    if len(names) != len(dirs):
        raise SystemExit("--names must name every --students directory")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1

    methods = {}  # name -> (session, spectra feed)
    for name, d in zip(names, dirs):
        path, info = export_spectra_input(d, dataset.psf, out / f"{Path(d).name}.onnx")
        methods[name] = (ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]),
                         SpectraFeed(info["geometry"], info["lam"], info["projector"]))
        print(f"exported {path} (λ = {info['lam']:.4g}, trained over scales "
              f"{info['config'].get('psf_scale_range', [1.0, 1.0])})", file=sys.stderr)
    lam, projector, geometry = info["lam"], info["projector"], info["geometry"]  # the last student's, for Wiener
    wiener = export_graph(ReconstructionGraph(dataset.psf, geometry, lam, objective="wiener", channels=truth.shape[1],
                                              projector=projector, spectra_input=True), out / "wiener.onnx")
    methods["Wiener"] = (ort.InferenceSession(str(wiener), opts, providers=["CPUExecutionProvider"]),
                         SpectraFeed(geometry, lam, projector))
    operators = ScaleOperators(dataset, model=None, lam=lam, projector=projector, device=torch.device("cpu"))
    sigma = float(dataset.meta.get("noise_std") or 0.0)
    results: dict = {"data": str(Path(args.data).resolve()), "ids": ids, "scales": scales, "noise_std": sigma,
                     "students": dict(zip(names, dirs)), "rows": {}}
    tiles: dict[tuple[str, float], np.ndarray] = {}  # (column, scale) -> the figure face, (C, h, w) in [0, 1]
    for k, s in enumerate(scales):
        _, forward = operators(s)
        x = fit_to_grid(truth, forward.scene_shape)
        g = torch.Generator().manual_seed(args.seed * 1000 + k)
        y = (forward.A(x) + sigma * torch.randn(forward.A(x).shape, generator=g)).clamp(0, 1)
        feeds = {"true": warp_psf(dataset.psf, PsfWarp(s)), "calibrated": dataset.psf}
        for name, (session, feed) in methods.items():
            for kind, psf in feeds.items():
                spectra = feed.feeds(psf)
                t0 = time.perf_counter()
                x_hat = torch.from_numpy(np.concatenate([session.run(None, {"y": y[i : i + 1].numpy(), **spectra})[0]
                                                         for i in range(len(ids))]))
                ms = (time.perf_counter() - t0) * 1e3 / len(ids)
                window = center_crop(x_hat, truth.shape[-2:]).clamp(0, 1)
                row = {"psnr": float(M.psnr(window, truth).mean()), "ssim": float(M.ssim(window, truth).mean()),
                       "lpips": float(M.lpips(window, truth, args.lpips_weights).mean()),
                       "consistency": float(M.consistency(fit_to_grid(x_hat, forward.scene_shape), y, forward).mean()),
                       "ms_per_image": ms}
                results["rows"].setdefault(f"{name} | {kind}", {})[str(s)] = row
                tiles[(f"{name}, A_s†" if kind == "true" else f"{name}, A_1†", s)] = \
                    window[args.figure_image].numpy()
                print(f"s = {s:.2f} {name:>24} fed {kind:>10} A†: PSNR {row['psnr']:.2f} LPIPS {row['lpips']:.3f} "
                      f"consistency {row['consistency']:.4f}", file=sys.stderr, flush=True)
        tiles[("truth", s)] = truth[args.figure_image].numpy()
        floor = float(M.consistency(x, y, forward).mean())
        results.setdefault("ground_truth_consistency", {})[str(s)] = floor
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# Students at other depths ({len(ids)} test faces of {args.data}, noise σ = {sigma:g})", "",
             ("PSNR (dB) / LPIPS / consistency ‖A_s x̂ − y_s‖/‖y_s‖ at each PSF scale s; `true`: fed A_s† (refocus), "
             "`calibrated`: fed A_1† (no refocus)."), "",
             "| method | A† fed | " + " | ".join(f"s = {s:g}" for s in scales) + " |",
             "|---|---|" + "---:|" * len(scales)]
    for key, by_scale in results["rows"].items():
        name, kind = key.split(" | ")
        cells = [f"{r['psnr']:.2f} / {r['lpips']:.3f} / {r['consistency']:.4f}" for r in
                 (by_scale[str(s)] for s in scales)]
        lines.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    lines.append("| ground truth (floor) | | " + " | ".join(
        f"{results['ground_truth_consistency'][str(s)]:.4f}" for s in scales) + " |")
    (out / "metrics.md").write_text("\n".join(lines) + "\n")
    if args.figure:
        write_figure(tiles, scales, Path(args.figure))
        print(f"wrote {args.figure}", file=sys.stderr)
    print(f"wrote {out / 'metrics.md'} and {out / 'metrics.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
