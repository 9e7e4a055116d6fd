"""``nsdd-train fit``: from a camera profile, scene images, a prior and real captures to a live bundle.

One resumable command, stage by stage (a stage whose output is complete is skipped on a rerun)::

    simulate  scenes through the profile (its PSF, sensor, noise model, signal level)     OUT/data
    teacher   DDNM+ labels of the training split, as many as the budget allows             OUT/teacher
    distill   the student (paper by default) on those labels, time-boxed                   OUT/student
    export    student + the profile's pseudo-inverse as one ONNX graph, verified           OUT/model.onnx
    bundle    the graph, the profile's preprocessing and the profile itself               OUT/bundle
    held-out  the simulated test faces of this profile (or --heldout-images through it): Wiener, the
              teacher and the student scored against their ground truth (PSNR, LPIPS; its only use)  OUT/heldout
    report    the real captures through Wiener (the profile's λ and the student's), FISTA, the
              teacher and the student, side by side, with ‖A x̂ − y‖/‖y‖ under the profile's
              forward operator, and the held-out table                                     OUT/report.md, .png

A student trained longer outside the fit (``nsdd-train distill --data OUT/data --targets OUT/teacher
--init-student OUT/student …``) comes back with ``--use-student DIR``: it replaces the distill stage, and export,
held-out scores and the report are redone with it (the earlier student is kept as ``OUT/student.previous-N``).

``--budget-minutes B`` sizes the work for the machine it runs on: the teacher's label count comes from its
measured rate, the student's steps from its measured step rate; each stage gets a share of the time left.
Every stage prints its wall time; ``OUT/fit.json`` records them. Nothing is chosen on ground truth: the
simulated scenes' ground truth only scores the held-out stage (through ``nsdd-train evaluate``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nsdd_edge.atomic import atomic_write_text
from nsdd_edge.camera import ProfileError, list_captures, load_profile
from nsdd_edge.cli_common import add_threads_argument
from train.threads import torch_threads

HELP = "fit a real camera: profile + scenes + prior + captures → simulate, teacher, student, export, bundle, report"

EDGE_ARCHITECTURE = {"width": 16, "depth": 3, "max_width": 128}  # fit's edge student (the paper one: its default)

# share of the time left when each stage starts
SHARES = {"simulate": 0.08, "teacher": 0.40, "distill": 0.70, "heldout": 0.5, "report": 1.0}


class FitError(ValueError):
    """A fit that cannot go on; the message names the stage and the problem."""


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", required=True, type=Path, help="camera profile directory (nsdd-edge calibrate)")
    p.add_argument("--images", required=True, type=Path, help="folder of scene images to simulate (e.g. faces)")
    p.add_argument("--prior", required=True, type=Path, help="diffusion prior directory (the teacher, and the paper "
                                                             "student's UNet)")
    p.add_argument("--captures", required=True, help="real captures (folder or glob) for the final report")
    p.add_argument("--out", required=True, type=Path, help="output directory (resumes)")
    p.add_argument("--budget-minutes", type=float, default=45.0, help="wall time for the whole fit")
    p.add_argument("--student", choices=("paper", "edge"), default="paper", help="student kind (default: paper)")
    p.add_argument("--scene-size", type=int, default=None,
                   help="simulated scene side in px (default: the prior's image size)")
    p.add_argument("--images-limit", type=int, default=2000, help="simulate at most this many scenes")
    p.add_argument("--teacher-steps", type=int, default=50, help="DDIM steps of the DDNM+ teacher")
    p.add_argument("--lam", default="discrepancy",
                   help="λ of the student's pseudo-inverse: a number or 'discrepancy' (default)")
    p.add_argument("--lpips-weights", default=None, help="LPIPS-Alex weights (student loss term 0.1 when given)")
    p.add_argument("--init-student", default=None, type=Path, metavar="DIR",
                   help="start the student from this one's weights (same kind and network; trained for another PSF "
                        "or geometry, e.g. on simulated faces with many more labels than this fit can afford)")
    p.add_argument("--use-student", default=None, type=Path, metavar="DIR",
                   help="a student trained for this fit outside it (e.g. `nsdd-train distill --data OUT/data "
                        "--targets OUT/teacher --init-student OUT/student`, run longer) takes the distill stage's "
                        "place: checked against OUT/data, copied to OUT/student (the one there is kept beside it), "
                        "then export, held-out scores and the report are redone with it")
    p.add_argument("--heldout-images", default=None, type=Path, metavar="DIR",
                   help="score the held-out stage on these scenes (simulated through the profile): images that "
                        "neither the prior nor --init-student trained on. Default: the test split of --images, "
                        "which is held out only if the prior never saw --images")
    add_threads_argument(p, "torch CPU threads (simulate: its own default unless given)", "train")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")


class Stages:
    """Wall-time bookkeeping: ``budget()`` is a share of what is left; ``done()`` records a stage's time."""

    def __init__(self, minutes: float, record: Path):
        self.t0 = time.monotonic()
        self.total = 60.0 * minutes
        self.record = record
        self.times: dict[str, float] = json.loads(record.read_text()).get("stages", {}) if record.exists() else {}

    def left(self) -> float:
        return max(self.total - (time.monotonic() - self.t0), 1.0)

    def budget(self, stage: str) -> float:
        return max(SHARES[stage] * self.left(), 1.0)

    def finished(self, stage: str) -> dict | None:
        """The recorded details of a stage an earlier run of this command completed, else None."""
        record = json.loads(self.record.read_text()) if self.record.exists() else {}
        return record.get("details", {}).get(stage) if stage in record.get("stages", {}) else None

    def forget(self, *names: str) -> None:
        """Drop stages from the record (their results no longer hold): a rerun does them again."""
        record = json.loads(self.record.read_text()) if self.record.exists() else {}
        for name in names:
            self.times.pop(name, None)
            record.get("stages", {}).pop(name, None)
            record.get("details", {}).pop(name, None)
        if record:
            atomic_write_text(self.record, json.dumps(record, indent=2) + "\n")

    def done(self, stage: str, started: float, **extra) -> None:
        self.times[stage] = round(time.monotonic() - started, 1)
        print(f"[fit] {stage}: {self.times[stage]:.0f} s (budget left {self.left() / 60:.1f} min)", flush=True)
        record = json.loads(self.record.read_text()) if self.record.exists() else {}
        record.setdefault("stages", {}).update(self.times)
        record.setdefault("details", {}).setdefault(stage, {}).update(extra)
        atomic_write_text(self.record, json.dumps(record, indent=2) + "\n")


def student_taper(profile, size: int) -> int:
    """The student's soft edge for ``size``² scenes: the profile's support taper as the same fraction of the scenes'
    side (``support.taper / support side``; 0 when the profile has no soft support). ``distill`` then widens the
    student's window to the scenes plus this edge on every side (:func:`train.distill.resolve_support`)."""
    if profile.support is None or not profile.support.taper:
        return 0
    fraction = profile.support.taper / min(profile.support.shape)
    return max(1, min(int(round(fraction * size)), size // 2 - 1))


def _complete(path: Path, key: str = "complete") -> bool:
    try:
        return bool(json.loads(path.read_text()).get(key))
    except (OSError, json.JSONDecodeError):
        return False


def run_fit(args: argparse.Namespace) -> dict:
    from train.cli import main as train_main
    from train.data import LenslessDataset
    from train.distill import DistillSettings, train_student
    from train.prior.io import load_prior
    from train.teacher import label_dataset

    try:
        profile = load_profile(args.profile)
    except ProfileError as exc:
        raise FitError(f"--profile {exc}") from None
    captures = list_captures(args.captures)
    measured = {path: profile.measurement(path) for path in captures}  # y of every capture, once
    for path, y in measured.items():  # every capture must be a measurement of this camera before any work starts
        if y.shape[0] != profile.channels:
            if "channels" not in profile.signal:  # calibrated before profiles recorded the captures' channels
                raise FitError(f"--captures {path}: {y.shape[0]} channel(s) after the profile's preprocessing; the "
                               f"profile {args.profile} does not record its captures' channels (an older calibration "
                               "that counts as 3): run nsdd-edge calibrate again")
            raise FitError(f"--captures {path}: {y.shape[0]} channel(s) after the profile's preprocessing, the camera "
                           f"gives {profile.channels} (a PSF image or another camera's file in the folder? pass a glob)")
    out: Path = args.out
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    prior = load_prior(args.prior, device=device)
    if prior.channels != profile.channels:
        raise FitError(f"--prior {args.prior} generates {prior.channels}-channel scenes, the camera measures "
                       f"{profile.channels} channel(s): train or pick a prior with the camera's channels")
    check_starts(args, profile.channels, prior)  # named errors now, not after an hour of labelling
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(args.budget_minutes, out / "fit.json")
    size = args.scene_size or prior.image_size

    # 1. simulate through the profile
    data = out / "data"
    t = time.monotonic()
    if not _complete(data / "dataset.json"):
        rc = train_main(["simulate", "--images", str(args.images), "--profile", str(args.profile), "--size", str(size),
                         "--limit", str(args.images_limit), "--n-test", str(min(32, args.images_limit // 10)),
                         "--out", str(data), *(["--threads", str(args.threads)] if args.threads else [])])
        if rc != 0:
            raise FitError("simulate failed (see above)")
    ds = LenslessDataset(data)
    if stages.finished("simulate") is None:
        stages.done("simulate", t, samples=len(ds.ids("train")), profile_match=ds.meta.get("profile_match"))

    # 2. teacher: the rate on the first batch sizes the label count
    t = time.monotonic()
    interactive = sys.stderr.isatty()
    teacher_dir = out / "teacher"
    if (earlier := stages.finished("teacher")) is not None:
        n_labels = int(earlier["labels"])
        print(f"[fit] teacher: {n_labels} labels from the earlier run", flush=True)
    else:
        budget = stages.budget("teacher")
        batch = 8
        common = dict(steps=args.teacher_steps, batch_size=batch, shard_size=batch, device=device,
                      progress=interactive, prior_path=args.prior, write_png=False)
        label_dataset(ds, prior, teacher_dir, split="train", limit=batch, **common)
        manifest = json.loads((teacher_dir / "teacher.json").read_text())
        per_image = np.median([v.get("seconds", 0) for v in json.loads((teacher_dir / "recon.json").read_text())
                               ["images"].values()]) or 1.0
        n_labels = int(min(len(ds.ids("train")), max(batch, (budget - (time.monotonic() - t)) / per_image)))
        n_labels = max(batch, n_labels // batch * batch)
        n_labels = max(n_labels, len(manifest.get("ids", [])))
        label_dataset(ds, prior, teacher_dir, split="train", limit=n_labels, **common)
        stages.done("teacher", t, labels=n_labels, seconds_per_image=float(per_image), steps=args.teacher_steps)

    # 3. student, time-boxed
    t = time.monotonic()
    student_dir = out / "student"
    distilled = stages.finished("distill")
    lam = args.lam if args.lam == "discrepancy" else float(args.lam)
    settings = DistillSettings(
        data=str(data), targets=str(teacher_dir), out=str(student_dir), student=args.student,
        prior=str(args.prior) if args.student == "paper" else None, lam=lam, limit=n_labels, model="crop"
        if profile.geometry.model == "crop" else None, lpips_weight=0.1 if args.lpips_weights else 0.0,
        lpips_weights=args.lpips_weights, steps=100_000, batch=8, lr=2e-4 if args.student == "paper" else 5e-4,
        warmup=20, checkpoint_every=100, samples=4, device=device, fp16=False, progress=interactive, preload=True,
        time_budget=stages.budget("distill"), support_taper=student_taper(profile, size),
        architecture={} if args.student == "paper" else dict(EDGE_ARCHITECTURE),  # as recorded by earlier fits
        init_student=str(args.init_student) if args.init_student else None,
        # scenes smaller than the grid (a cg camera: 64² faces on 256²): the loss where g acts, not the black padding
        loss_window=fit_loss_window(student_dir) if args.use_student is None else "auto")
    if args.use_student is not None:
        earlier = None if distilled is None else {**distilled, "seconds": stages.times.get("distill")}
        adopted = adopt_student(args.use_student, student_dir, ds, args.student, earlier,
                                student_taper(profile, size))
        if adopted is not None:  # a new student: what was scored with the old one is void
            stages.forget("heldout", "report")
            stages.done("distill", t, **adopted)
    elif distilled is None:
        summary = train_student(settings)
        stages.done("distill", t, steps=summary["step"], parameters=summary["parameters"])
    else:
        print(f"[fit] distill: the student of the earlier run ({distilled.get('steps')} steps)", flush=True)

    # 4. export, verify, bundle (the profile's preprocessing, the profile embedded)
    t = time.monotonic()
    from export.cli import main as export_main

    onnx = out / "model.onnx"
    psf_file = data / "psf.npy"
    if export_main(["onnx", "--student", str(student_dir), "--psf", str(psf_file), "--psf-normalization", "none",
                    "--out", str(onnx)]) != 0:
        raise FitError("export failed (see above)")
    if export_main(["verify", str(onnx), "--data", str(data), "--student", str(student_dir), "--json",
                    str(out / "verify.json"), "--limit", "4", "--no-quantize"]) != 0:
        raise FitError("verify failed (see above)")
    bundle = out / "bundle"
    if export_main(["bundle", "--onnx", str(onnx), "--psf", str(psf_file), "--psf-normalization", "none",
                    "--preprocess", str(args.profile), "--name", f"{profile.name}-{args.student}",
                    "--out", str(bundle)]) != 0:
        raise FitError("bundle failed (see above)")
    stages.done("export", t)

    # 5. held-out simulated faces of this profile, scored against their ground truth
    t = time.monotonic()
    heldout = stages.finished("heldout")
    unseen = out / "heldout_data" if args.heldout_images is not None else None
    if heldout is None or (unseen is not None and heldout.get("data") != str(unseen)):  # new faces: score again
        per_image = float(stages.finished("teacher")["seconds_per_image"])
        heldout_data = data if unseen is None else simulate_heldout(args, size, unseen)
        heldout = heldout_scores(heldout_data, student_dir, args, device, per_image, stages.budget("heldout"),
                                 len(LenslessDataset(heldout_data).ids("test")),
                                 out / ("heldout" if unseen is None else "heldout_unseen"))
        heldout["data"] = str(heldout_data)
        stages.done("heldout", t, **heldout)

    # 6. the report on the real captures
    t = time.monotonic()
    report = fit_report(profile, measured, prior, student_dir, out, args.teacher_steps, device, heldout)
    stages.done("report", t, consistency=report["consistency"])
    return json.loads((out / "fit.json").read_text())


def adopt_student(source: Path, student_dir: Path, ds, kind: str, earlier: dict | None,
                  taper: int) -> dict | None:
    """``--use-student``: ``source`` becomes ``student_dir`` (the fit's student). It must be a ``kind`` student
    trained for this fit's data: the same PSF (hash), sensor, scene grid, channels, forward model and objective
    (a soft edge other than the fit's ``taper`` is said aloud). The copy is made and checked first; then a student
    already in ``student_dir`` moves aside to ``student_dir.previous-N`` (nothing is overwritten). Returns the
    distill stage's record, or None when ``source`` is already this fit's student (a rerun of the same command)."""
    import shutil

    from nsdd_edge.bundle import file_sha256
    from train.students import StudentError, read_student_config, student_weights_path

    try:
        cfg = read_student_config(source)
        weights = student_weights_path(source, cfg)
    except StudentError as exc:
        raise FitError(f"--use-student {exc}") from None
    physics = ds.physics()
    wanted = {"kind": kind, "objective": "nullspace", "psf_sha256": physics.psf_hash,
              "channels": int(ds.meta.get("channels", 3)), "model": physics.model,
              "sensor_shape": list(physics.sensor_shape), "scene_shape": list(physics.scene_shape)}
    theirs = {**{k: cfg.get(k) for k in wanted}, "model": (cfg.get("geometry") or {}).get("model")}
    wrong = [f"{k} {theirs[k]} (this fit: {wanted[k]})" for k in wanted if theirs[k] != wanted[k]]
    if wrong:
        raise FitError(f"--use-student {source}: not a student of this fit's data: " + "; ".join(wrong))
    if int(cfg.get("support_taper") or 0) != taper:
        print(f"[fit] distill: note: --use-student {source} has a {cfg.get('support_taper') or 0} px soft edge, this "
              f"fit's profile asks for {taper} px (distill --support-taper)", flush=True)
    digest = file_sha256(weights)
    if earlier is not None and earlier.get("adopted_from") == str(source.resolve()) \
            and earlier.get("weights_sha256") == digest and (student_dir / weights.name).exists() \
            and file_sha256(student_dir / weights.name) == digest:
        print(f"[fit] distill: the student of {source} is already this fit's", flush=True)
        return None
    staging = student_dir.with_name(student_dir.name + ".incoming")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for f in sorted(source.iterdir()):  # the student's files (config, weights, loss curve), not its checkpoint
            if f.is_file() and f.name != "checkpoint.pt":
                shutil.copy2(f, staging / f.name)
        if file_sha256(staging / weights.name) != digest:
            raise FitError(f"--use-student {source}: its weights changed while they were copied")
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise FitError(f"--use-student {source}: copying it failed ({exc}); {student_dir} is untouched") from None
    if student_dir.exists():
        n = 1
        while student_dir.with_name(f"{student_dir.name}.previous-{n}").exists():
            n += 1
        student_dir.rename(student_dir.with_name(f"{student_dir.name}.previous-{n}"))
    staging.rename(student_dir)
    print(f"[fit] distill: the student of {source} ({cfg.get('step')} steps) replaces this fit's", flush=True)
    record = {"steps": int(cfg.get("step") or 0), "parameters": int(cfg.get("weights", {}).get("parameters") or 0),
              "adopted_from": str(source.resolve()), "weights_sha256": digest}
    if earlier is not None:
        kept = earlier.get("replaced") if earlier.get("adopted_from") else None  # the trained one's record
        record["replaced"] = kept or {k: earlier[k] for k in ("steps", "seconds") if earlier.get(k) is not None}
    return record


def student_architecture(kind: str) -> dict:
    """The network ``fit`` trains: the paper student's default, or a small edge UNet."""
    from train.students import default_architecture

    return default_architecture(kind, "nullspace") | ({} if kind == "paper" else EDGE_ARCHITECTURE)


def _but_channels(architecture: dict) -> dict:
    """A diffusion UNet's architecture without its channel counts (which --init-student folds)."""
    return {k: v for k, v in architecture.items() if k not in ("in_channels", "out_channels")}


def check_starts(args: argparse.Namespace, channels: int, prior) -> None:
    """``--heldout-images`` holds images; ``--init-student`` is a student with the network this fit trains
    (kind, channels, architecture; for a paper student the prior's UNet too)."""
    from nsdd_edge.optics import OpticsError
    from train.distill import DistillError, check_init_student
    from train.simulate import list_images

    if args.heldout_images is not None:
        try:
            list_images(args.heldout_images)
        except OpticsError as exc:
            raise FitError(str(exc).replace("--images", "--heldout-images", 1)) from None
    if getattr(args, "use_student", None) is not None:
        from train.students import StudentError, read_student_config

        if args.init_student is not None:
            raise FitError("--use-student and --init-student: give one (a student to adopt, or one to start from)")
        try:
            kind = read_student_config(args.use_student).get("kind")
        except StudentError as exc:
            raise FitError(f"--use-student {exc}") from None
        if kind != args.student:
            raise FitError(f"--use-student {args.use_student}: a {kind} student, this fit's is --student {args.student}")
        out, source = args.out.resolve(), args.use_student.resolve()
        if source == out / "student" or out / "student" in source.parents:
            raise FitError(f"--use-student {args.use_student} lies inside this fit's own student directory")
        record = out / "fit.json"
        done = json.loads(record.read_text()).get("stages", {}) if record.exists() else {}
        if not {"simulate", "teacher"} <= set(done):
            raise FitError(f"--use-student needs a fit whose data and labels exist: {args.out} has not finished "
                           "simulate and teacher (run the fit first, then train the student longer)")
    if args.init_student is not None:
        try:
            init = check_init_student(str(args.init_student), args.student, channels,
                                      student_architecture(args.student), "nullspace")
        except DistillError as exc:
            raise FitError(str(exc)) from None
        if args.student == "paper":  # the loaded prior's config, as the student config records it
            ours = (getattr(prior, "config", None) or {}).get("architecture")
            theirs = (init.get("prior") or {}).get("config", {}).get("architecture")
            if ours is not None and theirs is not None and _but_channels(ours) != _but_channels(theirs):
                raise FitError(f"--init-student {args.init_student}: its diffusion UNet is not --prior {args.prior}'s "
                               "(another architecture); start from a student of this prior")


def fit_loss_window(student_dir: Path) -> str:
    """``auto`` (the support window when the scenes are smaller than the grid), or ``grid`` for a distillation
    checkpoint written before the loss window existed: resuming it must not change its loss."""
    from train.distill import CHECKPOINT_NAME, _read_checkpoint

    earlier = _read_checkpoint(student_dir / CHECKPOINT_NAME) if (student_dir / CHECKPOINT_NAME).exists() else None
    if earlier is not None and "loss_window" not in earlier.get("signature", {}):
        print(f"[fit] distill: resuming {student_dir} with its loss on the whole grid (written before the loss "
              "window existed)", flush=True)
        return "grid"
    return "auto"


def simulate_heldout(args: argparse.Namespace, size: int, out: Path) -> Path:
    """``--heldout-images``: those scenes through the profile, every one in the test split (``OUT/heldout_data``;
    noise seed 1, not the training set's 0). simulate resumes, and refuses other images in the same folder."""
    from train.cli import main as train_main

    rc = train_main(["simulate", "--images", str(args.heldout_images), "--profile", str(args.profile),
                     "--size", str(size), "--limit", str(args.images_limit), "--test-fraction", "1", "--seed", "1",
                     "--out", str(out), *(["--threads", str(args.threads)] if args.threads else [])])
    if rc != 0:
        raise FitError("held-out: simulating --heldout-images failed (see above)")
    return out


def heldout_images(per_image: float, budget: float, available: int, minimum: int = 2) -> int:
    """How many held-out faces fit the budget: the teacher dominates (``per_image`` s each, the student and
    Wiener are free beside it); at least ``minimum``, at most ``available``."""
    return max(min(minimum, available), min(available, int(budget / max(per_image, 1e-3))))


def heldout_scores(data: Path, student_dir: Path, args: argparse.Namespace, device: str, per_image: float,
                   budget: float, available: int, out: Path) -> dict:
    """``nsdd-train evaluate`` of Wiener, the DDNM+ teacher and the student on the first held-out (test) faces
    of the simulated data: the issue's check that the student stays within LPIPS 0.02 of its teacher on faces
    of this camera. Returns the means per method and the student − teacher gaps."""
    from train.cli import main as train_main

    n = heldout_images(per_image, budget, available)
    if n == 0:
        raise FitError(f"held-out: the simulated data {data} has no test split")
    cmd = ["evaluate", "--data", str(data), "--split", "test", "--limit", str(n), "--prior", str(args.prior),
           "--methods", f"wiener,ddnm,student:{student_dir}", "--names", "Wiener,DDNM+ teacher,student",
           "--set", f"ddnm.steps={args.teacher_steps}", "--out", str(out), "--device", device,
           "--report", str(out / "report.md")]
    cmd += ["--lpips-weights", str(args.lpips_weights)] if args.lpips_weights else ["--no-lpips"]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    if train_main(cmd) != 0:
        raise FitError("held-out evaluation failed (see above)")
    metrics = json.loads((out / "metrics.json").read_text())
    keep = ("psnr", "ssim", "lpips", "consistency", "n")
    means = {name: {k: m.get(k) for k in keep if k in m} for name, m in metrics.items()}
    result: dict = {"images": n, "metrics": means}
    teacher, student = means.get("DDNM+ teacher", {}), means.get("student", {})
    for key in ("psnr", "lpips"):
        if teacher.get(key) is not None and student.get(key) is not None:
            result[f"student_minus_teacher_{key}"] = float(student[key]) - float(teacher[key])
    return result


def report_tile(x: np.ndarray, window: tuple[int, int], side: int = 160) -> np.ndarray:
    """A report picture of ``x`` ``(C, H, W)``: its centre ``window`` (clipped to ``x``'s grid: the student's and
    the teacher's grid may be smaller than the profile's), autoscaled to the 99.5th percentile, ``side``² px."""
    import cv2

    from nsdd_edge.preview import to_display

    h, w = min(int(window[0]), x.shape[-2]), min(int(window[1]), x.shape[-1])
    r, c = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    view = to_display(np.ascontiguousarray(x[..., r:r + h, c:c + w]), autoscale=True, percentile=99.5)
    return cv2.resize(view, (side, side), interpolation=cv2.INTER_AREA)


def fit_report(profile, measured: dict[Path, np.ndarray], prior, student_dir: Path, out: Path, teacher_steps: int,
               device: str, heldout: dict | None = None) -> dict:
    """Wiener (at the profile's λ and, when it differs, at the student's), FISTA, DDNM+ and the student on every
    real capture (``measured``: capture → its y): a picture and a consistency table; then the held-out table."""
    import cv2

    from train.physics import LenslessOperator
    from train.solvers.ddnm import DDNM
    from train.solvers.fista import FISTA
    from train.students import load_student

    g = profile.geometry
    captures = list(measured)
    sigma = float(np.median([profile.noise.std(np.median(y)) for y in list(measured.values())[:4]]))
    op = LenslessOperator(profile.psf, g.sensor_shape, g.model, lam=profile.lam, scene_shape=g.scene_shape,
                          conv_shape=g.conv_shape, noise_std=sigma).to(device)  # the zero-padded Wiener filter
    student = load_student(student_dir, device=device)
    sop = LenslessOperator(profile.psf, g.sensor_shape, g.model, lam=float(student.config["lam"]),
                           scene_shape=tuple(student.config["scene_shape"]),
                           conv_shape=tuple(student.config["geometry"]["conv_shape"]), noise_std=sigma,
                           projector=student.config.get("projector", "tikhonov")).to(device)
    fista, teacher = FISTA(iters=300), DDNM(prior, steps=teacher_steps)
    methods = {"Wiener": lambda y: op.A_dagger(y)}
    if sop.projector != "tikhonov" or not np.isclose(sop.lam, profile.lam, rtol=1e-6):  # "at the same λ"
        methods[f"A†y (the student's: {sop.projector}, λ {sop.lam:.3g})"] = lambda y: sop.A_dagger(y)
    methods |= {"FISTA": lambda y: fista(y, op), "DDNM+ teacher": lambda y: teacher(y, sop),
                "student": lambda y: student(y, sop)}
    rows, table = [], {m: [] for m in methods}
    window = profile.support.shape if profile.support else tuple(student.config.get("support_shape") or g.scene_shape)
    for path in captures:
        y = torch.from_numpy(measured[path])[None].to(device)
        tiles = []
        for name, fn in methods.items():
            with torch.no_grad():
                x = fn(y)
            physics = op if name in ("Wiener", "FISTA") else sop
            table[name].append(float(physics.consistency(x, y)))
            tiles.append(report_tile(x[0].cpu().numpy(), window))
        rows.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(rows, axis=0)
    cv2.imwrite(str(out / "report.png"), grid)
    means = {k: float(np.mean(v)) for k, v in table.items()}
    lines = [f"# Fit report: {profile.name}", "", f"Columns: {', '.join(methods)}; rows: "
             + ", ".join(p.name for p in captures), "", "![reconstructions](report.png)", "",
             "| method | mean ‖Ax̂ − y‖/‖y‖ |", "|---|---:|"] + [f"| {k} | {v:.4f} |" for k, v in means.items()]
    lines += heldout_lines(heldout)
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return {"consistency": means, "per_capture": table}


def heldout_lines(heldout: dict | None) -> list[str]:
    """The held-out table of the report (Markdown lines; none without a held-out record)."""
    if not heldout:
        return []

    def cell(v, fmt: str) -> str:
        return "—" if v is None else format(float(v), fmt)

    lines = ["", f"## Held-out simulated faces of this profile ({heldout['images']}, scored against ground truth)"]
    if heldout.get("data"):
        lines += ["", f"The test split of `{heldout['data']}`."]
    lines += ["", "| method | PSNR | SSIM | LPIPS | consistency |", "|---|---:|---:|---:|---:|"]
    for name, m in heldout["metrics"].items():
        lines.append(f"| {name} | {cell(m.get('psnr'), '.2f')} | {cell(m.get('ssim'), '.3f')} | "
                     f"{cell(m.get('lpips'), '.4f')} | {cell(m.get('consistency'), '.4f')} |")
    gap = heldout.get("student_minus_teacher_lpips")
    if gap is not None:
        lines += ["", f"Student − teacher LPIPS: {gap:+.4f} (target ≤ 0.02: {'met' if gap <= 0.02 else 'not met'})."]
    return lines


def main(args: argparse.Namespace) -> int:
    if not args.budget_minutes > 0:
        print("nsdd-train fit: error: --budget-minutes must be > 0", file=sys.stderr)
        return 2
    try:
        with torch_threads(args.threads, "train"):
            record = run_fit(args)
    except (FitError, ProfileError, ValueError) as exc:
        print(f"nsdd-train fit: error: {exc}", file=sys.stderr)
        return 2
    print(f"nsdd-train fit: bundle in {args.out / 'bundle'}; report {args.out / 'report.md'}; stages "
          + ", ".join(f"{k} {v:.0f} s" for k, v in record["stages"].items()))
    return 0

