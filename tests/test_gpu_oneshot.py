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
    import cv2

    from train.face_pack import pack_faces, unpack_faces

    data = _dataset(tmp_path)
    meta = json.loads((data / "dataset.json").read_text())
    info = pack_faces(data, tmp_path / "pack.npz", count128=5)
    assert info["count"] == len(meta["splits"]["train"]) == 13 and info["count128"] == 5
    sizes = unpack_faces(tmp_path / "pack.npz", tmp_path / "faces")
    want = sorted(meta["sources"][i] for i in meta["splits"]["train"])
    held_out = {meta["sources"][i] for i in meta["splits"]["test"]}
    assert list(sizes) == want and not held_out & set(sizes)
    assert sorted(sizes.values()) == [64] * 8 + [128] * 5
    for name, side in sizes.items():  # each file is stored at its recorded size
        assert cv2.imread(str(tmp_path / "faces" / name)).shape == (side, side, 3)
    # the seeded choice of the 128 px faces is the same every time
    pack_faces(data, tmp_path / "again.npz", count128=5)
    assert unpack_faces(tmp_path / "again.npz", tmp_path / "again") == sizes
    # the JPEG copy is close to the scene the data set was simulated from (64 px, quality 85), also when the
    # 64 px scene is made from a 128 px face (INTER_AREA, as from the source crop)
    from train.simulate import prepare_scene

    for side in (64, 128):
        k = next(i for i in meta["splits"]["train"] if sizes[meta["sources"][i]] == side)
        x = prepare_scene(tmp_path / "faces" / meta["sources"][k], 64, 3)
        ref = np.load(data / "ground_truth" / f"{k}.npy")
        assert np.sqrt(np.mean((x - ref) ** 2)) < 0.04


def test_a_file_that_is_not_a_face_pack_is_refused_by_name(tmp_path):
    from train.face_pack import FacePackError, unpack_faces

    bad = tmp_path / "faces.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(FacePackError, match="faces.npz: cannot read the face pack"):
        unpack_faces(bad, tmp_path / "out")
    np.savez(bad, info=np.array(json.dumps({"format": "something-else"})))
    with pytest.raises(FacePackError, match="not a face pack"):
        unpack_faces(bad, tmp_path / "out")


def test_the_256_stages_need_a_share_and_enough_128px_faces():
    from train.gpu_oneshot import skip_256_reason

    assert skip_256_reason(0.4, 1024, 64) is None
    assert "--share256 0" in skip_256_reason(0.0, 1024, 64)
    assert "127 faces at 128 px" in skip_256_reason(0.4, 127, 64)


@pytest.mark.skipif(not (PSF.exists() and FACES.is_dir()), reason="needs ../shared (PSF and faces)")
def test_gpu_train_script_runs_every_stage_tiny_on_cpu(tmp_path):
    from train.face_pack import pack_faces

    pack = tmp_path / "pack.npz"
    pack_faces(_dataset(tmp_path, 20), pack, count128=8)
    out = tmp_path / "out"
    env = {**os.environ, "FACES": str(pack), "PSF": str(PSF), "OUT": str(out), "WORK": str(tmp_path / "work"),
           "LPIPS": str(tmp_path / "no-lpips.pth")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_train.sh"), "--tiny", "--cpu"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["figures.json", "prior.tar", "prior128.tar", "student_lean.tar", "student_lean256.tar",
                     "student_lean_sep.tar", "student_paper.tar"]
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

    # the paper's geometry: 128 px scenes on a 256 px sensor, one step of everything
    g = figures["geometry256"]
    assert "skipped" not in g, g
    assert figures["faces"]["count128"] == 8
    assert g["prior"]["size"] == 128 and g["prior"]["steps"] == 1
    assert g["teacher"]["labelled_train"] > 0 and g["teacher"]["validation"] == 2
    assert 1e-5 < g["lambda"]["value"] < 1e-1
    assert g["students"]["lean256"]["steps"] == 1
    assert set(g["validation"]) >= {"teacher", "wiener", "lean256"}
    assert np.isfinite(g["validation"]["lean256"]["psnr_vs_teacher"])
    with tarfile.open(out / "student_lean256.tar") as tar:
        tar.extractall(tmp_path / "lean256", filter="data")
    cfg = json.loads((tmp_path / "lean256" / "config.json").read_text())
    assert cfg["architecture"]["unshuffle"] == 2 and cfg["support_shape"] == [128, 128]
    assert cfg["sensor_shape"] == cfg["scene_shape"] == [256, 256]
    load_student(tmp_path / "lean256")
    with tarfile.open(out / "prior128.tar") as tar:
        tar.extractall(tmp_path / "prior128", filter="data")
    assert load_prior(tmp_path / "prior128").num_parameters == g["prior"]["parameters"]


def test_clock_shares_what_is_left():
    from train.gpu_oneshot import Clock

    clock = Clock(100.0, reserve_s=10.0)
    assert 44.0 < clock.share(0.5) <= 45.0
    clock.hold(40.0)  # held back for later stages
    assert 24.0 < clock.share(0.5) <= 25.0
    clock.hold(0.0)
    assert 44.0 < clock.share(0.5) <= 45.0
    assert Clock(1.0, reserve_s=5.0).share(0.5) == 1.0  # never a zero budget


def test_module_runs_as_a_script():
    proc = subprocess.run([sys.executable, "-m", "train.gpu_oneshot", "--help"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "pack" in proc.stdout and "run" in proc.stdout
