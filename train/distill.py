"""``nsdd-train distill``: train a single-pass NSDD student from precomputed teacher targets.

Loss (``nullspace`` objective, NSDD): ``L = ‖(I − A†A)(x̂ − T(y))‖`` (L1 mean or L2 mean-square) with
``x̂ = A†y + (I − A†A) g(y, A†y)`` — only the null-space content is learned, the range comes from ``y``.
``full`` objective (ablation): ``L = ‖x̂ − T(y)‖`` with ``x̂ = g(y, A†y)``. Optional ``+ w · LPIPS(x̂, T)`` on
the full images. No ground truth is read: only ``measurements/ID.npy`` and the targets ``ID.npy``.

Training: AdamW, warm-up + cosine learning rate, gradient clipping, EMA of the weights (the EMA is what
is saved), bf16 autocast on a GPU. Every ``--checkpoint-every`` steps, atomically: ``checkpoint.pt``
(model, EMA, optimiser, step, RNG, data position, loss history), the student directory
(``config.json`` + ``model.safetensors``), ``loss.json`` + ``loss_curve.png`` and a sample grid
``samples/step_NNNNNNN.png`` (measurement view | A†y | student | teacher). Rerunning the same command
resumes from the checkpoint; the result equals an uninterrupted run. Ctrl-C / SIGTERM finish the step in
progress, write a checkpoint and exit (130); a second signal stops at once, keeping the last checkpoint.
Under ``torchrun`` the run is data parallel (``--batch`` global, rank 0 writes; :mod:`train.distributed`).

Over a range of PSF scales (``--psf-scale-range LO HI``, a scene at another depth: :mod:`train.scale_range`):
each sample's measurement is simulated from its target through the PSF scaled by its own ``s``, and the student
learns under that sample's ``A_s``.

λ: ``A†`` uses the dataset's ``recon.lam`` unless ``--lam`` is given. With very small λ (1e-6) and noisy
measurements ``A†y`` is dominated by amplified noise in the range, which a null-space student cannot
remove; a larger λ (≈1e-3 on the simulated radial-PSF data) gives the student far better inputs. The λ is
recorded in ``config.json`` and the student always uses it.

The command line (flags → :class:`DistillSettings`) is :mod:`train.distill_cli`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from nsdd_edge.atomic import atomic_write, atomic_write_text
from nsdd_edge.optics import PROJECTORS
from train.data import DatasetError, LenslessDataset
from train.distill_data import BatchOrder, DistillError, TargetSet, choose_ids
from train.distill_figures import measurement_view, write_loss_curve, write_sample_grid
from train.distill_holdout import held_out_loss, split_holdout
from train.distill_objective import distill_loss, ema_decay, ema_update, learning_rate, loss_window, windowed_lpips
from train.distributed import DistContext, init_distributed
from train.physics import LenslessOperator
from train.progress import TimeEstimate
from train.scale_range import ScaleOperators, ScaleRangeData, check_scale_range
from train.student_fold import fold_refusal, load_init_weights
from train.students import (
    KINDS,
    OBJECTIVES,
    StudentError,
    build_student,
    count_parameters,
    default_architecture,
    input_multiple,
    load_prior_dir,
    make_config,
    read_student_config,
    save_student,
    student_weights_path,
    wrap_student,
)

HELP = "distill a one-pass NSDD student (edge or paper) from teacher targets"
CHECKPOINT_NAME = "checkpoint.pt"
LOSS_WINDOWS = ("grid", "support", "auto")
SAMPLE_KEY = 2**31  # the scale-range draw of the sample grids (training steps use keys 0, 1, …)


@dataclass
class DistillSettings:
    """Everything that defines a distillation run (recorded in ``config.json`` and the checkpoint)."""

    data: str
    targets: str
    out: str
    student: str = "edge"
    objective: str = "nullspace"
    loss: str = "l1"
    lpips_weight: float = 0.0
    lpips_weights: str | None = None
    steps: int = 20000
    batch: int = 8
    lr: float = 2e-4
    weight_decay: float = 1e-4
    warmup: int = 500
    ema: float = 0.999
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    samples: int = 4
    split: str | None = None
    limit: int | None = None
    model: str | None = None
    lam: float | str | None = None  # a number, "discrepancy" (resolved on the training measurements) or the dataset's
    projector: str | None = None  # None: the data set's (dataset.json recon.projector, else tikhonov)
    prior: str | None = None
    support: str = "auto"
    support_taper: int = 0
    architecture: dict = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    fp16: bool = False
    progress: bool = True
    time_budget: float | None = None  # seconds for this invocation: sizes `steps` from the measured step rate
    preload: bool = False  # hold every (y, target) pair in memory (on the training device)
    psf_scale_range: list[float] | None = None  # [lo, hi]: y simulated from the targets, PSF scaled per sample
    init_student: str | None = None  # a student directory whose weights start the run (transfer to a new camera)
    loss_window: str = "grid"  # grid: the loss on the whole scene grid; support: on the student's support window
    holdout: int = 0  # the last N chosen ids are not trained on; their loss is logged at each checkpoint

    def validate(self) -> None:
        if self.student not in KINDS:
            raise DistillError(f"--student must be one of {KINDS}, got {self.student!r}")
        if self.objective not in OBJECTIVES:
            raise DistillError(f"--objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.loss not in ("l1", "l2"):
            raise DistillError(f"--loss must be l1 or l2, got {self.loss!r}")
        for name in ("steps", "batch", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise DistillError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise DistillError(f"--lr must be > 0, got {self.lr}")
        if not 0.0 <= self.ema < 1.0:
            raise DistillError(f"--ema must be in [0, 1), got {self.ema}")
        if self.lpips_weight < 0:
            raise DistillError(f"--lpips-weight must be >= 0, got {self.lpips_weight}")
        if self.student == "paper" and not self.prior:
            raise DistillError("--student paper needs --prior DIR (the pretrained diffusion prior to fine-tune)")
        if self.time_budget is not None and not self.time_budget > 0:
            raise DistillError(f"--time-budget must be > 0 minutes, got {self.time_budget / 60:g}")
        if self.projector is not None and self.projector not in PROJECTORS:
            raise DistillError(f"--projector must be one of {', '.join(PROJECTORS)}, got {self.projector!r}")
        if self.amp not in ("auto", "bf16", "off"):
            raise DistillError(f"--amp must be auto, bf16 or off, got {self.amp!r}")
        if self.psf_scale_range is not None:
            self.psf_scale_range = list(check_scale_range(self.psf_scale_range))
            if self.holdout:  # its training y are simulated through scaled PSFs: the held-out loss would not match
                raise DistillError("--holdout cannot be used with --psf-scale-range (the training measurements are "
                                   "simulated there, the held-out ones would be the data set's)")
        if self.loss_window not in LOSS_WINDOWS:
            raise DistillError(f"--loss-window must be one of {', '.join(LOSS_WINDOWS)}, got {self.loss_window!r}")
        parse_support(self.support)

    def signature(self) -> dict:
        """Settings that must not change when resuming (``steps``, I/O and display may)."""
        keep = ("student", "objective", "loss", "lpips_weight", "batch", "lr", "weight_decay", "warmup",
                "ema", "grad_clip", "split", "limit", "model", "lam", "projector", "support", "architecture", "seed")
        d = asdict(self)
        out = {k: d[k] for k in keep}
        if self.psf_scale_range is not None:  # absent otherwise: checkpoints written before it existed still resume
            out["psf_scale_range"] = list(self.psf_scale_range)
        if self.support_taper:  # likewise
            out["support_taper"] = int(self.support_taper)
        if self.loss_window != "grid":  # likewise
            out["loss_window"] = self.loss_window
        if self.holdout:  # likewise
            out["holdout"] = int(self.holdout)
        if self.init_student is not None:  # likewise (a resume takes its weights from the checkpoint)
            out["init_student"] = str(Path(self.init_student).resolve())  # its weights' hash is in the config
        return out


def parse_support(text: str) -> tuple[int, int] | str | None:
    """``--support``: ``auto``, ``full`` (None) or ``H[xW]`` in pixels."""
    if text in ("auto", "full"):
        return text if text == "auto" else None
    try:
        sizes = [int(v) for v in text.lower().split("x")]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise DistillError(f"--support must be auto, full or H[xW] in pixels, got {text!r}")
    return (sizes[0], sizes[-1])


def resolve_support(text: str, dataset: LenslessDataset, physics: LenslessOperator, taper: int = 0,
                    multiple: int = 1) -> tuple[int, int] | None:
    """The window ``g`` covers. ``auto``: the simulated scenes' size (dataset.json ``forward.scene_shape``)
    when it is smaller than the reconstruction grid — the rest is the known black padding — else the whole grid.

    With a soft edge (``taper`` τ > 0) ``auto`` widens the window by τ on every side, rounded up to the network's
    ``multiple`` and capped at the grid: the taper then falls on the black padding around the scenes, never on
    the scenes (a window of the scenes' own size fades ``g`` out over their outer τ pixels, a dark rim). An
    explicit ``H[xW]`` is taken as given."""
    support = parse_support(text)
    scene = tuple(physics.scene_shape)
    if support == "auto":
        fwd = tuple(dataset.forward_geometry.scene_shape)
        smaller = fwd[0] <= scene[0] and fwd[1] <= scene[1] and fwd != scene
        if not smaller:
            return None
        if taper > 0:
            step = max(1, int(multiple))
            wide = tuple(max(min(-(-(n + 2 * int(taper)) // step) * step, grid // step * step), n)
                         for n, grid in zip(fwd, scene))
            if any(w < n + 2 * int(taper) for w, n in zip(wide, fwd)):
                print(f"--support auto: the {scene[0]}x{scene[1]} grid leaves no room for the {taper} px soft edge "
                      f"around the {fwd[0]}x{fwd[1]} scenes; the window is {wide[0]}x{wide[1]}, so the edge fades "
                      "the scenes' outer pixels", file=sys.stderr)
            fwd = wide
        return fwd  # type: ignore[return-value]
    if support is not None and (support[0] > scene[0] or support[1] > scene[1]):
        raise DistillError(f"--support {support[0]}x{support[1]} is larger than the scene grid {scene[0]}x{scene[1]}")
    return support  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# Training pieces
# ----------------------------------------------------------------------------------------------


def init_student_record(directory: str) -> dict:
    """Where a ``--init-student`` run starts: the directory, its weights' SHA-256 and what they were trained for
    (PSF hash, geometry, step), recorded in the new student's ``config.json``."""
    try:
        cfg = read_student_config(directory)
        wpath = student_weights_path(directory, cfg)
    except StudentError as exc:
        raise DistillError(f"--init-student {exc}") from None
    return {"dir": str(Path(directory).resolve()), "weights_sha256": hashlib.sha256(wpath.read_bytes()).hexdigest(),
            "psf_sha256": cfg.get("psf_sha256"), "geometry": cfg.get("geometry"), "step": cfg.get("step"),
            "kind": cfg.get("kind"), "channels": cfg.get("channels")}


def check_init_student(directory: str, kind: str, channels: int, arch: dict, objective: str) -> dict:
    """The config of the student ``--init-student`` names, when its network is the one this run trains: same
    kind, architecture and objective (its PSF, geometry and λ may differ: that is the point), and a channel
    count that is this run's or folds to it (RGB ↔ gray, :mod:`train.student_fold`)."""
    try:
        cfg = read_student_config(directory)
    except StudentError as exc:
        raise DistillError(f"--init-student {exc}") from None
    theirs = {"kind": cfg.get("kind"), "architecture": cfg.get("architecture", {}), "objective": cfg.get("objective")}
    ours = {"kind": kind, "architecture": arch, "objective": objective}
    diff = [f"{k} {theirs[k]!r} (this run: {ours[k]!r})" for k in ours if theirs[k] != ours[k]]
    try:
        source_channels = int(cfg.get("channels", -1))
    except (TypeError, ValueError):  # not a count: reported as one that does not fold
        source_channels = -1
    refusal = fold_refusal(source_channels, int(channels), arch)  # RGB ↔ gray folds; other counts do not
    if refusal is not None:
        diff.append(f"channels {source_channels} (this run: {channels}): {refusal}")
    if diff:
        raise DistillError(f"--init-student {directory}: its network is not this run's: " + "; ".join(diff))
    return cfg


def _atomic_torch_save(obj: dict, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DistillError(f"--device {name}: CUDA is not available here")
    return dev


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived: the step in progress was finished and a checkpoint written."""


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def train_student(s: DistillSettings, *, prior: object | None = None,
                  callback: Callable[[int, float], None] | None = None) -> dict:
    """Run (or resume) a distillation; returns a summary. ``callback(step, loss)`` after every step.
    Under ``torchrun``: one data-parallel process of several (:mod:`train.distributed`; rank 0 writes).
    A run that fails before writing anything leaves no ``--out`` directory behind it."""
    s.validate()
    out = Path(s.out)
    created = not out.exists()
    ctx = init_distributed(_resolve_device(s.device), DistillError)
    try:
        with ctx.quiet_unless_main():
            return _train(s if ctx.is_main else replace(s, progress=False), ctx, prior=prior, callback=callback)
    except BaseException:
        if created and ctx.is_main and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    finally:
        ctx.close()


def _read_checkpoint(ckpt_path: Path) -> dict | None:
    """The checkpoint in ``--out`` (None: none yet); refuses a trained student without one, and a corrupt file."""
    out = ckpt_path.parent
    if not ckpt_path.exists() and (out / "model.safetensors").exists():
        raise DistillError(f"{out}: holds a trained student but no {CHECKPOINT_NAME} to resume from; choose another "
                           "--out (nothing is overwritten)")
    if not ckpt_path.exists():
        return None
    try:
        return torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt checkpoint is never silently replaced
        raise DistillError(f"{ckpt_path}: unreadable checkpoint ({type(exc).__name__}: {exc}); move it away "
                           "to start over") from exc


def _train(s: DistillSettings, ctx: DistContext, *, prior: object | None,
           callback: Callable[[int, float], None] | None) -> dict:
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    device = ctx.device
    ctx.check_batch(s.batch, DistillError)
    use_amp = s.amp == "bf16" or (s.amp == "auto" and device.type == "cuda")  # bf16 on CPU: allowed, slow

    try:
        dataset = LenslessDataset(s.data)
    except DatasetError as exc:
        raise DistillError(str(exc)) from exc
    ids, split = choose_ids(dataset, s.split)
    if s.limit is not None:
        if s.limit < 1:
            raise DistillError(f"--limit must be at least 1, got {s.limit}")
        ids = ids[: s.limit]  # the first N ids of the split, as `nsdd-train teacher --limit N` labels them
    ids, held_ids = split_holdout(ids, s.holdout)
    lam_rule = "given" if s.lam is not None else "dataset recon.lam"
    if s.lam == "discrepancy":  # no ground truth: the λ whose Wiener residual matches the noise level
        try:
            s.lam = dataset.discrepancy_lambda(ids)
        except DatasetError as exc:
            raise DistillError(f"--lam discrepancy: {exc}") from exc
        lam_rule = "discrepancy principle on the first 64 training measurements"
        if s.progress:
            print(f"λ = {s.lam:.4g} (discrepancy principle)", file=sys.stderr)
    try:
        physics = dataset.physics(model=s.model, lam=s.lam, projector=s.projector).to(device)
    except ValueError as exc:
        raise DistillError(f"--projector {s.projector}: {exc}") from None
    s.projector = physics.projector  # resolved (the data set's by default): resume signatures name the kind
    if held_ids:  # every label present first, so a missing one is named against the whole list
        TargetSet(dataset, s.targets, ids + held_ids, physics.scene_shape)
    data = TargetSet(dataset, s.targets, ids, physics.scene_shape)
    held = TargetSet(dataset, s.targets, held_ids, physics.scene_shape) if held_ids else None
    if physics.channels not in (1, data.channels):
        raise DistillError(f"{s.data}: PSF has {physics.channels} channels, measurements {data.channels}")

    arch = {**default_architecture(s.student, s.objective), **s.architecture}  # type: ignore[arg-type]
    ids_hash = hashlib.sha256("\n".join(data.ids).encode()).hexdigest()
    extra: dict = {"training": {
        "data": str(Path(s.data).resolve()), "targets": str(Path(s.targets).resolve()), "split": split,
        "num_samples": len(data.ids), "ids_sha256": ids_hash, "teacher": data.teacher,
        "objective": s.objective, "loss": s.loss, "lpips_weight": s.lpips_weight, "steps": s.steps,
        "batch": s.batch, "lr": s.lr, "ema": s.ema, "seed": s.seed, "weights_from": "ema", "lam_rule": lam_rule}}
    if ctx.enabled:
        extra["training"]["data_parallel"] = ctx.describe()
    if held is not None:
        extra["training"]["holdout"] = {"count": len(held.ids), "first": held.ids[0], "last": held.ids[-1],
                                        "ids_sha256": hashlib.sha256("\n".join(held.ids).encode()).hexdigest()}
    init_cfg = None
    if s.init_student is not None:
        init_cfg = check_init_student(s.init_student, s.student, data.channels, arch, s.objective)
        extra["training"]["init_from"] = init_student_record(s.init_student)
    if s.student == "paper":
        if prior is None:
            prior = load_prior_dir(s.prior)  # type: ignore[arg-type]
        extra["prior"] = {"dir": str(Path(s.prior).resolve()) if s.prior else None,
                          "config": getattr(prior, "config", {}),
                          "image_size": getattr(prior, "image_size", None)}
    scale_data = None
    if s.psf_scale_range is not None:  # measurements simulated from the targets through the PSF scaled per sample
        scale_data = ScaleRangeData(data, ScaleOperators(dataset, model=s.model, lam=physics.lam,
                                                         projector=physics.projector, device=device),
                                    s.psf_scale_range, seed=s.seed, noise_std=float(dataset.meta.get("noise_std") or 0))
        extra["training"]["scale_range"] = scale_data.describe()
        extra["psf_scale_range"] = list(s.psf_scale_range)
    ckpt_path = out / CHECKPOINT_NAME
    ckpt = ctx.from_main(lambda: _read_checkpoint(ckpt_path))  # rank 0 reads it and hands it to the others
    widened = s.support == "auto" and s.support_taper > 0
    if widened and ckpt is not None and "support_shape" not in ckpt.get("signature", {}):
        # written before `auto` widened a soft-edged window: resuming must not change the window it trains
        widened = False
        print(f"{ckpt_path}: resuming with the window of the scenes' own size (the soft edge inside it), as this "
              "checkpoint was started", file=sys.stderr)
    support = resolve_support(s.support, dataset, physics, int(s.support_taper) if widened else 0,
                              input_multiple(s.student, arch, prior))
    window = loss_window(s.loss_window, support, physics.scene_shape)
    s.loss_window = "grid" if window is None else "support"  # resolved: resume signatures name what ran
    if window is not None:
        extra["training"]["loss_window"] = list(window)
        from train.lpips import MIN_SIZE as LPIPS_MIN_SIZE

        if s.lpips_weight > 0 and min(window) < LPIPS_MIN_SIZE:
            raise DistillError(f"--loss-window support: LPIPS needs at least {LPIPS_MIN_SIZE}x{LPIPS_MIN_SIZE} px, the "
                               f"support window is {window[0]}x{window[1]} (use --loss-window grid or "
                               "--lpips-weight 0)")
    try:
        config = make_config(s.student, s.objective, data.channels, physics, arch, support,  # type: ignore[arg-type]
                             support_taper=int(s.support_taper), **extra)
    except StudentError as exc:
        raise DistillError(f"--support-taper: {exc}") from None

    torch.manual_seed(s.seed)
    try:
        student = build_student(config, prior=prior).to(device)
    except StudentError as exc:
        raise DistillError(str(exc)) from None
    net = student.net
    if s.student == "paper":  # the pretrained prior is fine-tuned too: make sure it is trainable
        for p in net.parameters():
            p.requires_grad_(True)
    if init_cfg is not None:  # transfer: start from another student's g (another PSF or geometry), same network
        load_init_weights(net, s.init_student, init_cfg, data.channels)  # type: ignore[arg-type]
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    order = BatchOrder(len(data.ids), s.batch, s.seed)
    history: list[list[float]] = []
    holdout_history: list[list] = []  # [step, loss, lpips or None] of the EMA student on the held-out labels
    step = 0

    signature = s.signature() | {"ids_sha256": ids_hash, "psf_sha256": physics.psf_hash}
    if widened and support is not None:  # the window `auto` resolved to (widened by the taper)
        signature["support_shape"] = [int(v) for v in support]
    if ckpt is not None:
        if ckpt.get("signature") != signature:
            diff = sorted(k for k in set(signature) | set(ckpt.get("signature", {}))
                          if signature.get(k) != ckpt.get("signature", {}).get(k))
            raise DistillError(f"{ckpt_path}: checkpoint was written with other settings ({', '.join(diff)}); "
                               "use another --out or the same settings to resume")
        net.load_state_dict(ckpt["net"])
        ema = {k: v.to(device) for k, v in ckpt["ema"].items()}
        optimizer.load_state_dict(ckpt["optimizer"])
        step = int(ckpt["step"])
        order = BatchOrder(len(data.ids), s.batch, s.seed, **ckpt["data"])
        history = [list(h) for h in ckpt["history"]]
        holdout_history = [list(h) for h in ckpt.get("holdout_history", [])]
        _set_rng_state(ckpt["rng"])
        if s.progress:
            print(f"resuming {out} at step {step}/{s.steps}", file=sys.stderr)
    ctx.seed_local_rng(s.seed, step)  # data parallel: each process its own dropout masks
    student.net = ctx.wrap(net)  # forward/backward through DDP (gradient all-reduce); `net` holds the weights
    if ctx.enabled and s.progress:
        print(f"data parallel: {ctx.world_size} processes ({ctx.backend}), global batch {s.batch} = "
              f"{ctx.world_size} x {s.batch // ctx.world_size}", file=sys.stderr)

    lpips_net = None
    if s.lpips_weight > 0:
        try:
            from train.lpips import get_lpips
        except ImportError as exc:
            raise DistillError(f"--lpips-weight needs train.lpips: {exc}") from exc
        weights = s.lpips_weights or os.environ.get("NSDD_LPIPS_WEIGHTS")
        if not weights:
            raise DistillError("--lpips-weight > 0 needs --lpips-weights PATH (LPIPS-Alex v0.1 state dict) or "
                               "NSDD_LPIPS_WEIGHTS; nothing is downloaded")
        if not Path(weights).is_file():
            raise DistillError(f"--lpips-weights {weights}: no such file")
        lpips_net = get_lpips(weights, device)
        for p in lpips_net.parameters():
            p.requires_grad_(False)

    sample_ids = data.ids[: max(0, s.samples)]

    def checkpoint() -> None:
        if not ctx.is_main:  # one checkpoint, written by rank 0 (every rank holds the same state)
            return
        ema_net = _ema_copy()
        if held is not None and (not holdout_history or holdout_history[-1][0] != step):
            solver = wrap_student(ema_net, config)
            got = held_out_loss(lambda y: solver(y, physics), held,
                                lambda x_hat, t: distill_loss(x_hat, t, physics, s.objective, s.loss, window),
                                lpips_net=lpips_net, lpips_weight=s.lpips_weight, window=window, batch=s.batch,
                                device=device)
            holdout_history.append([step] + [v if v is not None and math.isfinite(v) else None
                                             for v in (got["loss"], got.get("lpips"))])
            if s.progress:
                print(f"\nheld-out labels ({len(held.ids)}, fp32 EMA weights) at step {step}: "
                      f"loss {got['loss']:.4g}"
                      + (f", LPIPS {got['lpips']:.4f}" if "lpips" in got else ""), file=sys.stderr)
        _atomic_torch_save({"signature": signature, "step": step, "net": net.state_dict(), "ema": ema,
                            "optimizer": optimizer.state_dict(), "rng": _rng_state(), "data": order.state(),
                            "history": history, "holdout_history": holdout_history}, ckpt_path)
        save_student(out, ema_net, {**config, "step": step}, fp16=s.fp16)
        if history:
            record = {"step": [h[0] for h in history], "loss": [h[1] for h in history],
                      "lr": [h[2] for h in history]}
            if holdout_history:
                record["holdout"] = {"count": len(held.ids), "step": [h[0] for h in holdout_history],
                                     "loss": [h[1] for h in holdout_history],
                                     "lpips": [h[2] for h in holdout_history]}
            atomic_write_text(out / "loss.json", json.dumps(record) + "\n")
            write_loss_curve(history, out / "loss_curve.png", holdout=holdout_history)
        if sample_ids:
            if scale_data is not None:  # the same draw every time (a key no training step uses)
                y, t, sample_physics = scale_data.batch(sample_ids, SAMPLE_KEY)
            else:
                y, t = data.batch(sample_ids)
                sample_physics = physics
            y, t = y.to(device), t.to(device)
            with torch.no_grad():
                x_hat, x_dag = wrap_student(ema_net, config)(y, sample_physics, return_parts=True)
            view = measurement_view(y, physics.scene_shape)
            rows = [[view[i], x_dag[i], x_hat[i], t[i]] for i in range(len(sample_ids))]
            write_sample_grid(rows, out / "samples" / f"step_{step:07d}.png")

    def _ema_copy() -> torch.nn.Module:
        import copy

        ema_net = copy.deepcopy(net).eval()
        ema_net.load_state_dict(ema)
        return ema_net

    stop_signal: list[int] = []

    def _request_stop(signum, frame):  # finish the step, checkpoint, exit; a second signal stops at once
        if stop_signal:
            raise KeyboardInterrupt
        stop_signal.append(signum)

    previous: dict[int, object] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, _request_stop)
        except ValueError:  # not the main thread: signals keep their default behaviour
            pass

    if s.preload:
        data.preload(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    deadline = time.monotonic() + s.time_budget if s.time_budget else None
    probe: tuple[int, float] | None = None  # (step, time) where the step-rate measurement started
    start_step = step
    bar = None
    try:
        from tqdm import tqdm

        bar = tqdm(total=s.steps, initial=step, desc="distill", unit="step", disable=not s.progress,
                   dynamic_ncols=True)
        estimate = TimeEstimate("distill", s.steps, "step")
        net.train()
        # A†y of each sample once, when every y is held anyway (the scale range draws a new y every step)
        dagger_cache: dict[str, torch.Tensor] | None = {} if s.preload and scale_data is None else None
        while step < s.steps:
            if deadline is not None:  # size the run to the time budget from the measured step rate
                now = time.monotonic()
                if probe is None and step >= start_step + 3:  # skip the first (warm-up) steps
                    probe = (step, now)
                elif probe is not None and step == probe[0] + 10:
                    rate = (step - probe[0]) / max(now - probe[1], 1e-9)
                    fit = ctx.min_int(step + int(0.97 * rate * max(deadline - now, 0.0)))  # the slowest rank's
                    if fit < s.steps:
                        s.steps = max(fit, step + 1)
                        bar.total = s.steps
                        if s.progress:
                            print(f"\ntime budget: {rate:.2f} steps/s, training to step {s.steps}", file=sys.stderr)
                if ctx.any(now >= deadline)[0] and step > start_step:
                    s.steps = step  # out of time: end here (the checkpoint below saves this step)
                    break
            batch_ids = ctx.local([data.ids[i] for i in order.next()])  # this process's rows of the global batch
            if scale_data is not None:
                y, target, step_physics = scale_data.batch(batch_ids, step)
            else:
                y, target = data.batch(batch_ids)
                step_physics = physics
            y, target = y.to(device, non_blocking=True), target.to(device, non_blocking=True)
            x_dagger = None
            if dagger_cache is not None:  # A†y of a fixed y: computed once per sample (20 A/Aᵀ pairs for cg)
                missing = list(dict.fromkeys(i for i in batch_ids if i not in dagger_cache))  # once each
                if missing:
                    with torch.no_grad():
                        fresh = step_physics.A_dagger(y[[batch_ids.index(i) for i in missing]])
                    dagger_cache.update(zip(missing, fresh))
                x_dagger = torch.stack([dagger_cache[i] for i in batch_ids])
            lr = learning_rate(step, s.lr, s.steps, min(s.warmup, s.steps // 10))
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                x_hat = student(y, step_physics, x_dagger=x_dagger)
            loss = distill_loss(x_hat, target, step_physics, s.objective, s.loss, window)
            if lpips_net is not None:
                loss = loss + s.lpips_weight * windowed_lpips(lpips_net, x_hat, target, window).mean()
            mean_loss = ctx.mean(loss.detach())  # the global batch's loss (the same on every process)
            if not torch.isfinite(mean_loss):
                raise DistillError(f"loss became {mean_loss.item()} at step {step + 1}; lower --lr (checkpoint at "
                                   f"step {step - step % s.checkpoint_every} is kept)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if s.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
            optimizer.step()
            step += 1
            ema_update(ema, net, ema_decay(step, s.ema))
            value = float(mean_loss)
            history.append([step, value, lr])
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4g}", lr=f"{lr:.2e}")
            if deadline is None or (probe is not None and step > probe[0] + 10):  # after the budget sized the run
                estimate.total = s.steps
                estimate.update(step)
            if step % s.checkpoint_every == 0 or step == s.steps:
                checkpoint()
            if callback is not None:
                callback(step, value)
            if ctx.any(bool(stop_signal))[0]:  # a signal to any process stops all of them at this step
                checkpoint()
                name = signal.Signals(stop_signal[0]).name if stop_signal else "a signal to another process"
                raise TrainingInterrupted(f"{name}: checkpoint written at step "
                                          f"{step} in {ckpt_path}; rerun the same command to resume")
    except KeyboardInterrupt:
        print(f"\nstopped at once: the last checkpoint in {ckpt_path} is kept; rerun the same command to resume",
              file=sys.stderr)
        raise
    finally:
        if bar is not None:
            bar.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if ctx.is_main and (not (out / "model.safetensors").exists()
                        or json.loads((out / "config.json").read_text()).get("step") != step):
        checkpoint()
    return {"out": str(out), "step": step, "parameters": count_parameters(net), "rank": ctx.rank,
            "final_loss": history[-1][1] if history else None, "history": history,
            "holdout": holdout_history}
