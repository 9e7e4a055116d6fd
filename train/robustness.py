"""``nsdd-train robustness``: every method when the PSF it reconstructs with is not the one that made ``y``.

A PSF is calibrated once, at one depth; the scene then sits at another depth (the PSF scales), the mask
moves (shift, rotation) and the calibration is noisy. For each perturbation ``(kind, level)`` the study
simulates, for the same ``N`` held-out faces ``x`` and the same measurement noise ``n``,

    y = clip(A_true x + σ n, 0, 1),   A_true = the data set's forward model (crop) with the true PSF h_θ,

where ``h_θ`` is the data set's (calibrated) PSF ``h`` warped by :func:`nsdd_edge.psf_warp.warp_psf` (``shift``:
``t = (0, level)`` pixels along x; ``scale``: ``s = level``; ``rotation``: ``φ = level`` degrees) or, for
``psf_snr``, ``h`` plus calibration noise at ``level`` dB (:func:`nsdd_edge.psf_warp.psf_with_snr`, one seeded
noise pattern for every level; ``inf``: none). ``σ``, the noise draw of each face and the clip are the
simulation's own (:func:`train.simulate.noisy_measurement`), so the identity perturbation reproduces the data
set's stored measurements. Every method then reconstructs with the **calibrated** ``h`` (the data set's
reconstruction operator, the one the students were trained for): that is the mismatch.

Scores per face: PSNR, SSIM and LPIPS of the clipped centre crop against the ground truth
(:func:`train.scoring.image_scores`), and ``‖A x̂ − y‖ / ‖y‖`` under the **true** forward operator
(``consistency``, the one that made ``y``) and under the calibrated forward operator (``consistency_calibrated``,
the only one a user can compute). The ground truth's own consistency under the true operator is the noise floor
of each level (``reference``).

Settings are the evaluation's (:func:`train.evaluate.build_method`, ``--set METHOD.KEY=VALUE``); Wiener's λ is the
discrepancy principle on the data set's own (unperturbed) measurements of the scored faces, as in
``nsdd-train evaluate``, and is then fixed for every level; ``--diffusion-steps`` sets the steps of DDNM+, DiffPIR
and DPS unless ``--set`` does. Each ``(method, perturbation)`` cell is written to ``OUT/cells/METHOD/LABEL.json``
as soon as it is done (with the first face's reconstruction, ``LABEL.npy``) and a rerun with the same key skips
it; the identity perturbation of every kind is one cell (``none``). Outputs: ``results.json``, ``results.csv``,
``table.md``, ``robustness_{psnr,lpips,consistency}.png`` and ``grid.png`` (:mod:`train.robustness_report`).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nsdd_edge.atomic import atomic_save_npy
from nsdd_edge.cli_common import add_threads_argument
from nsdd_edge.optics import OpticsError, array_hash
from nsdd_edge.psf_warp import PsfWarp, psf_with_snr, warp_psf
from train.data import DatasetError, LenslessDataset
from train.evaluate import (
    DIFFUSION_METHODS,
    EvaluationError,
    Source,
    _jsonable,
    _safe,
    _split_list,
    _write_json,
    build_method,
    parse_settings,
    seeded_call,
    weights_sha256,
)
from train.physics import LenslessOperator
from train.progress import TimeEstimate
from train.scoring import forward_consistency, image_scores

HELP = "PSNR, LPIPS and consistency of every method when the PSF is shifted, scaled, rotated or noisy (mismatch)"

KINDS = ("shift", "scale", "rotation", "psf_snr")
UNITS = {"shift": "px along x", "scale": "×", "rotation": "°", "psf_snr": "dB"}
IDENTITY = {"shift": 0.0, "scale": 1.0, "rotation": 0.0, "psf_snr": math.inf}
DEFAULT_LEVELS: dict[str, tuple[float, ...]] = {
    "shift": (0, 1, 2, 3, 4),
    "scale": (0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25),
    "rotation": (0, 1, 2, 3, 5),
    "psf_snr": (math.inf, 20, 10, 0, -10),
}
CELL_FORMAT = "nsdd-robustness-cell"


class RobustnessError(ValueError):
    """Bad study arguments or inputs (a kind, a level, a data set); the message names it and the problem."""


def format_level(level: float) -> str:
    """``2``, ``1.05``, ``-10``, ``inf`` (the key of a level in files and tables)."""
    return "inf" if math.isinf(level) else f"{level:g}"


@dataclass(frozen=True)
class Perturbation:
    """One mismatch between the true PSF and the calibrated one: ``kind`` in :data:`KINDS` at ``level``."""

    kind: str
    level: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise RobustnessError(f"unknown perturbation kind {self.kind!r}; use one of {', '.join(KINDS)}")
        level = float(self.level)
        if math.isnan(level) or (math.isinf(level) and not (self.kind == "psf_snr" and level > 0)):
            raise RobustnessError(f"{self.kind} level {self.level!r}: must be a finite number"
                                  + (" or inf (no calibration noise)" if self.kind == "psf_snr" else ""))
        if self.kind == "scale" and level <= 0:
            raise RobustnessError(f"scale level {level:g}: must be > 0 (1 = the calibrated PSF)")
        object.__setattr__(self, "level", level)

    @property
    def is_identity(self) -> bool:
        return self.level == IDENTITY[self.kind]

    @property
    def label(self) -> str:
        """``none`` for the identity (shared by every kind), else e.g. ``scale_1.1``, ``psf_snr_-10``."""
        return "none" if self.is_identity else f"{self.kind}_{format_level(self.level)}"

    @property
    def title(self) -> str:
        return "no mismatch" if self.is_identity else f"{self.kind} {format_level(self.level)} {UNITS[self.kind]}"

    def warp(self) -> PsfWarp:
        return PsfWarp(scale=self.level if self.kind == "scale" else 1.0,
                       shift=(0.0, self.level if self.kind == "shift" else 0.0),
                       rotation_deg=self.level if self.kind == "rotation" else 0.0)

    def true_psf(self, psf: np.ndarray, seed: int) -> np.ndarray:
        """``h_θ``: the calibrated ``psf`` warped (energy kept), or with calibration noise (``psf_snr``; the noise
        pattern of ``seed``, the same for every level)."""
        if self.is_identity:
            return np.array(psf, dtype=np.float32, copy=True)
        if self.kind == "psf_snr":
            return psf_with_snr(psf, self.level, np.random.default_rng(seed))
        return warp_psf(psf, self.warp())


def parse_level_options(items: Sequence[str], kinds: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """``--kinds`` and ``--levels KIND=V,V,…`` → ``{kind: levels}`` (default levels where none are given)."""
    for kind in kinds:
        Perturbation(kind, IDENTITY.get(kind, 0.0))  # names an unknown kind
    levels = {k: DEFAULT_LEVELS[k] for k in kinds}
    for item in items:
        kind, sep, values = item.partition("=")
        kind = kind.strip()
        if not sep or not values.strip():
            raise RobustnessError(f"--levels {item!r}: expected KIND=V,V,… e.g. scale=0.9,1,1.1")
        if kind not in kinds:
            raise RobustnessError(f"--levels {item!r}: kind {kind!r} is not among --kinds {','.join(kinds)}")
        try:
            parsed = tuple(float(v) for v in _split_list(values))
        except ValueError:
            raise RobustnessError(f"--levels {item!r}: levels must be numbers (or inf for psf_snr)") from None
        for v in parsed:
            Perturbation(kind, v)
        levels[kind] = parsed
    return levels


@dataclass
class StudyConfig:
    data: Path
    out: Path
    sources: list[Source]
    levels: dict[str, tuple[float, ...]]
    split: str = "test"
    skip: int = 0
    limit: int = 8
    prior: Path | None = None
    lpips_weights: str | None = None
    use_lpips: bool = True
    batch_size: int = 8
    seed: int = 0
    psf_noise_seed: int = 0
    grid: list[Perturbation] = field(default_factory=list)
    overwrite: bool = False
    command: str = ""


def make_sources(methods: Sequence[str], names: Sequence[str], settings: dict[str, dict],
                 diffusion_steps: int | None) -> list[Source]:
    """One :class:`train.evaluate.Source` per ``--methods`` entry (``student:DIR`` too), named by ``--names``."""
    if not methods:
        raise RobustnessError("--methods: give at least one method, e.g. wiener,admm,student:DIR")
    sources: list[Source] = []
    for m in methods:
        if m.startswith("student:"):
            path = Path(m.split(":", 1)[1])
            if not path.is_dir():
                raise RobustnessError(f"--methods {m}: student directory {path} does not exist")
            sources.append(Source(f"student:{path.name}", "method", "student", path=path,
                                  settings=dict(settings.get("student", {}))))
        else:
            s = dict(settings.get(m, {}))
            if m in DIFFUSION_METHODS and diffusion_steps is not None:
                s.setdefault("steps", int(diffusion_steps))
            sources.append(Source(m, "method", m, settings=s))
    unknown = set(settings) - {s.spec for s in sources}
    if unknown:
        raise RobustnessError(f"--set for {sorted(unknown)}, which are not among --methods")
    if names:
        if len(names) != len(sources):
            raise RobustnessError(f"--names has {len(names)} names for {len(sources)} --methods")
        for s, n in zip(sources, names):
            s.name = n
    if len({s.name for s in sources}) != len(sources):
        raise RobustnessError(f"method names must be unique (give --names), got {[s.name for s in sources]}")
    return sources


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True,
                   help="simulated data set (nsdd-train simulate): its PSF is the calibrated one, its ground truth the "
                        "scenes, its forward model, noise level and seed make the mismatched measurements")
    p.add_argument("--methods", required=True,
                   help="methods, comma-separated: wiener, admm, fista, ddnm, diffpir, dps, student:DIR")
    p.add_argument("--names", default="", help="display names of --methods, comma-separated")
    p.add_argument("--prior", default=None, help="diffusion prior directory (ddnm, diffpir, dps)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method setting as in nsdd-train evaluate, e.g. admm.iters=50 (repeatable)")
    p.add_argument("--diffusion-steps", type=int, default=20,
                   help="steps of ddnm, diffpir and dps unless --set gives them (fewer than the reported tables' "
                        "50/100: the study runs every method at every level)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"perturbation kinds, comma-separated ({', '.join(KINDS)})")
    p.add_argument("--levels", action="append", default=[], metavar="KIND=V,V,…",
                   help="levels of one kind (repeatable), e.g. scale=0.9,1,1.1; shift in pixels along x, rotation in "
                        "degrees, psf_snr in dB (inf: no calibration noise). Default: "
                        + "; ".join(f"{k} {','.join(format_level(v) for v in DEFAULT_LEVELS[k])}" for k in KINDS))
    p.add_argument("--split", default="test", help="data set split the faces come from")
    p.add_argument("--skip", type=int, default=0, help="leave out the first N ids of the split")
    p.add_argument("--limit", type=int, default=8, help="number of faces (the first of the split after --skip)")
    p.add_argument("--batch-size", type=int, default=8, help="faces per method call")
    p.add_argument("--seed", type=int, default=0, help="seed of the stochastic methods (face k uses seed + k)")
    p.add_argument("--psf-noise-seed", type=int, default=0, help="seed of the calibration-noise pattern (psf_snr)")
    p.add_argument("--grid", default="scale=1.1,shift=2",
                   help="perturbations of the picture grid (first face, every method), KIND=LEVEL comma-separated; "
                        "the no-mismatch row comes first")
    p.add_argument("--lpips-weights", default=None,
                   help="LPIPS-Alex v0.1 state dict (default: $NSDD_LPIPS_WEIGHTS, else the usual download)")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS (no weights needed)")
    p.add_argument("--overwrite", action="store_true", help="recompute cells whose stored key differs instead of stopping")
    p.add_argument("--out", required=True, help="output directory (cells/ cache, results, figures)")
    add_threads_argument(p, "torch CPU threads", "train")


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    kinds = _split_list(args.kinds)
    if not kinds:
        raise RobustnessError("--kinds: give at least one kind")
    levels = parse_level_options(args.levels, kinds)
    try:
        settings = parse_settings(args.settings)
    except EvaluationError as exc:
        raise RobustnessError(str(exc)) from None
    if args.diffusion_steps is not None and args.diffusion_steps < 1:
        raise RobustnessError(f"--diffusion-steps must be ≥ 1, got {args.diffusion_steps}")
    sources = make_sources(_split_list(args.methods), _split_list(args.names), settings, args.diffusion_steps)
    needs_prior = [s.spec for s in sources if s.spec in DIFFUSION_METHODS]
    if needs_prior and not args.prior:
        raise RobustnessError(f"--methods {','.join(needs_prior)} need a diffusion prior: give --prior DIR")
    for flag, value, least in (("--limit", args.limit, 1), ("--batch-size", args.batch_size, 1), ("--skip", args.skip, 0)):
        if value < least:
            raise RobustnessError(f"{flag} must be ≥ {least}, got {value}")
    grid = []
    for item in _split_list(args.grid):
        kind, sep, value = item.partition("=")
        try:
            grid.append(Perturbation(kind.strip(), float(value)))
        except ValueError as exc:
            raise RobustnessError(f"--grid {item!r}: {exc}" if sep else f"--grid {item!r}: expected KIND=LEVEL") from None
    return StudyConfig(data=Path(args.data), out=Path(args.out), sources=sources, levels=levels, split=args.split,
                       skip=args.skip, limit=args.limit, prior=Path(args.prior) if args.prior else None,
                       lpips_weights=args.lpips_weights, use_lpips=not args.no_lpips, batch_size=args.batch_size,
                       seed=args.seed, psf_noise_seed=args.psf_noise_seed, grid=grid, overwrite=args.overwrite,
                       command=shlex.join(["nsdd-train", *sys.argv[1:]]) if sys.argv[1:2] == ["robustness"] else "")


def main(args: argparse.Namespace) -> int:
    from train.threads import torch_threads

    try:
        cfg = config_from_args(args)
        with torch_threads(args.threads):
            result = run_study(cfg)
    except (RobustnessError, EvaluationError, DatasetError, OpticsError) as exc:
        print(f"nsdd-train robustness: error: {exc}", file=sys.stderr)
        return 2
    print(result["table"], end="")
    print(f"wrote {cfg.out / 'results.json'}, results.csv, table.md and the figures; "
          f"{result['computed']} cells computed, {result['resumed']} resumed")
    return 0


# ----------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------


@dataclass
class Faces:
    """The scored faces: ids, ground truth ``(N, C, h, w)``, and the simulation's noise level, seed and index."""

    ids: list[str]
    truth: torch.Tensor
    noise_std: float
    seed: int
    indices: list[int]


def load_faces(ds: LenslessDataset, split: str, skip: int, limit: int) -> Faces:
    """The first ``limit`` faces of ``split`` after ``skip``, from a Gaussian-noise simulated data set."""
    ids = ds.ids(split)[skip : skip + limit]
    if not ids:
        raise RobustnessError(f"{ds.root}: split {split!r} has no ids after --skip {skip}")
    if ds.meta.get("noise_model"):
        raise RobustnessError(f"{ds.root}: simulated with a camera's Poisson–Gaussian noise model; the study "
                              "re-simulates Gaussian noise only (a data set of nsdd-train simulate without --profile)")
    sigma = ds.meta.get("noise_std")
    if sigma is None or not all(i.isdigit() for i in ids):
        raise RobustnessError(f"{ds.root}: not a simulated data set (needs noise_std in dataset.json and numbered "
                              "ids, as nsdd-train simulate writes)")
    missing = [i for i in ids if not ds.has_ground_truth(i)]
    if missing:
        raise RobustnessError(f"{ds.root}: no ground truth for {len(missing)} of the {len(ids)} faces "
                              f"(first: {missing[0]})")
    truth = torch.from_numpy(np.stack([ds.ground_truth(i) for i in ids]))
    return Faces(list(ids), truth, float(sigma), int(ds.meta.get("seed", 0)), [int(i) for i in ids])


def true_forward(ds: LenslessDataset, psf: np.ndarray) -> LenslessOperator:
    """The data set's forward model (geometry, noise level) with another PSF."""
    g = ds.forward_geometry
    return LenslessOperator(psf, g.sensor_shape, g.model, scene_shape=g.scene_shape, conv_shape=g.conv_shape,
                            noise_std=float(ds.meta.get("noise_std") or 0.0))


def simulate_measurements(forward: LenslessOperator, faces: Faces) -> torch.Tensor:
    """``y = clip(A x + σ n, 0, 1)`` with each face's own noise draw (:func:`train.simulate.noisy_measurement`)."""
    from train.physics import center_pad
    from train.simulate import noisy_measurement

    with torch.no_grad():
        clean = forward.A(center_pad(faces.truth, forward.scene_shape))
    return torch.stack([noisy_measurement(c, faces.noise_std, faces.seed, k) for c, k in zip(clean, faces.indices)])


def reconstruct(solver, y: torch.Tensor, physics: LenslessOperator, batch_size: int) -> torch.Tensor:
    """``solver`` on the rows of ``y`` in batches; seeded solvers get the seed of face ``k`` (as evaluate)."""
    call = seeded_call(solver, physics)
    out = []
    with torch.no_grad():
        for k in range(0, y.shape[0], batch_size):
            rows = list(range(k, min(k + batch_size, y.shape[0])))
            out.append(call(y[rows[0] : rows[-1] + 1], rows).detach().float().cpu())
    return torch.cat(out)


def cell_scores(x: torch.Tensor, y: torch.Tensor, faces: Faces, forward: LenslessOperator,
                calibrated_forward: LenslessOperator, cfg: StudyConfig, name: str) -> dict[str, list[float]]:
    """Per-face PSNR/SSIM/LPIPS against the ground truth and consistency under the true and calibrated models."""
    out = image_scores(x, faces.truth, cfg.use_lpips, cfg.lpips_weights, "cpu", name)
    out["consistency"] = [float(v) for v in forward_consistency(x, y, forward)]
    out["consistency_calibrated"] = [float(v) for v in forward_consistency(x, y, calibrated_forward)]
    return out


def _read_cell(path: Path, key: dict, overwrite: bool) -> dict | None:
    if not path.exists():
        return None
    try:
        cell = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a cell cut short by a crash is recomputed
    if cell.get("key") == key:
        return cell
    if overwrite:
        return None
    raise RobustnessError(f"{path}: holds a cell of another study (method, settings, weights, faces or PSF differ); "
                          "use another --out or --overwrite")


def run_study(cfg: StudyConfig) -> dict:
    """Run (or resume) every (method, perturbation) cell and write the results and figures; see the module doc."""
    from tqdm import tqdm

    from train.robustness_report import write_outputs

    ds = LenslessDataset(cfg.data)
    faces = load_faces(ds, cfg.split, cfg.skip, cfg.limit)
    if cfg.use_lpips:  # fail before any long run when the weights are missing
        from train.lpips import LPIPSWeightsError, get_lpips

        try:
            get_lpips(cfg.lpips_weights, "cpu")
        except LPIPSWeightsError as exc:
            raise RobustnessError(f"{exc} (or pass --no-lpips)") from None
    physics = ds.physics()  # the calibrated reconstruction operator every method uses
    calibrated_forward = ds.forward_physics()
    notes = []
    for src in cfg.sources:
        if src.spec == "wiener" and "lam" not in src.settings:
            src.settings["lam"] = ds.discrepancy_lambda(faces.ids)
            notes.append(f"{src.name}: λ = {src.settings['lam']:.3g} by the discrepancy principle on the data set's "
                         "own measurements of these faces (calibrated PSF), fixed for every level")
    perturbations: dict[str, Perturbation] = {}
    for kind, levels in cfg.levels.items():
        for level in levels:
            p = Perturbation(kind, level)
            perturbations.setdefault(p.label, p)
    for p in cfg.grid:
        perturbations.setdefault(p.label, p)
    perturbations = dict(sorted(perturbations.items(), key=lambda kv: kv[0] != "none"))  # identity first

    data_key = {"dataset": str(cfg.data.resolve()), "ids": faces.ids, "noise_std": faces.noise_std,
                "seed": faces.seed, "calibrated_psf_sha256": array_hash(ds.psf),
                "recon": {**physics.geometry.to_dict(), "lam": physics.lam}, "method_seed": cfg.seed}
    keys = {src.name: {**data_key, "method": src.spec, "settings": _jsonable(src.settings),
                       "path": str(src.path) if src.path else None,
                       "weights_sha256": weights_sha256(src.path) if src.path else None,
                       "prior_sha256": weights_sha256(cfg.prior) if cfg.prior and src.spec in DIFFUSION_METHODS
                       else None} for src in cfg.sources}
    solvers: dict[str, object] = {}
    cells: dict[str, dict[str, dict]] = {src.name: {} for src in cfg.sources}
    measurements: dict[str, np.ndarray] = {}
    references: dict[str, float] = {}
    computed = resumed = 0
    estimate = TimeEstimate("robustness", len(perturbations), "level", after=1)
    bar = tqdm(list(perturbations.values()), desc="robustness", unit="level", file=sys.stderr)
    for done, p in enumerate(bar, 1):
        h_true = p.true_psf(ds.psf, cfg.psf_noise_seed)
        forward = true_forward(ds, h_true)
        y = simulate_measurements(forward, faces)
        measurements[p.label] = y[0].numpy()
        references[p.label] = float(forward_consistency(faces.truth, y, forward).mean())
        psf_hash = array_hash(h_true)
        for src in cfg.sources:
            key = {**keys[src.name], "perturbation": {"kind": p.kind, "level": format_level(p.level)},
                   "true_psf_sha256": psf_hash}
            path = cfg.out / "cells" / _safe(src.name) / f"{p.label}.json"
            cell = _read_cell(path, key, cfg.overwrite)
            if cell is None:
                bar.set_postfix_str(f"{src.name} @ {p.label}")
                if src.name not in solvers:
                    solvers[src.name] = build_method(src, cfg.prior, "cpu")
                torch.manual_seed(cfg.seed)
                t0 = time.perf_counter()
                x = reconstruct(solvers[src.name], y, physics, cfg.batch_size)
                seconds = time.perf_counter() - t0
                cell = {"format": CELL_FORMAT, "key": key, "seconds": seconds, "scores": cell_scores(
                    x, y, faces, forward, calibrated_forward, cfg, src.name)}
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_save_npy(path.with_suffix(".npy"), x[0].numpy().astype(np.float32))
                _write_json(path, cell)
                computed += 1
            else:
                resumed += 1
            cells[src.name][p.label] = cell
        estimate.update(done)
    bar.close()
    return write_outputs(cfg, faces, perturbations, cells, measurements, references, notes) | {
        "computed": computed, "resumed": resumed}
