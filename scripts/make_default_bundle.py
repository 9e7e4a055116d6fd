#!/usr/bin/env python3
"""Build ``nsdd_edge/assets/default_bundle``: the bundle ``nsdd-edge run`` uses when given no ``--model``.

A Wiener-only bundle (no network) for a simulated contour PSF (PhlatCam-like, ``simulate_psf('contour',
128×128, seed 0)``), circular model at 128×128, 3 channels, and preprocessing that matches the ``sim://``
camera's raw counts (taken from ``SimCamera.matching_preprocess()``). λ is chosen from a grid by the mean
PSNR of the Wiener reconstruction against the simulated scenes of a few ``sim://`` frames (noise and shot
noise as the camera makes them); the table is printed and recorded in the bundle's provenance.

It is replaced by a trained student's bundle (``nsdd-export bundle``) once one exists.

    python scripts/make_default_bundle.py [--out nsdd_edge/assets/default_bundle] [--size 128] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from nsdd_edge.bundle import PreprocessConfig, write_bundle
from nsdd_edge.optics import LenslessGeometry, WienerFilter
from nsdd_edge.preprocess import Preprocessor
from nsdd_edge.psf_sim import simulate_psf
from nsdd_edge.sources import open_source

ROOT = Path(__file__).resolve().parents[1]
LAM_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def psnr(x: np.ndarray, ref: np.ndarray) -> float:
    """``10 log10(1 / mean((clip(x) − ref)²))`` for images in [0, 1]."""
    mse = float(np.mean((np.clip(x, 0, 1) - ref) ** 2))
    return 10 * np.log10(1.0 / max(mse, 1e-12))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "nsdd_edge/assets/default_bundle")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--frames", type=int, default=6, help="sim frames used to choose λ")
    args = ap.parse_args(argv)

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
