"""Shared test fixtures: seeded, few threads, paths to ../shared (read-only data beside the checkout)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NSDD_SHARED", ROOT.parent / "shared"))

try:
    import torch

    # One thread by default: the suite's small FFT loops run faster (no thread hand-off, much faster on a
    # loaded machine) and reproducibly; NSDD_TEST_THREADS=N to test with more.
    torch.set_num_threads(int(os.environ.get("NSDD_TEST_THREADS", "1")))
except ImportError:  # the device-runtime tests run without torch
    torch = None


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    if torch is not None:
        torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def shared() -> Path:
    """The ../shared directory (real PSFs, the DiffuserCam capture, faces, LPIPS weights)."""
    if not SHARED.is_dir():
        if os.environ.get("NSDD_REQUIRE_SHARED"):  # CI: a missing data directory must fail, not skip
            pytest.fail(f"../shared not found at {SHARED} (NSDD_REQUIRE_SHARED is set)")
        pytest.skip(f"../shared not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def radial_psf(shared) -> np.ndarray:
    from nsdd_edge.optics import load_psf

    return load_psf(shared / "data/psf/radial_6per_256.npy")
