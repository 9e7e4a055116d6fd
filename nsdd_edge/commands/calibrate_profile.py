"""``nsdd-edge calibrate --psf-image FILE --captures FOLDER --out DIR``: a camera profile from files.

Runs :func:`nsdd_edge.profile_estimate.profile_from_captures` and writes ``DIR/camera.json``, ``DIR/psf.npy``
and ``DIR/calibration.png`` (the PSF as cut, one capture's ``y``, its Wiener reconstruction under the profile's
operator with the scene window drawn), then prints what it found.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from nsdd_edge.atomic import atomic_write_bytes
from nsdd_edge.camera import ProfileError
from nsdd_edge.preview import to_display


def calibration_picture(psf: np.ndarray, y: np.ndarray, x: np.ndarray, support: tuple[int, int] | None,
                        side: int = 256) -> np.ndarray:
    """PSF | y | reconstruction (support window drawn in red), each resized to ``side`` px, as BGR for OpenCV."""
    import cv2

    tiles = []
    for a, gamma in ((psf, 0.5), (y, 1.0), (x, 1.0)):
        view = to_display(a, autoscale=True, percentile=99.5, gamma=gamma)
        tiles.append(cv2.resize(view, (side, side), interpolation=cv2.INTER_AREA))
    if support is not None:
        H, W = x.shape[-2:]
        h, w = support
        top, left = (H - h) // 2 * side / H, (W - w) // 2 * side / W
        cv2.rectangle(tiles[2], (int(left), int(top)), (int(left + w * side / W) - 1, int(top + h * side / H) - 1),
                      (0, 0, 255), 1)
    gap = np.full((side, 4, 3), 255, np.uint8)
    row = np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1)
    return np.ascontiguousarray(row)


def run(args: argparse.Namespace) -> int:
    import cv2

    from nsdd_edge.optics import WienerFilter
    from nsdd_edge.profile_estimate import profile_from_captures

    prog = "nsdd-edge calibrate"
    out = Path(args.out)
    if out.suffix.lower() == ".npy":
        print(f"{prog}: --out {out}: with --psf-image the output is a profile directory, not a .npy file",
              file=sys.stderr)
        return 2
    black = args.black_level or 0.0
    if black == "corner":
        from nsdd_edge.camera import list_captures
        from nsdd_edge.optics import corner_background, read_array

        try:
            black = float(corner_background(read_array(list_captures(args.captures)[0])).mean())
        except (ProfileError, ValueError) as exc:
            print(f"{prog}: --black-level corner: {exc}", file=sys.stderr)
            return 1
        print(f"{prog}: black level {black:.1f} counts (corner mean of the first capture)", file=sys.stderr)
    try:
        profile, report = profile_from_captures(
            args.psf_image, args.captures, sensor=args.sensor, name=args.name, downsample=args.downsample,
            grayscale=args.grayscale, center=args.psf_center if args.psf_center else "auto",
            dark=args.background, black_level=black,
            progress=lambda m: print(f"{prog}: {m}", file=sys.stderr))
        path = profile.save(out)
    except ProfileError as exc:
        print(f"{prog}: refused: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{prog}: cannot write {out}: {exc}", file=sys.stderr)
        return 1
    first = report["captures"][0]
    y = report["y"][first]
    x = WienerFilter(profile.psf, profile.geometry, profile.lam, profile.projector)(y)
    ok, png = cv2.imencode(".png", calibration_picture(profile.psf, y, x, profile.support.shape if profile.support
                                                       else None))
    if ok:
        atomic_write_bytes(out / "calibration.png", png.tobytes())
    print(f"{prog}: wrote {path} ({len(report['captures'])} captures; sensor {profile.sensor_shape}, "
          f"PSF {tuple(profile.psf.shape[-2:])}, λ {profile.lam:.3g}) and {out / 'calibration.png'}")
    return 0
