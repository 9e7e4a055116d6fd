"""``nsdd-train refine-psf``: the PSF warp (scale = depth, shift, rotation) that best explains real captures.

    nsdd-train refine-psf --profile CAMERA --captures FOLDER|GLOB --out DIR [--scales 0.8:1.4:13]
        [--parameters scale,shift,rotation] [--compare-scale 1.31]

No ground truth: the criterion is the self-consistency of a non-negative reconstruction under the warped
PSF (:mod:`nsdd_edge.refine`). Writes to ``DIR``:

- ``camera.json`` + ``psf.npy``: the refined profile (the warped PSF on the search canvas, its geometry, λ by the
  discrepancy principle again; the recipe records the warp and the profile it came from),
- ``refine.json``: every evaluation, the coarse curve per capture and each capture's own best scale,
- ``refine.png``: the criterion against scale (mean and per capture), and reconstructions of the captures at the
  calibration (θ = identity), at the optimum and at each ``--compare-scale``,
- ``report.md``: the same in words and tables.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from nsdd_edge.atomic import atomic_write_text
from nsdd_edge.camera import CameraProfile, ProfileError, list_captures, load_profile
from nsdd_edge.optics import OpticsError, array_hash, normalize
from nsdd_edge.profile_estimate import reconstruction_lambda, saturation_map
from nsdd_edge.psf_warp import PsfWarp, psf_on_canvas, warp_psf
from nsdd_edge.refine import PARAMETERS, RefineError, RefineResult, SelfConsistency, refine_warp

HELP = "refine the PSF (scale/depth, shift, rotation) from real captures alone; writes a refined camera profile"


def parse_scales(text: str) -> tuple[float, float, int]:
    """``LO:HI:N`` → ``(LO, HI, N)``."""
    try:
        lo, hi, n = text.split(":")
        return float(lo), float(hi), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scales wants LO:HI:N (e.g. 0.8:1.4:13), got {text!r}") from None


def positive_scale(text: str) -> float:
    """``--compare-scale``: a finite scale > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"--compare-scale wants a PSF scale > 0 (e.g. 1.31), got {text!r}")
    return value


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", required=True, type=Path, help="camera profile directory (nsdd-edge calibrate)")
    p.add_argument("--captures", required=True, help="real captures: a folder or a glob")
    p.add_argument("--out", required=True, type=Path, help="output directory (refined profile and report)")
    p.add_argument("--scales", type=parse_scales, default=(0.8, 1.4, 13),
                   help="coarse geometric grid of PSF scales LO:HI:N (default 0.8:1.4:13)")
    p.add_argument("--parameters", default="scale,shift,rotation",
                   help=f"what to refine after the coarse scale search, from {','.join(PARAMETERS)}")
    p.add_argument("--iters", type=int, default=150, help="FISTA iterations per criterion evaluation (default 150)")
    p.add_argument("--rounds", type=int, default=3, help="finite-difference refinement rounds (default 3)")
    p.add_argument("--max-captures", type=int, default=4,
                   help="captures used by the criterion (the first N; default 4); all are reconstructed")
    p.add_argument("--compare-scale", type=positive_scale, action="append", default=[],
                   help="also reconstruct at this scale for the pictures (repeatable, e.g. a lab's hand-picked 1.31)")
    p.add_argument("--recon-iters", type=int, default=300, help="FISTA iterations of the pictures (default 300)")
    p.add_argument("--keep-saturated", action="store_true",
                   help="score saturated pixels too (default: pixels of y that a saturated raw pixel reaches are left "
                        "out of the data term, per channel; a clipped pixel is not A x)")


def best_scale_per_capture(curve) -> list[float]:
    """Each capture's own best scale on the coarse curve (a parabola in log-scale through its best three)."""
    from nsdd_edge.refine import _parabola_vertex

    scales = np.array([e.warp.scale for e in curve])
    table = np.array([e.per_capture for e in curve])  # (scales, captures)
    best = []
    for values in table.T:
        k = int(np.argmin(values))
        s = float(scales[k])
        if 0 < k < len(scales) - 1:
            v = _parabola_vertex(np.log(scales[k - 1 : k + 2]), values[k - 1 : k + 2])
            if v is not None:
                s = float(math.exp(v))
        best.append(s)
    return best


def refined_profile(profile: CameraProfile, crit: SelfConsistency, result: RefineResult, ys: list[np.ndarray],
                    source: Path) -> CameraProfile:
    """The profile with the warped PSF (unit sum) on the search canvas and geometry, and λ again by discrepancy."""
    # a per-channel PSF: each channel on the search canvas, warped the same way
    psf = normalize(warp_psf(psf_on_canvas(profile.psf, crit.psf.shape[-2:]), result.warp), "sum")
    lam, lam_rule, _sigma = reconstruction_lambda(psf, crit.geometry, ys, profile.noise)
    recipe = dict(profile.psf_recipe)
    recipe["refined"] = {"warp": result.warp.to_dict(), "criterion": result.criterion,
                         "start_criterion": result.start_criterion, "from_profile": str(source),
                         "from_psf_sha256": array_hash(profile.psf), "rule": "nsdd-train refine-psf"}
    support = profile.support
    if support is not None and any(s > g for s, g in zip(support.shape, crit.geometry.scene_shape)):
        support = None
    return CameraProfile(name=profile.name, preprocess=profile.preprocess, psf=psf, geometry=crit.geometry,
                         lam=lam, noise=profile.noise, lam_rule=lam_rule, projector=profile.projector,
                         support=support, signal=profile.signal, psf_recipe=recipe,
                         reference_exposure_us=profile.reference_exposure_us, root=profile.root)


def picture(crit: SelfConsistency, warps: list[tuple[str, PsfWarp]], ys: list[np.ndarray], names: list[str],
            iters: int, out: Path, curve_plot) -> None:
    """``refine.png``: the criterion curve on top, then one row per capture, one column per warp (every pixel used:
    a clipped value still says "at least this bright", and leaving a saturated channel out of a picture leaves its
    colour to chance)."""
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nsdd_edge.optics import center_crop
    from nsdd_edge.preview import to_display

    side = 160
    sensor = crit.geometry.sensor_shape
    rows = []
    for y, name in zip(ys, names):
        tiles = [cv2.resize(to_display(y, autoscale=True), (side, side), interpolation=cv2.INTER_AREA)]
        cv2.putText(tiles[0], Path(name).stem[:24], (3, side - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.36, (0, 0, 0), 2)
        cv2.putText(tiles[0], Path(name).stem[:24], (3, side - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.36, (255, 255, 255), 1)
        for _label, w in warps:
            x = crit.reconstruct(w, ys=np.asarray(y, np.float32), iters=iters)
            view = center_crop(x, tuple(min(s, g) for s, g in zip(sensor, x.shape[-2:])))
            tiles.append(cv2.resize(to_display(view, autoscale=True, percentile=99.5), (side, side),
                                    interpolation=cv2.INTER_AREA))
        rows.append(np.concatenate(tiles, axis=1))
    grid = cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_BGR2RGB)
    fig = plt.figure(figsize=(2.0 * (len(warps) + 1), 2.6 + 2.0 * len(ys)))
    ax = fig.add_axes([0.1, 1 - 2.2 / fig.get_figheight(), 0.85, 1.7 / fig.get_figheight()])
    curve_plot(ax)
    ax2 = fig.add_axes([0.02, 0.01, 0.96, 1 - 3.0 / fig.get_figheight()])
    ax2.imshow(grid)
    ax2.xaxis.tick_top()
    ax2.set_xticks([side * (i + 0.5) for i in range(len(warps) + 1)])
    ax2.set_xticklabels(["y"] + [label for label, _ in warps], fontsize=8)
    ax2.set_yticks([])
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    t0 = time.time()
    try:
        profile = load_profile(args.profile)
        files = list_captures(args.captures)
        if not files:
            raise ProfileError(f"--captures {args.captures}: no captures found")
        ys = [profile.measurement(f) for f in files]
        masks = [None if args.keep_saturated else saturation_map(profile, f) for f in files]
    except (ProfileError, OpticsError) as exc:
        print(f"refine-psf: {exc}", file=sys.stderr)
        return 2
    params = tuple(p.strip() for p in args.parameters.split(",") if p.strip())
    used = ys[: max(1, int(args.max_captures))]
    lo, hi, n = args.scales
    for f, m in zip(files, masks):
        if m is not None:
            print(f"refine-psf: {Path(f).name}: {m.mean():.0%} of its y pixels (channel-wise mean) reached by "
                  f"saturated raw pixels, left out")
    print(f"refine-psf: {len(files)} captures ({len(used)} in the criterion), scales {lo}–{hi} ({n}), "
          f"refining {', '.join(params) or 'nothing'} after the scale search; {args.iters} FISTA iterations each")
    count = [0]

    def progress(e) -> None:
        count[0] += 1
        w = e.warp
        print(f"  [{count[0]:3d} {time.time() - t0:6.1f} s] scale {w.scale:.4f} shift ({w.shift[0]:+.2f}, "
              f"{w.shift[1]:+.2f}) rotation {w.rotation_deg:+.2f}°  c = {e.criterion:.5f}", flush=True)

    try:
        result, crit = refine_warp(profile.psf, profile.geometry, used, scale_range=(lo, hi), n_scales=n,
                                   parameters=params, iters=args.iters, rounds=args.rounds, progress=progress,
                                   excluded=masks[: len(used)])
    except (RefineError, OpticsError) as exc:
        print(f"refine-psf: {exc}", file=sys.stderr)
        return 2
    search_s = time.time() - t0
    names = [Path(f).name for f in files]
    per_capture = dict(zip(names, best_scale_per_capture(result.scale_curve)))
    w = result.warp
    print(f"refine-psf: θ = scale {w.scale:.4f}, shift ({w.shift[0]:+.3f}, {w.shift[1]:+.3f}) px, rotation "
          f"{w.rotation_deg:+.3f}°; c {result.start_criterion:.5f} → {result.criterion:.5f} "
          f"({len(result.evaluations)} evaluations, {search_s:.0f} s)")
    for note in result.notes:
        print(f"refine-psf: note: {note}")

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    refined = refined_profile(profile, crit, result, used, args.profile)
    refined.save(out)
    summary = {"profile": str(args.profile), "captures": [str(f) for f in files], "criterion_captures": len(used),
               "settings": {"scales": [lo, hi, n], "parameters": list(params), "iters": args.iters,
                            "rounds": args.rounds, "saturated_left_out": not args.keep_saturated},
               "saturated_fraction": {Path(f).name: (0.0 if m is None else float(m.mean())) for f, m in zip(files, masks)},
               "result": result.to_dict(), "best_scale_per_capture": per_capture, "search_seconds": search_s,
               "search_geometry": crit.geometry.to_dict(), "refined_lam": refined.lam}
    atomic_write_text(out / "refine.json", json.dumps(summary, indent=2) + "\n")

    warps = [("calibrated", PsfWarp()), (f"optimum ×{w.scale:.3f}", w)]
    warps += [(f"×{s:g}", PsfWarp(float(s), w.shift, w.rotation_deg)) for s in args.compare_scale]
    curve = result.scale_curve

    def curve_plot(ax) -> None:
        s = [e.warp.scale for e in curve]
        table = np.array([e.per_capture for e in curve])
        for j in range(table.shape[1]):
            ax.plot(s, table[:, j] / table[:, j].min(), color="0.7", lw=0.8)
        mean = np.array([e.criterion for e in curve])
        ax.plot(s, mean / mean.min(), "k.-", lw=1.5, label="mean (criterion)")
        ax.axvline(1.0, color="tab:blue", ls=":", label="calibrated ×1")
        ax.axvline(w.scale, color="tab:red", ls="--", label=f"optimum ×{w.scale:.3f}")
        for c in args.compare_scale:
            ax.axvline(c, color="tab:green", ls="-.", label=f"×{c:g}")
        ax.set_xlabel("PSF scale (depth)")
        ax.set_ylabel("c(θ) / min")
        ax.legend(fontsize=7, ncol=2)

    print(f"refine-psf: reconstructing {len(files)} captures at {len(warps)} warps for the picture …", flush=True)
    picture(crit, warps, [np.asarray(y, np.float32) for y in ys], names, args.recon_iters, out / "refine.png",
            curve_plot)
    command = (f"`nsdd-train refine-psf --profile {args.profile} --captures '{args.captures}' --out {out}`"
               f" (scales {lo}–{hi} in {n} steps, refining {', '.join(params)}, {args.iters} FISTA iterations per "
               f"evaluation, {len(used)} captures in the criterion)")
    theta = (f"- **θ**: scale {w.scale:.4f}, shift ({w.shift[0]:+.3f}, {w.shift[1]:+.3f}) px, rotation "
             f"{w.rotation_deg:+.3f}°")
    criterion = (f"- **criterion** c = mean ‖A_θ x̂ − y‖/‖y‖: {result.start_criterion:.5f} at the calibration → "
                 f"{result.criterion:.5f} ({len(result.evaluations)} evaluations, {search_s:.0f} s)")
    lines = [f"# PSF refinement of `{args.profile}`", "", command, "", theta, criterion,
             f"- refined λ {refined.lam:.3g} ({refined.lam_rule})", ""]
    lines += [f"- note: {note}" for note in result.notes]
    lines += ["", "| scale | c (mean) | " + " | ".join(names[: len(used)]) + " |",
              "|---|---|" + "---|" * len(used)]
    for e in curve:
        lines.append(f"| {e.warp.scale:.3f} | {e.criterion:.5f} | " + " | ".join(f"{v:.5f}" for v in e.per_capture)
                     + " |")
    lines += ["", "Each capture's own best scale on the coarse curve:", ""]
    lines += [f"- `{k}`: ×{v:.3f}" for k, v in list(per_capture.items())[: len(used)]]
    lines += ["", "![refine](refine.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    print(f"refine-psf: wrote {out}/camera.json, psf.npy, refine.json, refine.png, report.md "
          f"({time.time() - t0:.0f} s)")
    return 0
