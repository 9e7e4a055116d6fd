"""The GPU one-shot (``scripts/gpu_train.sh``): from face crops to shipped weights in a fixed wall-time budget.

One process, five stages at 64 px scenes on a 128 px sensor, each given a share of the time that is left (so an
overrun early is absorbed later, and the run always ends with its outputs written):

1. **prior**: ``nsdd-train prior`` on the faces (bf16 autocast, large batch, EMA, scenes and noise on the
   GPU), stopped by ``--time-limit``; meanwhile ``nsdd-train simulate`` makes the lensless data set in a
   second process on the CPU.
2. **teacher**: DDNM+ labels the validation faces (held out from the prior and the students), then as much
   of the training split as its share of time allows (the rate is measured on the validation batch).
3. **λ**: the students' Wiener λ by the discrepancy principle on training measurements (no ground truth).
4. **students**: the paper student (g_φ + the fine-tuned prior UNet) and two lean edge students
   (pixel-unshuffle; one with depthwise-separable blocks), null-space objective, L1 + 0.1 LPIPS.
5. **figures**: on the validation faces, agreement of every student (and Wiener) with the teacher's labels
   (PSNR, LPIPS) and consistency ``‖A x̂ − y‖/‖y‖`` under the forward operator that made ``y``; batch-1
   GPU timings (median of timed calls after warm-up) of the teacher at 50 and 100 steps and of each student;
   the prior's held-out denoising loss. Ground truth is not read.

Then **the paper's geometry**, 128 px scenes on a 256 px sensor (the radial PSF at full size), when the face
pack carries 128 px faces (``pack --count128``): a 128 px prior (base 32, mults 1,2,2,2: the 64 px prior's
11.5 GFLOP per image, so about its images per second; not yet run on a GPU), DDNM+ labels, λ and the lean 256² student
(``LEAN256``, chosen by ``bench/bench_lean.py`` for 30 fps on one x86 core) with its validation figures. These
stages get ``--share256`` of the budget, held back from the 64 px stages, plus whatever those leave unused;
with less than ``MIN_SECONDS_256`` left they are skipped and ``figures.json`` says why.

Outputs in ``--out`` (at most 8 files, each under 16 MB): ``prior.tar``, ``student_paper.tar``,
``student_lean.tar``, ``student_lean_sep.tar``, ``prior128.tar``, ``student_lean256.tar`` (each a model
directory as ``save_pretrained`` writes it, fp16 safetensors), ``figures.json``. The face crops travel as one
file written by ``pack`` (:mod:`train.face_pack`): JPEG bytes of the canonical data set's **training split
only** (the held-out test faces never leave this machine).

``--tiny`` runs every stage for one step on a handful of faces (CPU, CI).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

from nsdd_edge.timing import time_calls
from train.face_pack import pack_faces, unpack_faces

STUDENTS = {
    # name: (kind, architecture, learning rate); the lean widths were picked by bench/bench_student.py-style
    # CPU timings of the bare network (≈10 ms and ≈6 ms per 64² window on one core in torch)
    "paper": ("paper", {}, 2e-4),
    "lean": ("edge", {"width": 48, "depth": 3, "max_width": 192, "blocks": 2, "unshuffle": 2}, 5e-4),
    "lean_sep": ("edge", {"width": 64, "depth": 3, "max_width": 256, "blocks": 2, "unshuffle": 2,
                          "separable": True}, 5e-4),
}
# bench/bench_lean.py's choice for the 256² sensor (128² support): 28 ms per frame for the whole graph on one
# x86 core under load, 1.2M parameters (2.4 MB fp16); docs/results.md
LEAN256 = ("edge", {"width": 32, "depth": 3, "max_width": 128, "blocks": 2, "unshuffle": 2}, 5e-4)
PRIOR_ARCH = ["--base-channels", "64", "--channel-mults", "1,2,2", "--num-res-blocks", "2",
              "--attention-resolutions", "16", "--dropout", "0"]
# 128 px prior: 2.25M parameters and 11.5 GFLOP per image, the 64 px prior's cost (which trained at 1,780 images/s
# on an H200), so it should see about as many images in its share of time (an estimate until a GPU runs it)
PRIOR128_ARCH = ["--base-channels", "32", "--channel-mults", "1,2,2,2", "--num-res-blocks", "2",
                 "--attention-resolutions", "16", "--dropout", "0"]
TINY_PRIOR_ARCH = ["--base-channels", "8", "--channel-mults", "1,2", "--num-res-blocks", "1",
                   "--attention-resolutions", "", "--dropout", "0"]
# stage shares of the time left when the stage starts
SHARES = {"prior": 0.45, "teacher": 0.33, "paper": 0.40, "lean": 0.5, "lean_sep": 0.85}
SHARES256 = {"prior": 0.45, "teacher": 0.45, "lean256": 0.85}
MIN_SECONDS_256 = 90.0  # less than this left after the 64 px stages: the 256² stages are skipped
SCENE128 = 128


# ---- helpers ------------------------------------------------------------------------------------
class Clock:
    """Wall-time budget: ``share(f)`` is the fraction ``f`` of what is left (minus a reserve for the end and
    the seconds ``held`` back for later stages)."""

    def __init__(self, budget_s: float, reserve_s: float):
        self.t0 = time.monotonic()
        self.budget_s, self.reserve_s = float(budget_s), float(reserve_s)
        self.held_s = 0.0
        self.stages: dict[str, float] = {}

    def hold(self, seconds: float) -> None:
        """Keep ``seconds`` out of ``left()`` (and every share) until ``hold(0)``."""
        self.held_s = max(float(seconds), 0.0)

    def left(self) -> float:
        return max(self.budget_s - self.reserve_s - self.held_s - (time.monotonic() - self.t0), 0.0)

    def share(self, fraction: float) -> float:
        return max(fraction * self.left(), 1.0)

    def done(self, name: str, since: float) -> None:
        self.stages[name] = round(time.monotonic() - since, 2)
        print(f"[{time.monotonic() - self.t0:7.1f} s] {name} done in {self.stages[name]:.1f} s", flush=True)


def _tar(directory: Path, out: Path, skip: tuple[str, ...] = ("checkpoint.pt",)) -> int:
    """A directory as an uncompressed tar (its files at the top level; large checkpoints left out)."""
    with tarfile.open(out, "w") as tar:
        for f in sorted(directory.rglob("*")):
            if f.is_file() and f.name not in skip and not f.name.startswith("."):
                tar.add(f, arcname=str(f.relative_to(directory)))
    return out.stat().st_size


def _median_ms(fn, warmup: int, repeats: int, sync) -> float:
    return time_calls(fn, repeats, warmup=warmup, sync=sync).median_ms


# ---- stages -------------------------------------------------------------------------------------
def _split_faces(faces: Path, names: list[str], n_val: int, prior_faces: Path) -> None:
    """Link into ``prior_faces`` every face of ``names`` but the validation ones: the seeded split that
    ``nsdd-train simulate`` makes of the same files (numbered in name order) as its test split."""
    from train.simulate import split_ids

    ids = [f"{k:06d}" for k in range(len(names))]
    val_ids = set(split_ids(ids, 0, 0.1, n_val)["test"])
    prior_faces.mkdir(parents=True, exist_ok=True)
    for i, name in zip(ids, names):
        link = prior_faces / name
        if i not in val_ids and not link.exists():
            link.symlink_to((faces / name).resolve())


def _simulate(images: Path, psf: str, scene: int, psf_downsample: int, n_val: int, out: Path) -> subprocess.Popen:
    """``nsdd-train simulate`` in a second process on the CPU (scenes of ``scene`` px, sensor 2× as large)."""
    cmd = [sys.executable, "-m", "train.cli", "simulate", "--images", str(images), "--psf", psf,
           "--psf-downsample", str(psf_downsample), "--size", str(scene), "--noise-std", "0.005", "--seed", "0",
           "--n-test", str(n_val), "--threads", "4", "--out", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen, what: str) -> None:
    output, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{output[-2000:]}")


def _prior_stage(name: str, images: Path, size: int, arch: list[str], batch: int, seconds: float | None,
                 prior_dir: Path, sim: subprocess.Popen, data: Path, figures: dict, out: Path, clock: Clock,
                 device: str, tiny: bool):
    """Train the prior (``OUT/<name>.tar``), then wait for its simulated data set and score the prior's held-out
    denoising error on the data set's validation faces: ``(prior, its figures, the data set)``."""
    from train.data import LenslessDataset

    t = time.monotonic()
    prior, prior_figures = _train_prior(images, size, arch, batch, seconds, device, prior_dir, tiny)
    clock.done(name, t)
    figures["files"][f"{name}.tar"] = _tar(prior_dir, out / f"{name}.tar")
    _write_figures(out, figures, clock)
    t = time.monotonic()
    _wait(sim, f"simulate for {name}")
    clock.done(f"simulate for {name} (wait)", t)
    ds = LenslessDataset(data)
    prior_figures["heldout_denoising_mse"] = _heldout_check(prior, ds, ds.ids("test"), device)
    return prior, prior_figures, ds


def _train_prior(images: Path, size: int, arch: list[str], batch: int, seconds: float | None, device: str,
                 out: Path, tiny: bool):
    """``nsdd-train prior`` stopped by ``--time-limit``; returns the EMA prior and its figures."""
    from train.prior import train_prior
    from train.prior.io import load_prior

    parser = argparse.ArgumentParser()
    train_prior.configure_parser(parser)
    prior_args = parser.parse_args(
        ["--images", str(images), "--size", str(size), *arch, "--batch", str(batch), "--lr", "4e-4",
         "--warmup", "1" if tiny else "200", "--ema", "0.999", "--steps", "1" if tiny else "1000000",
         "--checkpoint-every", "1000000", "--sample-count", "4" if tiny else "16",
         "--sample-steps", "2" if tiny else "50", "--save-dtype", "float16", "--log-every", "1" if tiny else "100",
         "--no-progress", "--device", device, "--out", str(out)]
        + ([] if seconds is None else ["--time-limit", f"{seconds / 60:.4f}"]))
    rc = train_prior.main(prior_args)
    if rc != 0:
        raise RuntimeError(f"prior training ({size} px) failed (exit {rc})")
    log_path = out / "train_log.jsonl"
    log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.exists() else []
    prior = load_prior(out, device=device)
    return prior, {"size": size, "steps": json.loads((out / "config.json").read_text())["training"].get("step"),
                   "batch": batch, "parameters": prior.num_parameters,
                   "final_loss": log[-1]["loss"] if log else None, "arch": arch}


def _heldout_check(prior, ds, val: list[str], device: str) -> dict:
    """The prior's held-out denoising MSE on the validation faces (clean scenes, used for this check only)."""
    import torch

    from train.prior import train_prior

    gt_val = torch.from_numpy(np.stack([ds.ground_truth(i) for i in val])) * 2 - 1
    return train_prior.heldout_denoising_loss(prior.net, gt_val, prior.alphas_cumprod.to(device).float())


def _teacher(ds, prior, prior_dir: Path, out_val: Path, out_train: Path, seconds: float, args: argparse.Namespace,
             device: str) -> dict:
    """DDNM+ labels: the validation faces first (they time the teacher), then as much of the train split as
    ``seconds`` allow (whole batches)."""
    from train.teacher import label_dataset

    t = time.monotonic()
    tiny, train_split, val = args.tiny, ds.ids("train"), ds.ids("test")
    steps = 2 if tiny else args.teacher_steps
    batch = 4 if tiny else args.teacher_batch
    common = {"steps": steps, "batch_size": batch, "write_png": False, "device": device, "progress": False,
              "prior_path": prior_dir, "shard_size": batch}
    t_val = time.monotonic()
    label_dataset(ds, prior, out_val, split="test", **common)
    rate = len(val) / max(time.monotonic() - t_val, 1e-6)
    n_train = len(train_split) if tiny else min(len(train_split),
                                                max(args.teacher_batch, int(rate * (seconds - (time.monotonic() - t)))))
    if not tiny and n_train < len(train_split):  # whole batches
        n_train = min(len(train_split), max(args.teacher_batch, n_train // args.teacher_batch * args.teacher_batch))
    label_dataset(ds, prior, out_train, split="train", limit=n_train, **common)
    return {"steps": steps, "eta": 0.85, "labelled_train": n_train, "validation": len(val),
            "images_per_second": round(rate, 2)}


def _discrepancy_lambda(ds) -> dict:
    """The students' λ by the discrepancy principle on 64 training measurements (measurements and σ only)."""
    from nsdd_edge.optics import discrepancy_lambda

    y_probe = np.stack([ds.measurement(i) for i in ds.ids("train")[:64]])
    lam = discrepancy_lambda(ds.psf, ds.physics().geometry, y_probe, float(ds.meta["noise_std"]))
    return {"rule": "discrepancy principle, rms(y − A A†y) = σ on 64 training measurements", "value": lam,
            "sigma": float(ds.meta["noise_std"])}


def _distil(spec: tuple, data: Path, targets: Path, out: Path, prior_dir: Path | None, lam: float,
            n_train: int, lpips_w: str | None, seconds: float | None, args: argparse.Namespace, device: str) -> dict:
    """One student (null-space L1 + 0.1 LPIPS on the teacher's labels); its figures, or the error that stopped it
    (one failing student must not cost the others, or the prior, their outputs)."""
    from train.distill import DistillSettings, train_student

    kind, arch, lr = spec
    tiny = args.tiny
    if tiny:
        arch = {**arch, "width": 4, "max_width": 8, "depth": 1} if kind == "edge" else {
            "width": 4, "depth": 1, "max_width": 8}
    settings = DistillSettings(
        data=str(data), targets=str(targets), out=str(out), student=kind,
        prior=str(prior_dir) if kind == "paper" else None, lam=lam, limit=n_train,
        lpips_weight=0.1 if lpips_w else 0.0, lpips_weights=lpips_w, steps=1 if tiny else 1_000_000,
        batch=2 if tiny else args.student_batch, lr=lr, warmup=1 if tiny else 100,
        checkpoint_every=1_000_000, samples=2 if tiny else 4, architecture=arch, device=device,
        fp16=True, progress=False, preload=True, time_budget=None if tiny else seconds)
    try:
        summary = train_student(settings)
    except Exception as exc:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"kind": kind, "architecture": arch, "lr": lr, "steps": summary["step"],
            "parameters": summary["parameters"], "final_loss": summary["final_loss"], "batch": settings.batch}


# ---- the run ------------------------------------------------------------------------------------
def skip_256_reason(share256: float, count128: int, n_val128: int) -> str | None:
    """Why the 256² stages cannot run (``None``: they can): they need a share of the budget and 128 px faces,
    enough for the validation faces and at least as many again to train on."""
    if share256 <= 0:
        return "--share256 0"
    if count128 < 2 * n_val128:
        return f"the face pack has {count128} faces at 128 px (pack --count128), fewer than 2 × {n_val128}"
    return None


def run(args: argparse.Namespace) -> dict:
    """The one-shot (module docstring); a background simulation whose stages did not run (skipped, or an earlier
    stage failed) is killed, not left behind on the device machine."""
    background: list[subprocess.Popen] = []
    try:
        return _run(args, background)
    finally:
        for proc in background:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def _run(args: argparse.Namespace, background: list[subprocess.Popen]) -> dict:
    import torch


    tiny = args.tiny
    clock = Clock(args.budget_seconds, reserve_s=5.0 if tiny else 25.0)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    work, out = Path(args.work).resolve(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    figures: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                     "torch": torch.__version__, "budget_seconds": args.budget_seconds, "tiny": tiny,
                     "cpu_threads": torch.get_num_threads(), "files": {}}

    # faces → folder; the validation faces (the simulated set's "test" split) are hidden from the prior
    t = time.monotonic()
    faces = work / "faces"
    sizes = unpack_faces(Path(args.faces), faces)
    names = sorted(sizes)
    names128 = [n for n in names if sizes[n] == SCENE128]
    n_val = 4 if tiny else args.val
    n_val128 = 2 if tiny else args.val256
    _split_faces(faces, names, n_val, work / "prior_faces")
    figures["faces"] = {"count": len(names), "validation": n_val, "prior": len(names) - n_val,
                        "count128": len(names128)}
    why_not_256 = skip_256_reason(args.share256, len(names128), n_val128)
    clock.done("unpack", t)

    # the data sets, simulated on the CPU while the prior trains on the GPU
    data = work / "data"
    sim = _simulate(faces, args.psf, 64, 2, n_val, data)
    background.append(sim)
    if why_not_256 is None:
        faces128 = work / "faces128"
        faces128.mkdir(exist_ok=True)
        for name in names128:
            if not (faces128 / name).exists():
                (faces128 / name).symlink_to(faces / name)
        _split_faces(faces128, names128, n_val128, work / "prior_faces128")
        sim256 = _simulate(faces128, args.psf, SCENE128, 1, n_val128, work / "data256")
        background.append(sim256)
        clock.hold(args.share256 * args.budget_seconds)  # the 64 px stages run without this share

    # 1. prior
    prior_dir = work / "prior"
    prior, figures["prior"], ds = _prior_stage(
        "prior", work / "prior_faces", 64, TINY_PRIOR_ARCH if tiny else PRIOR_ARCH, 4 if tiny else args.prior_batch,
        None if tiny else clock.share(SHARES["prior"]), prior_dir, sim, data, figures, out, clock, device, tiny)
    val = ds.ids("test")

    # 2. teacher, 3. λ
    t = time.monotonic()
    figures["teacher"] = _teacher(ds, prior, prior_dir, work / "teacher_val", work / "teacher_train",
                                  clock.share(SHARES["teacher"]), args, device)
    n_train = figures["teacher"]["labelled_train"]
    clock.done("teacher", t)
    figures["lambda"] = _discrepancy_lambda(ds)
    lam = figures["lambda"]["value"]
    _write_figures(out, figures, clock)

    # 4. students
    lpips_w = args.lpips_weights if args.lpips_weights and Path(args.lpips_weights).is_file() else None
    figures["students"] = {}
    for name, spec in STUDENTS.items():
        t = time.monotonic()
        figures["students"][name] = _distil(spec, data, work / "teacher_train", work / f"student_{name}",
                                            prior_dir, lam, n_train, lpips_w, clock.share(SHARES[name]), args,
                                            device)
        if "error" in figures["students"][name]:
            continue
        clock.done(f"student {name}", t)
        figures["files"][f"student_{name}.tar"] = _tar(work / f"student_{name}", out / f"student_{name}.tar")
        _write_figures(out, figures, clock)

    # 5. figures on the validation faces: agreement with the teacher, consistency, timings
    t = time.monotonic()
    trained = {n: work / f"student_{n}" for n in STUDENTS if "error" not in figures["students"][n]}
    figures["validation"] = validation_figures(ds, val, work / "teacher_val", trained, lam, prior, device, lpips_w,
                                               tiny)
    clock.done("figures", t)
    _write_figures(out, figures, clock)

    # the paper's geometry: 128 px scenes on a 256 px sensor, in the time held back plus what is left
    clock.hold(0.0)
    if why_not_256 is None and not tiny and clock.left() < MIN_SECONDS_256:
        why_not_256 = f"{clock.left():.0f} s left after the 64 px stages (< {MIN_SECONDS_256:.0f} s)"
    if why_not_256 is None:
        figures["geometry256"] = geometry256(work, out, figures, clock, args, device, lpips_w, sim256)
    else:
        figures["geometry256"] = {"skipped": why_not_256}
        print(f"256² stages skipped: {why_not_256}", flush=True)
    _write_figures(out, figures, clock)
    return figures


def geometry256(work: Path, out: Path, figures: dict, clock: Clock, args: argparse.Namespace, device: str,
                lpips_w: str | None, sim: subprocess.Popen) -> dict:
    """128 px scenes on a 256 px sensor: the 128 px prior, DDNM+ labels, λ and the lean 256² student, with
    the validation figures; ``prior128.tar`` and ``student_lean256.tar`` in ``out``."""

    tiny = args.tiny
    result: dict = {"scene": SCENE128, "sensor": 2 * SCENE128, "psf_downsample": 1}
    figures["geometry256"] = result
    prior_dir, data = work / "prior128", work / "data256"
    prior, result["prior"], ds = _prior_stage(
        "prior128", work / "prior_faces128", SCENE128, TINY_PRIOR_ARCH if tiny else PRIOR128_ARCH,
        4 if tiny else args.prior128_batch, None if tiny else clock.share(SHARES256["prior"]), prior_dir, sim,
        data, figures, out, clock, device, tiny)
    val = ds.ids("test")
    t = time.monotonic()
    result["teacher"] = _teacher(ds, prior, prior_dir, work / "teacher_val256", work / "teacher_train256",
                                 clock.share(SHARES256["teacher"]), args, device)
    clock.done("teacher256", t)
    result["lambda"] = _discrepancy_lambda(ds)
    lam = result["lambda"]["value"]
    _write_figures(out, figures, clock)
    t = time.monotonic()
    result["students"] = {"lean256": _distil(
        LEAN256, data, work / "teacher_train256", work / "student_lean256", None, lam,
        result["teacher"]["labelled_train"], lpips_w, clock.share(SHARES256["lean256"]), args, device)}
    trained = {}
    if "error" not in result["students"]["lean256"]:
        clock.done("student lean256", t)
        figures["files"]["student_lean256.tar"] = _tar(work / "student_lean256", out / "student_lean256.tar")
        trained["lean256"] = work / "student_lean256"
    _write_figures(out, figures, clock)
    t = time.monotonic()
    result["validation"] = validation_figures(ds, val, work / "teacher_val256", trained, lam, prior, device, lpips_w,
                                              tiny)
    clock.done("figures256", t)
    return result


def _write_figures(out: Path, figures: dict, clock: Clock) -> None:
    """``figures.json`` as it stands (rewritten after every stage, so a run cut short still reports)."""
    figures["stages_seconds"] = clock.stages
    figures["wall_seconds"] = round(time.monotonic() - clock.t0, 1)
    tmp = out / ".figures.json.tmp"
    tmp.write_text(json.dumps(figures, indent=2) + "\n")
    tmp.replace(out / "figures.json")


def validation_figures(ds, val: list[str], teacher_dir: Path, students: dict[str, Path], lam: float, prior,
                       device: str, lpips_w: str | None, tiny: bool) -> dict:
    """Agreement with the teacher's labels (in ``teacher_dir``) and forward consistency on held-out faces, for
    Wiener and each student directory of ``students``; batch-1 timings."""
    import torch

    from train.data import read_recon_dir
    from train.metrics import psnr
    from train.physics import center_crop
    from train.solvers.ddnm import DDNM
    from train.students import load_student

    fwd = ds.forward_physics().to(device)
    phys = ds.physics(lam=lam).to(device)
    y = ds.measurements(val).to(device)
    teacher = read_recon_dir(teacher_dir, val).to(device)
    lpips_net = None
    if lpips_w:
        from train.lpips import get_lpips

        lpips_net = get_lpips(lpips_w, device)

    def scores(x: torch.Tensor) -> dict:
        crop = fwd.scene_shape
        xc, tc = center_crop(x, crop), center_crop(teacher, crop)
        d = {"psnr_vs_teacher": float(psnr(xc.clamp(0, 1), tc.clamp(0, 1)).mean()),
             "consistency_forward": float(fwd.consistency(xc, y).mean())}
        if lpips_net is not None:
            with torch.no_grad():
                d["lpips_vs_teacher"] = float(lpips_net(xc.clamp(0, 1), tc.clamp(0, 1)).mean())
        return d

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    result: dict = {"n": len(val), "teacher": {"consistency_forward": float(
        fwd.consistency(center_crop(teacher, fwd.scene_shape), y).mean())}}
    with torch.no_grad():
        result["wiener"] = scores(phys.A_dagger(y))
        y1 = y[:1]
        result["wiener"]["ms_batch1"] = _median_ms(lambda: phys.A_dagger(y1), 3, 20, sync)
        for steps in ((2,) if tiny else (50, 100)):
            solver = DDNM(prior, steps=steps, sigma_y=float(ds.meta["noise_std"]))
            result["teacher"][f"ms_batch1_{steps}_steps"] = _median_ms(lambda solver=solver: solver(y1, phys), 1,
                                                                         1 if tiny else 5, sync)
        for name, directory in students.items():
            s = load_student(directory, device=device)
            x = torch.cat([s(y[k:k + 32], phys) for k in range(0, len(val), 32)])
            result[name] = scores(x)
            result[name]["ms_batch1"] = _median_ms(lambda s=s: s(y1, phys), 3, 3 if tiny else 50, sync)
    return result


def configure_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="command", required=True)
    pk = sub.add_parser("pack", help="pack a simulated data set's training faces as JPEGs into one .npz")
    pk.add_argument("--dataset", type=Path, required=True, help="dataset directory (its train split is packed)")
    pk.add_argument("--out", type=Path, required=True)
    pk.add_argument("--size", type=int, default=64)
    pk.add_argument("--quality", type=int, default=85, help="JPEG quality (85: the 8,602 faces in ~15 MB at 64 px)")
    pk.add_argument("--count128", type=int, default=1024,
                    help="faces (a seeded choice) packed at 128 px instead, for the 256² stages (+2.1 kB each: "
                         "1,024 keep .gpu/ within its 22 MiB budget, scripts/gpu_payload.sh); 0: none")
    pk.add_argument("--lpips-weights", type=Path, default=None,
                    help="also write a float16 copy of these LPIPS weights beside --out (smaller to carry)")
    r = sub.add_parser("run", help="the one-shot: prior → teacher → students → figures, in --budget-seconds")
    r.add_argument("--faces", required=True, help="face pack (.npz) written by `pack`")
    r.add_argument("--psf", required=True,
                   help="the radial PSF (256²: box-downsampled ×2 for the 128² sensor, at full size for the 256² one)")
    r.add_argument("--lpips-weights", default=None, help="LPIPS-Alex v0.1 state dict (students' LPIPS term)")
    r.add_argument("--out", required=True, help="output folder (tars of the model directories, figures.json)")
    r.add_argument("--work", default="/tmp/nsdd-oneshot", help="scratch folder")
    r.add_argument("--budget-seconds", type=float, default=510.0, help="wall-time budget of the whole run")
    r.add_argument("--val", type=int, default=256, help="validation faces (held out from prior and students)")
    r.add_argument("--prior-batch", type=int, default=256)
    r.add_argument("--teacher-steps", type=int, default=50)
    r.add_argument("--teacher-batch", type=int, default=512)
    r.add_argument("--student-batch", type=int, default=64)
    r.add_argument("--share256", type=float, default=0.4,
                   help="fraction of the budget held back from the 64 px stages for the 256² ones (128 px prior, "
                        "teacher, lean 256² student); they also get what the 64 px stages leave; 0: skip them")
    r.add_argument("--val256", type=int, default=64, help="validation faces of the 256² stages (128 px faces)")
    r.add_argument("--prior128-batch", type=int, default=128)
    r.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is there")
    r.add_argument("--tiny", action="store_true", help="one step of everything on a dozen faces (CI)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.gpu_oneshot", description=__doc__.split("\n\n")[0])
    configure_parser(p)
    args = p.parse_args(argv)
    if args.command == "pack":
        info = pack_faces(args.dataset, args.out, args.size, args.quality, count128=args.count128)
        print(json.dumps(info))
        if args.lpips_weights:
            import torch

            state = torch.load(args.lpips_weights, map_location="cpu", weights_only=True)
            half = args.out.parent / "lpips_alex_fp16.pth"
            buf = io.BytesIO()
            torch.save({k: v.half() for k, v in state.items()}, buf)
            half.write_bytes(buf.getvalue())
            print(f"wrote {half} ({half.stat().st_size} bytes)")
        return 0
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    figures = run(args)
    print(json.dumps({k: figures[k] for k in ("wall_seconds", "stages_seconds", "lambda")}, indent=2))
    print(json.dumps({"geometry256": {k: v for k, v in figures["geometry256"].items() if k in ("skipped", "lambda")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
