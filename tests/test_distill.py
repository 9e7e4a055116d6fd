"""``nsdd-train distill`` on a tiny simulated problem whose "teacher targets" are the true scenes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nsdd_edge.optics import array_hash
from train.cli import main as cli_main
from train.distill import BatchOrder, DistillError, DistillSettings, TrainingInterrupted, learning_rate, train_student
from train.physics import LenslessOperator
from train.students import load_student

SIZE = 32
N = 12
SMALL = {"width": 8, "depth": 2, "max_width": 16, "blocks": 1}


def blur_psf(size: int = 16, sigma: float = 1.5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    psf = np.zeros((size, size))
    for _ in range(4):
        cy, cx = rng.uniform(2, size - 2, 2)
        psf += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    return (psf / psf.sum()).astype(np.float32)[None]


def make_problem(root: Path, n: int = N, seed: int = 0) -> tuple[Path, Path]:
    """A dataset directory WITHOUT ground truth + a targets directory holding the true scenes."""
    data, targets = root / "data", root / "targets"
    (data / "measurements").mkdir(parents=True)
    targets.mkdir()
    psf = blur_psf()
    np.save(data / "psf.npy", psf)
    phys = LenslessOperator(psf, (SIZE, SIZE), "circular", lam=1e-4)
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 3, 4, 4), generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    y = phys.measure(x, noise_std=0.005, generator=g)
    ids = [f"s{k:03d}" for k in range(n)]
    for k, i in enumerate(ids):
        np.save(data / "measurements" / f"{i}.npy", y[k].numpy())
        np.save(targets / f"{i}.npy", x[k].numpy())
    geo = {"model": "circular", "sensor_shape": [SIZE, SIZE], "scene_shape": [SIZE, SIZE], "conv_shape": [SIZE, SIZE]}
    meta = {"psf": {"file": "psf.npy", "sha256": array_hash(psf), "source": "test"}, "forward": geo,
            "recon": {"model": "circular", "lam": 1e-4}, "noise_std": 0.005, "seed": seed, "channels": 3,
            "splits": {"train": ids[: n - 2], "test": ids[n - 2 :]}}
    (data / "dataset.json").write_text(json.dumps(meta))
    (targets / "recon.json").write_text(json.dumps({"method": "truth-as-teacher"}))
    assert not (data / "ground_truth").exists()
    return data, targets


def settings(data: Path, targets: Path, out: Path, **kw) -> DistillSettings:
    base = {"data": str(data), "targets": str(targets), "out": str(out), "architecture": dict(SMALL), "steps": 6,
            "batch": 4, "lr": 2e-3, "warmup": 0, "checkpoint_every": 2, "samples": 2, "ema": 0.9, "progress": False}
    base.update(kw)
    return DistillSettings(**base)


@pytest.mark.parametrize("objective", ["nullspace", "full"])
def test_distill_decreases_loss_writes_outputs_without_ground_truth(tmp_path, objective, monkeypatch):
    data, targets = make_problem(tmp_path)
    from train.data import LenslessDataset

    def no_ground_truth(self, sample_id):
        raise AssertionError(f"distillation read the ground truth of {sample_id}")

    monkeypatch.setattr(LenslessDataset, "ground_truth", no_ground_truth)
    out = tmp_path / "student"
    rc = cli_main(["distill", "--data", str(data), "--targets", str(targets), "--out", str(out), "--student", "edge",
                   "--objective", objective, "--steps", "40", "--batch", "4", "--lr", "3e-3", "--warmup", "0",
                   "--ema", "0.8", "--checkpoint-every", "20", "--width", "8", "--depth", "2", "--max-width", "16",
                   "--blocks", "1", "--samples", "2", "--quiet"])
    assert rc == 0
    hist = json.loads((out / "loss.json").read_text())
    loss = np.array(hist["loss"])
    assert hist["step"] == list(range(1, 41))
    assert loss[-8:].mean() < 0.7 * loss[:4].mean(), loss
    for name in ("config.json", "model.safetensors", "checkpoint.pt", "loss_curve.png",
                 "samples/step_0000020.png", "samples/step_0000040.png"):
        assert (out / name).is_file(), name
    import cv2

    grid = cv2.imread(str(out / "samples/step_0000040.png"))
    assert grid.shape == (2 * SIZE + 2, 4 * SIZE + 3 * 2, 3)  # measurement | A†y | student | teacher, 2 rows
    teacher_tile = grid[:SIZE, 3 * (SIZE + 2):, ::-1]  # row 0, teacher column, back to RGB
    want = (np.moveaxis(np.load(targets / "s000.npy"), 0, -1).clip(0, 1) * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(teacher_tile, want)
    assert cv2.imread(str(out / "loss_curve.png")).shape[1] > 100

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["step"] == 40 and cfg["objective"] == objective and cfg["kind"] == "edge"
    assert cfg["training"]["split"] == "train" and cfg["training"]["num_samples"] == N - 2
    assert cfg["training"]["teacher"] == {"method": "truth-as-teacher"}
    assert not (data / "ground_truth").exists()

    # the saved (EMA) student has learnt: nullspace beats A†y on the null-space error within 40 steps
    # (the full ablation learns more slowly, as in the paper: it only has to beat its own start)
    solver = load_student(out)
    ds_ids = [f"s{k:03d}" for k in range(N - 2)]
    y = torch.from_numpy(np.stack([np.load(data / "measurements" / f"{i}.npy") for i in ds_ids]))
    t = torch.from_numpy(np.stack([np.load(targets / f"{i}.npy") for i in ds_ids]))
    phys = LenslessOperator(np.load(data / "psf.npy"), (SIZE, SIZE), "circular", lam=1e-4)
    x_hat = solver(y, phys)
    if objective == "nullspace":
        null_err = phys.null_project(x_hat - t).abs().mean()
        assert null_err < 0.8 * phys.null_project(phys.A_dagger(y) - t).abs().mean()
    else:
        assert (x_hat - t).abs().mean() < 0.7 * loss[:4].mean()


def test_resume_after_kill_gives_the_same_weights(tmp_path):
    data, targets = make_problem(tmp_path)
    full = train_student(settings(data, targets, tmp_path / "a"))

    class Killed(Exception):
        pass

    def kill_at_5(step, loss):
        if step == 5:  # after the step-4 checkpoint, before step 6: like a SIGKILL, nothing more is written
            raise Killed

    with pytest.raises(Killed):
        train_student(settings(data, targets, tmp_path / "b"), callback=kill_at_5)
    ckpt = torch.load(tmp_path / "b/checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4
    resumed = train_student(settings(data, targets, tmp_path / "b"))
    assert resumed["step"] == 6
    assert [h[:2] for h in resumed["history"]] == [h[:2] for h in full["history"]]
    a, b = load_file(str(tmp_path / "a/model.safetensors")), load_file(str(tmp_path / "b/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca = torch.load(tmp_path / "a/checkpoint.pt", weights_only=True)
    cb = torch.load(tmp_path / "b/checkpoint.pt", weights_only=True)
    assert all(torch.equal(ca["net"][k], cb["net"][k]) for k in ca["net"])
    assert ca["data"] == cb["data"]
    # running again once finished changes nothing
    again = train_student(settings(data, targets, tmp_path / "b"))
    assert again["step"] == 6


def test_holdout_labels_are_not_trained_on_and_their_loss_is_logged_and_resumed(tmp_path):
    data, targets = make_problem(tmp_path)
    full = train_student(settings(data, targets, tmp_path / "a", holdout=3))
    cfg = json.loads((tmp_path / "a/config.json").read_text())
    held = [f"s{k:03d}" for k in range(7, 10)]  # the last 3 of the 10 training ids
    assert cfg["training"]["num_samples"] == 7
    assert (cfg["training"]["holdout"]["count"], cfg["training"]["holdout"]["first"]) == (3, "s007")
    record = json.loads((tmp_path / "a/loss.json").read_text())["holdout"]
    assert record["step"] == [2, 4, 6] and record["count"] == 3 and record["lpips"] == [None] * 3
    # the logged figure is the saved EMA student's null-space L1 on the held-out labels, recomputed here
    solver = load_student(tmp_path / "a")
    y = torch.from_numpy(np.stack([np.load(data / "measurements" / f"{i}.npy") for i in held]))
    t = torch.from_numpy(np.stack([np.load(targets / f"{i}.npy") for i in held]))
    phys = LenslessOperator(np.load(data / "psf.npy"), (SIZE, SIZE), "circular", lam=1e-4)
    with torch.no_grad():
        want = phys.null_project(solver(y, phys) - t).abs().mean().item()
    assert record["loss"][-1] == pytest.approx(want, rel=1e-4)
    # a resumed run logs the same held-out history; holding out all ids or a negative count is refused
    with pytest.raises(RuntimeError):
        train_student(settings(data, targets, tmp_path / "b", holdout=3),
                      callback=lambda step, loss: (_ for _ in ()).throw(RuntimeError) if step == 5 else None)
    resumed = train_student(settings(data, targets, tmp_path / "b", holdout=3))
    assert resumed["holdout"] == full["holdout"]
    for bad in (10, -1):
        with pytest.raises(DistillError, match="--holdout"):
            train_student(settings(data, targets, tmp_path / f"bad{bad}", holdout=bad))
    assert not (tmp_path / "bad10").exists()
    with pytest.raises(DistillError, match="--holdout cannot be used with --psf-scale-range"):
        train_student(settings(data, targets, tmp_path / "bad", holdout=3, psf_scale_range=[0.9, 1.1]))
    (targets / "s009.npy").unlink()  # a missing held-out label is named against the whole list
    with pytest.raises(DistillError, match=r"s009 .*--limit 9"):
        train_student(settings(data, targets, tmp_path / "bad", holdout=3))


def test_sigint_or_sigterm_finishes_the_step_and_writes_a_checkpoint(tmp_path):
    import os
    import signal

    data, targets = make_problem(tmp_path)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # SIG_IGN in a background job
    for sig, out in ((signal.SIGINT, "i"), (signal.SIGTERM, "t")):
        def send(step, loss, sig=sig):
            if step == 3:
                os.kill(os.getpid(), sig)

        with pytest.raises(TrainingInterrupted, match=signal.Signals(sig).name):
            train_student(settings(data, targets, tmp_path / out, checkpoint_every=100), callback=send)
        assert torch.load(tmp_path / out / "checkpoint.pt", weights_only=True)["step"] == 3
        assert json.loads((tmp_path / out / "config.json").read_text())["step"] == 3
    assert {sig: signal.getsignal(sig) for sig in before} == before  # handlers restored
    resumed = train_student(settings(data, targets, tmp_path / "t", checkpoint_every=100))
    full = train_student(settings(data, targets, tmp_path / "full", checkpoint_every=100))
    assert [h[:2] for h in resumed["history"]] == [h[:2] for h in full["history"]]


def test_missing_targets_are_listed(tmp_path, capsys):
    data, targets = make_problem(tmp_path)
    (targets / "s003.npy").unlink()
    (targets / "s007.npy").unlink()
    with pytest.raises(DistillError, match=r"no teacher target ID.npy for 2 of 10 measurements: s003, s007"):
        train_student(settings(data, targets, tmp_path / "s"))
    rc = cli_main(["distill", "--data", str(data), "--targets", str(targets), "--out", str(tmp_path / "s"), "--quiet"])
    assert rc == 2 and "s003, s007" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # a failed run leaves no empty --out behind (issue 16, item 13)
    # targets labelled for another PSF are refused
    (targets / "recon.json").write_text(json.dumps({"method": "ddnm", "source": {"psf_sha256": "0" * 64}}))
    with pytest.raises(DistillError, match="targets were made for PSF 000000000000"):
        train_student(settings(data, targets, tmp_path / "s", split="test"))
    (targets / "recon.json").unlink()
    # the test split has all its targets
    summary = train_student(settings(data, targets, tmp_path / "t", split="test", steps=2, batch=2))
    assert summary["step"] == 2


def test_targets_of_teacher_limit_suggest_distill_limit(tmp_path, capsys):
    """Targets for only the first N ids of the split (what `teacher --limit N` writes): the error says
    `--limit N`, and --limit N trains on them (issue 16, item 8)."""
    data, targets = make_problem(tmp_path)
    train_ids = json.loads((data / "dataset.json").read_text())["splits"]["train"]
    for i in train_ids[4:]:
        (targets / f"{i}.npy").unlink()
    out = tmp_path / "s"
    keep = out / "mine.txt"
    out.mkdir()
    keep.write_text("the user's")
    argv = ["distill", "--data", str(data), "--targets", str(targets), "--out", str(out), "--quiet",
            "--steps", "2", "--batch", "2", "--width", "8", "--depth", "2", "--max-width", "16", "--blocks", "1"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "no teacher target ID.npy for 6 of 10" in err and "add --limit 4 to train on those" in err
    assert keep.read_text() == "the user's"  # a directory that existed before is left as it was
    assert cli_main([*argv, "--limit", "4"]) == 0
    assert json.loads((out / "config.json").read_text())["training"]["num_samples"] == 4


def test_bad_settings_and_changed_settings_on_resume(tmp_path):
    data, targets = make_problem(tmp_path)
    with pytest.raises(DistillError, match="--steps"):
        train_student(settings(data, targets, tmp_path / "s", steps=0))
    with pytest.raises(DistillError, match="--prior"):
        train_student(settings(data, targets, tmp_path / "s", student="paper"))
    with pytest.raises(DistillError, match="targets directory does not exist"):
        train_student(settings(data, tmp_path / "nope", tmp_path / "s"))
    np.save(targets / "s000.npy", np.zeros((3, 16, 16), np.float32))
    with pytest.raises(DistillError, match=r"target has shape \(3, 16, 16\), expected \(3, 32, 32\)"):
        train_student(settings(data, targets, tmp_path / "s", split="train"))
    data2, targets2 = make_problem(tmp_path / "second")
    train_student(settings(data2, targets2, tmp_path / "r", steps=2))
    with pytest.raises(DistillError, match="other settings .*lr"):
        train_student(settings(data2, targets2, tmp_path / "r", steps=4, lr=1e-3))
    (tmp_path / "r/checkpoint.pt").unlink()
    with pytest.raises(DistillError, match="holds a trained student but no checkpoint.pt"):
        train_student(settings(data2, targets2, tmp_path / "r", steps=4))


def test_paper_student_distills_with_a_tiny_prior(tmp_path):
    from test_students import tiny_prior

    data, targets = make_problem(tmp_path)
    prior = tiny_prior()
    before = {k: v.clone() for k, v in prior.net.state_dict().items()}
    summary = train_student(settings(data, targets, tmp_path / "p", student="paper", prior="unused-in-test",
                                     architecture={**SMALL, "t_fixed": 20}, steps=3), prior=prior)
    assert summary["step"] == 3
    # the student fine-tuned its own copy of g_θ; the prior it started from is unchanged
    assert all(torch.equal(before[k], v) for k, v in prior.net.state_dict().items())
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "p/model.safetensors"))
    assert any(not torch.equal(before[k].float(), saved[f"prior_net.{k}"].float()) for k in before)  # fine-tuned
    cfg = json.loads((tmp_path / "p/config.json").read_text())
    assert cfg["kind"] == "paper" and cfg["architecture"]["t_fixed"] == 20
    solver = load_student(tmp_path / "p", prior=tiny_prior())
    y = torch.from_numpy(np.load(data / "measurements/s000.npy"))[None]
    phys = LenslessOperator(np.load(data / "psf.npy"), (SIZE, SIZE), "circular", lam=1e-4)
    assert solver(y, phys).shape == (1, 3, SIZE, SIZE)


def test_lpips_term(tmp_path, shared):
    weights = shared / "weights/lpips/lpips_alex_full_v0.1.pth"
    if not weights.exists():
        pytest.skip("no LPIPS weights in ../shared")
    data, targets = make_problem(tmp_path)
    with pytest.raises(DistillError, match="--lpips-weights"):
        train_student(settings(data, targets, tmp_path / "x", lpips_weight=0.1))
    plain = train_student(settings(data, targets, tmp_path / "a", steps=1))
    with_lpips = train_student(settings(data, targets, tmp_path / "b", steps=1, lpips_weight=0.5,
                                        lpips_weights=str(weights)))
    assert with_lpips["history"][0][1] > plain["history"][0][1]
    # the held-out loss carries the same LPIPS term: recomputed here from the saved student (ids s008, s009)
    held = train_student(settings(data, targets, tmp_path / "c", steps=1, lpips_weight=0.5, holdout=2,
                                  lpips_weights=str(weights)))["holdout"]
    from train.lpips import get_lpips

    ids = ["s008", "s009"]
    y = torch.from_numpy(np.stack([np.load(data / "measurements" / f"{i}.npy") for i in ids]))
    t = torch.from_numpy(np.stack([np.load(targets / f"{i}.npy") for i in ids]))
    phys = LenslessOperator(np.load(data / "psf.npy"), (SIZE, SIZE), "circular", lam=1e-4)
    with torch.no_grad():
        x_hat = load_student(tmp_path / "c")(y, phys)
        lpips = get_lpips(str(weights), torch.device("cpu"))(x_hat, t).mean().item()
        l1 = phys.null_project(x_hat - t).abs().mean().item()
    assert held[0][2] == pytest.approx(lpips, rel=1e-4) and held[0][1] == pytest.approx(l1 + 0.5 * lpips, rel=1e-4)


def test_batch_order_and_learning_rate():
    order = BatchOrder(5, 3, seed=1)
    seen = order.next() + order.next()
    assert sorted(seen[:5]) == list(range(5))  # one epoch covers every sample once
    replay = BatchOrder(5, 3, seed=1, epoch=0, index=3)
    assert replay.next() == seen[3:]
    assert learning_rate(0, 1.0, 100, 10) == pytest.approx(0.1)
    assert learning_rate(10, 1.0, 100, 10) == pytest.approx(1.0)
    assert learning_rate(100, 1.0, 100, 10) == pytest.approx(0.1)


def test_paper_student_from_a_prior_directory_cli(tmp_path):
    """End to end through ``--prior DIR`` (``train.prior.io.load_prior``) and back through ``load_student``."""
    io = pytest.importorskip("train.prior.io")
    unet = pytest.importorskip("train.prior.unet")
    torch.manual_seed(3)
    net = unet.UNet(image_size=SIZE, base_channels=8, channel_mults=[1, 2], num_res_blocks=1,
                    attention_resolutions=[], dropout=0.0, mid_attention=False)
    io.save_prior(net, tmp_path / "prior")
    data, targets = make_problem(tmp_path)
    out = tmp_path / "paper"
    rc = cli_main(["distill", "--data", str(data), "--targets", str(targets), "--out", str(out), "--student", "paper",
                   "--prior", str(tmp_path / "prior"), "--t-fixed", "30", "--steps", "2", "--batch", "2",
                   "--width", "8", "--depth", "1", "--checkpoint-every", "2", "--samples", "1", "--quiet"])
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["prior"]["dir"] == str((tmp_path / "prior").resolve()) and cfg["architecture"]["t_fixed"] == 30
    original = io.load_prior(tmp_path / "prior").net.state_dict()
    y = torch.from_numpy(np.load(data / "measurements/s000.npy"))[None]
    phys = LenslessOperator(np.load(data / "psf.npy"), (SIZE, SIZE), "circular", lam=1e-4)
    with torch.no_grad():
        before = load_student(out)(y, phys)
    # the student directory is self-contained: g_θ's architecture and schedule come from its config.json,
    # the fine-tuned weights from its model.safetensors; the prior directory may move or go
    shutil.rmtree(tmp_path / "prior")
    solver = load_student(out)
    tuned = solver.net.prior_net.state_dict()
    assert any(not torch.equal(original[k], tuned[k]) for k in original)
    with torch.no_grad():
        after = solver(y, phys)
    assert torch.isfinite(after).all() and torch.equal(before, after)
    from train.prior.base import linear_alphas_cumprod

    assert solver.net.alpha_bar == pytest.approx(float(linear_alphas_cumprod(1000)[30]))


def test_bf16_autocast_path(tmp_path):
    """The mixed-precision path (bf16 autocast; GPUs use it by default) runs on CPU autocast too."""
    data, targets = make_problem(tmp_path)
    bf16 = train_student(settings(data, targets, tmp_path / "bf16", amp="bf16", steps=4))
    fp32 = train_student(settings(data, targets, tmp_path / "fp32", amp="off", steps=4))
    lb, lf = np.array([h[1] for h in bf16["history"]]), np.array([h[1] for h in fp32["history"]])
    assert np.all(np.isfinite(lb)) and not np.array_equal(lb, lf)  # really ran in lower precision
    assert np.allclose(lb, lf, rtol=0.1)
    w = load_file(str(tmp_path / "bf16/model.safetensors"))
    assert all(v.dtype == torch.float32 for v in w.values())  # master weights stay float32


def test_support_window_auto_full_explicit_and_refused(tmp_path):
    """--support: auto takes the simulated scenes' size when smaller than the grid; the network then sees
    only that window and the saved student records it; bad or too large windows are refused by name."""
    from train.data import LenslessDataset
    from train.distill import parse_support, resolve_support

    data, targets = make_problem(tmp_path)
    dataset = LenslessDataset(data)
    physics = dataset.physics()
    assert resolve_support("auto", dataset, physics) is None  # forward scene = grid: nothing to crop
    meta = json.loads((data / "dataset.json").read_text())
    meta["forward"] = {"model": "crop", "sensor_shape": [SIZE, SIZE], "scene_shape": [16, 16],
                       "conv_shape": [2 * SIZE, 2 * SIZE]}  # scenes simulated at 16 px (crop model)
    (data / "dataset.json").write_text(json.dumps(meta))
    dataset = LenslessDataset(data)
    assert resolve_support("auto", dataset, physics) == (16, 16)
    assert resolve_support("full", dataset, physics) is None
    assert resolve_support("8x12", dataset, physics) == (8, 12)
    assert parse_support("24") == (24, 24)
    for bad in ("0", "ax3", "1x2x3", ""):
        with pytest.raises(DistillError, match="--support"):
            parse_support(bad)
    with pytest.raises(DistillError, match="larger than the scene grid"):
        resolve_support("64", dataset, physics)

    out = tmp_path / "student"
    train_student(settings(data, targets, out, support="auto"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["support_shape"] == [16, 16]
    solver = load_student(out)
    seen = []
    solver.net.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    y = torch.from_numpy(np.stack([dataset.measurement(i) for i in dataset.ids("test")]))
    x_hat = solver(y, dataset.physics(lam=cfg["lam"]))
    assert seen == [(16, 16)] and x_hat.shape[-2:] == (SIZE, SIZE)

    # a soft edge: recorded, used by the loaded student, refused by name when it does not fit the window
    soft = tmp_path / "soft"
    train_student(settings(data, targets, soft, support="auto", support_taper=3))
    assert json.loads((soft / "config.json").read_text())["support_taper"] == 3
    assert load_student(soft).student.support_taper == 3
    with pytest.raises(DistillError, match="--support-taper"):
        train_student(settings(data, targets, tmp_path / "bad", support="16", support_taper=8))


def test_a_soft_edge_widens_the_auto_window_so_it_never_dims_the_scenes(tmp_path, capsys):
    """With --support-taper τ, `auto` is the scenes' size + 2τ (rounded up to the network's multiple, capped at
    the grid): g has full weight over every scene pixel, and fades out over the black padding around them. A
    checkpoint from before (the taper inside the scenes' window) resumes with the window it was started with."""
    from train.data import LenslessDataset
    from train.distill import CHECKPOINT_NAME, resolve_support
    from train.students import input_multiple

    data, targets = make_problem(tmp_path)
    meta = json.loads((data / "dataset.json").read_text())
    meta["forward"] = {"model": "crop", "sensor_shape": [SIZE, SIZE], "scene_shape": [16, 16],
                       "conv_shape": [2 * SIZE, 2 * SIZE]}
    (data / "dataset.json").write_text(json.dumps(meta))
    dataset = LenslessDataset(data)
    physics = dataset.physics()
    assert resolve_support("auto", dataset, physics, 3) == (22, 22)
    assert resolve_support("auto", dataset, physics, 3, 4) == (24, 24)
    assert resolve_support("auto", dataset, physics, 12, 4) == (SIZE, SIZE)  # capped at the grid
    assert resolve_support("16", dataset, physics, 3, 4) == (16, 16)  # explicit: as given
    assert input_multiple("edge", SMALL) == 4
    assert input_multiple("edge", {**SMALL, "unshuffle": 2}) == 8
    # a grid that no multiple of the network fills: the largest multiple within it, said aloud
    capsys.readouterr()
    assert resolve_support("auto", dataset, physics, 12, 6) == (30, 30)
    assert "no room for the 12 px soft edge" in capsys.readouterr().err

    out = tmp_path / "soft"
    train_student(settings(data, targets, out, support="auto", support_taper=3, steps=2))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["support_shape"] == [24, 24] and cfg["support_taper"] == 3
    window = load_student(out).student._window.numpy()
    inner = window[4:20, 4:20]  # where the 16² scenes lie
    assert inner.min() == 1.0 and window[0].max() < 0.1  # full weight on the scenes, faded at the edge

    ckpt = torch.load(out / CHECKPOINT_NAME, weights_only=True)
    assert ckpt["signature"]["support_shape"] == [24, 24]
    ckpt["signature"] = {k: v for k, v in ckpt["signature"].items() if k != "support_shape"}  # as written before
    torch.save(ckpt, out / CHECKPOINT_NAME)  # the window was widened
    capsys.readouterr()
    train_student(settings(data, targets, out, support="auto", support_taper=3, steps=4))
    assert "resuming with the window of the scenes' own size" in capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["support_shape"] == [16, 16] and cfg["step"] == 4


def test_the_input_multiple_of_every_kind_of_diffusion_unet():
    """A paper student's window must suit its diffusion UNet too: ours (channel_mults), ADM (channel_mult) and
    diffusers (block_out_channels) give 2^(levels − 1); a network that says nothing, 1."""
    from types import SimpleNamespace

    from train.students import input_multiple, unet_multiple

    ours = SimpleNamespace(cfg=SimpleNamespace(channel_mults=[1, 2, 2, 2]))
    adm = SimpleNamespace(cfg=SimpleNamespace(channel_mult=[1, 1, 2, 2, 4, 4]))
    diffusers = SimpleNamespace(config=SimpleNamespace(block_out_channels=(64, 128, 128)))
    assert [unet_multiple(n) for n in (ours, adm, diffusers, object())] == [8, 32, 4, 1]
    assert input_multiple("paper", SMALL, SimpleNamespace(net=adm)) == 32
    assert input_multiple("paper", SMALL, SimpleNamespace(net=ours)) == 8
    assert input_multiple("edge", SMALL, SimpleNamespace(net=adm)) == 4  # an edge student has no diffusion UNet


def test_fit_gives_the_student_the_profiles_soft_edge_as_a_fraction_of_its_window():
    from types import SimpleNamespace

    from nsdd_edge.camera import SupportWindow
    from train.fit import student_taper

    assert student_taper(SimpleNamespace(support=SupportWindow((256, 256), 32)), 64) == 8
    assert student_taper(SimpleNamespace(support=SupportWindow((256, 256), 0)), 64) == 0
    assert student_taper(SimpleNamespace(support=None), 64) == 0
    assert student_taper(SimpleNamespace(support=SupportWindow((16, 16), 7)), 8) == 3  # capped below half


def test_init_student_starts_from_another_cameras_student_and_refuses_another_network(tmp_path):
    """--init-student: transfer a student trained under one PSF to another camera (a fine-tune, recorded)."""
    data_a, targets_a = make_problem(tmp_path / "a")
    train_student(settings(data_a, targets_a, tmp_path / "sa", steps=4))
    data_b, targets_b = make_problem(tmp_path / "b")
    psf_b = blur_psf(seed=1)  # another camera: another PSF, same network
    np.save(data_b / "psf.npy", psf_b)
    meta = json.loads((data_b / "dataset.json").read_text())
    meta["psf"]["sha256"] = array_hash(psf_b)
    (data_b / "dataset.json").write_text(json.dumps(meta))

    # a learning rate of ~0 and no EMA lag: the saved weights are the ones it started from
    train_student(settings(data_b, targets_b, tmp_path / "sb", steps=1, lr=1e-12, ema=0.0,
                           init_student=str(tmp_path / "sa")))
    wa, wb = load_file(str(tmp_path / "sa/model.safetensors")), load_file(str(tmp_path / "sb/model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6) for k in wa)
    train_student(settings(data_b, targets_b, tmp_path / "scratch", steps=1, lr=1e-12, ema=0.0))
    ws = load_file(str(tmp_path / "scratch/model.safetensors"))
    assert not all(torch.allclose(wa[k].float(), ws[k].float(), atol=1e-6) for k in wa)

    cfg = json.loads((tmp_path / "sb/config.json").read_text())
    init = cfg["training"]["init_from"]
    assert init["psf_sha256"] == json.loads((tmp_path / "sa/config.json").read_text())["psf_sha256"]
    assert init["psf_sha256"] != cfg["psf_sha256"]  # trained for camera A, now for camera B
    assert len(init["weights_sha256"]) == 64 and init["step"] == 4

    with pytest.raises(DistillError, match=r"--init-student .*architecture"):
        train_student(settings(data_b, targets_b, tmp_path / "sc", steps=1, init_student=str(tmp_path / "sa"),
                               architecture={**SMALL, "width": 4}))
    with pytest.raises(DistillError, match="other settings .*init_student"):  # resuming from another start
        train_student(settings(data_b, targets_b, tmp_path / "scratch", steps=2, lr=1e-12, ema=0.0,
                               init_student=str(tmp_path / "sa")))
    with pytest.raises(DistillError, match=r"--init-student .*nope: no such student directory"):
        train_student(settings(data_b, targets_b, tmp_path / "sd", init_student=str(tmp_path / "nope")))


def test_preloaded_runs_compute_each_a_dagger_once_and_train_the_same_weights(tmp_path, monkeypatch):
    """--preload caches A†y per sample (a cg A† costs 20 A/Aᵀ pairs); the weights equal the uncached run's."""
    data, targets = make_problem(tmp_path)
    calls = []
    original = LenslessOperator.A_dagger

    def counting(self, y):
        calls.append(int(y.shape[0]))
        return original(self, y)

    monkeypatch.setattr(LenslessOperator, "A_dagger", counting)
    train_student(settings(data, targets, tmp_path / "plain", samples=0))
    plain_calls = sum(calls)
    calls.clear()
    train_student(settings(data, targets, tmp_path / "cached", preload=True, samples=0))
    assert sum(calls) == N - 2 < plain_calls  # the 10 training samples, once each (6 steps of 4 see them all)
    a, b = load_file(str(tmp_path / "plain/model.safetensors")), load_file(str(tmp_path / "cached/model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_loss_window_support_scores_only_the_window_the_student_fills(tmp_path):
    from train.distill import distill_loss, loss_window

    physics = LenslessOperator(blur_psf(), (SIZE, SIZE), "circular", lam=1e-4)
    g = torch.Generator().manual_seed(0)
    x, t = torch.rand((2, 3, SIZE, SIZE), generator=g), torch.rand((2, 3, SIZE, SIZE), generator=g)
    r = physics.null_project(x - t)
    inner = r[..., 8:24, 8:24]
    assert distill_loss(x, t, physics, "nullspace", "l1", (16, 16)) == pytest.approx(inner.abs().mean().item())
    assert distill_loss(x, t, physics, "nullspace", "l2") == pytest.approx(r.pow(2).mean().item())
    outside = t.clone()
    outside[..., :4, :] += 1.0  # a difference outside the window does not count
    assert distill_loss(x, outside, physics, "full", "l1", (16, 16)) == pytest.approx(
        distill_loss(x, t, physics, "full", "l1", (16, 16)).item())
    assert loss_window("grid", (16, 16), (SIZE, SIZE)) is None
    assert loss_window("support", (16, 16), (SIZE, SIZE)) == (16, 16)
    with pytest.raises(DistillError, match="--loss-window support needs a support window"):
        loss_window("support", None, (SIZE, SIZE))
    assert loss_window("auto", (16, 16), (SIZE, SIZE)) == (16, 16)
    assert loss_window("auto", None, (SIZE, SIZE)) is None and loss_window("auto", (SIZE, SIZE), (SIZE, SIZE)) is None

    data, targets = make_problem(tmp_path)
    with pytest.raises(DistillError, match="--loss-window support needs"):
        train_student(settings(data, targets, tmp_path / "none", loss_window="support"))
    with pytest.raises(DistillError, match="--loss-window"):
        train_student(settings(data, targets, tmp_path / "bad", loss_window="edges"))
    meta = json.loads((data / "dataset.json").read_text())
    meta["forward"] = {"model": "crop", "sensor_shape": [SIZE, SIZE], "scene_shape": [16, 16],
                       "conv_shape": [2 * SIZE, 2 * SIZE]}
    (data / "dataset.json").write_text(json.dumps(meta))
    out = tmp_path / "windowed"
    train_student(settings(data, targets, out, support="auto", loss_window="support"))
    assert json.loads((out / "config.json").read_text())["training"]["loss_window"] == [16, 16]
    with pytest.raises(DistillError, match="other settings .*loss_window"):  # resuming with the whole grid
        train_student(settings(data, targets, out, support="auto", steps=8))
    train_student(settings(data, targets, out, support="auto", steps=8, loss_window="auto"))  # auto = support here
    with pytest.raises(DistillError, match=r"LPIPS needs at least 31x31 px, the support window is 16x16"):
        train_student(settings(data, targets, tmp_path / "lp", support="auto", loss_window="support",
                               lpips_weight=0.1))
