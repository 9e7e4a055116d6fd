"""Helpers and session fixtures shared by the export tests (no tests here).

Tiny data made here: the real radial PSF downsampled to 32², smooth seeded scenes, a width-4 EdgeUNet
student saved with ``train.students.save_student``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

SIZE = (32, 32)
LAM = 1e-3


def small_psf(shared: Path) -> np.ndarray:
    from nsdd_edge.optics import load_psf

    return load_psf(shared / "data/psf/radial_6per_256.npy", downsample=8)


def smooth_scenes(n: int, size=SIZE, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 3, 4, 4), generator=g)
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)


def make_dataset(root: Path, psf: np.ndarray, n: int = 6, size=SIZE, lam: float = LAM, seed: int = 0) -> Path:
    """A dataset directory (measurements/*.npy, ground_truth/*.npy, psf.npy, dataset.json)."""
    from nsdd_edge.optics import LenslessGeometry, array_hash
    from train.physics import LenslessOperator

    op = LenslessOperator(psf, size, "circular", lam=lam)
    x = smooth_scenes(n, size, seed)
    y = op.measure(x, noise_std=0.005, generator=torch.Generator().manual_seed(seed + 1))
    (root / "measurements").mkdir(parents=True, exist_ok=True)
    (root / "ground_truth").mkdir(parents=True, exist_ok=True)
    ids = [f"{k:04d}" for k in range(n)]
    for k, i in enumerate(ids):
        np.save(root / "measurements" / f"{i}.npy", y[k].numpy().astype(np.float32))
        np.save(root / "ground_truth" / f"{i}.npy", x[k].numpy().astype(np.float32))
    np.save(root / "psf.npy", psf)
    geo = LenslessGeometry.make("circular", size)
    meta = {"psf": {"file": "psf.npy", "sha256": array_hash(psf), "source": "test"}, "forward": geo.to_dict(),
            "recon": {"model": "circular", "lam": lam}, "noise_std": 0.005, "seed": seed, "channels": 3,
            "splits": {"train": ids}, "skipped": []}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def make_student(root: Path, psf: np.ndarray, objective: str = "nullspace", size=SIZE, lam: float = LAM,
                 seed: int = 0) -> Path:
    """A tiny EdgeUNet student directory trained for ``psf`` (random weights, seeded, head scaled up)."""
    from train.physics import LenslessOperator
    from train.students import build_student, make_config, save_student

    torch.manual_seed(seed)
    op = LenslessOperator(psf, size, "circular", lam=lam)
    cfg = make_config("edge", objective, 3, op, architecture={"width": 4, "depth": 2, "max_width": 8, "blocks": 1},
                      training={"data": "test-made", "num_samples": 6, "seed": seed})
    student = build_student(cfg)
    with torch.no_grad():  # make g's output O(1) so its errors show
        student.net.head.weight.mul_(8.0)
    save_student(root, student.net, cfg)
    return root


@pytest.fixture(scope="session")
def export_env(tmp_path_factory, shared):
    """PSF file, dataset and student directories shared by the export test files."""
    root = tmp_path_factory.mktemp("export_env")
    psf = small_psf(shared)
    np.save(root / "psf32.npy", psf)
    return {"root": root, "psf": psf, "psf_file": root / "psf32.npy",
            "data": make_dataset(root / "data", psf), "student": make_student(root / "student", psf)}


@pytest.fixture(scope="session")
def exported(export_env):
    """FP32 ONNX exports made once through the CLI: the student (matmul DFT, dynamic batch) and the
    Wiener-only graph (static batch 2)."""
    from export.onnx_graph import main_argv

    e = export_env
    out = {}
    common = ["--psf", str(e["psf_file"]), "--size", *map(str, SIZE)]
    assert main_argv(["--student", str(e["student"]), *common, "--batch", "dynamic",
                      "--out", str(e["root"] / "student.onnx")]) == 0
    out["student"] = e["root"] / "student.onnx"
    assert main_argv(["--wiener-only", *common, "--lam", str(LAM), "--batch", "2",
                      "--out", str(e["root"] / "wiener.onnx")]) == 0
    out["wiener"] = e["root"] / "wiener.onnx"
    return out
