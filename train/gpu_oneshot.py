"""The GPU one-shot (``scripts/gpu_train.sh``): from face crops to shipped weights in a fixed wall-time budget.

One process, five stages, each given a share of the time that is left (so an overrun early is absorbed
later, and the run always ends with its outputs written):

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

Outputs in ``--out`` (at most 8 files, each under 16 MB): ``prior.tar``, ``student_paper.tar``,
``student_lean.tar``, ``student_lean_sep.tar`` (each a model directory as ``save_pretrained`` writes it,
fp16 safetensors), ``figures.json``. The face crops travel as one file written by ``pack``: JPEG bytes of
the canonical data set's **training split only** (the held-out test faces never leave this machine).

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

PACK_FORMAT = "nsdd-face-pack/1"
STUDENTS = {
    # name: (kind, architecture, learning rate); the lean widths were picked by bench/bench_student.py-style
    # CPU timings of the bare network (≈10 ms and ≈6 ms per 64² window on one core in torch)
    "paper": ("paper", {}, 2e-4),
    "lean": ("edge", {"width": 48, "depth": 3, "max_width": 192, "blocks": 2, "unshuffle": 2}, 5e-4),
    "lean_sep": ("edge", {"width": 64, "depth": 3, "max_width": 256, "blocks": 2, "unshuffle": 2,
                          "separable": True}, 5e-4),
}
PRIOR_ARCH = ["--base-channels", "64", "--channel-mults", "1,2,2", "--num-res-blocks", "2",
              "--attention-resolutions", "16", "--dropout", "0"]
TINY_PRIOR_ARCH = ["--base-channels", "8", "--channel-mults", "1,2", "--num-res-blocks", "1",
                   "--attention-resolutions", "", "--dropout", "0"]
# stage shares of the time left when the stage starts
SHARES = {"prior": 0.45, "teacher": 0.33, "paper": 0.40, "lean": 0.5, "lean_sep": 0.85}


# ---- the face pack ------------------------------------------------------------------------------
def pack_faces(dataset: Path, out: Path, size: int = 64, quality: int = 85) -> dict:
    """JPEG-encode the training split of a simulated data set's scenes (its ``dataset.json`` names the source
    files) at ``size`` px into one ``.npz``; the test split is left out."""
    import cv2

    from train.simulate import prepare_scene

    meta = json.loads((dataset / "dataset.json").read_text())
    folder = Path(meta["settings"]["images"])
    train = meta["splits"]["train"]
    names = [meta["sources"][i] for i in train]
    blobs = []
    for name in names:
        x = prepare_scene(folder / name, size, 3)
        u8 = (np.moveaxis(x, 0, -1)[..., ::-1] * 255.0 + 0.5).astype(np.uint8)  # BGR for OpenCV
        ok, buf = cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        if not ok:
            raise RuntimeError(f"{name}: JPEG encoding failed")
        blobs.append(buf.tobytes())
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    info = {"format": PACK_FORMAT, "size": size, "quality": quality, "count": len(names),
            "dataset": str(dataset), "split": "train", "source": str(folder)}
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, jpeg=np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets=offsets,
             names=np.frombuffer("\n".join(names).encode(), dtype=np.uint8), info=np.array(json.dumps(info)))
    return {**info, "bytes": int(offsets[-1])}


def unpack_faces(pack: Path, folder: Path, limit: int | None = None) -> list[str]:
    """Write the pack's JPEGs into ``folder`` under their original names; returns the names (sorted)."""
    with np.load(pack) as z:
        info = json.loads(str(z["info"]))
        if info.get("format") != PACK_FORMAT:
            raise ValueError(f"{pack}: not a face pack ({info.get('format')!r})")
        jpeg, offsets, names = z["jpeg"], z["offsets"], z["names"].tobytes().decode().split("\n")
    folder.mkdir(parents=True, exist_ok=True)
    order = sorted(range(len(names)), key=lambda k: names[k])[:limit]
    for k in order:
        (folder / names[k]).write_bytes(jpeg[offsets[k]:offsets[k + 1]].tobytes())
    return sorted(names[k] for k in order)


# ---- helpers ------------------------------------------------------------------------------------
class Clock:
    """Wall-time budget: ``share(f)`` is the fraction ``f`` of what is left (minus a reserve for the end)."""

    def __init__(self, budget_s: float, reserve_s: float):
        self.t0 = time.monotonic()
        self.budget_s, self.reserve_s = float(budget_s), float(reserve_s)
        self.stages: dict[str, float] = {}

    def left(self) -> float:
        return max(self.budget_s - self.reserve_s - (time.monotonic() - self.t0), 0.0)

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
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - t))
    return float(np.median(times))


# ---- the run ------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    import torch

    from train.data import LenslessDataset
    from train.distill import DistillSettings, train_student
    from train.prior import train_prior
    from train.prior.io import load_prior
    from train.simulate import split_ids
    from train.teacher import label_dataset

    tiny = args.tiny
    clock = Clock(args.budget_seconds, reserve_s=5.0 if tiny else 25.0)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    figures: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                     "torch": torch.__version__, "budget_seconds": args.budget_seconds, "tiny": tiny,
                     "cpu_threads": torch.get_num_threads()}

    # faces → folder; the validation faces (the simulated set's "test" split) are hidden from the prior
    t = time.monotonic()
    faces = work / "faces"
    names = unpack_faces(Path(args.faces), faces, limit=12 if tiny else None)
    n_val = 4 if tiny else args.val
    ids = [f"{k:06d}" for k in range(len(names))]  # simulate numbers the sorted files the same way
    val_ids = set(split_ids(ids, 0, 0.1, n_val)["test"])
    prior_faces = work / "prior_faces"
    prior_faces.mkdir(exist_ok=True)
    for i, name in zip(ids, names):
        link = prior_faces / name
        if i not in val_ids and not link.exists():
            link.symlink_to(faces / name)
    figures["faces"] = {"count": len(names), "validation": n_val, "prior": len(names) - n_val}
    clock.done("unpack", t)

    # the data set, simulated on the CPU while the prior trains on the GPU
    data = work / "data"
    sim_cmd = [sys.executable, "-m", "train.cli", "simulate", "--images", str(faces), "--psf", args.psf,
               "--psf-downsample", "2", "--size", "64", "--noise-std", "0.005", "--seed", "0",
               "--n-test", str(n_val), "--threads", "4", "--out", str(data)]
    sim = subprocess.Popen(sim_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # 1. prior
    t = time.monotonic()
    prior_dir = work / "prior"
    parser = argparse.ArgumentParser()
    train_prior.configure_parser(parser)
    prior_args = parser.parse_args(
        ["--images", str(prior_faces), "--size", "64", *(TINY_PRIOR_ARCH if tiny else PRIOR_ARCH),
         "--batch", "4" if tiny else str(args.prior_batch), "--lr", "4e-4", "--warmup", "1" if tiny else "200",
         "--ema", "0.999", "--steps", "1" if tiny else "1000000", "--checkpoint-every", "1000000",
         "--sample-count", "4" if tiny else "16", "--sample-steps", "2" if tiny else "50",
         "--save-dtype", "float16", "--log-every", "1" if tiny else "100", "--no-progress",
         "--device", device, "--out", str(prior_dir)]
        + ([] if tiny else ["--time-limit", f"{clock.share(SHARES['prior']) / 60:.4f}"]))
    rc = train_prior.main(prior_args)
    if rc != 0:
        raise RuntimeError(f"prior training failed (exit {rc})")
    log_path = prior_dir / "train_log.jsonl"
    log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.exists() else []
    prior = load_prior(prior_dir, device=device)
    figures["prior"] = {"steps": json.loads((prior_dir / "config.json").read_text())["training"].get("step"),
                        "batch": prior_args.batch, "parameters": prior.num_parameters,
                        "final_loss": log[-1]["loss"] if log else None,
                        "arch": PRIOR_ARCH if not tiny else TINY_PRIOR_ARCH}
    clock.done("prior", t)
    figures["files"] = {"prior.tar": _tar(prior_dir, out / "prior.tar")}
    _write_figures(out, figures, clock)
    t = time.monotonic()
    sim_out, _ = sim.communicate()
    if sim.returncode != 0:
        raise RuntimeError(f"simulate failed (exit {sim.returncode}):\n{sim_out[-2000:]}")
    clock.done("simulate (wait)", t)
    ds = LenslessDataset(data)
    val = ds.ids("test")
    train_split = ds.ids("train")
    gt_val = torch.from_numpy(np.stack([ds.ground_truth(i) for i in val])) * 2 - 1  # clean faces, prior check only
    figures["prior"]["heldout_denoising_mse"] = train_prior.heldout_denoising_loss(
        prior.net, gt_val, prior.alphas_cumprod.to(device).float())

    # 2. teacher: validation labels first (they time the teacher), then as much of the train split as fits
    t = time.monotonic()
    budget = clock.share(SHARES["teacher"])
    steps = 2 if tiny else args.teacher_steps
    common = dict(steps=steps, batch_size=4 if tiny else args.teacher_batch, write_png=False, device=device,
                  progress=False, prior_path=prior_dir, shard_size=4 if tiny else args.teacher_batch)
    t_val = time.monotonic()
    label_dataset(ds, prior, work / "teacher_val", split="test", **common)
    rate = len(val) / max(time.monotonic() - t_val, 1e-6)
    n_train = len(train_split) if tiny else min(len(train_split),
                                                max(args.teacher_batch, int(rate * (budget - (time.monotonic() - t)))))
    if not tiny and n_train < len(train_split):  # whole batches
        n_train = min(len(train_split), max(args.teacher_batch, n_train // args.teacher_batch * args.teacher_batch))
    label_dataset(ds, prior, work / "teacher_train", split="train", limit=n_train, **common)
    figures["teacher"] = {"steps": steps, "eta": 0.85, "labelled_train": n_train, "validation": len(val),
                          "images_per_second": round(rate, 2)}
    clock.done("teacher", t)
    _write_figures(out, figures, clock)

    # 3. λ by the discrepancy principle (measurements and σ only)
    from nsdd_edge.optics import discrepancy_lambda

    phys = ds.physics()
    y_probe = np.stack([ds.measurement(i) for i in train_split[:64]])
    lam = discrepancy_lambda(ds.psf, phys.geometry, y_probe, float(ds.meta["noise_std"]))
    figures["lambda"] = {"rule": "discrepancy principle, rms(y − A A†y) = σ on 64 training measurements",
                         "value": lam, "sigma": float(ds.meta["noise_std"])}

    # 4. students
    lpips_w = args.lpips_weights if args.lpips_weights and Path(args.lpips_weights).is_file() else None
    figures["students"] = {}
    for name, (kind, arch, lr) in STUDENTS.items():
        t = time.monotonic()
        if tiny:
            arch = {**arch, "width": 4, "max_width": 8, "depth": 1} if kind == "edge" else {
                "width": 4, "depth": 1, "max_width": 8}
        settings = DistillSettings(
            data=str(data), targets=str(work / "teacher_train"), out=str(work / f"student_{name}"), student=kind,
            prior=str(prior_dir) if kind == "paper" else None, lam=lam, limit=n_train,
            lpips_weight=0.1 if lpips_w else 0.0, lpips_weights=lpips_w, steps=1 if tiny else 1_000_000,
            batch=2 if tiny else args.student_batch, lr=lr, warmup=1 if tiny else 100,
            checkpoint_every=1_000_000, samples=2 if tiny else 4, architecture=arch, device=device,
            fp16=True, progress=False, preload=True,
            time_budget=None if tiny else clock.share(SHARES[name]))
        try:
            summary = train_student(settings)
        except Exception as exc:  # noqa: BLE001  one failing student must not cost the others (or the prior) their outputs
            import traceback

            traceback.print_exc()
            figures["students"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        figures["students"][name] = {"kind": kind, "architecture": arch, "lr": lr, "steps": summary["step"],
                                     "parameters": summary["parameters"], "final_loss": summary["final_loss"],
                                     "batch": settings.batch}
        clock.done(f"student {name}", t)
        figures["files"][f"student_{name}.tar"] = _tar(work / f"student_{name}", out / f"student_{name}.tar")
        _write_figures(out, figures, clock)

    # 5. figures on the validation faces: agreement with the teacher, consistency, timings
    t = time.monotonic()
    trained = [n for n in STUDENTS if "error" not in figures["students"][n]]
    figures["validation"] = validation_figures(ds, val, work, lam, prior, device, lpips_w, tiny, trained)
    clock.done("figures", t)
    _write_figures(out, figures, clock)
    return figures


def _write_figures(out: Path, figures: dict, clock: Clock) -> None:
    """``figures.json`` as it stands (rewritten after every stage, so a run cut short still reports)."""
    figures["stages_seconds"] = clock.stages
    figures["wall_seconds"] = round(time.monotonic() - clock.t0, 1)
    tmp = out / ".figures.json.tmp"
    tmp.write_text(json.dumps(figures, indent=2) + "\n")
    tmp.replace(out / "figures.json")


def validation_figures(ds, val: list[str], work: Path, lam: float, prior, device: str, lpips_w: str | None,
                       tiny: bool, students: list[str]) -> dict:
    """Agreement with the teacher's labels and forward consistency on held-out faces; batch-1 timings."""
    import torch

    from train.data import read_recon_dir
    from train.metrics import psnr
    from train.physics import center_crop
    from train.solvers.ddnm import DDNM
    from train.students import load_student

    fwd = ds.forward_physics().to(device)
    phys = ds.physics(lam=lam).to(device)
    y = ds.measurements(val).to(device)
    teacher = read_recon_dir(work / "teacher_val", val).to(device)
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
        for name in students:
            s = load_student(work / f"student_{name}", device=device)
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
    pk.add_argument("--quality", type=int, default=85, help="JPEG quality (85: the 8,602 faces in ~15 MB)")
    pk.add_argument("--lpips-weights", type=Path, default=None,
                    help="also write a float16 copy of these LPIPS weights beside --out (smaller to carry)")
    r = sub.add_parser("run", help="the one-shot: prior → teacher → students → figures, in --budget-seconds")
    r.add_argument("--faces", required=True, help="face pack (.npz) written by `pack`")
    r.add_argument("--psf", required=True, help="the radial PSF (256², box-downsampled ×2 to the 128² sensor)")
    r.add_argument("--lpips-weights", default=None, help="LPIPS-Alex v0.1 state dict (students' LPIPS term)")
    r.add_argument("--out", required=True, help="output folder (tars of the model directories, figures.json)")
    r.add_argument("--work", default="/tmp/nsdd-oneshot", help="scratch folder")
    r.add_argument("--budget-seconds", type=float, default=510.0, help="wall-time budget of the whole run")
    r.add_argument("--val", type=int, default=256, help="validation faces (held out from prior and students)")
    r.add_argument("--prior-batch", type=int, default=256)
    r.add_argument("--teacher-steps", type=int, default=50)
    r.add_argument("--teacher-batch", type=int, default=512)
    r.add_argument("--student-batch", type=int, default=64)
    r.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is there")
    r.add_argument("--tiny", action="store_true", help="one step of everything on a dozen faces (CI)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.gpu_oneshot", description=__doc__.split("\n\n")[0])
    configure_parser(p)
    args = p.parse_args(argv)
    if args.command == "pack":
        info = pack_faces(args.dataset, args.out, args.size, args.quality)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
