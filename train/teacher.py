"""``nsdd-train teacher``: label every measurement of a dataset with its DDNM+ reconstruction (NSDD targets).

Output (a reconstruction directory, see :mod:`train.data`)::

    ID.npy, ID.png          the teacher target T(y) (float32 (C, H, W), in [0, 1] space, not clipped) and a view
    teacher.json            manifest: prior path + hash, settings, dataset + PSF hash, ids, per-sample x_T seeds
    recon.json              method/settings/physics and per-image consistency, seconds, network calls
    .teacher/shard-KKKKK.json   completion record of shard K (its ids, the SHA-256 of each ID.npy, the
                            settings digest, the worker, start and finish times)
    .teacher/claims/        which worker holds (or held) which shard (train.shard_claims)

Sample ``k`` of the split (sorted as the dataset lists it) uses the seed ``seed + k`` for x_T and all of
its noise, whatever batch it shares, so targets do not depend on batching. Work goes in shards of
``shard_size`` ids; every file is written to a temporary name and renamed atomically, and a shard counts
as done only when its completion record exists and every file it lists is present with the recorded
hash. A run killed at any moment and restarted redoes the unfinished shards and ends with byte-identical
targets (on the same device and torch thread count; other thread counts change float rounding only).
The teacher never reads ground truth.

Many workers, one folder: start the same command several times — in one shell, under ``torchrun`` (one
worker per GPU, ``cuda:LOCAL_RANK``), or on several machines that share ``--out`` and see the same data and
prior. Each worker claims a shard atomically before labelling it, so no shard is labelled twice, and takes
over the shard of a worker that died (at once on the same machine, after ``--claim-timeout`` seconds without
a heartbeat from another one). The shards and per-sample seeds do not depend on who labels them, so the
targets are the same bytes whatever the number of workers (same device type and thread count). Every worker
returns when all shards are done. ``nsdd-train teacher-progress --out OUT`` shows the progress across workers.
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
from train.distributed import local_device
from train.prior.base import DiffusionPrior
from train.progress import TimeEstimate
from train.shard_claims import DEFAULT_TIMEOUT, ShardClaims, Worker
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
    p.add_argument("--device", default="cpu",
                   help="torch device for the prior and the operator (cuda under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--no-png", action="store_true", help="do not write the 8-bit ID.png views")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; the same count gives byte-identical targets)")
    p.add_argument("--worker", default=None,
                   help="this worker's name in the claims and shard records (default: host-pid, or host-rankR-pid "
                        "under torchrun)")
    p.add_argument("--claim-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="other workers take this worker's shard over after this long without its heartbeat (sent "
                        "every SECONDS/4; recorded in its claim); a dead worker on the same machine: at once")


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
def shard_record_path(out: Path, index: int) -> Path:
    return out / RECORD_DIR / f"shard-{index:05d}.json"


def shard_is_done(out: Path, index: int, ids: Sequence[str], identity: str | None = None) -> bool:
    """A shard is done when its record lists exactly ``ids`` and every ``ID.npy`` matches its hash (and, given
    ``identity``, the record was made with those settings; records older than the digest pass)."""
    path = shard_record_path(out, index)
    if not path.exists():
        return False
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return False
    if record.get("ids") != list(ids):
        return False
    if identity is not None and record.get("identity", identity) != identity:
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


def identity_digest(identity: dict) -> str:
    """Short SHA-256 of the identity: what the shard records and claims carry."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def label_dataset(dataset: LenslessDataset, prior: DiffusionPrior, out: str | Path, *, split: str = "train",
                  steps: int = 100, eta: float = 0.85, sigma_y: float | None = None, travel_length: int = 1,
                  travel_repeat: int = 1, batch_size: int = 4, seed: int = 0, shard_size: int = 64,
                  limit: int | None = None, prior_path: str | Path | None = None, write_png: bool = True,
                  device: str | torch.device = "cpu", progress: bool = True,
                  after_batch: Callable[[int], None] | None = None, worker: str | None = None,
                  claim_timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Write the DDNM+ reconstruction of every measurement of ``split`` to ``out`` (module docstring).

    ``after_batch(n)`` is called after the ``n``-th batch written in this call (1-based): a hook for
    progress reporting and for crash tests. ``worker``: this worker's name (default host-pid);
    ``claim_timeout``: seconds without this worker's heartbeat before others take its shard over (a claim
    without a recorded timeout, made by an older version, gets this worker's own). Returns
    the manifest once every shard is done (by this worker or others).
    """
    if batch_size < 1 or shard_size < 1:
        raise TeacherError(f"batch size and shard size must be >= 1 (got {batch_size}, {shard_size})")
    if limit is not None and limit < 0:
        raise TeacherError(f"--limit must be >= 0, got {limit}")
    if not claim_timeout > 0:
        raise TeacherError(f"--claim-timeout must be > 0 seconds, got {claim_timeout}")
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

    # Workers sharing `out` agree on the settings that decide the targets' bytes (the claims carry them).
    digest = identity_digest(identity)
    me = Worker.this_process(worker)
    claims = ShardClaims(out / RECORD_DIR / "claims", me, claim_timeout,
                         {"identity": digest, "batch_size": batch_size, "shard_size": shard_size, "limit": limit})
    clash = claims.conflicts()
    if clash:
        c = clash[0]
        raise TeacherError(f"--out {out}: worker {c.get('worker')} on {c.get('host')} is labelling it with other "
                           f"settings ({c.get('settings')}; this worker: {claims.settings}); use the same teacher "
                           "settings, --batch, --shard-size and --limit, or another --out")

    seed_of = dict(zip(ids, seeds))
    shards = [list(ids[k : k + shard_size]) for k in range(0, len(ids), shard_size)]
    done = {k for k, shard in enumerate(shards) if shard_is_done(out, k, shard, digest)}
    if not manifest_path.exists() or json.loads(manifest_path.read_text()) != manifest:
        atomic_write_json(manifest_path, manifest)  # unchanged when another worker wrote the same one
    prior.to(device).eval()
    bar = tqdm(total=len(ids), initial=sum(len(shards[k]) for k in done), desc="teacher", unit="img",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    # this worker's rate over what is left (other workers on the same --out make it end sooner)
    estimate = TimeEstimate("teacher", len(ids), "image", after=1)
    images_done = sum(len(shards[k]) for k in done)
    if write_png:
        from train.solve import to_png8  # the shared 8-bit view writer
        from train.solve import write_png as write_png8
    from train.teacher_progress import progress_view, summary_line

    def show_all_workers() -> None:  # the bar counts every worker's finished shards, the postfix their rate
        view = progress_view(out)
        bar.n = max(bar.n, view["images_done"])
        bar.set_postfix_str(summary_line(view), refresh=True)

    batches_written = 0
    poll = min(5.0, claim_timeout / 4)  # seconds between looks while the other workers hold every shard left
    try:
        with claims.heartbeat():
            while len(done) < len(shards):
                labelled = False
                for k, shard in enumerate(shards):
                    if k in done:
                        continue
                    if shard_is_done(out, k, shard, digest):  # finished by another worker
                        done.add(k)
                        continue
                    claim = claims.claim(k)
                    if claim is None:  # another worker holds it (or won the race for it)
                        continue
                    if shard_is_done(out, k, shard, digest):  # finished between the look and the claim
                        claims.release(claim)
                        done.add(k)
                        continue
                    started = time.time()
                    hashes: dict[str, str] = {}
                    stats: dict[str, dict] = {}
                    for b in range(0, len(shard), batch_size):
                        if not claims.holds(claim):
                            break
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
                                write_png8(out / f"{i}.png", to_png8(x))
                            stats[i] = {"consistency": float(c), "seconds": seconds, "nfe": solver.nfe}
                        bar.update(len(chunk))
                        images_done += len(chunk)
                        estimate.update(images_done)
                        batches_written += 1
                        if after_batch is not None:
                            after_batch(batches_written)
                    claims.release(claim)
                    if not claims.holds(claim):  # presumed dead and taken over: the new holder finishes it
                        print(f"nsdd-train teacher: {me.name}: shard {k} was taken over by another worker "
                              "(no heartbeat within --claim-timeout); leaving it to them", file=sys.stderr)
                        continue
                    atomic_write_json(shard_record_path(out, k), {
                        "ids": shard, "sha256": hashes, "images": stats, "identity": digest,
                        "worker": {"name": me.name, "host": me.host, "device": str(device),
                                   "threads": torch.get_num_threads()},
                        "started": started, "finished": time.time()})
                    done.add(k)
                    labelled = True
                    if progress:
                        show_all_workers()
                if not labelled and len(done) < len(shards):
                    time.sleep(poll)  # every shard left is held by a live worker: wait, then look again
                    if progress:
                        show_all_workers()
    finally:
        bar.close()

    images: dict[str, dict] = {}
    for k, shard in enumerate(shards):
        record = json.loads(shard_record_path(out, k).read_text())
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
    if args.threads is not None and args.threads < 1:
        print("nsdd-train teacher: error: --threads must be ≥ 1", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)  # --threads applies to this command only (matters when called in-process)


def _main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        try:  # under torchrun each worker takes its own GPU
            device = str(local_device(torch.device(args.device)))
        except RuntimeError as exc:
            raise TeacherError(f"--device {args.device!r}: {exc}") from exc
        dataset = LenslessDataset(args.data)
        try:
            from train.prior.io import load_prior  # lazy: the prior package is only needed here
        except ImportError as exc:
            print(f"nsdd-train teacher: error: cannot load priors ({exc})", file=sys.stderr)
            return 2
        prior = load_prior(args.prior, device=device)
        manifest = label_dataset(dataset, prior, args.out, split=args.split, steps=args.steps, eta=args.eta,
                                 sigma_y=args.sigma_y, travel_length=args.travel_length,
                                 travel_repeat=args.travel_repeat, batch_size=args.batch, seed=args.seed,
                                 shard_size=args.shard_size, limit=args.limit, prior_path=args.prior,
                                 write_png=not args.no_png, device=device, worker=args.worker,
                                 claim_timeout=args.claim_timeout)
    except (TeacherError, DatasetError, OpticsError, ValueError) as exc:
        print(f"nsdd-train teacher: error: {exc}", file=sys.stderr)
        return 2
    print(f"labelled {len(manifest['ids'])} measurements of split {args.split!r} into {args.out} "
          f"({manifest['settings']['network_calls_per_image']} network calls per image)")
    return 0
