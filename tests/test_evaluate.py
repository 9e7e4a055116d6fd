"""``nsdd-train evaluate``: tiny datasets written in the test, recon dirs and methods run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from nsdd_edge.optics import array_hash
from train import metrics as M
from train.cli import main as train_cli
from train.evaluate import PeakMemory, parse_settings
from train.physics import LenslessOperator
from train.solvers import SOLVERS


def make_dataset(root: Path, *, n: int = 4, channels: int = 3, scene: int = 32, sensor: int = 32,
                 model: str = "circular", lam: float = 1e-6, seed: int = 0) -> Path:
    """A dataset directory in the layout of :mod:`train.data`, noiseless, scenes in [0, 0.9]."""
    rng = np.random.default_rng(seed)
    psf = rng.random((1, 9, 9)).astype(np.float32) ** 4
    psf /= psf.sum()
    conv = sensor if model == "circular" else 2 * sensor
    fwd = LenslessOperator(psf, (sensor, sensor), model, lam=lam, scene_shape=None if model == "circular" else
                           (scene, scene), conv_shape=None if model == "circular" else (conv, conv)).double()
    (root / "measurements").mkdir(parents=True)
    (root / "ground_truth").mkdir()
    np.save(root / "psf.npy", psf)
    ids = [f"s{k:03d}" for k in range(n)]
    yy, xx = np.mgrid[0:scene, 0:scene] / scene
    for k, i in enumerate(ids):
        # smooth blobs + texture so the methods differ
        x = np.stack([0.45 + 0.35 * np.sin(2 * np.pi * (c + 1 + k) * xx) * np.cos(2 * np.pi * (k + 1) * yy)
                      for c in range(channels)]) + 0.1 * rng.random((channels, scene, scene))
        x = np.clip(x, 0, 0.9).astype(np.float32)
        y = fwd.A(torch.from_numpy(x[None]).double())[0].float().numpy()
        np.save(root / "ground_truth" / f"{i}.npy", x)
        np.save(root / "measurements" / f"{i}.npy", y)
    meta = {
        "psf": {"file": "psf.npy", "sha256": array_hash(psf), "source": "test"},
        "forward": fwd.geometry.to_dict(),
        "recon": {"model": "circular", "lam": lam},
        "noise_std": 0.0, "seed": seed, "channels": channels,
        "splits": {"train": ids[:1], "test": ids[1:]}, "skipped": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def lpips_weights(shared) -> str:
    return str(shared / "weights/lpips/lpips_alex_full_v0.1.pth")


@pytest.fixture(scope="module")
def circular_data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "circ")


def test_methods_wiener_admm_report(circular_data, lpips_weights, tmp_path):
    methods = "wiener,admm" if "admm" in SOLVERS else "wiener"
    out, report = tmp_path / "eval", tmp_path / "docs" / "results.md"
    rc = train_cli(["evaluate", "--data", str(circular_data), "--methods", methods, "--set", "admm.iters=5"
                    if "admm" in SOLVERS else "wiener.clip=false", "--out", str(out), "--report", str(report),
                    "--lpips-weights", lpips_weights, "--device", "cpu"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == methods.split(",")
    for name, m in metrics.items():
        for key in ("psnr", "ssim", "lpips", "consistency", "n", "seconds_per_image", "peak_mem_mb", "machine"):
            assert key in m, (name, key)
        assert m["n"] == 3
        assert m["seconds_per_image"] > 0 and m["peak_mem_mb"] is not None and m["peak_mem_mb"] >= 0
        assert -1 <= m["ssim"] <= 1 and m["lpips"] >= 0 and np.isfinite(m["psnr"])
        assert m["machine"]["torch"] == torch.__version__ and m["machine"]["cores"] >= 1
    w = metrics["wiener"]
    # noiseless circular data and λ = 1e-6: the Wiener residual is ~0, and the scene is recovered well
    assert w["consistency"] < 1e-3
    assert w["psnr"] > 30 and w["ssim"] > 0.9 and w["lpips"] < 0.1

    # the per-image numbers are the metrics of the saved reconstructions, recomputed here
    from train.data import LenslessDataset

    ds = LenslessDataset(circular_data)
    ids = ds.ids("test")
    x = torch.from_numpy(np.stack([np.load(out / "recon" / "wiener" / f"{i}.npy") for i in ids]))
    gt = torch.from_numpy(np.stack([ds.ground_truth(i) for i in ids]))
    per = json.loads((out / "per_image.json").read_text())["wiener"]
    assert per["ids"] == ids
    np.testing.assert_allclose(per["psnr"], M.psnr(x.clamp(0, 1), gt).numpy(), rtol=1e-5)
    np.testing.assert_allclose(per["consistency_recon"], ds.physics().consistency(x, ds.measurements(ids)).numpy(),
                               rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(per["consistency"], ds.forward_physics().consistency(x, ds.measurements(ids)).numpy(),
                               rtol=1e-4, atol=1e-9)  # circular data: the forward operator is the same grid
    assert w["psnr"] == pytest.approx(float(np.mean(per["psnr"])))
    assert len(per["seconds"]) == 3 and w["seconds_per_image"] == pytest.approx(float(np.median(per["seconds"])))

    for png in ("grid.png", "lpips_vs_time.png"):
        img = cv2.imread(str(out / png))
        assert img is not None and img.shape[0] > 100 and img.shape[1] > 100, png
    grid = cv2.imread(str(out / "grid.png"))
    assert grid.shape[1] > grid.shape[0]  # 3 rows, 2 + methods columns: wider than tall
    assert cv2.imread(str(out / "recon" / "wiener" / f"{ids[0]}.png")).shape[:2] == (32, 32)
    table = (out / "metrics.md").read_text()
    assert "| wiener |" in table and "LPIPS" in table

    text = report.read_text()
    assert "| wiener |" in text and "nsdd-train evaluate --data" in text and "--set" in text
    assert "## Machine" in text and torch.__version__ in text
    for fig in ("results_grid.png", "results_lpips_vs_time.png"):
        assert (report.parent / fig).exists() and f"]({fig})" in text


def test_recon_dirs_centre_crop_and_names(tmp_path, lpips_weights):
    """Crop-model data (scene 32 inside a 48 sensor): reconstructions are centre-cropped to 32 for scoring."""
    data = make_dataset(tmp_path / "crop", n=3, scene=32, sensor=48, model="crop")
    from train.data import LenslessDataset

    ds = LenslessDataset(data)
    ids = ds.ids("test")
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    for i in ids:
        gt = ds.ground_truth(i)
        x = np.full((3, 48, 48), 5.0, np.float32)  # garbage outside the scene: must be cropped away
        x[:, 8:40, 8:40] = gt + 0.01  # MSE 1e-4 → PSNR 40 dB exactly
        np.save(good / f"{i}.npy", x)
        np.save(bad / f"{i}.npy", np.full((3, 48, 48), 0.5, np.float32))
    out = tmp_path / "eval"
    rc = train_cli(["evaluate", "--data", str(data), "--recon", f"{good},{bad}", "--names", "close,flat",
                    "--out", str(out), "--lpips-weights", lpips_weights, "--grid-samples", "2"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["close", "flat"]
    c, f = metrics["close"], metrics["flat"]
    assert c["psnr"] == pytest.approx(40.0, abs=1e-3)
    assert c["ssim"] > 0.99 and c["lpips"] < 0.05
    assert f["psnr"] < 20 and f["ssim"] < c["ssim"] and f["lpips"] > c["lpips"]
    assert c["seconds_per_image"] is None and c["n"] == 2
    # consistency under the forward (crop) operator on the 32×32 scene window: the garbage outside is not part of
    # the scene; and, as a second column, on the full 48×48 reconstruction with the circular recon operator
    from train.physics import center_crop

    y = ds.measurements(ids)
    x = torch.from_numpy(np.stack([np.load(good / f"{i}.npy") for i in ids]))
    assert c["consistency"] == pytest.approx(float(ds.forward_physics().consistency(center_crop(x, (32, 32)), y)
                                                   .mean()), rel=1e-5)
    assert c["consistency"] < 0.05
    assert c["consistency_recon"] == pytest.approx(float(ds.physics().consistency(x, y).mean()), rel=1e-5)
    assert c["consistency_recon"] > 1.0  # the circular operator sees the garbage border
    assert (out / "grid.png").exists() and not (out / "lpips_vs_time.png").exists()


def test_errors_are_clear(circular_data, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert train_cli(["evaluate", "--data", str(circular_data), "--out", out]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert train_cli(["evaluate", "--data", str(circular_data), "--recon", str(tmp_path / "nope"), "--out", out]) == 2
    assert "nope: not a directory" in capsys.readouterr().err
    partial = tmp_path / "partial"
    partial.mkdir()
    np.save(partial / "s001.npy", np.zeros((3, 32, 32), np.float32))
    assert train_cli(["evaluate", "--data", str(circular_data), "--recon", str(partial), "--out", out,
                      "--no-lpips"]) == 2
    assert "no reconstruction for 2 ids" in capsys.readouterr().err
    assert train_cli(["evaluate", "--data", str(circular_data), "--methods", "ddnm", "--out", out]) == 2
    assert "--prior" in capsys.readouterr().err
    assert train_cli(["evaluate", "--data", str(circular_data), "--methods", "nosuch", "--out", out,
                      "--no-lpips"]) == 2
    assert "unknown method 'nosuch'" in capsys.readouterr().err
    assert train_cli(["evaluate", "--data", str(circular_data), "--methods", "wiener", "--set", "wiener.bogus=1",
                      "--out", out, "--no-lpips"]) == 2
    assert "wiener" in capsys.readouterr().err
    assert train_cli(["evaluate", "--data", str(circular_data), "--methods", "wiener", "--names", "a,b",
                      "--out", out]) == 2
    assert "--names has 2 names for 1 sources" in capsys.readouterr().err
    assert train_cli(["evaluate", "--data", str(circular_data), "--methods", "wiener", "--split", "val",
                      "--out", out, "--no-lpips"]) == 2
    assert "no split 'val'" in capsys.readouterr().err
    assert train_cli(["evaluate", "--data", str(circular_data), "--methods", "wiener", "--out", out,
                      "--lpips-weights", str(tmp_path / "missing.pth")]) == 2
    err = capsys.readouterr().err
    assert "missing.pth" in err and "--no-lpips" in err


def test_no_lpips_limit_and_split_all(circular_data, tmp_path):
    out = tmp_path / "o"
    rc = train_cli(["evaluate", "--data", str(circular_data), "--methods", "wiener", "--split", "all",
                    "--limit", "2", "--no-lpips", "--no-save-recon", "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())["wiener"]
    assert m["n"] == 2 and m["lpips"] is None and m["psnr"] > 30
    assert not (out / "recon").exists()
    # --skip: a subset disjoint from the first ids (to choose settings on), and a clear error past the end
    rc = train_cli(["evaluate", "--data", str(circular_data), "--methods", "wiener", "--split", "all",
                    "--skip", "2", "--limit", "1", "--no-lpips", "--no-save-recon", "--out", str(tmp_path / "v")])
    assert rc == 0
    assert json.loads((tmp_path / "v" / "per_image.json").read_text())["wiener"]["ids"] == ["s002"]
    assert train_cli(["evaluate", "--data", str(circular_data), "--methods", "wiener", "--split", "test",
                      "--skip", "3", "--no-lpips", "--out", str(tmp_path / "w")]) != 0


def test_parse_settings_and_peak_memory():
    assert parse_settings(["admm.iters=50", "ddnm.eta=0.85", "dps.name=abc", "wiener.clip=true"]) == {
        "admm": {"iters": 50}, "ddnm": {"eta": 0.85}, "dps": {"name": "abc"}, "wiener": {"clip": True}}
    with PeakMemory("cpu") as mem:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        block[::512] = 2.0
    del block
    assert mem.peak is not None and mem.peak >= 48 * 2**20

    def many_small() -> int:  # 2048 × 32 KiB from the heap: freed memory stays resident unless trimmed
        blocks = [torch.ones(8192) for _ in range(2048)]
        return len(blocks)

    many_small()
    with PeakMemory("cpu") as again:  # a repeated call (as after the warm-up) still shows its working memory
        many_small()
    assert again.peak >= 48 * 2**20


def test_resume_and_changed_settings(circular_data, tmp_path):
    out = tmp_path / "o"
    base = ["evaluate", "--data", str(circular_data), "--methods", "wiener", "--no-lpips", "--out", str(out)]
    assert train_cli(base) == 0
    first = json.loads((out / "metrics.json").read_text())["wiener"]
    record = json.loads((out / "recon" / "wiener" / "recon.json").read_text())
    assert sorted(record["images"]) == ["s001", "s002", "s003"] and first["resumed_images"] == 0
    assert train_cli(base) == 0  # nothing recomputed: the stored images, times and memory are reused
    second = json.loads((out / "metrics.json").read_text())["wiener"]
    assert second["resumed_images"] == 3
    for key in ("psnr", "ssim", "consistency", "seconds_per_image", "peak_mem_mb"):
        assert second[key] == pytest.approx(first[key]), key
    # other settings in the same output directory: refused, unless --overwrite
    assert train_cli(base + ["--set", "wiener.clip=true"]) == 2
    assert train_cli(base + ["--set", "wiener.clip=true", "--overwrite"]) == 0
    assert json.loads((out / "metrics.json").read_text())["wiener"]["resumed_images"] == 0


def test_recon_dir_from_solve_has_timing(circular_data, tmp_path):
    pytest.importorskip("train.solve")
    rdir, batched = tmp_path / "wiener_solve", tmp_path / "wiener_batched"
    assert train_cli(["solve", "--data", str(circular_data), "--method", "wiener", "--batch-size", "1",
                      "--out", str(rdir)]) == 0
    assert train_cli(["solve", "--data", str(circular_data), "--method", "wiener", "--batch-size", "4",
                      "--out", str(batched)]) == 0
    assert json.loads((rdir / "recon.json").read_text())["timing"]["protocol"] == "batch-1"
    out = tmp_path / "o"
    assert train_cli(["evaluate", "--data", str(circular_data), "--recon", f"{rdir},{batched}", "--no-lpips",
                      "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    m = metrics["wiener_solve"]
    assert m["method"] == "wiener" and m["seconds_per_image"] > 0 and "nsdd-train solve" in m["seconds_source"]
    assert m["consistency"] < 1e-3 and m["psnr"] > 30
    # batch-amortised times are not the table's protocol: not shown, and the record says why
    b = metrics["wiener_batched"]
    assert b["seconds_per_image"] is None and "batch-1" in b["seconds_note"]


def test_student_and_ddnm_methods(circular_data, tmp_path, lpips_weights):
    """An untrained tiny edge student and DDNM with a tiny random prior run through the same evaluation."""
    students = pytest.importorskip("train.students")
    prior_io = pytest.importorskip("train.prior.io")
    from train.data import LenslessDataset
    from train.prior.unet import UNet
    from train.solvers import SOLVERS as registry

    if "ddnm" not in registry:
        pytest.skip("ddnm is not registered")
    ds = LenslessDataset(circular_data)
    physics = ds.physics()
    cfg = students.make_config("edge", "nullspace", 3, physics, {"width": 4, "depth": 2, "max_width": 8, "blocks": 1})
    student = students.build_student(cfg)
    sdir = students.save_student(tmp_path / "student", student.net, cfg)
    net = UNet(image_size=32, base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attention_resolutions=[],
               mid_attention=False, num_heads=1, dropout=0.0)
    pdir = prior_io.save_prior(net, tmp_path / "prior")
    out = tmp_path / "o"
    rc = train_cli(["evaluate", "--data", str(circular_data), "--methods", f"wiener,student:{sdir},ddnm",
                    "--prior", str(pdir), "--set", "ddnm.steps=3", "--limit", "2", "--out", str(out),
                    "--lpips-weights", lpips_weights])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["wiener", "student", "ddnm"]
    assert metrics["student"]["nfe"] == 1 and metrics["ddnm"]["settings"]["steps"] == 3
    # the NSDD student keeps the Wiener range part: x̂ = A†y + (I − A†A) g, so A x̂ ≈ A A†y
    assert metrics["student"]["consistency"] == pytest.approx(metrics["wiener"]["consistency"], abs=1e-4)
    for m in metrics.values():
        assert m["n"] == 2 and m["seconds_per_image"] > 0 and m["lpips"] is not None
    # one image at a time with per-sample seeds == one batched run of the split
    ids = ds.ids("test")[:2]
    batched = registry["ddnm"](prior=prior_io.load_prior(pdir), steps=3)(ds.measurements(ids), physics)
    single = torch.from_numpy(np.stack([np.load(out / "recon" / "ddnm" / f"{i}.npy") for i in ids]))
    assert torch.allclose(single, batched, atol=1e-4)


def test_real_data_without_ground_truth(tmp_path):
    """Real captures have no ground truth: consistency only, and a grid without a ground-truth column."""
    import shutil

    data = make_dataset(tmp_path / "real", n=3)
    shutil.rmtree(data / "ground_truth")
    out = tmp_path / "o"
    assert train_cli(["evaluate", "--data", str(data), "--methods", "wiener", "--no-lpips", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())["wiener"]
    assert m["psnr"] is None and m["ssim"] is None and m["lpips"] is None
    assert m["consistency"] is not None and m["consistency"] < 1e-3 and m["n"] == 2
    grid = cv2.imread(str(out / "grid.png"))
    assert grid is not None and "–" in (out / "metrics.md").read_text()


def test_retrained_student_in_the_same_directory_is_evaluated_again(circular_data, tmp_path):
    """Cached reconstructions are keyed by the weights: new weights in the same directory are re-run."""
    students = pytest.importorskip("train.students")
    from train.data import LenslessDataset

    physics = LenslessDataset(circular_data).physics()
    cfg = students.make_config("edge", "nullspace", 3, physics, {"width": 4, "depth": 2, "max_width": 8, "blocks": 1})
    sdir = tmp_path / "student"
    out = tmp_path / "o"
    args = ["evaluate", "--data", str(circular_data), "--methods", f"student:{sdir}", "--limit", "2",
            "--no-lpips", "--out", str(out)]
    recon = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = students.build_student(cfg).net
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.5 * torch.randn_like(p))  # weights that visibly change g (the head starts near zero)
        students.save_student(sdir, net, cfg)
        if seed == 1:  # the cached run is of other weights: refused, never silently reused
            assert train_cli(args) != 0
        assert train_cli(args + (["--overwrite"] if seed == 1 else [])) == 0
        ids = LenslessDataset(circular_data).ids("test")[:2]
        recon.append(np.stack([np.load(out / "recon" / "student" / f"{i}.npy") for i in ids]))
    assert not np.allclose(recon[0], recon[1])


def test_ground_truth_consistency_is_the_noise_floor(tmp_path):
    """reference.json and the report give the ground truth's ‖A x − y‖/‖y‖: for circular data with added
    noise n it is exactly ‖n‖/‖y‖; Wiener at a tiny λ fits the noise and scores below it."""
    data = make_dataset(tmp_path / "noisy", n=3)
    rng = np.random.default_rng(5)
    ratios = []
    for i in ("s001", "s002"):
        y = np.load(data / "measurements" / f"{i}.npy")
        n = (0.01 * rng.standard_normal(y.shape)).astype(np.float32)
        np.save(data / "measurements" / f"{i}.npy", y + n)
        ratios.append(np.linalg.norm(n) / np.linalg.norm(y + n))
    out, report = tmp_path / "eval", tmp_path / "report.md"
    rc = train_cli(["evaluate", "--data", str(data), "--methods", "wiener", "--no-lpips", "--out", str(out),
                    "--report", str(report), "--device", "cpu"])
    assert rc == 0
    floor = json.loads((out / "reference.json").read_text())["ground_truth_consistency"]
    assert floor == pytest.approx(float(np.mean(ratios)), rel=1e-3)
    assert json.loads((out / "metrics.json").read_text())["wiener"]["consistency"] < 0.5 * floor
    assert f"{floor:.3g}" in report.read_text()
