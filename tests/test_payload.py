"""The device payload (scripts/gpu_payload.sh): what the GPU one-shot sends must fit the device transfer.

The device machine receives the working tree plus the carried ``.gpu/`` folder, 64 MiB in all, and refuses
more. The tracked tree's budget (35 MiB, stated in the script) leaves room for the face pack and LPIPS weights
(≤ 22 MiB) under a 57 MiB target: a commit that adds weights without dropping superseded ones fails here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_payload.sh"
pytestmark = pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs git and a git checkout")


def _run(gpu_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT)], check=False, cwd=ROOT, env={**os.environ, "GPU_DIR": str(gpu_dir)},
                          capture_output=True, text=True, timeout=120)


def test_tracked_tree_fits_the_device_payload_budget(tmp_path):
    proc = _run(tmp_path / "no-gpu-dir")
    assert "tracked files" in proc.stdout
    assert proc.returncode == 0, (
        "the tracked tree is over its device-payload budget: the GPU one-shot (scripts/gpu_train.sh) would be "
        "refused by the device machine (64 MiB for the working tree and .gpu/ together). Drop superseded "
        "weights (git rm; scripts/restore_models.sh restores them from history) or store them as fp16.\n"
        + proc.stdout + proc.stderr)


def test_an_oversized_carried_folder_fails(tmp_path):
    gpu = tmp_path / ".gpu"
    gpu.mkdir()
    with open(gpu / "faces.npz", "wb") as f:  # sparse: 23 MiB apparent size, no disk
        f.truncate(23 * 2**20)
    proc = _run(gpu)
    assert proc.returncode == 1
    assert "OVER BUDGET" in proc.stderr and "exceeds 22 MiB" in proc.stderr
    assert "23.00 MiB" in proc.stdout
