"""How exact is the ``cg`` pseudo-inverse in float32? (docs/real-cameras.md, issue 12)

The real cameras' A† is 20 conjugate-gradient steps on ``(AᵀA + λI) x = Aᵀy`` at λ ≈ 2e-7. The PSF sums to 1, so
``‖AᵀA‖ ≤ 1`` and the condition number of ``AᵀA + λI`` can reach ``1/λ`` ≈ 4–6·10⁶: float32 rounding (~6e-8) is
then amplified in the weakly measured directions.
For every capture this prints, per method and step count, the consistency ‖A x − y‖/‖y‖ (under the float64
forward model) and the distance ‖x − x₆₄‖/‖x₆₄‖ to the same number of steps in float64:

- ``numpy float64``: :func:`nsdd_edge.optics.cg_tikhonov` on a float64 :class:`~nsdd_edge.optics.ForwardModel`
  (the reference);
- ``numpy float32``: the same function as the runtime calls it;
- ``torch float32, N threads``: ``LenslessOperator.A_dagger`` as training, the teacher and ``fit``'s report
  compute it, with ``torch.set_num_threads(N)``.

    python bench/bench_cg_precision.py --profile runs/real_v2/diffusercam_150 --captures runs/diffusercam/hand \
        --student runs/fit/diffusercam_fold/student3

λ and the grids are the student's (``--student``; its ``config.json``), else the profile's. Prints a markdown
table. Deterministic for a given machine and thread count; the thread counts are the point.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from nsdd_edge.camera import list_captures, load_profile
from nsdd_edge.optics import ForwardModel, LenslessGeometry, cg_tikhonov


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", type=Path, required=True, help="camera profile directory (camera.json)")
    p.add_argument("--captures", required=True, help="a capture file, a folder or a glob")
    p.add_argument("--student", type=Path, default=None, help="take λ and the scene/convolution grids from this "
                                                               "student's config.json (default: the profile's)")
    p.add_argument("--iters", type=int, nargs="+", default=[20], help="cg step counts (default: 20, the runtime's)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts")
    args = p.parse_args()

    from train.physics import LenslessOperator

    profile = load_profile(args.profile)
    g = profile.geometry
    lam, scene, conv = profile.lam, g.scene_shape, g.conv_shape
    if args.student is not None:
        cfg = json.loads((args.student / "config.json").read_text())
        lam, scene, conv = float(cfg["lam"]), tuple(cfg["scene_shape"]), tuple(cfg["geometry"]["conv_shape"])
    geometry = LenslessGeometry.make("crop", g.sensor_shape, profile.psf.shape[-2:], scene, conv)
    A64, A32 = ForwardModel(profile.psf, geometry, np.float64), ForwardModel(profile.psf, geometry)
    op = LenslessOperator(profile.psf, g.sensor_shape, "crop", lam=lam, scene_shape=scene, conv_shape=conv,
                          projector="cg")  # the thread count changes how it sums, not what it holds

    print(f"# cg precision: {profile.name}, λ {lam:.3g}, scene {scene[0]}x{scene[1]}, conv {conv[0]}x{conv[1]}\n")
    print("| capture | method | steps | ‖Ax − y‖/‖y‖ | ‖x − x₆₄‖/‖x₆₄‖ |")
    print("|---|---|---:|---:|---:|")
    for path in list_captures(args.captures):
        y = profile.measurement(path).astype(np.float64)
        for iters in args.iters:
            x64 = cg_tikhonov(A64, y, lam, iters)
            runs = {"numpy float64": x64, "numpy float32": cg_tikhonov(A32, y, lam, iters).astype(np.float64)}
            for n in args.threads:
                torch.set_num_threads(n)
                with torch.no_grad():
                    x = op.normal_cg(op.A_adjoint(torch.from_numpy(y.astype(np.float32))[None]), lam, iters)
                runs[f"torch float32, {n} thread{'s' if n > 1 else ''}"] = x[0].double().numpy()
            for name, x in runs.items():
                distance = np.linalg.norm(x - x64) / max(np.linalg.norm(x64), 1e-30)
                print(f"| {path.name} | {name} | {iters} | {A64.consistency(x, y):.5f} | {distance:.4f} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
