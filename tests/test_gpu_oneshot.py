"""The GPU one-shot (scripts/gpu_train.sh → train.gpu_oneshot) at tiny scale on the CPU: one step of everything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PSF = SHARED / "data" / "psf" / "radial_6per_256.npy"
FACES = SHARED / "data" / "faces" / "utkface"


def _dataset(tmp: Path, n: int = 16) -> Path:
    """A tiny simulated data set whose train split the pack will hold."""
    from train.cli import main as train_main

    data = tmp / "data"
    rc = train_main(["simulate", "--images", str(FACES), "--psf", str(PSF), "--psf-downsample", "2", "--size", "64",
                     "--limit", str(n), "--n-test", "3", "--out", str(data)])
    assert rc == 0
    return data


@pytest.mark.skipif(not (PSF.exists() and FACES.is_dir()), reason="needs ../shared (PSF and faces)")
def test_pack_holds_the_train_split_only_and_round_trips(tmp_path):
    from train.gpu_oneshot import pack_faces, unpack_faces

    data = _dataset(tmp_path)
    meta = json.loads((data / "dataset.json").read_text())
    info = pack_faces(data, tmp_path / "pack.npz")
    assert info["count"] == len(meta["splits"]["train"]) == 13
    names = unpack_faces(tmp_path / "pack.npz", tmp_path / "faces")
    want = sorted(meta["sources"][i] for i in meta["splits"]["train"])
    held_out = {meta["sources"][i] for i in meta["splits"]["test"]}
    assert names == want and not held_out & set(names)
    # the JPEG copy is close to the scene the data set was simulated from (64 px, quality 85)
    from train.simulate import prepare_scene

    first = meta["splits"]["train"][0]
    x = prepare_scene(tmp_path / "faces" / meta["sources"][first], 64, 3)
    ref = np.load(data / "ground_truth" / f"{first}.npy")
    assert np.sqrt(np.mean((x - ref) ** 2)) < 0.04


@pytest.mark.skipif(not (PSF.exists() and FACES.is_dir()), reason="needs ../shared (PSF and faces)")
def test_gpu_train_script_runs_every_stage_tiny_on_cpu(tmp_path):
    from train.gpu_oneshot import pack_faces

    pack = tmp_path / "pack.npz"
    pack_faces(_dataset(tmp_path, 20), pack)
    out = tmp_path / "out"
    env = {**os.environ, "FACES": str(pack), "PSF": str(PSF), "OUT": str(out), "WORK": str(tmp_path / "work"),
           "LPIPS": str(tmp_path / "no-lpips.pth")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_train.sh"), "--tiny", "--cpu"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["figures.json", "prior.tar", "student_lean.tar", "student_lean_sep.tar", "student_paper.tar"]
    assert all((out / f).stat().st_size < 16 * 2 ** 20 for f in files)
    figures = json.loads((out / "figures.json").read_text())
    assert figures["prior"]["steps"] == 1
    assert figures["teacher"]["labelled_train"] > 0
    assert set(figures["validation"]) >= {"teacher", "wiener", "paper", "lean", "lean_sep"}
    assert 1e-5 < figures["lambda"]["value"] < 1e-1  # the discrepancy principle found a λ
    for name in ("paper", "lean", "lean_sep"):
        assert figures["students"][name]["steps"] == 1
        assert np.isfinite(figures["validation"][name]["psnr_vs_teacher"])
    # each tar is a loadable model directory with fp16 weights and no training checkpoint
    with tarfile.open(out / "student_lean.tar") as tar:
        names = tar.getnames()
        assert "config.json" in names and "model.safetensors" in names and "checkpoint.pt" not in names
        tar.extractall(tmp_path / "lean", filter="data")
    from train.students import load_student

    cfg = json.loads((tmp_path / "lean" / "config.json").read_text())
    assert cfg["weights"]["dtype"] == "float16" and cfg["architecture"]["unshuffle"] == 2
    load_student(tmp_path / "lean")
    with tarfile.open(out / "prior.tar") as tar:
        tar.extractall(tmp_path / "prior", filter="data")
    from train.prior.io import load_prior

    assert load_prior(tmp_path / "prior").num_parameters == figures["prior"]["parameters"]


def test_clock_shares_what_is_left():
    from train.gpu_oneshot import Clock

    clock = Clock(100.0, reserve_s=10.0)
    assert 44.0 < clock.share(0.5) <= 45.0
    assert Clock(1.0, reserve_s=5.0).share(0.5) == 1.0  # never a zero budget


def test_module_runs_as_a_script():
    proc = subprocess.run([sys.executable, "-m", "train.gpu_oneshot", "--help"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "pack" in proc.stdout and "run" in proc.stdout
