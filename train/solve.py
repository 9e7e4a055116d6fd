"""``nsdd-train solve``: reconstruct a dataset split or a real capture with any registered method.

Two inputs, one output format (``ID.npy`` float32 ``(C, H, W)``, ``ID.png`` 8-bit view, ``recon.json``):

- ``--data DIR [--split test] [--limit N]``: a dataset of :mod:`train.data`; the operator is the dataset's
  ``recon`` setting (``--model``/``--lam`` override it).
- ``--capture FILE|FOLDER|GLOB --profile DIR``: real captures through a camera profile (``nsdd-edge
  calibrate``): the runtime's preprocessing (full-resolution crop, binning, fixed scale, exposure
  normalisation), the profile's PSF, forward operator, λ and noise model.
- ``--capture … --psf FILE``: without a profile, PSF and captures go through the same loader,
  :func:`nsdd_edge.optics.load_psf` (dark frame or DiffuserCam corner background → box downsample →
  normalise: the PSF to unit sum, each capture to unit max). Default model ``crop`` with
  scene = conv = 2× sensor (DiffuserCam) and λ = 1e-4 (the prototype value); for ``student:DIR`` the
  operator the student was trained for (its geometry and λ, from its config.json).
  Output names are the capture stems (``PARENT__STEM`` where stems collide); the diffusion solvers assume
  the noise σ of ``--noise-std``, the profile, or an estimate from the captures.

``--method student:DIR`` runs a student directory of ``nsdd-train distill`` (= ``--method student --set
path=DIR``); it refuses a PSF (after the preprocessing above) or geometry other than its own.

Each image's measurement consistency ``‖A x̂ − y‖ / ‖y‖`` is printed and stored in recon.json. Outputs
already in ``--out`` from the same method and settings are kept (an interrupted run resumes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from nsdd_edge.atomic import atomic_save_npy, atomic_write_bytes, atomic_write_text
from nsdd_edge.optics import OpticsError, array_hash, fit_to, load_psf
from train.data import DatasetError, LenslessDataset
from train.physics import LenslessOperator
from train.solvers import SOLVERS, make_solver
from train.students import StudentError

HELP = "reconstruct a dataset split or a real capture with a registered method (wiener, admm, ddnm, ...)"


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True,
                   help=f"registered method (now: {', '.join(sorted(SOLVERS))}, ...) or student:DIR")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="method setting (repeatable), e.g. --set iters=200 --set tau=1e-4")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="dataset directory (nsdd-train simulate)")
    src.add_argument("--capture", help="raw capture: a file (.npy/.npz/.png/.tif), a folder of them, or a quoted glob")
    p.add_argument("--split", default="test", help="dataset split ('all' for every sample)")
    p.add_argument("--limit", type=int, default=None, help="reconstruct only the first N samples")
    p.add_argument("--psf", type=Path, help="PSF file for --capture (without --profile)")
    p.add_argument("--profile", type=Path, default=None,
                   help="camera profile (nsdd-edge calibrate) for --capture: its preprocessing, PSF, operator, λ and "
                        "noise model")
    p.add_argument("--noise-std", type=float, default=None,
                   help="noise σ of the captures in y units for the diffusion solvers (default: the profile's noise "
                        "model, else estimated from the captures)")
    p.add_argument("--dark", type=Path, default=None, help="dark frame subtracted from PSF and capture")
    p.add_argument("--background", choices=("corner", "none"), default=None,
                   help="background subtraction without a dark frame (unset: corner for --capture)")
    p.add_argument("--downsample", type=int, default=4, help="box-downsample factor of PSF and capture")
    p.add_argument("--model", choices=("crop", "circular"), default=None,
                   help="operator model (unset: the dataset's recon model; crop for --capture)")
    p.add_argument("--lam", type=float, default=None, help="Wiener λ (unset: the dataset's; 1e-4 for --capture)")
    p.add_argument("--prior", type=Path, default=None, help="diffusion prior directory (passed as prior=)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="images per solver call; 1 times every image alone after a warm-up call (the timing protocol "
                        "evaluate shows), larger sizes record batch-amortised times that evaluate does not show")
    p.add_argument("--device", default="cpu", help="torch device for the solver (cpu, cuda, cuda:1, ...)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (unset: torch's choice; 1 is fastest on a busy machine)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="recompute outputs that already exist")


def parse_settings(items: list[str]) -> dict:
    """``["iters=200", "tau=1e-4", "clip=true", "mode=fast"]`` → ``{iters: 200, tau: 1e-4, clip: True, ...}``."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        low = raw.strip().lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        elif low in ("none", "null"):
            out[key] = None
        else:
            try:
                out[key] = json.loads(raw)
            except json.JSONDecodeError:
                out[key] = raw
    return out


def build_solver(method: str, settings: dict, prior_dir: Path | None, device: str = "cpu"):
    """``make_solver(method, **settings, prior=load_prior(prior_dir))`` with clear errors;
    ``student:DIR`` is ``make_solver("student", path=DIR)``."""
    kwargs = dict(settings)
    if method.startswith("student:"):
        method, kwargs["path"] = "student", method.split(":", 1)[1]
        kwargs.setdefault("device", device)
    if prior_dir is not None:
        from train.prior.io import load_prior  # lazy: diffusion priors are optional for classical methods

        kwargs["prior"] = load_prior(prior_dir)
    try:
        return make_solver(method, **kwargs)
    except StudentError as exc:
        raise ValueError(f"--method {method}: {exc}") from None
    except TypeError as exc:
        raise ValueError(f"--method {method}: bad settings {sorted(kwargs)} ({exc})") from None


def to_png8(x: np.ndarray, *, normalize_max: bool = False) -> np.ndarray:
    """8-bit HWC (RGB order) view of a ``(C, H, W)`` image: clipped to [0, 1] (after ``x / max x``)."""
    x = np.asarray(x, dtype=np.float32)
    if normalize_max:
        m = float(x.max())
        x = x / m if m > 0 else x
    x = np.clip(np.nan_to_num(x, nan=0.0), 0.0, 1.0)
    img = np.round(np.moveaxis(x, 0, -1) * 255.0).astype(np.uint8)
    return img[..., 0] if img.shape[-1] == 1 else img


def write_png(path: Path, img8: np.ndarray) -> None:
    bgr = img8 if img8.ndim == 2 else np.ascontiguousarray(img8[..., ::-1])
    ok, buf = cv2.imencode(".png", bgr)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    atomic_write_bytes(path, buf.tobytes())


def capture_ids(files: list[Path]) -> list[str]:
    """Output names for capture files: the file stem, or ``PARENT__STEM`` where stems collide (captures with
    the same name in different folders never overwrite each other)."""
    stems = [f.stem for f in files]
    ids = [f"{f.parent.name}__{f.stem}" if stems.count(f.stem) > 1 else f.stem for f in files]
    if len(set(ids)) != len(ids):  # same parent names too: fall back to numbered names
        ids = [f"{k:04d}__{f.stem}" for k, f in enumerate(files)]
    return ids


def load_capture(args: argparse.Namespace, trained_for: dict | None = None
                 ) -> tuple[list[str], torch.Tensor, LenslessOperator, dict]:
    """Measurements ``y`` of ``--capture`` (a file, folder or glob) and the operator to reconstruct them with.

    With ``--profile``: the camera profile's preprocessing (the runtime's code path, exposure-normalised), its
    PSF, forward geometry, λ and noise model. Without: ``--psf`` and the captures through the same loader
    (dark frame or background, box downsample; the PSF to unit sum, each capture to unit max), the crop
    model with scene = conv = 2× sensor. ``trained_for``: a student's config; its geometry and λ are used
    when they fit. The noise σ the diffusion solvers assume: ``--noise-std``, else the profile's model at the
    captures' median level, else an estimate from the captures themselves (Immerkær; no ground truth)."""
    from nsdd_edge.camera import ProfileError, list_captures, load_profile, noise_std_immerkaer

    try:
        files = list_captures(args.capture)
    except ProfileError as exc:
        raise OpticsError(f"--capture {exc}") from None
    ids = capture_ids(files)
    if args.profile is not None:
        if args.psf is not None or args.dark is not None or args.background is not None:
            raise OpticsError("--profile brings its own PSF, dark frame and background; drop --psf/--dark/--background")
        try:
            profile = load_profile(args.profile)
            ys = [profile.measurement(f) for f in files]
        except ProfileError as exc:
            raise OpticsError(f"--profile {exc}") from None
        psf, g = profile.psf, profile.geometry
        sigma = float(np.median([profile.noise.std(np.median(y)) for y in ys]))
        lam = profile.lam if args.lam is None else args.lam
        projector = profile.projector  # the camera's A† (cg where its PSF is larger than the sensor)
        info = {"profile": str(args.profile), "profile_name": profile.name, "psf_sha256": array_hash(psf),
                "noise_rule": "camera profile"}
        geometry = (g.model, g.sensor_shape, g.scene_shape, g.conv_shape)
    else:
        if args.psf is None:
            raise OpticsError("--capture needs --psf FILE or --profile DIR")
        projector = "tikhonov"
        background = args.background or ("none" if args.dark is not None else "corner")
        common = {"dark": args.dark, "background": background, "downsample": args.downsample}
        try:
            psf = load_psf(args.psf, normalization="sum", **common)
        except OpticsError as exc:
            raise OpticsError(f"--psf {exc}") from None
        ys = []
        for f in files:
            try:
                ys.append(load_psf(f, normalization="max", **common))  # the PSF's code path, unit max
            except OpticsError as exc:
                if "all zero" in str(exc):
                    raise OpticsError(f"--capture {f}: the capture is all zero after background subtraction "
                                      f"({'dark frame' if args.dark else background})") from None
                raise OpticsError(f"--capture {exc}") from None
        sigma = float(np.median([noise_std_immerkaer(y) for y in ys]))
        lam = 1e-4 if args.lam is None else args.lam
        info = {"psf": str(args.psf), "psf_sha256": array_hash(psf), "dark": str(args.dark) if args.dark else None,
                "background": background, "downsample": args.downsample,
                "normalization": {"psf": "sum", "capture": "max"}, "noise_rule": "Immerkær estimate on the captures"}
        sensor = tuple(ys[0].shape[-2:])
        model = args.model or "crop"
        geometry = (model, sensor, None, None)
    for f, y in zip(files, ys):
        if y.shape != ys[0].shape:
            raise OpticsError(f"--capture {f}: y is {tuple(y.shape)}, {files[0]} gave {tuple(ys[0].shape)}; "
                              "captures of one run must come from the same camera settings")
        if psf.shape[0] == 3 and y.shape[0] == 1:
            raise OpticsError(f"--capture {f}: grayscale capture but an RGB PSF")
    sensor = tuple(ys[0].shape[-2:])
    if args.profile is None and psf.shape[-2:] != sensor:
        raise OpticsError(f"--capture {files[0]}: size {sensor} differs from --psf {args.psf} {psf.shape[-2:]} "
                          f"(after downsample ×{args.downsample}); they must come from the same sensor")
    noise = float(args.noise_std) if args.noise_std is not None else sigma
    geo = (trained_for or {}).get("geometry")
    if geo and args.model in (None, geo["model"]) and tuple(geo["sensor_shape"]) == sensor:
        lam = float(trained_for.get("lam", lam)) if args.lam is None else args.lam
        op = LenslessOperator(psf, sensor, geo["model"], lam=lam, scene_shape=geo["scene_shape"],
                              conv_shape=geo["conv_shape"], noise_std=noise,
                              projector=trained_for.get("projector", "tikhonov"))
    else:
        model, _, scene, conv = geometry
        if args.model is not None and args.profile is not None and args.model != model:
            scene = conv = None
            model = args.model
        if model == "crop":  # profile: its grids; else scene = conv = 2× sensor (DiffuserCam)
            op = LenslessOperator(psf, sensor, "crop", lam=lam, scene_shape=scene, conv_shape=conv, noise_std=noise,
                                  projector=projector)
        else:
            op = LenslessOperator(psf if psf.shape[-2] <= sensor[0] and psf.shape[-1] <= sensor[1]
                                  else fit_to(psf, sensor) / fit_to(psf, sensor).sum(), sensor, "circular", lam=lam,
                                  noise_std=noise)
    info.update(capture=[str(f) for f in files], noise_std=noise, lam=op.lam)
    return ids, torch.from_numpy(np.stack(ys)), op, info


def solve(args: argparse.Namespace) -> dict:
    settings = parse_settings(args.settings)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    solver = build_solver(args.method, settings, args.prior, args.device)
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "recon.json").exists():
        raise ValueError(f"--out {out}: directory is not empty and holds no recon.json; refusing to write "
                         "into it (choose an empty or new directory)")
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "recon.json"
    record = {"method": args.method, "settings": {**solver.settings(), **{k: v for k, v in settings.items()
                                                                         if isinstance(v, (int, float, str, bool))}},
              "prior": str(args.prior) if args.prior else None, "images": {}}
    timing = {"protocol": "batch-1" if args.batch_size == 1 else "batch-amortised", "batch_size": args.batch_size,
              "warmup": True, "threads": torch.get_num_threads(), "device": str(args.device)}

    if args.capture is not None:
        ids, y_all, physics, source = load_capture(args, getattr(solver, "config", None))
        want = int(getattr(solver, "config", {}).get("channels") or y_all.shape[1])
        if y_all.shape[1] == 1 and want > 1 and physics.channels == 1:
            # a monochrome capture through a PSF shared by all channels is the measurement of the grey scene
            # (R = G = B): every channel of a colour model sees the same y
            y_all = y_all.repeat(1, want, 1, 1)
            source["capture_channels_repeated"] = want
        measurements = {i: y_all[k : k + 1] for k, i in enumerate(ids)}
        real = True
    else:
        if args.psf is not None or args.dark is not None:
            raise ValueError("--psf/--dark belong to --capture; a dataset has its own PSF")
        ds = LenslessDataset(args.data)
        physics = ds.physics(model=args.model, lam=args.lam)
        ids = ds.ids(args.split)
        if args.limit is not None:
            ids = ids[: args.limit]
        if not ids:
            raise DatasetError(f"--data {args.data}: split {args.split!r} is empty")
        measurements = None
        source = {"data": str(args.data), "split": args.split, "psf_sha256": ds.meta.get("psf", {}).get("sha256")}
        real = False
    try:
        device = torch.device(args.device)
        physics = physics.to(device)
        for movable in (solver, getattr(solver, "prior", None)):
            if hasattr(movable, "to"):
                movable.to(device)
    except (RuntimeError, AssertionError) as exc:  # e.g. CUDA requested on a machine without it
        raise ValueError(f"--device {args.device}: {exc}") from None
    g = physics.geometry
    record.update(source=source, physics={**g.to_dict(), "lam": physics.lam})
    record = json.loads(json.dumps(record, default=str))  # JSON-normalised, comparable with a stored one

    if record_path.exists() and not args.overwrite:
        try:
            old = json.loads(record_path.read_text())
        except json.JSONDecodeError:
            old = {}
        same = all(old.get(k) == record[k] for k in ("method", "settings", "prior", "source", "physics"))
        if same:
            record["images"] = {i: v for i, v in old.get("images", {}).items() if (out / f"{i}.npy").exists()}
        elif old:
            raise ValueError(f"--out {out}: holds reconstructions with other method/settings/data "
                             "(recon.json differs); use another --out or --overwrite")
    todo = [i for i in ids if i not in record["images"]]
    if len(todo) < len(ids):
        print(f"resuming: {len(ids) - len(todo)} of {len(ids)} already in {out}")

    def batches():
        for k in range(0, len(todo), args.batch_size):
            chunk = todo[k : k + args.batch_size]
            if measurements is not None:
                yield chunk, torch.cat([measurements[i] for i in chunk])
            else:
                yield chunk, ds.measurements(chunk)

    if todo:  # the timing protocol: one untimed warm-up call (lazy initialisation, allocator, caches)
        y0 = measurements[todo[0]] if measurements is not None else ds.measurements(todo[:1])
        with torch.no_grad():
            solver(y0.to(device), physics)
    record["timing"] = timing
    bar = tqdm(batches(), total=-(-len(todo) // args.batch_size), desc=args.method, unit="batch",
               file=sys.stderr, disable=len(todo) <= args.batch_size)
    for chunk, y in bar:
        t0 = time.perf_counter()
        y = y.to(device)
        x_hat = solver(y, physics)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        x_hat = x_hat.detach()
        with torch.no_grad():
            cons = physics.consistency(x_hat.to(y.dtype), y).tolist()
        for i, x, c in zip(chunk, x_hat.float().cpu().numpy(), cons):
            atomic_save_npy(out / f"{i}.npy", np.ascontiguousarray(x, dtype=np.float32))
            write_png(out / f"{i}.png", to_png8(x, normalize_max=real))
            record["images"][i] = {"consistency": float(c), "seconds": seconds / len(chunk),
                                   "nfe": int(getattr(solver, "nfe", 0))}
        bar.set_postfix(consistency=f"{float(np.mean(cons)):.4f}")
        atomic_write_text(record_path, json.dumps(record, indent=2))
    record["images"] = {i: record["images"][i] for i in ids}
    cons = [v["consistency"] for v in record["images"].values()]
    record["summary"] = {"n": len(cons), "mean_consistency": float(np.mean(cons)),
                         "mean_seconds": float(np.mean([v["seconds"] for v in record["images"].values()]))}
    atomic_write_text(record_path, json.dumps(record, indent=2))
    return record


def main(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    try:
        record = solve(args)
    except (OpticsError, DatasetError, ValueError) as exc:
        print(f"nsdd-train solve: error: {exc}", file=sys.stderr)
        return 2
    for i, v in record["images"].items():
        print(f"{i}\tconsistency ‖Ax̂−y‖/‖y‖ = {v['consistency']:.5f}\t{v['seconds']:.3f} s")
    s = record["summary"]
    print(f"{args.method}: {s['n']} images → {args.out}; mean consistency {s['mean_consistency']:.5f}, "
          f"{s['mean_seconds']:.3f} s/image")
    return 0
