"""``nsdd-train simulate``: a lensless dataset from a folder of images and a PSF (the NSDD authors' recipe).

Each scene is centre-cropped to a square, resized to ``--size`` (``cv2.INTER_AREA``) and scaled to [0, 1];
the measurement is the crop model of :class:`train.physics.LenslessOperator` — the scene zero-padded
to a convolution grid of 2× the sensor (+1 px on an axis with an odd sensor and an even scene, so that
the scene lands centred on the sensor: :func:`centred_conv_shape`), convolved by FFT with the unit-sum
PSF, centre-cropped to the sensor (= the PSF's size unless ``--sensor``) — plus Gaussian noise::

    y = clip(C F⁻¹[H · F(P x)] + n, 0, 1),   n ~ N(0, σ²), σ = --noise-std (on the [0, 1] scale)

The clip to [0, 1] is what the paper's simulation does (a sensor saturates and has no negative counts);
it biases the noise slightly at dark pixels. The noise of image number ``i`` (its index in the sorted file
list) is drawn from ``torch.Generator().manual_seed(seed + i)``, so the output is byte-identical for the
same arguments, and resuming an interrupted run (same ``--out``) gives the same files as an uninterrupted one.
Reconstruction operators read the ``recon`` settings of dataset.json: ``{model: circular, lam}`` at sensor
size by default, as the NSDD authors do; ``--recon-model crop`` reconstructs with the crop model itself, on
the 2× grid (``--recon-support grid``) or on the known ``--size``² scene support (``scene``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from nsdd_edge.atomic import atomic_save_npy, atomic_write_text
from nsdd_edge.cli_common import add_threads_argument
from nsdd_edge.optics import (
    IMAGE_SUFFIXES,
    LenslessGeometry,
    OpticsError,
    array_hash,
    load_psf,
    read_image01,
)
from train.physics import LenslessOperator, center_pad
from train.threads import torch_threads

HELP = "simulate a lensless dataset (y = crop(PSF * pad(x)) + noise) from a folder of images"

FORMAT = "nsdd-lensless-dataset"
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as cv2.COLOR_RGB2GRAY


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, type=Path, help="folder of scene images (png/jpg/tif/bmp)")
    p.add_argument("--psf", type=Path, default=None, help="PSF file (.npy/.npz/.png/.tif), normalised to sum 1 "
                                                          "(or --profile)")
    p.add_argument("--out", required=True, type=Path, help="output dataset directory")
    p.add_argument("--size", type=int, default=128, help="scene size (square) in pixels")
    p.add_argument("--sensor", type=int, nargs="+", default=None, metavar="N",
                   help="sensor size H [W] (unset: the PSF's size after --psf-downsample)")
    p.add_argument("--psf-downsample", type=int, default=1, help="box-downsample the PSF by this factor")
    p.add_argument("--psf-background", choices=("none", "corner"), default="none",
                   help="subtract a background from the PSF before downsampling (corner: the DiffuserCam corner "
                        "mean, as nsdd-train solve --capture does for a real PSF and capture)")
    p.add_argument("--noise-std", type=float, default=0.005, help="Gaussian noise std on the [0, 1] scale")
    p.add_argument("--profile", type=Path, default=None,
                   help="camera profile (nsdd-edge calibrate): its PSF, sensor and Poisson–Gaussian noise model, and "
                        "scenes scaled so the simulated y's 99th percentile matches the real captures' (replaces "
                        "--psf, --psf-downsample, --sensor and --noise-std); the match is printed and recorded")
    p.add_argument("--seed", type=int, default=0, help="noise seed (image i uses seed + i) and split seed")
    p.add_argument("--model", choices=("crop", "circular"), default="crop",
                   help="forward model that makes y (crop: the paper's; circular: scene padded to the sensor)")
    p.add_argument("--recon-model", choices=("circular", "crop"), default="circular",
                   help="operator the reconstruction methods use (recon.model in dataset.json)")
    p.add_argument("--recon-support", choices=("grid", "scene"), default="grid",
                   help="crop recon model only: reconstruct on the whole 2× convolution grid (grid: DiffuserCam "
                        "convention, the scene's extent unknown) or on the known scene support (scene: --size², "
                        "centred, as the scenes were simulated)")
    p.add_argument("--lam", type=float, default=1e-6, help="Wiener λ of the reconstruction operator")
    p.add_argument("--grayscale", action="store_true", help="one-channel scenes (BT.601 luma) and PSF")
    p.add_argument("--limit", type=int, default=None, help="use only the first N image files (sorted)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--test-fraction", type=float, default=0.1,
                       help="fraction of samples in the test split (1: all of them, a held-out set)")
    split.add_argument("--n-test", type=int, default=None, help="number of samples in the test split")
    p.add_argument("--batch-size", type=int, default=32, help="images convolved per batch")
    add_threads_argument(p, "torch CPU threads", "simulate")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a different dataset already in --out, or re-split it with other split options")


# ----------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------


def measurement_noise(y_clean: torch.Tensor, seed: int, index: int) -> torch.Tensor:
    """The standard-normal noise of image number ``index``: ``randn`` from a generator seeded ``seed + index``
    (the same for any batch, and for any PSF that made ``y_clean``)."""
    g = torch.Generator().manual_seed(int(seed) + int(index))
    return torch.randn(y_clean.shape, generator=g, dtype=y_clean.dtype)


def noisy_measurement(y_clean: torch.Tensor, noise_std: float, seed: int, index: int) -> torch.Tensor:
    """``y = clip(A x + σ n, 0, 1)`` for one image, ``n`` = :func:`measurement_noise` (the simulation's rule)."""
    return (y_clean + float(noise_std) * measurement_noise(y_clean, seed, index)).clamp(0.0, 1.0)


def list_images(folder: Path, limit: int | None = None) -> list[Path]:
    """Image files of ``folder`` (non-recursive) in sorted order, at most ``limit``."""
    if not folder.is_dir():
        raise OpticsError(f"--images {folder}: not a directory")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise OpticsError(f"--images {folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files[:limit] if limit is not None else files


def scene_level(captures_p99: float, clean_p99: float) -> float:
    """``L`` that brings a scene's clean measurement to the captures' signal (``p99`` over ``p99``); 1 for a
    black scene (nothing to scale)."""
    return captures_p99 / clean_p99 if clean_p99 > 1e-12 else 1.0


def recover_level(ground_truth: np.ndarray, scene: np.ndarray) -> float:
    """``L`` of a stored ``L·x`` from its [0, 1] scene ``x``: ``Σ L·x / Σ x`` (1 for a black scene)."""
    total = float(scene.sum())
    return float(ground_truth.sum()) / total if total > 1e-12 else 1.0


def prepare_scene(path: Path, size: int, channels: int) -> np.ndarray:
    """Read → centre-crop to a square → resize to ``size`` (INTER_AREA) → ``channels`` → float32 [0, 1]."""
    img = read_image01(path)  # (C, H, W) in [0, 1]
    h, w = img.shape[-2:]
    s = min(h, w)
    r, c = (h - s) // 2, (w - s) // 2
    hwc = np.ascontiguousarray(np.moveaxis(img[:, r : r + s, c : c + s], 0, -1))
    resized = cv2.resize(hwc, (size, size), interpolation=cv2.INTER_AREA)
    if resized.ndim == 2:
        resized = resized[..., None]
    x = np.moveaxis(resized, -1, 0)
    if channels == 1 and x.shape[0] == 3:
        x = np.tensordot(LUMA, x, axes=(0, 0))[None]
    elif channels == 3 and x.shape[0] == 1:
        x = np.repeat(x, 3, axis=0)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def centred_conv_shape(sensor: tuple[int, int], scene: tuple[int, int]) -> tuple[int, int]:
    """The crop model's convolution grid: 2× the sensor, or 2× + 1 on an axis where that is needed for the
    scene to sit on the sensor where :func:`train.physics.center_pad` puts it.

    The scene is centre-padded to the convolution grid and the sensor is its centre crop, so the scene's
    offset on the sensor is ``(N − s) // 2 − (N − S) // 2`` (grid ``N``, sensor ``S``, scene ``s``). Every
    reconstruction at sensor size (the circular operator, the evaluation's centre crop, a student's or a
    prior's support window) expects ``(S − s) // 2``. With ``N = 2S`` the two differ by one pixel when
    ``S`` is odd and ``s`` even (e.g. DiffuserCam ×16: sensor 75, scenes 64); ``N = 2S + 1`` fixes that and
    changes nothing else (the grid still holds the whole linear convolution of scene and PSF).
    """
    def axis(big: int, small: int) -> int:
        if small > big:  # scene larger than the sensor: no sensor-centred placement to match
            return 2 * big
        for n in (2 * big, 2 * big + 1):
            if (n - small) // 2 - (n - big) // 2 == (big - small) // 2:
                return n
        raise AssertionError("unreachable: 2S or 2S + 1 always centres the scene")

    return axis(sensor[0], scene[0]), axis(sensor[1], scene[1])


def split_ids(ids: list[str], seed: int, test_fraction: float, n_test: int | None) -> dict[str, list[str]]:
    """Deterministic train/test split: a seeded permutation, the first ``n_test`` go to ``test``."""
    if n_test is None:
        if not 0.0 <= test_fraction <= 1.0:
            raise ValueError(f"--test-fraction must be in [0, 1], got {test_fraction}")
        n_test = round(test_fraction * len(ids))
        if test_fraction > 0 and len(ids) > 1:
            n_test = max(n_test, 1)
    if not 0 <= n_test <= len(ids):
        raise ValueError(f"--n-test {n_test} is not between 0 and the {len(ids)} samples")
    order = np.random.default_rng(seed).permutation(len(ids))
    test = set(order[:n_test].tolist())
    return {"train": [i for k, i in enumerate(ids) if k not in test],
            "test": [i for k, i in enumerate(ids) if k in test]}


def check_resplit(out: Path, old: dict, args: argparse.Namespace) -> None:
    """Refuse (without ``--overwrite``) to give a finished dataset another train/test split: samples that were
    trained on would move into the test split, and teacher targets and students made from the old split
    would no longer match it."""
    splits = old.get("splits") or {}
    if not old.get("complete") or not splits:
        return
    ids = sorted(i for part in splits.values() for i in part)
    try:
        new = split_ids(ids, args.seed, args.test_fraction, args.n_test)
    except ValueError as exc:
        raise ValueError(f"--out {out}: {exc} (the dataset holds {len(ids)} samples)") from None
    if new == {k: splits.get(k, []) for k in new}:
        return
    moved = len(set(splits.get("train", [])) & set(new["test"]))
    if not args.overwrite:
        raise OpticsError(
            f"--out {out}: already split into train {len(splits.get('train', []))} / test "
            f"{len(splits.get('test', []))}; these split options give train {len(new['train'])} / test "
            f"{len(new['test'])}, moving {moved} training samples into the test split (teacher targets and "
            f"students made from the old split would then be scored on data they saw). Rerun with "
            f"--n-test {len(splits.get('test', []))} to keep it, choose another --out, or pass --overwrite "
            "to re-split")
    print(f"nsdd-train simulate: --overwrite: re-splitting {out}: {moved} training samples move into the test "
          "split; teacher targets and students made from the old split no longer match it", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def simulate(args: argparse.Namespace) -> dict:
    """Write the dataset described by ``args`` (see the module docstring); returns dataset.json's content."""
    if args.size < 2:
        raise ValueError(f"--size must be ≥ 2, got {args.size}")
    if args.noise_std < 0:
        raise ValueError(f"--noise-std must be ≥ 0, got {args.noise_std}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    files = list_images(args.images, args.limit)
    profile = None
    if getattr(args, "profile", None) is not None:
        from nsdd_edge.camera import ProfileError, load_profile

        if args.psf is not None:
            raise ValueError("--profile brings its own PSF: drop --psf")
        try:
            profile = load_profile(args.profile)
        except ProfileError as exc:
            raise OpticsError(f"--profile {exc}") from None
        if profile.channels == 1 and not args.grayscale:  # a mono camera measures one channel: gray scenes
            print(f"--profile {args.profile}: a 1-channel camera, so the scenes are grayscale (BT.601 luma)")
            args.grayscale = True
        psf = profile.psf.mean(axis=0, keepdims=True) if args.grayscale and profile.psf.shape[0] == 3 else profile.psf
        args.sensor = list(profile.sensor_shape)
        args.psf = Path(args.profile) / "psf.npy"
        args.noise_std = float(profile.noise.read_std)
        args.recon_model = "crop"  # the profile's operator: the crop model (its PSF may be larger than the sensor)
    elif args.psf is None:
        raise ValueError("give --psf FILE or --profile DIR")
    else:
        psf = load_psf(args.psf, background=args.psf_background, downsample=args.psf_downsample,
                       grayscale=args.grayscale)
    channels = 1 if args.grayscale else 3
    if args.sensor is None:
        sensor = tuple(psf.shape[-2:])
    elif len(args.sensor) in (1, 2):
        sensor = (args.sensor[0], args.sensor[-1])
    else:
        raise ValueError(f"--sensor takes H or H W, got {args.sensor}")
    if args.n_test is not None and args.n_test < 0:
        raise ValueError(f"--n-test must be ≥ 0, got {args.n_test}")
    if args.n_test is not None and args.n_test > len(files):
        raise ValueError(f"--n-test {args.n_test} is more than the {len(files)} images"
                         + (f" of --limit {args.limit}" if args.limit is not None else f" in {args.images}")
                         + "; lower --n-test or raise --limit")
    if args.n_test is None and not 0.0 <= args.test_fraction <= 1.0:
        raise ValueError(f"--test-fraction must be in [0, 1] (1: every sample in the test split), got "
                         f"{args.test_fraction}")
    if min(sensor) < 2:
        raise ValueError(f"--sensor must be ≥ 2 pixels, got {sensor}")
    size = (args.size, args.size)
    if args.model == "crop" and (args.size > 2 * sensor[0] or args.size > 2 * sensor[1]):
        raise OpticsError(f"--size {args.size}: the scene is larger than the convolution grid "
                          f"{(2 * sensor[0], 2 * sensor[1])} (2× the sensor {sensor}); use a smaller --size "
                          "or a larger --sensor")
    try:
        if args.model == "crop":
            geometry = LenslessGeometry.make("crop", sensor, psf.shape[-2:], scene_shape=size,
                                             conv_shape=centred_conv_shape(sensor, size))
        else:
            if size[0] > sensor[0] or size[1] > sensor[1]:
                raise OpticsError(f"--size {args.size} is larger than the sensor {sensor} (circular model)")
            geometry = LenslessGeometry.make("circular", sensor, psf.shape[-2:])
        recon = {"model": args.recon_model, "lam": float(args.lam)}
        if args.recon_model == "crop":
            # grid: DiffuserCam convention, scene = conv = 2× sensor; scene: the known support --size²
            conv = list(geometry.conv_shape) if args.model == "crop" else [2 * sensor[0], 2 * sensor[1]]
            recon.update(scene_shape=list(size) if args.recon_support == "scene" else conv, conv_shape=conv)
            LenslessOperator(psf, sensor, "crop", lam=args.lam, scene_shape=recon["scene_shape"],
                             conv_shape=recon["conv_shape"])
        else:
            LenslessOperator(psf, sensor, "circular", lam=args.lam)  # validates PSF vs sensor and λ
    except OpticsError as exc:
        raise OpticsError(f"--psf {args.psf} / --sensor: {exc}") from None
    forward = LenslessOperator(psf, sensor, geometry.model, lam=args.lam, scene_shape=geometry.scene_shape,
                               conv_shape=geometry.conv_shape, noise_std=args.noise_std)

    ids = [f"{k:06d}" for k in range(len(files))]
    out: Path = args.out
    if profile is not None:
        recon["lam"] = float(profile.lam)
        recon["projector"] = profile.projector  # the camera's pseudo-inverse kind (cg: PSF larger than the sensor)
    settings = {"psf_sha256": array_hash(psf), "forward": geometry.to_dict(), "recon": recon,
                "noise_std": float(args.noise_std), "seed": int(args.seed), "channels": channels,
                "scene_size": int(args.size), "images": str(args.images.resolve()), "n_files": len(files)}
    meta_path = out / "dataset.json"
    if out.exists() and not out.is_dir():
        raise OpticsError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not meta_path.exists():
        raise OpticsError(f"--out {out}: directory is not empty and holds no dataset.json; "
                          "refusing to write into it (choose an empty or new directory)")
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise OpticsError(f"--out {meta_path}: invalid JSON ({exc}); move it away or choose another --out") from None
        if old.get("settings") != settings:
            if not args.overwrite:
                raise OpticsError(f"--out {out}: holds a different dataset (dataset.json settings differ); "
                                  "use another --out or --overwrite")
            for sub in ("measurements", "ground_truth"):  # --overwrite: the old samples must not be reused
                for f in (out / sub).glob("*.npy"):
                    f.unlink()
        else:
            check_resplit(out, old, args)
    (out / "measurements").mkdir(parents=True, exist_ok=True)
    (out / "ground_truth").mkdir(parents=True, exist_ok=True)
    np.save(out / "psf.npy", psf)
    meta = {
        "format": FORMAT, "version": 1, "complete": False, "settings": settings,
        "psf": {"file": "psf.npy", "sha256": array_hash(psf), "source": str(args.psf),
                "downsample": int(args.psf_downsample), "background": args.psf_background,
                "shape": list(psf.shape)},
        "forward": geometry.to_dict(), "recon": recon, "noise_std": float(args.noise_std),
        "noise_model": None if profile is None else {**profile.noise.__dict__, "profile": str(args.profile)},
        "noise": "gaussian on [0, 1], then clip to [0, 1]", "clip": [0.0, 1.0], "seed": int(args.seed),
        "channels": channels, "scene_size": int(args.size), "ground_truth_shape": [channels, *size],
        "sources": {}, "splits": {}, "skipped": [],
    }
    atomic_write_text(meta_path, json.dumps(meta, indent=2))  # marks the directory as this (incomplete) dataset: resumable

    done, skipped, sources = [], [], {}
    levels: dict[str, float] = {}
    pending: list[tuple[int, str, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        # circular model: the scene is zero-padded centrally to the sensor grid (no-op for crop)
        x = center_pad(torch.from_numpy(np.stack([p[2] for p in pending])), geometry.scene_shape)
        with torch.no_grad():
            clean = forward.A(x)
        for (index, sid, scene), y_clean in zip(pending, clean):
            if profile is None:
                y = noisy_measurement(y_clean, float(args.noise_std), int(args.seed), index)
            else:  # the camera's signal level and Poisson–Gaussian noise: var = σ_r² + g·y
                noise = measurement_noise(y_clean, int(args.seed), index)
                level = scene_level(float(profile.signal.get("p99", 1.0)), float(torch.quantile(y_clean, 0.99)))
                scene = (scene * level).astype(np.float32)
                y_clean = y_clean * level
                std = torch.sqrt(profile.noise.read_std ** 2 + profile.noise.shot_gain * y_clean.clamp_min(0))
                y = (y_clean + std * noise).clamp_min(0.0)
                levels[sid] = level
            atomic_save_npy(out / "ground_truth" / f"{sid}.npy", scene)
            atomic_save_npy(out / "measurements" / f"{sid}.npy", y.numpy().astype(np.float32))
            done.append(sid)
        pending.clear()

    for index, (sid, path) in enumerate(tqdm(list(zip(ids, files)), desc="simulate", unit="img",
                                             file=sys.stderr)):
        if (out / "measurements" / f"{sid}.npy").exists() and (out / "ground_truth" / f"{sid}.npy").exists():
            sources[sid] = path.name
            done.append(sid)  # already written by an interrupted run with the same settings
            if profile is not None:  # its level: L = Σ L·x / Σ x (the scene is deterministic)
                levels[sid] = recover_level(np.load(out / "ground_truth" / f"{sid}.npy"),
                                            prepare_scene(path, args.size, channels))
            continue
        try:
            scene = prepare_scene(path, args.size, channels)
        except (OpticsError, cv2.error) as exc:
            skipped.append({"file": str(path), "reason": str(exc)})
            tqdm.write(f"skipped (unreadable): {exc}", file=sys.stderr)
            continue
        sources[sid] = path.name
        pending.append((index, sid, scene))
        if len(pending) >= args.batch_size:
            flush()
    flush()
    done = sorted(done)
    if not done:
        raise OpticsError(f"--images {args.images}: none of the {len(files)} files could be read")
    meta.update(complete=True, sources=dict(sorted(sources.items())), skipped=skipped,
                splits=split_ids(done, args.seed, args.test_fraction, args.n_test), count=len(done))
    if profile is not None:  # ground truth = L·x: image metrics score x̂ / L against x (LenslessDataset.scene_levels)
        meta["scene_levels"] = {sid: levels[sid] for sid in sorted(levels)}
    if profile is not None:  # how well the simulated y matches the real captures (no ground truth involved)
        from nsdd_edge.camera import noise_std_immerkaer, signal_stats

        probe = [np.load(out / "measurements" / f"{i}.npy") for i in done[:64]]
        meta["profile_match"] = {"real": profile.signal, "simulated": signal_stats(probe),
                                 "noise_real": profile.noise.__dict__,
                                 "noise_simulated_immerkaer": float(np.median([noise_std_immerkaer(y) for y in probe])),
                                 "scene_levels": {"min": min(levels.values(), default=None),
                                                  "max": max(levels.values(), default=None)}}
    atomic_write_text(meta_path, json.dumps(meta, indent=2))
    return meta


def main(args: argparse.Namespace) -> int:
    try:
        with torch_threads(args.threads, "simulate"):
            meta = simulate(args)
    except (OpticsError, ValueError) as exc:
        print(f"nsdd-train simulate: error: {exc}", file=sys.stderr)
        return 2
    if meta.get("profile_match"):
        m = meta["profile_match"]
        print("profile match (real vs simulated y): " + ", ".join(
            f"{k} {m['real'].get(k, float('nan')):.3g} vs {m['simulated'][k]:.3g}" for k in ("p50", "p99", "max"))
            + f"; noise σ (Immerkær) {m['noise_real']['read_std']:.3g} vs {m['noise_simulated_immerkaer']:.3g}")
    g = meta["forward"]
    print(f"wrote {meta['count']} samples to {args.out} (train {len(meta['splits']['train'])}, "
          f"test {len(meta['splits']['test'])}); forward {g['model']}: scene {g['scene_shape']}, "
          f"sensor {g['sensor_shape']}, conv {g['conv_shape']}; recon {meta['recon']}")
    if meta["skipped"]:
        print(f"skipped {len(meta['skipped'])} unreadable files:")
        for s in meta["skipped"]:
            print(f"  {s['reason']}")
    return 0
