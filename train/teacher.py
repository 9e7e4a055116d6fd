"""``nsdd-train teacher``: label every measurement of a dataset with its DDNM+ reconstruction (NSDD targets).

Output (a reconstruction directory, see :mod:`train.data`)::

    ID.npy, ID.png          the teacher target T(y) (float32 (C, H, W), in [0, 1] space, not clipped) and a view
    teacher.json            manifest: prior path + hash, settings, dataset + PSF hash, ids, per-sample x_T seeds
    recon.json              method/settings/physics and per-image consistency, seconds, network calls
    .teacher/shard-KKKKK.json   completion record of shard K (its ids and the SHA-256 of each ID.npy)

Sample ``k`` of the split (sorted as the dataset lists it) uses the seed ``seed + k`` for x_T and all of
its noise, whatever batch it shares, so targets do not depend on batching. Work goes in shards of
``shard_size`` ids; every file is written to a temporary name and renamed atomically, and a shard counts
as done only when its completion record exists and every file it lists is present with the recorded
hash. A run killed at any moment and restarted redoes the unfinished shards and ends with byte-identical
targets (on the same device and torch thread count; other thread counts change float rounding only).
The teacher never reads ground truth.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nsdd_edge.atomic import atomic_write_bytes, atomic_write_json
from nsdd_edge.optics import OpticsError, array_hash
from train.data import DatasetError, LenslessDataset
from train.prior.base import DiffusionPrior
from train.solvers.ddnm import DDNM

HELP = "label a dataset's measurements with DDNM+ teacher reconstructions (sharded, resumable)"
MANIFEST = "teacher.json"
RECORD_DIR = ".teacher"
FORMAT_VERSION = 1


class TeacherError(ValueError):
    """An output directory or setting that cannot be used; the message names it and the problem."""


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="dataset directory (dataset.json, psf.npy, measurements/)")
    p.add_argument("--prior", type=Path, required=True, help="diffusion prior directory (train.prior.io.load_prior)")
    p.add_argument("--out", type=Path, required=True, help="output directory for ID.npy targets (resumable)")
    p.add_argument("--split", default="train", help="dataset split to label ('all': every measurement)")
    p.add_argument("--steps", type=int, default=100, help="DDIM steps over the prior's training schedule")
    p.add_argument("--eta", type=float, default=0.85, help="DDIM η")
    p.add_argument("--sigma-y", type=float, default=None,
                   help="measurement noise std in [0, 1] units (default: the dataset's noise_std)")
    p.add_argument("--travel-length", type=int, default=1, help="RePaint time-travel length (1: off)")
    p.add_argument("--travel-repeat", type=int, default=1, help="RePaint time-travel repeats (1: off)")
    p.add_argument("--batch", type=int, default=4, help="measurements per network batch")
    p.add_argument("--seed", type=int, default=0, help="sample k of the split starts from the noise of seed + k")
    p.add_argument("--shard-size", type=int, default=64, help="ids per completion record")
    p.add_argument("--limit", type=int, default=None, help="label only the first N ids of the split")
    p.add_argument("--device", default="cpu", help="torch device for the prior and the operator")
    p.add_argument("--no-png", action="store_true", help="do not write the 8-bit ID.png views")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; the same count gives byte-identical targets)")


# ---- hashing and atomic files --------------------------------------------------------------------
def prior_fingerprint(prior: DiffusionPrior) -> str:
    """SHA-256 of the prior's weights (names, shapes, float32 values) and its ᾱ schedule."""
    h = hashlib.sha256()
    state = prior.net.state_dict() if isinstance(prior.net, torch.nn.Module) else {}
    for name in sorted(state):
        t = state[name].detach().cpu()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(np.ascontiguousarray(t.float().numpy()).tobytes())
    h.update(np.ascontiguousarray(prior.alphas_cumprod.cpu().numpy()).tobytes())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


# ---- shards --------------------------------------------------------------------------------------
def _shard_record_path(out: Path, index: int) -> Path:
    return out / RECORD_DIR / f"shard-{index:05d}.json"


def shard_is_done(out: Path, index: int, ids: Sequence[str]) -> bool:
    """A shard is done when its record lists exactly ``ids`` and every ``ID.npy`` matches its hash."""
    path = _shard_record_path(out, index)
    if not path.exists():
        return False
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return False
    if record.get("ids") != list(ids):
        return False
    hashes = record.get("sha256", {})
    for i in ids:
        f = out / f"{i}.npy"
        if not f.exists() or hashes.get(i) != _file_sha256(f):
            return False
    return True


def _identity(dataset: LenslessDataset, physics, prior_hash: str, split: str, solver: DDNM,
              sigma_y: float) -> dict:
    """What a resumed run must share with the run that started the directory."""
    return {"format": FORMAT_VERSION, "method": "ddnm", "prior_sha256": prior_hash,
            "dataset_psf_sha256": array_hash(dataset.psf), "split": split,
            "physics": {**physics.geometry.to_dict(), "lam": physics.lam},
            "settings": {"steps": solver.steps, "eta": solver.eta, "sigma_y": sigma_y,
                         "travel_length": solver.travel_length, "travel_repeat": solver.travel_repeat,
                         "seed": solver.seed, "null_cutoff": solver.null_cutoff, "clip_x0": solver.clip_x0}}


def label_dataset(dataset: LenslessDataset, prior: DiffusionPrior, out: str | Path, *, split: str = "train",
                  steps: int = 100, eta: float = 0.85, sigma_y: float | None = None, travel_length: int = 1,
                  travel_repeat: int = 1, batch_size: int = 4, seed: int = 0, shard_size: int = 64,
                  limit: int | None = None, prior_path: str | Path | None = None, write_png: bool = True,
                  device: str | torch.device = "cpu", progress: bool = True,
                  after_batch: Callable[[int], None] | None = None) -> dict:
    """Write the DDNM+ reconstruction of every measurement of ``split`` to ``out`` (module docstring).

    ``after_batch(n)`` is called after the ``n``-th batch written in this call (1-based): a hook for
    progress reporting and for crash tests. Returns the manifest.
    """
    if batch_size < 1 or shard_size < 1:
        raise TeacherError(f"batch size and shard size must be >= 1 (got {batch_size}, {shard_size})")
    if limit is not None and limit < 0:
        raise TeacherError(f"--limit must be >= 0, got {limit}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TeacherError(f"--out {out}: exists and is not a directory")
    all_ids = dataset.ids(split)
    ids = all_ids if limit is None else all_ids[:limit]
    if not ids:
        raise TeacherError(f"--data {dataset.root}: split {split!r} has no measurements to label")
    seeds = [seed + k for k in range(len(ids))]
    physics = dataset.physics().to(device)
    sigma = float(physics.noise_std if sigma_y is None else sigma_y)
    solver = DDNM(prior, steps=steps, eta=eta, sigma_y=sigma, travel_length=travel_length,
                  travel_repeat=travel_repeat, seed=seed)
    prior_hash = prior_fingerprint(prior)
    identity = _identity(dataset, physics, prior_hash, split, solver, sigma)

    scene = tuple(physics.scene_shape)
    s = prior.image_size
    if scene[0] > s and scene[1] > s:
        print(f"nsdd-train teacher: the prior generates {s}x{s} scenes; on the {scene[0]}x{scene[1]} scene grid it "
              "works on the centred support and the rest is known black (train.prior.base.SupportPrior)",
              file=sys.stderr)
    elif scene != (s, s):
        print(f"nsdd-train teacher: note: the prior was built for {s} px images; the operator's "
              f"scene grid is {scene[0]}x{scene[1]} (a convolutional prior runs, but off its training size)",
              file=sys.stderr)

    manifest_path = out / MANIFEST
    if not manifest_path.exists() and out.is_dir() and any(out.glob("*.npy")):
        raise TeacherError(f"--out {out}: holds .npy files but no {MANIFEST} (not a teacher directory); "
                           "refusing to overwrite them, choose another --out")
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise TeacherError(f"{manifest_path}: invalid JSON ({exc}); move it away to relabel") from exc
        differs = sorted(k for k in identity if old.get("identity", {}).get(k) != identity[k])
        if differs:
            raise TeacherError(f"--out {out}: labelled with different {', '.join(differs)} (see {manifest_path}); "
                               "use another --out, or delete it to relabel")
    (out / RECORD_DIR).mkdir(parents=True, exist_ok=True)
    manifest = {"identity": identity, "prior": {"path": str(prior_path) if prior_path else None,
                                                "sha256": prior_hash, "num_parameters": prior.num_parameters,
                                                "image_size": prior.image_size},
                "dataset": {"path": str(dataset.root), "psf_sha256": identity["dataset_psf_sha256"],
                            "split": split, "noise_std": float(physics.noise_std)},
                "settings": {**identity["settings"], "batch_size": batch_size, "shard_size": shard_size,
                             "limit": limit, "network_calls_per_image": solver.nfe},
                "ids": list(ids), "seeds": dict(zip(ids, seeds)), "complete": False}
    atomic_write_json(manifest_path, manifest)

    seed_of = dict(zip(ids, seeds))
    shards = [list(ids[k : k + shard_size]) for k in range(0, len(ids), shard_size)]
    todo = [k for k, shard in enumerate(shards) if not shard_is_done(out, k, shard)]
    done_count = len(ids) - sum(len(shards[k]) for k in todo)
    prior.to(device).eval()
    bar = tqdm(total=len(ids), initial=done_count, desc="teacher", unit="img", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    if write_png:
        from train.solve import to_png8  # the shared 8-bit view writer
        from train.solve import write_png as write_png8
    batches_written = 0
    try:
        for k in todo:
            shard = shards[k]
            hashes: dict[str, str] = {}
            stats: dict[str, dict] = {}
            for b in range(0, len(shard), batch_size):
                chunk = shard[b : b + batch_size]
                y = dataset.measurements(chunk).to(device)
                t0 = time.perf_counter()
                x_hat = solver(y, physics, seeds=[seed_of[i] for i in chunk])
                seconds = (time.perf_counter() - t0) / len(chunk)
                consistency = physics.consistency(x_hat, y).tolist()
                for i, x, c in zip(chunk, x_hat.detach().cpu().float().numpy(), consistency):
                    data = _npy_bytes(x)
                    atomic_write_bytes(out / f"{i}.npy", data)
                    hashes[i] = hashlib.sha256(data).hexdigest()
                    if write_png:
                        from train.solve import to_png8
                        from train.solve import write_png as write_png8

                        write_png8(out / f"{i}.png", to_png8(x))
                    stats[i] = {"consistency": float(c), "seconds": seconds, "nfe": solver.nfe}
                bar.update(len(chunk))
                batches_written += 1
                if after_batch is not None:
                    after_batch(batches_written)
            atomic_write_json(_shard_record_path(out, k), {"ids": shard, "sha256": hashes, "images": stats})
    finally:
        bar.close()

    images: dict[str, dict] = {}
    for k, shard in enumerate(shards):
        record = json.loads(_shard_record_path(out, k).read_text())
        images.update({i: record.get("images", {}).get(i, {}) for i in shard})
    manifest["complete"] = True
    atomic_write_json(manifest_path, manifest)
    cons = [v["consistency"] for v in images.values() if "consistency" in v]
    atomic_write_json(out / "recon.json", {
        "method": "ddnm", "settings": solver.settings(), "prior": str(prior_path) if prior_path else None,
        "source": {"data": str(dataset.root), "split": split, "psf_sha256": identity["dataset_psf_sha256"]},
        "physics": identity["physics"], "images": images,
        "summary": {"n": len(images), "mean_consistency": float(np.mean(cons)) if cons else None}})
    return manifest


def main(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            print("nsdd-train teacher: error: --threads must be ≥ 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        dataset = LenslessDataset(args.data)
        try:
            from train.prior.io import load_prior  # lazy: the prior package is only needed here
        except ImportError as exc:
            print(f"nsdd-train teacher: error: cannot load priors ({exc})", file=sys.stderr)
            return 2
        prior = load_prior(args.prior, device=args.device)
        manifest = label_dataset(dataset, prior, args.out, split=args.split, steps=args.steps, eta=args.eta,
                                 sigma_y=args.sigma_y, travel_length=args.travel_length,
                                 travel_repeat=args.travel_repeat, batch_size=args.batch, seed=args.seed,
                                 shard_size=args.shard_size, limit=args.limit, prior_path=args.prior,
                                 write_png=not args.no_png, device=args.device)
    except (TeacherError, DatasetError, OpticsError, ValueError) as exc:
        print(f"nsdd-train teacher: error: {exc}", file=sys.stderr)
        return 2
    print(f"labelled {len(manifest['ids'])} measurements of split {args.split!r} into {args.out} "
          f"({manifest['settings']['network_calls_per_image']} network calls per image)")
    return 0
