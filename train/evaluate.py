"""``nsdd-train evaluate``: score reconstruction methods on a dataset split and write a report.

Sources of reconstructions:

- ``--recon DIR[,DIR…]``: directories of ``ID.npy`` written by ``nsdd-train solve``;
- ``--methods wiener,admm,dps,diffpir,ddnm,student:DIR``: run here, one image at a time, timed (median
  seconds per image after one warm-up call) and with their peak memory measured (CPU: peak RSS increase
  during the call, sampled by a thread; GPU: ``torch.cuda.max_memory_allocated``).

Scores per method (means over the images, per-image values in ``per_image.json``):
PSNR / SSIM / LPIPS on the reconstruction clipped to [0, 1] and centre-cropped to the ground truth's size
(the scene sits in the centre of the sensor-size reconstruction), or, with ``--against DIR``, against
reference reconstructions such as held-out teacher labels (a ground-truth-free score to choose settings on).
Consistency ``‖A x̂ − y‖ / ‖y‖`` twice: ``consistency`` under the **forward operator that made y**
(:meth:`LenslessDataset.forward_physics`, e.g. the crop model on the scene grid; x̂ centre-cropped or padded
to that grid) — the main column — and ``consistency_recon`` under the reconstruction operator the methods
use (:meth:`LenslessDataset.physics`, e.g. circular at sensor size). The ground truth's own values under
both (``reference.json``) are the noise floor.

Timing protocol (every table): one untimed warm-up call, then each image alone (batch 1), the median of
the per-image times, with the torch thread count stated (``--threads``). ``--recon`` directories carry
``nsdd-train solve``'s times only when solve ran by the same protocol (``--batch-size 1``).
Wiener without a ``--set wiener.lam=…`` uses the λ of the discrepancy principle on the scored measurements
(no ground truth), and the report says which.

Outputs in ``--out``: ``metrics.json`` (``{method: {"psnr", "ssim", "lpips", "consistency", "n", …}}``),
``metrics.md``, ``per_image.json``, ``reference.json`` (the ground truth's own consistency: the noise floor),
``grid.png``, ``lpips_vs_time.png`` (when methods were timed) and
``recon/METHOD/ID.npy|png`` for the methods run here; ``--report FILE.md`` adds a self-contained report.
Runs of ``--methods`` are resumable: each image is written with its time and memory as soon as it is done
(``recon/METHOD/recon.json``) and a rerun with the same method, settings and data reuses them.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nsdd_edge.atomic import atomic_save_npy, atomic_write_json
from nsdd_edge.bundle import file_sha256
from nsdd_edge.optics import OpticsError
from train.data import DatasetError, LenslessDataset, read_recon_dir
from train.machine import PeakMemory, machine_info
from train.machine import sync as _sync
from train.physics import LenslessOperator, center_crop
from train.progress import TimeEstimate
from train.scoring import (
    EvaluationError,
    against_reference,
    check_border,
    ground_truth_consistency,
    score,
)

HELP = "score reconstructions (PSNR, SSIM, LPIPS, consistency, time, memory) and write tables, figures, a report"

DIFFUSION_METHODS = ("ddnm", "dps", "diffpir")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset directory (dataset.json, measurements/, ground_truth/)")
    p.add_argument("--recon", default="", help="reconstruction directories (ID.npy), comma-separated")
    p.add_argument("--methods", default="",
                   help="methods to run here, comma-separated: wiener, admm, ddnm, dps, diffpir, student:DIR")
    p.add_argument("--prior", default=None, help="diffusion prior directory for ddnm/dps/diffpir (and paper students)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method setting, e.g. admm.iters=50 (repeatable; values parsed as JSON when possible)")
    p.add_argument("--names", default="", help="display names, comma-separated: the --recon dirs, then the --methods")
    p.add_argument("--split", default="test", help="dataset split ('all': every measurement)")
    p.add_argument("--skip", type=int, default=0,
                   help="leave out the first N ids of the split (before --limit): a subset disjoint from a reported "
                        "one, to choose settings on")
    p.add_argument("--limit", type=int, default=None, help="score only the first N ids of the split")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--report", default=None, help="also write a self-contained markdown report to FILE.md")
    p.add_argument("--lpips-weights", default=None,
                   help="LPIPS-Alex v0.1 state dict (default: $NSDD_LPIPS_WEIGHTS, else the usual download)")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS (no weights needed)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--grid-samples", type=int, default=4, help="rows of the qualitative grid")
    p.add_argument("--no-save-recon", action="store_true",
                   help="do not write the reconstructions of --methods (and do not resume)")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute --methods even where OUT/recon/METHOD holds an earlier run")
    p.add_argument("--seed", type=int, default=0, help="torch seed before each image (stochastic methods)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for every method (stated in the report; default: torch's choice)")
    p.add_argument("--against", default=None, metavar="DIR",
                   help="score PSNR/SSIM/LPIPS against the reconstructions ID.npy in DIR (e.g. held-out teacher "
                        "labels) instead of the ground truth: a ground-truth-free score to choose settings on")
    p.add_argument("--border", type=int, default=0, metavar="PX",
                   help="score PSNR/SSIM/LPIPS without the outer PX pixels of the scene window (where is the error: "
                        "at the window's edge or inside?); consistency always covers everything")


def main(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            print("nsdd-train evaluate: error: --threads must be ≥ 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        config = EvaluationConfig.from_args(args)
        result = run_evaluation(config)
    except (EvaluationError, DatasetError, OpticsError) as exc:
        print(f"nsdd-train evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(result["table"], end="")
    print(f"wrote {config.out / 'metrics.json'}" + (f" and {config.report}" if config.report else ""))
    return 0


def _split_list(text: str) -> list[str]:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def parse_value(text: str):
    """``--set`` values: JSON (``50``, ``1e-3``, ``true``, ``[1, 2]``, ``"s"``), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        low = text.strip().lower()
        if low in ("true", "false"):
            return low == "true"
        return text


def parse_settings(items: Sequence[str]) -> dict[str, dict]:
    """``["admm.iters=50", "ddnm.eta=0.85"]`` → ``{"admm": {"iters": 50}, "ddnm": {"eta": 0.85}}``."""
    out: dict[str, dict] = {}
    for item in items:
        m = re.fullmatch(r"\s*([^.=\s]+)\.([^=\s]+)\s*=(.*)", item)
        if not m:
            raise EvaluationError(f"--set {item!r}: expected METHOD.KEY=VALUE, e.g. admm.iters=50")
        out.setdefault(m.group(1), {})[m.group(2)] = parse_value(m.group(3).strip())
    return out


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass
class Source:
    """One column of the comparison: a reconstruction directory or a method run here."""

    name: str
    kind: str  # "recon" or "method"
    spec: str  # directory, or method name (student: its directory in ``path``)
    path: Path | None = None
    settings: dict = field(default_factory=dict)


@dataclass
class EvaluationConfig:
    data: Path
    out: Path
    sources: list[Source]
    split: str = "test"
    limit: int | None = None
    skip: int = 0
    prior: Path | None = None
    report: Path | None = None
    lpips_weights: str | None = None
    use_lpips: bool = True
    device: str = "cpu"
    grid_samples: int = 4
    save_recon: bool = True
    seed: int = 0
    overwrite: bool = False
    command: str = ""
    against: Path | None = None
    border: int = 0

    @staticmethod
    def from_args(args: argparse.Namespace) -> EvaluationConfig:
        recon_dirs = _split_list(args.recon)
        methods = _split_list(args.methods)
        if not recon_dirs and not methods:
            raise EvaluationError("nothing to evaluate: give --recon DIR[,DIR…] and/or --methods NAME[,NAME…]")
        settings = parse_settings(args.settings)
        sources: list[Source] = []
        for d in recon_dirs:
            p = Path(d)
            if not p.is_dir():
                raise EvaluationError(f"--recon {d}: not a directory")
            sources.append(Source(p.resolve().name, "recon", d, path=p))
        for m in methods:
            if m.startswith("student:"):
                p = Path(m.split(":", 1)[1])
                if not p.is_dir():
                    raise EvaluationError(f"--methods {m}: student directory {p} does not exist")
                sources.append(Source("student", "method", "student", path=p, settings=dict(settings.get("student", {}))))
            else:
                sources.append(Source(m, "method", m, settings=dict(settings.get(m, {}))))
        unknown = set(settings) - {s.spec for s in sources if s.kind == "method"}
        if unknown:
            raise EvaluationError(f"--set for {sorted(unknown)}, which are not among --methods {methods}")
        names = _split_list(args.names)
        if names:
            if len(names) != len(sources):
                raise EvaluationError(f"--names has {len(names)} names for {len(sources)} sources "
                                      f"({len(recon_dirs)} --recon dirs, then {len(methods)} --methods)")
            for s, n in zip(sources, names):
                s.name = n
        else:
            _dedupe_names(sources)
        if len({s.name for s in sources}) != len(sources):
            raise EvaluationError(f"--names: names must be unique, got {[s.name for s in sources]}")
        needs_prior = [s.spec for s in sources if s.spec in DIFFUSION_METHODS]
        if needs_prior and not args.prior:
            raise EvaluationError(f"--methods {','.join(needs_prior)} need a diffusion prior: give --prior DIR")
        if args.limit is not None and args.limit < 1:
            raise EvaluationError(f"--limit must be ≥ 1, got {args.limit}")
        if args.skip < 0:
            raise EvaluationError(f"--skip must be ≥ 0, got {args.skip}")
        if args.grid_samples < 0:
            raise EvaluationError(f"--grid-samples must be ≥ 0, got {args.grid_samples}")
        if getattr(args, "border", 0) < 0:
            raise EvaluationError(f"--border must be ≥ 0 pixels, got {args.border}")
        return EvaluationConfig(
            data=Path(args.data), out=Path(args.out), sources=sources, split=args.split, limit=args.limit, skip=args.skip,
            prior=Path(args.prior) if args.prior else None, report=Path(args.report) if args.report else None,
            lpips_weights=args.lpips_weights, use_lpips=not args.no_lpips, device=resolve_device(args.device),
            grid_samples=args.grid_samples, save_recon=not args.no_save_recon, seed=args.seed,
            overwrite=args.overwrite, against=_against_dir(getattr(args, "against", None)),
            border=int(getattr(args, "border", 0) or 0),
            command=command_line(args))


def _against_dir(text: str | None) -> Path | None:
    if not text:
        return None
    if not Path(text).is_dir():
        raise EvaluationError(f"--against {text}: not a directory")
    return Path(text)


def command_line(args: argparse.Namespace, argv: Sequence[str] | None = None) -> str:
    """The command recorded in the report: the exact ``nsdd-train evaluate …`` typed (``sys.argv``) when run
    from the console script or ``python -m train.cli``, otherwise one equivalent to ``args``."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) > 1 and argv[1] == "evaluate" and Path(argv[0]).name in ("nsdd-train", "cli.py", "__main__.py"):
        return shlex.join(["nsdd-train", *argv[1:]])
    parts = ["nsdd-train", "evaluate", "--data", str(args.data), "--out", str(args.out)]
    for flag, value in (("--recon", args.recon), ("--methods", args.methods), ("--prior", args.prior),
                        ("--names", args.names), ("--split", args.split), ("--skip", args.skip or None),
                        ("--limit", args.limit),
                        ("--report", args.report), ("--lpips-weights", args.lpips_weights),
                        ("--device", args.device), ("--grid-samples", args.grid_samples), ("--seed", args.seed),
                        ("--threads", getattr(args, "threads", None)), ("--against", getattr(args, "against", None)),
                        ("--border", getattr(args, "border", 0) or None)):
        if value not in (None, ""):
            parts += [flag, str(value)]
    for item in args.settings:
        parts += ["--set", item]
    parts += [flag for flag, on in (("--no-lpips", args.no_lpips), ("--no-save-recon", args.no_save_recon),
                                              ("--overwrite", args.overwrite)) if on]
    return shlex.join(parts)


def _dedupe_names(sources: list[Source]) -> None:
    """Make default names unique: ``student`` twice → ``student:DIRNAME``; recon dirs by parent/name."""
    for s in sources:
        if sum(t.name == s.name for t in sources) > 1:
            if s.kind == "method" and s.path is not None:
                s.name = f"{s.spec}:{s.path.resolve().name}"
            elif s.kind == "recon" and s.path is not None:
                s.name = f"{s.path.resolve().parent.name}/{s.path.resolve().name}"
    seen: dict[str, int] = {}
    for s in sources:
        if s.name in seen:
            seen[s.name] += 1
            s.name = f"{s.name}#{seen[s.name]}"
        else:
            seen[s.name] = 1


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvaluationError(f"--device {device}: CUDA is not available (torch {torch.__version__})")
    if not (device == "cpu" or device.startswith("cuda")):
        raise EvaluationError(f"--device {device}: use cpu, cuda, cuda:N or auto")
    return device


# ----------------------------------------------------------------------------------------------
# Building and running methods
# ----------------------------------------------------------------------------------------------


def build_method(source: Source, prior_dir: Path | None, device: str) -> Callable:
    """A solver ``(y, physics) → x̂`` for a ``--methods`` entry (registry, student or diffusion prior)."""
    from train.solvers import SOLVERS, make_solver

    settings = dict(source.settings)
    if source.spec == "student":
        try:
            from train.students import load_student
        except ImportError as exc:
            raise EvaluationError(f"--methods student:{source.path}: train.students is unavailable ({exc})") from exc
        if prior_dir is not None and "prior" not in settings:
            settings["prior"] = _load_prior(prior_dir, device)
        try:
            return load_student(source.path, device=device, **settings)
        except TypeError as exc:
            raise EvaluationError(f"--set student.*: {exc}") from exc
    if source.spec in DIFFUSION_METHODS:
        settings["prior"] = _load_prior(prior_dir, device)
    if source.spec not in SOLVERS:
        raise EvaluationError(f"--methods: unknown method {source.spec!r}; available: "
                              f"{', '.join(sorted(SOLVERS))}, student:DIR")
    try:
        solver = make_solver(source.spec, **settings)
    except TypeError as exc:
        raise EvaluationError(f"--set {source.spec}.*: {exc}") from exc
    if isinstance(solver, torch.nn.Module):
        solver = solver.to(device).eval()
    return solver


_PRIORS: dict[tuple[str, str], object] = {}


def _load_prior(prior_dir: Path | None, device: str):
    if prior_dir is None:
        raise EvaluationError("diffusion methods need --prior DIR")
    key = (str(prior_dir), device)
    if key not in _PRIORS:
        try:
            from train.prior.io import load_prior
        except ImportError as exc:
            raise EvaluationError(f"--prior {prior_dir}: train.prior.io.load_prior is unavailable ({exc})") from exc
        prior = load_prior(prior_dir)
        if isinstance(prior, torch.nn.Module):
            prior = prior.to(device).eval()
        _PRIORS[key] = prior
    return _PRIORS[key]


@dataclass
class MethodRun:
    recon: torch.Tensor  # (N, C, H, W) float32 on the CPU
    seconds: list[float]  # per image, in ``ids`` order
    peak_bytes: int | None
    settings: dict
    nfe: int | None
    resumed: int = 0  # images taken from an earlier run's recon directory


RECON_RECORD = "recon.json"


def _save_image(root: Path, sample_id: str, x: np.ndarray) -> None:
    """``ID.npy`` (float32 CHW, atomic) and ``ID.png`` (8-bit view, :func:`train.solve.to_png8`)."""
    from train.solve import to_png8, write_png

    atomic_save_npy(root / f"{sample_id}.npy", np.ascontiguousarray(x, dtype=np.float32))
    write_png(root / f"{sample_id}.png", to_png8(x))


def _resume_state(root: Path | None, key: dict, ids: Sequence[str]) -> dict[str, dict]:
    """Images of an earlier run with the same ``key`` (method, settings, data, device, seed) in ``root``."""
    if root is None or not (root / RECON_RECORD).exists():
        return {}
    try:
        old = json.loads((root / RECON_RECORD).read_text())
    except json.JSONDecodeError:
        return {}
    if old.get("key") != key:
        raise EvaluationError(f"{root}: holds reconstructions of another run (method, settings, data, device or "
                              f"seed differ in {RECON_RECORD}); use another --out or --overwrite")
    done = old.get("images", {})
    return {i: done[i] for i in ids if i in done and (root / f"{i}.npy").exists()}


def seeded_call(solver: Callable, physics: LenslessOperator) -> Callable[[torch.Tensor, Sequence[int]], torch.Tensor]:
    """``(y, ks) → x̂`` for the samples ``ks`` of the split (one per row of ``y``); seeded solvers
    (``__call__(…, seeds=)``, the diffusion methods) get ``seeds=[solver.seed + k for k in ks]``, so
    one-at-a-time runs equal one batched run of the split."""
    try:
        takes_seeds = "seeds" in inspect.signature(solver.__call__).parameters
    except (TypeError, ValueError):
        takes_seeds = False
    if not takes_seeds:
        return lambda y, ks: solver(y, physics)
    base = int(getattr(solver, "seed", 0) or 0)
    return lambda y, ks: solver(y, physics, seeds=[base + int(k) for k in ks])


def run_method(solver: Callable, ds: LenslessDataset, ids: Sequence[str], physics: LenslessOperator,
               device: str, seed: int = 0, name: str = "method", save_dir: Path | None = None,
               key: dict | None = None, record_extra: dict | None = None) -> MethodRun:
    """Run ``solver`` one image at a time: one untimed warm-up call, then per-image time and peak memory.

    With ``save_dir`` every image is written as soon as it is done (``ID.npy``, ``ID.png`` and its time and
    memory in ``recon.json``); a rerun with the same ``key`` resumes, reusing the stored images and numbers.
    """
    from tqdm import tqdm

    key = _jsonable(key or {})
    done = _resume_state(save_dir, key, ids)
    record = {"key": key, **(record_extra or {}), "images": dict(done)}
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
    todo = [i for i in ids if i not in done]
    call = seeded_call(solver, physics)
    if todo:
        torch.manual_seed(seed)
        with torch.no_grad():
            call(ds.measurements(todo[:1]).to(device), [ids.index(todo[0])])
        _sync(device)
    results: dict[str, torch.Tensor] = {}
    estimate = TimeEstimate(f"evaluate {name}", len(todo), "image", after=2)
    for count, sample_id in enumerate(tqdm(todo, desc=name, unit="img", leave=False, file=sys.stderr), 1):
        y = ds.measurements([sample_id]).to(device)
        torch.manual_seed(seed + ids.index(sample_id))
        with PeakMemory(device) as mem:
            _sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                x = call(y, [ids.index(sample_id)])
            _sync(device)
            seconds = time.perf_counter() - t0
        if not torch.is_tensor(x) or x.ndim != 4 or x.shape[0] != 1:
            raise EvaluationError(f"method {name}: expected a (1, C, H, W) tensor for {sample_id}, "
                                  f"got {type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
        results[sample_id] = x.detach().float().cpu()
        record["images"][sample_id] = {"seconds": seconds,
                                       "peak_mem_mb": mem.peak / 2**20 if mem.peak is not None else None}
        if save_dir is not None:
            _save_image(save_dir, sample_id, results[sample_id][0].numpy())
            _write_json(save_dir / RECON_RECORD, record)
        estimate.update(count)
    for sample_id in done:
        results[sample_id] = torch.from_numpy(np.load(save_dir / f"{sample_id}.npy"))[None]
    settings = solver.settings() if hasattr(solver, "settings") else {}
    nfe = getattr(solver, "nfe", None)
    seconds_all = [float(record["images"][i]["seconds"]) for i in ids]
    peaks = [record["images"][i]["peak_mem_mb"] for i in ids if record["images"][i].get("peak_mem_mb") is not None]
    return MethodRun(torch.cat([results[i] for i in ids]), seconds_all,
                     int(max(peaks) * 2**20) if peaks else None, settings,
                     int(nfe) if isinstance(nfe, (int, float)) else None, resumed=len(done))


def _mean(values: Sequence[float] | None) -> float | None:
    if not values:
        return None
    return float(np.mean(values))


def finite_or_none(obj):
    """Strict JSON: NaN/±Inf (e.g. the PSNR of an exact reconstruction) become ``null``."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def _write_json(path: Path, obj) -> None:
    """Atomic strict-JSON write (temporary file + rename; non-finite numbers as ``null``)."""
    atomic_write_json(path, finite_or_none(obj), indent=2, allow_nan=False)


def _recon_dir_timing(path: Path, ids: Sequence[str]) -> dict:
    """Method, settings and time per image recorded by ``nsdd-train solve`` in ``recon.json`` (if any).

    ``solve`` stores ``images[ID].seconds``; they are used (their median over ``ids``) only when solve timed by
    this command's protocol (``timing.protocol == "batch-1"``: warm-up, then one image per call).
    """
    meta_path = path / RECON_RECORD
    if not meta_path.exists():
        return {}
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise EvaluationError(f"{meta_path}: invalid JSON ({exc})") from exc
    out = {k: meta[k] for k in ("method", "settings") if k in meta}
    images = meta.get("images", {})
    secs = [images[i]["seconds"] for i in ids if isinstance(images.get(i), dict) and "seconds" in images[i]]
    timing = meta.get("timing") or {}
    if timing.get("protocol") != "batch-1":
        out["seconds_note"] = (f"{meta_path}: timed with batch size {timing.get('batch_size', '?')} without the "
                               "batch-1 protocol; not shown (rerun solve with --batch-size 1)")
        secs = []
    if len(secs) == len(ids):
        out["seconds_per_image"] = float(statistics.median(secs))
        out["seconds_source"] = f"{meta_path} (nsdd-train solve)"
    peaks = [images[i].get("peak_mem_mb") for i in ids if isinstance(images.get(i), dict)]
    if peaks and all(v is not None for v in peaks) and len(peaks) == len(ids):
        out["peak_mem_mb"] = float(max(peaks))
    return out


# ----------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------


def run_evaluation(cfg: EvaluationConfig) -> dict:
    """Evaluate every source, write metrics.json / metrics.md / per_image.json / figures (and the report)."""
    from train.report import metrics_table, save_grid, save_lpips_vs_time, write_report

    ds = LenslessDataset(cfg.data)
    ids = ds.ids(cfg.split)
    total = len(ids)
    ids = ids[cfg.skip:]
    if cfg.limit is not None:
        ids = ids[: cfg.limit]
    if not ids:
        raise EvaluationError(f"{cfg.data}: split {cfg.split!r} is empty" if not total else
                              f"{cfg.data}: --skip {cfg.skip} leaves none of the split's {total} ids")
    if cfg.use_lpips:  # fail before any long run when the weights are missing
        from train.lpips import LPIPSWeightsError, get_lpips

        try:
            get_lpips(cfg.lpips_weights, cfg.device)
        except LPIPSWeightsError as exc:
            raise EvaluationError(f"{exc} (or pass --no-lpips)") from exc
    physics = ds.physics().to(cfg.device)
    machine = machine_info(cfg.device)
    cfg.out.mkdir(parents=True, exist_ok=True)
    reference = against_reference(ds, ids, cfg.against) if cfg.against is not None else None
    if cfg.border:  # before any method runs
        side = min(ds.ground_truth(ids[0]).shape[-2:] if ds.has_ground_truth(ids[0])
                    else tuple(ds.forward_physics().scene_shape))
        check_border(cfg.border, side, cfg.use_lpips)
    notes: list[str] = []
    for src in cfg.sources:  # Wiener's λ without ground truth unless given: the discrepancy principle
        if src.kind == "method" and src.spec == "wiener" and "lam" not in src.settings:
            try:
                src.settings["lam"] = ds.discrepancy_lambda(ids)
            except DatasetError as exc:
                notes.append(f"{src.name}: the data set's λ = {physics.lam:g} ({exc}).")
                continue
            notes.append(f"{src.name}: λ = {src.settings['lam']:.3g} by the discrepancy principle "
                         f"(rms(y − A A†y) = σ = {ds.meta.get('noise_std')} on the scored measurements).")

    metrics: dict[str, dict] = {}
    per_image: dict[str, dict] = {}
    recons: dict[str, torch.Tensor] = {}
    for src in cfg.sources:
        entry: dict = {"source": src.kind, "split": cfg.split, "dataset": str(cfg.data)}
        if src.kind == "recon":
            x = read_recon_dir(src.path, ids)
            entry["path"] = str(src.path)
            entry.update(_recon_dir_timing(src.path, ids))
        else:
            solver = build_method(src, cfg.prior, cfg.device)
            save_dir = cfg.out / "recon" / _safe(src.name) if cfg.save_recon else None
            key = {"method": src.spec, "path": str(src.path) if src.path else None, "settings": src.settings,
                   "prior": str(cfg.prior) if cfg.prior and (src.spec in DIFFUSION_METHODS or src.spec == "student")
                   else None, "dataset": str(cfg.data.resolve()), "device": cfg.device, "seed": cfg.seed,
                   "physics": {**physics.geometry.to_dict(), "lam": physics.lam, "psf_sha256": physics.psf_hash},
                   # the weights themselves: a student or prior retrained in the same directory is a new method
                   "weights_sha256": {
                       "model": weights_sha256(src.path) if src.path else None,
                       "prior": weights_sha256(cfg.prior) if cfg.prior and (
                           src.spec in DIFFUSION_METHODS or src.spec == "student") else None}}
            if save_dir is not None and cfg.overwrite and (save_dir / RECON_RECORD).exists():
                (save_dir / RECON_RECORD).unlink()
            run = run_method(solver, ds, ids, physics, cfg.device, cfg.seed, src.name, save_dir, key,
                             {"method": src.spec, "settings": _jsonable(solver.settings() if hasattr(
                                 solver, "settings") else {}), "dataset": str(cfg.data), "split": cfg.split,
                              "machine": machine})
            x = run.recon
            entry.update({
                "method": src.spec, "settings": _jsonable(run.settings),
                "seconds_per_image": float(statistics.median(run.seconds)),
                "seconds_per_image_mean": float(np.mean(run.seconds)),
                "peak_mem_mb": run.peak_bytes / 2**20 if run.peak_bytes is not None else None,
                "peak_mem_kind": "cuda max_memory_allocated" if cfg.device.startswith("cuda") else "RSS increase",
                "nfe": run.nfe,
            })
            if src.path is not None:
                entry["path"] = str(src.path)
            if save_dir is not None:
                entry["recon_dir"] = str(save_dir)
                entry["resumed_images"] = run.resumed
        scores = score(x, ids, ds, physics, cfg.use_lpips, cfg.lpips_weights, cfg.device, src.name, reference,
                       cfg.border)
        for key in ("psnr", "ssim", "lpips", "consistency", "consistency_recon"):
            entry[key] = _mean(scores.get(key))
            if scores.get(key):
                entry[f"{key}_std"] = float(np.std(scores[key]))
        entry["n"] = len(ids)
        if cfg.border:
            entry["border"] = cfg.border  # the image metrics leave out the window's outer `border` px
        entry["machine"] = machine
        if src.kind == "method":
            scores["seconds"] = run.seconds
        metrics[src.name] = _order(entry)
        per_image[src.name] = {"ids": list(ids), **scores, **({"border": cfg.border} if cfg.border else {})}
        recons[src.name] = x
        print(f"{src.name}: " + ", ".join(f"{k} {entry[k]:.4g}" for k in ("psnr", "ssim", "lpips", "consistency",
                                                                          "seconds_per_image")
                                           if entry.get(k) is not None), file=sys.stderr)

    _write_json(cfg.out / "metrics.json", metrics)
    _write_json(cfg.out / "per_image.json", per_image)
    floor = ground_truth_consistency(ds, ids, physics)
    if floor is not None:
        _write_json(cfg.out / "reference.json", {"ground_truth_consistency": floor["forward"],
                                                 "ground_truth_consistency_recon": floor["recon"]})
        print(f"ground truth: consistency {floor['forward']:.4g} under the forward operator"
              + (f", {floor['recon']:.4g} under the reconstruction operator" if floor["recon"] is not None else "")
              + " (what a perfect reconstruction scores)", file=sys.stderr)
    table = metrics_table(metrics)
    border = f", image metrics without the outer {cfg.border} px" if cfg.border else ""
    (cfg.out / "metrics.md").write_text(f"# Metrics ({cfg.data}, split {cfg.split}, n = {len(ids)}{border})\n\n"
                                        + table)

    figures: dict[str, Path | None] = {"qualitative comparison": None, "LPIPS vs. time": None}
    rows = ids[: cfg.grid_samples]
    if rows:
        gh_gw = ds.ground_truth(rows[0]).shape[-2:] if ds.has_ground_truth(rows[0]) else None
        try:  # shown as scored: a camera profile's scenes at their level L, divided by it
            level = [1.0] * len(rows) if (lv := ds.scene_levels(rows)) is None else [float(v) for v in lv]
        except DatasetError:
            level = [1.0] * len(rows)
        shown = {name: [(center_crop(x[k], gh_gw) if gh_gw is not None else x[k]).numpy() / level[k]
                        for k in range(len(rows))] for name, x in recons.items()}
        gts = [ds.ground_truth(i) / level[k] if ds.has_ground_truth(i) else None for k, i in enumerate(rows)]
        figures["qualitative comparison"] = save_grid(cfg.out / "grid.png", rows,
                                                      [ds.measurement(i) for i in rows], shown, gts)
    figures["LPIPS vs. time"] = save_lpips_vs_time(cfg.out / "lpips_vs_time.png", metrics)
    if cfg.report is not None:
        notes.insert(0, "Timing: one untimed warm-up call, then every image alone (batch 1); the median per image, "
                        f"{machine.get('torch_threads')} torch thread(s) on {machine.get('device')}.")
        notes.insert(1, "Consistency ‖Ax̂ − y‖/‖y‖ is scored under the forward operator that made y (x̂ cut to its "
                        "scene grid) and, in the second column, under the reconstruction operator the methods use.")
        if cfg.against is not None:
            notes.append(f"PSNR, SSIM and LPIPS are scored against the reconstructions in {cfg.against} (no ground "
                         "truth).")
        if cfg.border:
            notes.append(f"PSNR, SSIM and LPIPS leave out the outer {cfg.border} px of the scene window (--border).")
        if not cfg.use_lpips:
            notes.append("LPIPS skipped (--no-lpips).")
        if floor is not None:
            notes.append(f"The ground truth itself scores ‖A x − y‖ / ‖y‖ = {floor['forward']:.3g} under the forward "
                         "operator (the noise floor)"
                         + (f" and {floor['recon']:.3g} under the reconstruction operator (the noise floor plus its "
                            "model error)" if floor["recon"] is not None else "")
                         + ": lower values fit noise.")
        write_report(cfg.report, metrics, machine, cfg.command, figures, str(cfg.data), cfg.split, len(ids), notes)
    return {"metrics": metrics, "table": table, "figures": figures, "ids": ids}


_ORDER = ("psnr", "ssim", "lpips", "consistency", "consistency_recon", "n", "seconds_per_image", "peak_mem_mb")


def _order(entry: dict) -> dict:
    return {**{k: entry.get(k) for k in _ORDER}, **{k: v for k, v in entry.items() if k not in _ORDER}}



WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def weights_sha256(path: str | os.PathLike) -> str | None:
    """SHA-256 over a model's weight files (a file, or a directory's weight files except training checkpoints)."""
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES
                       and f.name != "checkpoint.pt")
    else:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("_") or "method"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
