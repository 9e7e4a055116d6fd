"""``nsdd-train design-mask``: design a manufacturable amplitude mask by knowledge distillation and compare
it with the usual choices, on faces, at CPU scale.

1. A relaxed teacher (continuous mask + Wiener/refinement decoder) is trained end to end.
2. The binary student (minimum feature via fabrication filter + projection, or an LCD grid) is trained with
   the reconstruction loss plus the encoder and decoder-feature transfer losses (``kd``), with one of them
   (``kd-enc``, ``kd-dec``) or none (``e2e``: end-to-end binary, straight-through estimator).
3. Baselines with the same decoder and budget: random binary, MURA, MLS, the contour PSF, the real radial PSF.
4. Outputs in ``--out``: ``mask.png`` (one pixel per fabrication cell, physical pitch in the PNG header),
   ``mask.svg`` (the openings, in millimetres), ``psf.npy`` (float32 ``(3, H, W)``, ready for
   ``nsdd-train simulate --psf``) of the ``--primary`` design; ``designs/NAME/`` the same for every design
   (+ ``result.json``, ``state.pt``); ``report.md`` + ``report.png``; ``design.json``.

A finished design (its ``result.json`` written with the same settings) is reused when the command is run
again, so an interrupted run resumes at the design it was training.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from nsdd_edge.atomic import atomic_save_npy, atomic_write_json
from nsdd_edge.cli_common import add_threads_argument
from nsdd_edge.optics import OpticsError
from train.evaluate import finite_or_none, machine_info
from train.mask.analysis import conditioning, radial_mtf
from train.mask.design import (
    DESIGNS,
    STUDENTS,
    DesignError,
    DesignSettings,
    best_wiener_lambda,
    build_system,
    constraint_check,
    reconstruct,
    score,
    train_system,
)
from train.mask.printing import write_png, write_svg
from train.mask.propagation import RGB_WAVELENGTHS_NM, MaskOptics, MaskToPsf
from train.mask.report import save_figure_side_by_side, write_report
from train.mask.systems import measure
from train.simulate import list_images, prepare_scene, split_ids
from train.threads import torch_threads

HELP = "design a binary lensless mask by knowledge distillation from a relaxed teacher, against baselines"


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, type=Path, help="folder of scene images (faces)")
    p.add_argument("--out", required=True, type=Path, help="output directory (resumes design by design)")
    p.add_argument("--designs", default=",".join(DESIGNS),
                   help=f"comma-separated designs to run, from {','.join(DESIGNS)} (kd* need teacher)")
    p.add_argument("--primary", default=None,
                   help="design whose mask/PSF go to --out (default: kd if run, else the first binary design)")
    p.add_argument("--limit", type=int, default=1200, help="use the first N images (sorted)")
    p.add_argument("--n-test", type=int, default=200, help="held-out scenes for the scores")
    p.add_argument("--scene", type=int, default=32, help="scene size in pixels (square)")
    p.add_argument("--sensor", type=int, default=64, help="sensor (and PSF) grid in pixels (square)")
    p.add_argument("--distance-mm", type=float, default=0.5, help="mask-to-sensor distance d")
    p.add_argument("--sensor-pitch-um", type=float, default=10.0, help="pixel pitch of the sensor grid")
    p.add_argument("--feature-um", type=float, default=10.0, help="fabrication pitch (one mask cell)")
    p.add_argument("--wavelengths-nm", type=float, nargs=3, default=list(RGB_WAVELENGTHS_NM),
                   metavar=("R", "G", "B"), help="wavelength of each colour channel")
    p.add_argument("--oversample", type=int, default=2, help="propagation samples per mask cell")
    p.add_argument("--propagation", choices=("auto", "fresnel", "shadow"), default="auto",
                   help="angular spectrum, geometric shadow, or auto (shadow at a cell Fresnel number ≥ 25)")
    p.add_argument("--aperture", type=float, default=0.75, help="design aperture side / mask grid side")
    p.add_argument("--constraint", choices=("binary", "lcd"), default="binary",
                   help="student mask: binary with a minimum feature, or an LCD pixel grid with dead space")
    p.add_argument("--min-feature", type=int, default=2, help="minimum feature (lines and gaps) in cells")
    p.add_argument("--filter-radius", type=float, default=None, help="cone filter radius in cells (default: min feature)")
    p.add_argument("--fill-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="open fraction of the aperture the binary student must keep")
    p.add_argument("--lcd-pitch", type=int, default=4, help="LCD pixel pitch in cells")
    p.add_argument("--lcd-dead", type=int, default=1, help="opaque cells per LCD pixel side (dead space)")
    p.add_argument("--noise-std", type=float, default=0.005,
                   help="Gaussian read noise on the [0, 1] scale, for a mask passing --reference-throughput")
    p.add_argument("--profile", type=Path, default=None,
                   help="camera profile (nsdd-edge calibrate): its Poisson–Gaussian noise and signal level instead "
                        "of --noise-std")
    p.add_argument("--reference-throughput", type=float, default=0.5,
                   help="mask throughput (mean t² over the aperture) the exposure is set for: a mask passing τ "
                        "sees noise σ·ref/τ; 0: the same σ for every mask")
    p.add_argument("--steps", type=int, default=400, help="training steps per design (the shared budget)")
    p.add_argument("--teacher-steps", type=int, default=None,
                   help="steps of the relaxed teacher, trained once before the students (default: 2 × --steps)")
    p.add_argument("--teacher-beta", type=float, default=16.0,
                   help="final projection sharpness of the relaxed teacher (its mask stays continuous)")
    p.add_argument("--batch", type=int, default=16, help="scenes per training step")
    p.add_argument("--lr-mask", type=float, default=0.05, help="Adam learning rate of the mask logits")
    p.add_argument("--lr-decoder", type=float, default=2e-3, help="Adam learning rate of the refinement net")
    p.add_argument("--lam", type=float, default=1e-3, help="initial Wiener λ of the decoder (learned)")
    p.add_argument("--encoder-loss", choices=("gram", "mtf", "mask"), default="mask",
                   help="encoder transfer loss: Gram (|H|²) or MTF (|H|) alignment, or the masks themselves")
    p.add_argument("--enc-weight", type=float, default=1.0, help="weight of the encoder loss (kd, kd-enc)")
    p.add_argument("--dec-weight", type=float, default=1.0, help="weight of the decoder-feature loss (kd, kd-dec)")
    p.add_argument("--width", type=int, default=16, help="refinement network base channels")
    p.add_argument("--depth", type=int, default=2, help="refinement network levels")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the train/test split, the initial weights, the batches and the noise")
    p.add_argument("--radial-psf", default=None, help="real PSF for the radial baseline (.npy)")
    p.add_argument("--lpips-weights", default=None, help="LPIPS-Alex v0.1 weights (.pth); without: no LPIPS")
    add_threads_argument(p, "torch CPU threads", "train")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def settings_from_args(args: argparse.Namespace) -> DesignSettings:
    optics = MaskOptics(distance_mm=args.distance_mm, sensor_pitch_um=args.sensor_pitch_um,
                        feature_um=args.feature_um, wavelengths_nm=tuple(args.wavelengths_nm),
                        oversample=args.oversample)
    s = DesignSettings(scene=args.scene, sensor=args.sensor, optics=optics, propagation=args.propagation,
                       aperture=args.aperture, constraint=args.constraint, min_feature=args.min_feature,
                       filter_radius=args.filter_radius,
                       fill_range=tuple(args.fill_range) if args.fill_range else None,
                       lcd_pitch=args.lcd_pitch, lcd_dead=args.lcd_dead, noise_std=args.noise_std,
                       reference_throughput=args.reference_throughput or None,
                       profile=str(Path(args.profile).resolve()) if args.profile else None,
                       steps=args.steps, teacher_steps=args.teacher_steps, teacher_beta=args.teacher_beta,
                       batch=args.batch,
                       lr_mask=args.lr_mask, lr_decoder=args.lr_decoder, lam=args.lam,
                       encoder_loss=args.encoder_loss, enc_weight=args.enc_weight, dec_weight=args.dec_weight,
                       width=args.width, depth=args.depth, seed=args.seed,
                       radial_psf=str(Path(args.radial_psf).resolve()) if args.radial_psf else None)
    s.validate()
    return s


def parse_designs(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in DESIGNS]
    if unknown or not names:
        raise DesignError(f"--designs: unknown {unknown or 'empty list'}; use {', '.join(DESIGNS)}")
    if any(n in ("kd", "kd-enc", "kd-dec") for n in names) and "teacher" not in names:
        names.insert(0, "teacher")
    return sorted(set(names), key=DESIGNS.index)


def load_scenes(folder: Path, limit: int, n_test: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, test)`` scenes ``(N, 3, size, size)``: the first ``limit`` images, split as ``simulate`` does."""
    files = list_images(folder, limit)
    if n_test >= len(files):
        raise DesignError(f"--n-test {n_test} leaves no training scene out of {len(files)} images")
    ids = [f"{k:06d}" for k in range(len(files))]
    split = split_ids(ids, seed, 0.0, n_test)
    out = {}
    for name, part in split.items():
        scenes = []
        for sid in part:
            try:
                scenes.append(prepare_scene(files[int(sid)], size, 3))
            except (OpticsError, cv2.error) as exc:
                print(f"skipped (unreadable): {exc}", file=sys.stderr)
        if not scenes:
            raise DesignError(f"--images {folder}: no readable image in the {name} split")
        out[name] = torch.from_numpy(np.stack(scenes))
    return out["train"], out["test"]


@torch.no_grad()
def mean_noise(system, scenes: torch.Tensor, psf: torch.Tensor) -> float:
    """The mean noise σ relative to the signal over the clean measurements of ``scenes``."""
    ratio = system.throughput_ratio()
    clean = measure(scenes, psf, system.decoder.sensor, None, system.noise, ratio)
    return float(system.noise.std(clean, ratio).mean())


def run_design(name: str, s: DesignSettings, to_psf: MaskToPsf, train: torch.Tensor, test: torch.Tensor,
               out: Path, teacher, lpips_weights: str | None, progress: bool):
    """Train (or reuse) and score one design; returns ``(system, result)``."""
    folder = out / "designs" / name
    folder.mkdir(parents=True, exist_ok=True)
    system = build_system(name, s, to_psf)
    signature = s.signature(name)
    result_path, state_path = folder / "result.json", folder / "state.pt"
    if result_path.exists() and state_path.exists():
        old = json.loads(result_path.read_text())
        if old.get("signature") == signature:
            system.load_state_dict(torch.load(state_path, weights_only=True))
            system.eval()
            print(f"{name}: reusing {folder}", file=sys.stderr)
            return system, old
    steps = (s.teacher_steps or 2 * s.steps) if name == "teacher" else s.steps
    t0 = time.perf_counter()
    weights = {"kd": (s.enc_weight, s.dec_weight), "kd-enc": (s.enc_weight, 0.0), "kd-dec": (0.0, s.dec_weight)}
    enc_w, dec_w = weights.get(name, (0.0, 0.0))
    history = train_system(system, train, steps, s, teacher=teacher if name in weights else None,
                           enc_weight=enc_w, dec_weight=dec_w, desc=name, progress=progress)
    seconds = time.perf_counter() - t0
    mask = system.encoder.mask()
    psf, _ = system.encoder(to_psf, 1.0)
    psf_np = psf.detach().numpy().astype(np.float32)
    wiener_lam = best_wiener_lambda(system, train[:64], s.seed + 7)
    x_dec, x_wie = reconstruct(system, test, s.seed + 12345, wiener_lam=wiener_lam)
    green = psf_np[len(psf_np) // 2]
    result = {
        "signature": signature, "design": name, "train_seconds": seconds, "steps": steps,
        "mask_kind": {"teacher": "relaxed", "contour": "PSF only", "radial": "PSF only (real)"}.get(
            name, f"{s.constraint if name in STUDENTS else 'binary'}"),
        "constraint": constraint_check(name, mask, s), "lam": system.decoder.lam, "wiener_lam": wiener_lam,
        "fill_factor": None, "noise_std": mean_noise(system, test, psf.detach()),
        **conditioning(green, (s.sensor, s.sensor), (s.scene, s.scene)),
        "decoder": score(x_dec, test, lpips_weights), "wiener": score(x_wie, test, lpips_weights),
        "final_loss": history[-1] if history else None,
        "how_fabricated": getattr(system.encoder, "last_how", None) or None,
    }
    if mask is not None and name == "teacher":
        result["fill_factor"] = float(mask.sum() / s.aperture_cells ** 2)  # mean transmittance
    atomic_save_npy(folder / "psf.npy", psf_np)
    atomic_save_npy(folder / "recon_0.npy", x_dec[0].numpy())  # the first held-out scene, for the figure
    if mask is not None:
        atomic_save_npy(folder / "mask.npy", mask.astype(np.float32))
        if name != "teacher":
            write_png(folder / "mask.png", mask, s.optics.feature_um)
            write_svg(folder / "mask.svg", mask, s.optics.feature_um)
    atomic_write_json(folder / "loss.json", history)
    torch.save(system.state_dict(), state_path)
    atomic_write_json(result_path, finite_or_none(result), indent=2)
    return system, result


def design_masks(args: argparse.Namespace) -> dict:
    s = settings_from_args(args)
    names = parse_designs(args.designs)
    primary = args.primary or next((n for n in ("kd", "e2e", "kd-enc", "kd-dec", "random", "mura", "mls")
                                    if n in names), None)
    if primary is not None and primary not in names:
        raise DesignError(f"--primary {primary} is not among --designs {','.join(names)}")
    if primary in ("teacher", "contour", "radial"):
        raise DesignError(f"--primary {primary}: only a binary design has a printable mask")
    if "radial" in names and not s.radial_psf:
        raise DesignError("the radial design needs --radial-psf FILE (e.g. ../shared/data/psf/radial_6per_256.npy)")
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise DesignError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train, test = load_scenes(args.images, args.limit, args.n_test, s.scene, s.seed)
    print(f"scenes: {len(train)} train, {len(test)} test ({s.scene}² px); mask grid {s.cells}² cells of "
          f"{s.optics.feature_um} µm, aperture {s.aperture_cells}²; designs: {', '.join(names)}", file=sys.stderr)
    to_psf = MaskToPsf(s.optics, (s.sensor, s.sensor), s.propagation)
    teacher, results, figure_entries = None, {}, []
    for name in names:
        system, result = run_design(name, s, to_psf, train, test, out, teacher, args.lpips_weights,
                                    not args.quiet)
        if name == "teacher":
            teacher = system
        results[name] = result
        d = result["decoder"]
        print(f"{name}: decoder {d['psnr']:.2f} dB, Wiener {result['wiener']['psnr']:.2f} dB, "
              f"κ {result['condition_number']:.3g}, μ {result['gram_coherence']:.3f}", file=sys.stderr)
        folder = out / "designs" / name
        mask = np.load(folder / "mask.npy") if (folder / "mask.npy").exists() else None
        psf = np.load(folder / "psf.npy")
        figure_entries.append({"name": name, "mask": mask, "psf": psf, "mtf": radial_mtf(psf),
                               "recon": np.load(folder / "recon_0.npy"), "psnr": d["psnr_per_image"][0]})
    if primary is not None:
        for f in ("mask.png", "mask.svg", "psf.npy"):
            shutil.copyfile(out / "designs" / primary / f, out / f)
    seconds = time.perf_counter() - t0
    save_figure_side_by_side(out / "report.png", figure_entries, test[0].numpy())
    command = shlex.join(["nsdd-train", *sys.argv[1:]]) if sys.argv[1:2] == ["design-mask"] else \
        "nsdd-train design-mask (called from Python: " + ", ".join(
            f"{k}={v}" for k, v in vars(args).items() if v not in (None, False) and k != "command") + ")"
    machine = machine_info("cpu")
    write_report(out / "report.md", results, s.to_dict(), machine, command, "report.png", primary, seconds)
    record = {"settings": s.to_dict(), "designs": names, "primary": primary, "command": command,
              "machine": machine, "seconds": seconds,
              "results": {k: {kk: vv for kk, vv in v.items() if kk != "signature"} for k, v in results.items()}}
    atomic_write_json(out / "design.json", finite_or_none(record), indent=2)
    return record


def main(args: argparse.Namespace) -> int:
    try:
        with torch_threads(args.threads, "train"):
            record = design_masks(args)
    except (DesignError, OpticsError, ValueError) as exc:
        print(f"nsdd-train design-mask: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/report.md ({len(record['designs'])} designs, {record['seconds'] / 60:.1f} min)"
          + (f"; printable mask and PSF of '{record['primary']}': {args.out}/mask.png, mask.svg, psf.npy"
             if record["primary"] else ""))
    return 0
