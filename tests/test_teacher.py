"""Teacher labelling: layout, manifest, batch independence, crash-and-resume byte equality, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from nsdd_edge.optics import array_hash
from train.data import LenslessDataset
from train.physics import LenslessOperator
from train.solvers.ddnm import DDNM
from train.teacher import TeacherError, label_dataset, shard_is_done

TESTS = Path(__file__).resolve().parent
SIZE = 16
N_IDS = 10


def make_dataset(root: Path, n: int = N_IDS, noise_std: float = 0.005) -> LenslessDataset:
    """A circular-model dataset written by hand in the train.data layout (seeded, no ground truth used)."""
    rng = np.random.default_rng(0)
    psf = (rng.random((1, SIZE, SIZE)) ** 6).astype(np.float32)
    psf /= psf.sum()
    (root / "measurements").mkdir(parents=True)
    (root / "ground_truth").mkdir()
    np.save(root / "psf.npy", psf)
    op = LenslessOperator(psf, (SIZE, SIZE), "circular", lam=1e-4)
    ids = [f"img{k:03d}" for k in range(n)]
    g = torch.Generator().manual_seed(1)
    for i in ids:
        x = torch.rand(1, 3, SIZE, SIZE, generator=g)
        y = op.measure(x, noise_std=noise_std, generator=g)[0].numpy()
        np.save(root / "measurements" / f"{i}.npy", y.astype(np.float32))
        np.save(root / "ground_truth" / f"{i}.npy", x[0].numpy())
    geometry = op.geometry.to_dict()
    meta = {"psf": {"file": "psf.npy", "sha256": array_hash(psf), "source": "test"}, "forward": geometry,
            "recon": {"model": "circular", "lam": 1e-4}, "noise_std": noise_std, "seed": 0, "channels": 3,
            "splits": {"train": ids[: n - 2], "val": ids[n - 2 :]}, "skipped": []}
    (root / "dataset.json").write_text(json.dumps(meta))
    return LenslessDataset(root)


def prior():
    sys.path.insert(0, str(TESTS))
    from test_diffusion_solvers import tiny_prior

    return tiny_prior()


SETTINGS = {"split": "train", "steps": 5, "batch_size": 2, "shard_size": 3, "seed": 11, "progress": False}


def npy_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.npy"))}


def test_label_dataset_layout_manifest_and_seeds(tmp_path):
    ds = make_dataset(tmp_path / "data")
    out = tmp_path / "targets"
    p = prior()
    manifest = label_dataset(ds, p, out, **SETTINGS)
    ids = ds.ids("train")
    assert sorted(x.stem for x in out.glob("*.npy")) == ids and len(list(out.glob("*.png"))) == len(ids)
    stored = json.loads((out / "teacher.json").read_text())
    assert stored == manifest and stored["complete"] is True
    assert stored["seeds"] == {i: 11 + k for k, i in enumerate(ids)}
    assert stored["prior"]["sha256"] and stored["dataset"]["psf_sha256"] == array_hash(ds.psf)
    assert stored["settings"]["sigma_y"] == pytest.approx(0.005) and stored["settings"]["steps"] == 5
    recon = json.loads((out / "recon.json").read_text())
    assert recon["method"] == "ddnm" and set(recon["images"]) == set(ids)
    # each target is DDNM+ of its own measurement from its own seed, whatever its batch
    physics = ds.physics()
    k = 4
    alone = DDNM(p, steps=5, eta=0.85, sigma_y=0.005)(ds.measurements([ids[k]]), physics, seeds=[11 + k])
    target = np.load(out / f"{ids[k]}.npy")
    assert target.dtype == np.float32 and target.shape == (3, SIZE, SIZE)
    np.testing.assert_allclose(target, alone[0].numpy(), atol=1e-5)


def test_resume_after_hard_kill_gives_identical_targets(tmp_path):
    ds = make_dataset(tmp_path / "data")
    reference = tmp_path / "reference"
    label_dataset(ds, prior(), reference, **SETTINGS)

    out = tmp_path / "resumed"
    # a real process dies without cleanup (os._exit) after its 3rd batch: shard 0 (3 ids, 2 batches) is
    # complete; shard 1 has one batch's files on disk and no completion record
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(TESTS)!r})
        import torch
        torch.set_num_threads({torch.get_num_threads()})  # same float summation order as this process
        from test_diffusion_solvers import tiny_prior
        from train.data import LenslessDataset
        from train.teacher import label_dataset
        def crash(n):
            if n == 3:
                os._exit(17)
        label_dataset(LenslessDataset({str(ds.root)!r}), tiny_prior(), {str(out)!r}, after_batch=crash,
                      **{SETTINGS!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr
    ids = ds.ids("train")
    shards = [ids[0:3], ids[3:6], ids[6:8]]
    assert shard_is_done(out, 0, shards[0])
    assert not shard_is_done(out, 1, shards[1])
    assert (out / f"{shards[1][0]}.npy").exists() and not (out / f"{shards[2][0]}.npy").exists()
    # tamper with the partial shard's file: a rerun must recompute it, not trust it
    np.save(out / f"{shards[1][0]}.npy", np.zeros((3, SIZE, SIZE), np.float32))

    calls = []
    label_dataset(ds, prior(), out, after_batch=calls.append, **SETTINGS)
    assert len(calls) == 3  # shard 1 (2 batches) + shard 2 (1 batch); shard 0 was kept
    assert npy_bytes(out) == npy_bytes(reference)
    assert json.loads((out / "teacher.json").read_text())["complete"] is True

    # a finished shard whose file changed afterwards is redone too
    np.save(out / f"{shards[0][1]}.npy", np.ones((3, SIZE, SIZE), np.float32))
    calls.clear()
    label_dataset(ds, prior(), out, after_batch=calls.append, **SETTINGS)
    assert len(calls) == 2 and npy_bytes(out) == npy_bytes(reference)


def test_resume_refuses_other_settings(tmp_path):
    ds = make_dataset(tmp_path / "data", n=4)
    out = tmp_path / "targets"
    label_dataset(ds, prior(), out, **{**SETTINGS, "limit": 1})
    before = npy_bytes(out)
    with pytest.raises(TeacherError, match="settings"):
        label_dataset(ds, prior(), out, **{**SETTINGS, "steps": 6})
    with pytest.raises(TeacherError, match="prior_sha256"):
        other = prior()
        with torch.no_grad():
            next(other.net.parameters()).add_(1.0)
        label_dataset(ds, other, out, **SETTINGS)
    assert npy_bytes(out) == before  # nothing the first run wrote was lost
    foreign = tmp_path / "user_files"
    foreign.mkdir()
    np.save(foreign / "img000.npy", np.ones((3, SIZE, SIZE), np.float32))
    with pytest.raises(TeacherError, match="refusing to overwrite"):
        label_dataset(ds, prior(), foreign, **SETTINGS)
    assert np.load(foreign / "img000.npy").sum() == 3 * SIZE * SIZE
    with pytest.raises(TeacherError, match="no measurements"):
        label_dataset(ds, prior(), tmp_path / "empty", **{**SETTINGS, "limit": 0})


def test_cli_teacher_with_saved_unet_prior(tmp_path, capsys):
    from train.cli import main
    from train.prior.base import DiffusionPrior, linear_alphas_cumprod
    from train.prior.io import save_prior
    from train.prior.unet import UNet

    ds = make_dataset(tmp_path / "data", n=3)
    torch.manual_seed(0)
    net = UNet(image_size=SIZE, base_channels=8, channel_mults=[1, 2], num_res_blocks=1,
               attention_resolutions=[], num_heads=1, dropout=0.0, mid_attention=False)
    save_prior(DiffusionPrior(net, linear_alphas_cumprod(), SIZE, 3), tmp_path / "prior")
    out = tmp_path / "targets"
    argv = ["teacher", "--data", str(ds.root), "--prior", str(tmp_path / "prior"), "--out", str(out),
            "--split", "all", "--steps", "3", "--batch", "2", "--shard-size", "2", "--limit", "3"]
    assert main(argv) == 0
    assert sorted(p.stem for p in out.glob("*.npy")) == ds.ids("all")
    manifest = json.loads((out / "teacher.json").read_text())
    assert manifest["prior"]["path"] == str(tmp_path / "prior") and manifest["settings"]["steps"] == 3
    assert "labelled 3 measurements" in capsys.readouterr().out
    assert main(["teacher", "--data", str(tmp_path / "nope"), "--prior", str(tmp_path / "prior"),
                 "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err
