#!/usr/bin/env python3
"""Build ``nsdd_edge/assets/default_bundle``: the bundle ``nsdd-edge run`` uses when given no ``--model``.

Without ``--student``: a Wiener-only bundle (no network) for a simulated contour PSF (PhlatCam-like,
``simulate_psf('contour', 128×128, seed 0)``), circular model at 128×128, 3 channels, and preprocessing that
matches the ``sim://`` camera's raw counts (taken from ``SimCamera.matching_preprocess()``). λ is chosen
from a grid by the mean PSNR of the Wiener reconstruction against the simulated scenes of a few ``sim://``
frames (noise and shot noise as the camera makes them); the table is printed and recorded in the bundle's
provenance.

With ``--student DIR`` (needs the ``train`` and ``export`` extras): the trained student is exported with
nsdd-export's Python API (DFT by matmul, FP32 ONNX, static batch 1, its support window as Slice/Concat) and
the bundle's default engine is that ONNX model, with the PSF the student was trained on (our own simulated
contour PSF, recomputed here and checked against the student's PSF hash — never a file from ../shared), the
student's λ and support window (``geometry.support_shape``: ``sim://`` then renders the scenes at the support
size and simulates them with the crop model on a 2× sensor grid, as ``nsdd-train simulate``), preprocessing
matching ``sim://`` and provenance (student config, training summary, PSNR of the student and of the Wiener
filter on a few ``sim://`` frames when ONNX Runtime is installed). ``nsdd-edge run`` uses the student with
ONNX Runtime (``pip install 'nsdd-edge[onnxruntime]'``) and falls back to the numpy Wiener filter, saying
so, without it.

    python scripts/make_default_bundle.py [--out nsdd_edge/assets/default_bundle] [--size 128] [--seed 0]
    python scripts/make_default_bundle.py --student runs/student_nullspace [--max-mb 8]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from nsdd_edge.bundle import PreprocessConfig, write_bundle
from nsdd_edge.optics import LenslessGeometry, WienerFilter
from nsdd_edge.preprocess import Preprocessor
from nsdd_edge.psf_sim import simulate_psf
from nsdd_edge.sources import open_source

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # read-only research data: nothing from there may go into a bundle
LAM_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


class StudentBundleError(ValueError):
    """The student cannot go into the default bundle (other PSF, PSF from ../shared, too large, ...)."""


def psnr(x: np.ndarray, ref: np.ndarray) -> float:
    """``10 log10(1 / mean((clip(x) − ref)²))`` for images in [0, 1]."""
    mse = float(np.mean((np.clip(x, 0, 1) - ref) ** 2))
    return 10 * np.log10(1.0 / max(mse, 1e-12))


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def student_psf(info, psf_file: Path | None, seed: int, fill: float = 0.8) -> tuple[np.ndarray, dict]:
    """The PSF the student was trained on: our simulated contour PSF at the student's sensor size (seed
    ``seed``, aperture ``fill``, unit sum), or ``psf_file``; it must hash to the student's ``psf_sha256``."""
    from nsdd_edge.optics import array_hash, load_psf, normalize

    sensor = tuple(info.sensor_shape)
    if psf_file is not None:
        if _inside(psf_file, SHARED):
            raise StudentBundleError(f"--psf {psf_file}: files under {SHARED} must not go into a bundle")
        psf, record = load_psf(psf_file), {"file": str(psf_file.resolve())}
    else:
        psf = normalize(simulate_psf("contour", sensor, seed, fill=fill), "sum")
        record = {"kind": "contour", "shape": [int(v) for v in psf.shape], "seed": seed, "fill": fill,
                  "made_by": "nsdd_edge.psf_sim.simulate_psf, normalised to sum 1"}
    got = array_hash(psf)
    if info.psf_sha256 is not None and got != info.psf_sha256:
        what = f"--psf {psf_file}" if psf_file else f"simulate_psf('contour', {sensor}, seed={seed}, fill={fill})"
        raise StudentBundleError(f"the student was trained for PSF {info.psf_sha256[:12]}…, but {what} has hash "
                                 f"{got[:12]}…: train the student on the simulated contour PSF (or give --seed / "
                                 "--psf-fill / --psf of the PSF it was trained on)")
    return psf, {**record, "sha256": got}


def training_summary(student_dir: Path, cfg: dict) -> dict:
    """Steps, parameters, final loss (``loss.json``), data and teacher of a distilled student."""
    import json

    training = dict(cfg.get("training") or {})
    summary = {"step": cfg.get("step"), "parameters": (cfg.get("weights") or {}).get("parameters"),
               "weights_dtype": (cfg.get("weights") or {}).get("dtype"), "kind": cfg.get("kind"),
               "objective": cfg.get("objective"), "architecture": cfg.get("architecture"),
               "support_shape": cfg.get("support_shape"), "lam": cfg.get("lam"),
               "data": training.get("data"), "num_samples": training.get("num_samples"),
               "teacher": (training.get("teacher") or {}).get("method"), "loss": training.get("loss"),
               "steps": training.get("steps")}
    loss_path = student_dir / "loss.json"
    if loss_path.exists():
        try:
            loss = json.loads(loss_path.read_text())
            if loss.get("loss"):
                summary["final_loss"] = float(loss["loss"][-1])
                summary["first_loss"] = float(loss["loss"][0])
        except (ValueError, TypeError, KeyError):
            summary["loss_json"] = "unreadable"
    return summary


def sim_scores(bundle, frames: int) -> dict | None:
    """Mean PSNR (dB) against the simulated scenes, on the support window, of the bundle's ONNX model and of
    the Wiener filter with the same λ over ``frames`` ``sim://`` frames; None without ONNX Runtime."""
    from nsdd_edge.engines import EngineError, NumpyWienerEngine, OnnxRuntimeEngine

    try:
        engine = OnnxRuntimeEngine(bundle.model_path("onnx_fp32"), input_shape=bundle.input_shape)
    except EngineError as exc:
        print(f"(no sim:// scores: {exc})")
        return None
    camera = open_source("sim://?realtime=0", psf=bundle.psf, geometry=bundle.sim_geometry(),
                         channels=bundle.channels)
    prep = Preprocessor(bundle.preprocess, bundle.root)
    wiener = NumpyWienerEngine(bundle)
    indices = [int(i) for i in np.linspace(0, 240, frames)]
    scores: dict[str, list[float]] = {"student": [], "wiener": []}
    for i in indices:
        y = prep(camera.raw_frame(i))[None]
        truth = camera.scene(i)
        scores["student"].append(psnr(bundle.display_crop(engine.infer(y)[0]), truth))
        scores["wiener"].append(psnr(bundle.display_crop(wiener.infer(y)[0]), truth))
    engine.close()
    return {"frames": indices, "psnr_db": {k: round(float(np.mean(v)), 3) for k, v in scores.items()},
            "note": "noise and shot noise as sim:// makes them; scored on the support window"}


def make_student_bundle(args: argparse.Namespace) -> int:
    import tempfile

    from export.graph import ReconstructionGraph
    from export.make_bundle import make_bundle
    from export.onnx_graph import check_student_matches, export_graph, load_student_info

    student_dir = Path(args.student)
    info = load_student_info(student_dir)
    if info.sensor_shape is None or info.lam is None:
        raise StudentBundleError(f"{student_dir}: the student config gives no sensor size or λ")
    psf, psf_record = student_psf(info, args.psf, args.seed, args.psf_fill)
    sensor, lam = tuple(info.sensor_shape), float(info.lam)
    check_student_matches(info, psf_record["sha256"], sensor, lam, str(student_dir))
    channels = int(info.channels or 3)
    graph = ReconstructionGraph(psf, sensor, lam, net=info.net.float().eval(), objective=info.objective,
                                dft="matmul", channels=channels, support_shape=info.support_shape)
    camera = open_source("sim://?realtime=0", psf=psf, channels=channels)
    preprocess = PreprocessConfig(**camera.matching_preprocess())
    # what it holds: the student's kind (paper: g_φ + the prior's UNet; edge: EdgeUNet), its objective when not
    # the null-space one; the file keeps its name student_<objective>.onnx (README and docs commands use it)
    kind = str(info.config.get("kind", "edge"))
    name = f"default-sim-contour{sensor[0]}-{kind}-student" + ("" if info.objective == "nullspace" else
                                                               f"-{info.objective}")
    with tempfile.TemporaryDirectory(prefix="nsdd-default-bundle-") as tmp:
        onnx_path = export_graph(graph, Path(tmp) / f"student_{info.objective}.onnx", batch=1, opset=17,
                                 extra_metadata={"nsdd.student": str(student_dir.resolve()),
                                                 "nsdd.student_config": json.dumps(info.config, default=str)})
        mb = (onnx_path.stat().st_size + psf.nbytes) / 1e6
        print(f"exported {onnx_path.name}: {onnx_path.stat().st_size / 1e6:.2f} MB (objective {info.objective}, "
              f"λ={lam:g}, sensor {sensor}, support {info.support_shape})")
        if mb > args.max_mb:
            raise StudentBundleError(f"the bundle would hold {mb:.1f} MB (> --max-mb {args.max_mb:g}): the default "
                                     "bundle ships inside the package; use a smaller student or raise --max-mb")
        provenance = {"made_by": "scripts/make_default_bundle.py --student", "psf": psf_record,
                      "camera": "sim:// (nsdd_edge.sources.SimCamera defaults)" + (
                          f"; scenes rendered at the support {list(info.support_shape)}, crop model on a 2× sensor "
                          "grid" if info.support_shape else ""),
                      "training_summary": training_summary(student_dir, info.config),
                      "note": "default bundle with the trained NSDD student; the numpy Wiener filter (same λ) is "
                              "the fallback without ONNX Runtime"}
        common = {"preprocess": preprocess, "name": name,
                  "psf_source": psf_record.get("file", "nsdd_edge.psf_sim.simulate_psf('contour')")}
        if args.frames > 0:  # score the student on sim:// frames first (a scratch bundle), record the figures
            scratch = make_bundle([onnx_path], psf, Path(tmp) / "scratch", provenance_extra=provenance, **common)
            scores = sim_scores(scratch, args.frames)
            if scores is not None:
                provenance["sim_scores"] = scores
                print(f"sim:// PSNR on the support window: student {scores['psnr_db']['student']:.2f} dB, "
                      f"Wiener (same λ) {scores['psnr_db']['wiener']:.2f} dB ({len(scores['frames'])} frames)")
        bundle = make_bundle([onnx_path], psf, args.out, provenance_extra=provenance, **common)
    size = sum(f.stat().st_size for f in bundle.root.iterdir()) / 1e6
    print(f"wrote {bundle.root} ({size:.2f} MB): {bundle.name}, models {sorted(bundle.models)}, "
          f"PSF {bundle.psf_sha256[:12]}…, λ={bundle.lam:g}, support {bundle.support_shape}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "nsdd_edge/assets/default_bundle")
    ap.add_argument("--size", type=int, default=128, help="sensor size (Wiener-only; a student brings its own)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the simulated contour PSF")
    ap.add_argument("--psf-fill", type=float, default=0.8,
                    help="aperture of the simulated contour PSF, as a fraction of the sensor side (a student's "
                         "PSF: the fill it was trained with; 0.5 keeps a 64 px scene's blur on a 128 px sensor)")
    ap.add_argument("--frames", type=int, default=6,
                    help="sim frames used to choose λ (Wiener-only) or to score the student (0: skip)")
    ap.add_argument("--student", type=Path, default=None, metavar="DIR",
                    help="trained student directory (nsdd-train distill): export it and make it the default engine")
    ap.add_argument("--psf", type=Path, default=None, metavar="FILE",
                    help="with --student: the PSF it was trained on (default: simulate_psf('contour', sensor, "
                         "--seed), recomputed); never a file from ../shared")
    ap.add_argument("--max-mb", type=float, default=8.0, help="with --student: refuse a bundle larger than this")
    args = ap.parse_args(argv)
    if args.student is not None:
        from export.graph import ExportError
        from nsdd_edge.bundle import BundleError
        from nsdd_edge.optics import OpticsError

        try:
            return make_student_bundle(args)
        except (StudentBundleError, ExportError, BundleError, OpticsError) as exc:
            print(f"make_default_bundle: error: {exc}", file=sys.stderr)
            return 2
    if args.psf is not None:
        ap.error("--psf goes with --student")

    psf = simulate_psf("contour", (args.size, args.size), args.seed)
    geometry = LenslessGeometry.make("circular", (args.size, args.size), psf_shape=psf.shape[-2:])
    camera = open_source("sim://?realtime=0", psf=psf, geometry=geometry, channels=3)
    preprocess = PreprocessConfig(**camera.matching_preprocess())
    prep = Preprocessor(preprocess, args.out)
    indices = [int(i) for i in np.linspace(0, 240, args.frames)]
    ys = [prep(camera.raw_frame(i)) for i in indices]
    scenes = [camera.scene(i) for i in indices]

    print(f"{'lambda':>8} | {'PSNR dB (Wiener vs scene)':>26}")
    table = {}
    for lam in LAM_GRID:
        wiener = WienerFilter(psf, geometry, lam)
        score = float(np.mean([psnr(wiener(y), x) for y, x in zip(ys, scenes)]))
        table[f"{lam:g}"] = round(score, 3)
        print(f"{lam:8g} | {score:26.2f}")
    lam = float(max(LAM_GRID, key=lambda v: table[f"{v:g}"]))
    print(f"chosen lambda = {lam:g}")

    bundle = write_bundle(
        args.out, psf=psf, geometry=geometry, lam=lam, channels=3, preprocess=preprocess,
        name="default-sim-contour128-wiener",
        provenance={"made_by": "scripts/make_default_bundle.py", "psf": {"kind": "contour", "shape": list(psf.shape),
                                                                        "seed": args.seed},
                    "camera": "sim:// (nsdd_edge.sources.SimCamera defaults)", "lam_selection_psnr_db": table,
                    "note": "Wiener-only default bundle; replace with a trained student's bundle"})
    print(f"wrote {bundle.root} (PSF {bundle.psf_sha256[:12]}…, λ={lam:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
