#!/usr/bin/env python
"""The DiffuserCam hand side by side — raw | Wiener | ADMM | student — and the consistency table.

Reads the reconstructions that ``scripts/diffusercam_student.sh hand`` writes with ``nsdd-train solve
--capture`` (``HAND/{wiener,admm,student}/rawdata_hand_sample.npy``) and prepares the capture and the PSF
exactly as solve does (:func:`nsdd_edge.optics.load_psf`: corner background, box ×DS; PSF unit sum,
capture unit max).

Consistency ``‖A x̂ − y‖ / ‖y‖`` under both operators, for every method:

- **crop** (DiffuserCam convention, as in docs/diffusercam.md): scene = conv = 2× the sensor. A sensor-size
  image (the student's) is zero-padded centrally to that grid.
- **circular** at sensor size (the student's operator): a 2×-grid image (Wiener, ADMM) is centre-cropped to
  the sensor's field of view first.

A colour reconstruction is compared with the monochrome capture repeated on its channels (the PSF is shared
by the channels: the measurement of a grey scene). The reference row ``A†y`` is the circular Wiener filter
at the student's λ, the student's range part.

Figure: top row the sensor's field of view (centre sensor-size crop) of each reconstruction, each scaled by
its own maximum (negative values black), ×UPSCALE nearest; the student's panel outlines its support window
(the network's ``--support``); bottom row the residual ``|A x̂ − y|`` under each method's own operator
(crop for Wiener/ADMM, circular for the student), channel mean, on one common scale (the largest residual).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nsdd_edge.atomic import atomic_write_text
from nsdd_edge.optics import load_psf
from train.physics import LenslessOperator, center_crop, center_pad
from train.solve import to_png8, write_png

METHODS = (("wiener", "Wiener (crop, λ=1e-4)"), ("admm", "ADMM (crop, TV, 100 it.)"), ("student", "student"))
SAMPLE = "rawdata_hand_sample"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hand", type=Path, required=True, help="directory with wiener/, admm/, student/ (nsdd-train solve)")
    p.add_argument("--psf", type=Path, required=True)
    p.add_argument("--capture", type=Path, required=True)
    p.add_argument("--downsample", type=int, default=16)
    p.add_argument("--support", type=int, nargs="+", default=[64], metavar="N",
                   help="the student's support window H [W] to outline (0: none)")
    p.add_argument("--upscale", type=int, default=4, help="nearest-neighbour upscaling of the panels")
    p.add_argument("--figure", type=Path, required=True, help="output PNG")
    p.add_argument("--table", type=Path, default=None, help="also write the markdown table here")
    return p.parse_args(argv)


def consistencies(x: np.ndarray, y: torch.Tensor, crop: LenslessOperator, circ: LenslessOperator
                  ) -> tuple[float, float, np.ndarray]:
    """``(crop, circular, |A x̂ − y| under the image's own operator)`` for a ``(C, H, W)`` reconstruction."""
    xt = torch.from_numpy(x)[None].to(torch.float64)
    yc = y.to(torch.float64).repeat(1, xt.shape[1] // y.shape[1], 1, 1)
    on_grid = tuple(xt.shape[-2:]) == crop.scene_shape
    x_crop = xt if on_grid else center_pad(xt, crop.scene_shape)
    x_circ = center_crop(xt, circ.scene_shape) if on_grid else xt
    with torch.no_grad():
        c_crop = float(crop.consistency(x_crop, yc)[0])
        c_circ = float(circ.consistency(x_circ, yc)[0])
        own = crop if on_grid else circ
        resid = (own.A(x_crop if on_grid else x_circ) - yc).abs().mean(dim=1)[0].numpy()
    return c_crop, c_circ, resid


def panel(img: np.ndarray, title: str, scale: int) -> np.ndarray:
    """8-bit RGB panel ``(H·scale + 22, W·scale, 3)`` with a title bar."""
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    big = cv2.resize(img, (img.shape[1] * scale, img.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
    bar = np.full((22, big.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, title.replace("λ", "lam"), (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, big], axis=0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common = {"background": "corner", "downsample": args.downsample}
    psf = load_psf(args.psf, normalization="sum", **common)
    y_np = load_psf(args.capture, normalization="max", **common)
    sensor = tuple(y_np.shape[-2:])
    y = torch.from_numpy(y_np)[None]
    crop = LenslessOperator(psf, sensor, "crop", lam=1e-4)
    student_cfg = json.loads((args.hand / "student" / "recon.json").read_text())
    lam_s = float(student_cfg["physics"]["lam"])
    circ = LenslessOperator(psf, sensor, "circular", lam=lam_s)

    recons = {m: np.load(args.hand / m / f"{SAMPLE}.npy") for m, _ in METHODS}
    with torch.no_grad():
        recons["adagger"] = circ.A_dagger(y.to(torch.float64))[0].float().numpy()
    names = dict(METHODS, adagger=f"A†y (circular Wiener, λ={lam_s:g})")
    rows, resid = [], {}
    for m in ("wiener", "admm", "adagger", "student"):
        c_crop, c_circ, r = consistencies(recons[m], y, crop, circ)
        resid[m] = r
        seconds = None
        if m != "adagger":
            rec = json.loads((args.hand / m / "recon.json").read_text())["images"][SAMPLE]
            seconds = rec["seconds"]
        rows.append((names[m], recons[m].shape, c_crop, c_circ, seconds))

    lines = ["| method | output grid | consistency, crop model | consistency, circular (sensor size) | seconds |",
             "|---|---|---|---|---|"]
    for name, shape, c_crop, c_circ, sec in rows:
        grid = f"{shape[0]}×{shape[1]}×{shape[2]}"
        lines.append(f"| {name} | {grid} | {c_crop:.5f} | {c_circ:.5f} | {'–' if sec is None else f'{sec:.3f}'} |")
    table = "\n".join(lines)
    print(table)
    if args.table:
        atomic_write_text(args.table, table + "\n")

    s = args.upscale
    top = [panel(to_png8(y_np, normalize_max=True), f"raw capture x{args.downsample} {sensor[0]}x{sensor[1]}", s)]
    for m, title in METHODS:
        view = center_crop(torch.from_numpy(recons[m]), sensor).numpy()
        img = to_png8(view, normalize_max=True)
        if m == "student" and args.support[0] > 0:
            sh, sw = args.support[0], args.support[-1]
            r0, c0 = (sensor[0] - sh) // 2, (sensor[1] - sw) // 2
            img = np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img.copy()
            big = panel(img, title + f" (window {sh}x{sw})", s)
            cv2.rectangle(big, (c0 * s, 22 + r0 * s), ((c0 + sw) * s - 1, 22 + (r0 + sh) * s - 1), (255, 200, 0), 1)
            top.append(big)
        else:
            top.append(panel(img, title, s))
    vmax = max(float(r.max()) for m, r in resid.items() if m != "adagger")
    bottom = [panel(np.zeros(sensor, np.uint8), f"|Ax-y|, common scale 0..{vmax:.3f}", s)]
    for m, _title in METHODS:
        r = resid[m]
        if r.shape != sensor:
            r = center_crop(torch.from_numpy(r), sensor).numpy()
        own = "crop" if m != "student" else "circular"
        bottom.append(panel(np.round(255 * np.clip(r / vmax, 0, 1)).astype(np.uint8), f"|Ax-y| ({own})", s))
    gap = np.full((top[0].shape[0], 6, 3), 255, np.uint8)
    row = lambda ps: np.concatenate([q for p in ps for q in (p, gap)][:-1], axis=1)
    fig = np.concatenate([row(top), np.full((6, row(top).shape[1], 3), 255, np.uint8), row(bottom)], axis=0)
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    write_png(args.figure, fig)
    print(f"figure: {args.figure} ({fig.shape[1]}x{fig.shape[0]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
