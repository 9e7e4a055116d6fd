"""The runtime's live consistency ‖A x̂ − y‖/‖y‖ (issue 12): the numpy forward model and the stats it feeds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nsdd_edge.cli import main as edge_main
from nsdd_edge.optics import ForwardModel, LenslessGeometry, OpticsError
from train.physics import LenslessOperator


@pytest.mark.parametrize("model", ["circular", "crop"])
def test_numpy_forward_model_equals_the_training_operator(model):
    rng = np.random.default_rng(0)
    psf = (rng.random((1, 9, 11)) ** 3).astype(np.float32)
    psf /= psf.sum()
    if model == "circular":
        op = LenslessOperator(psf, (24, 24), "circular")
        geometry = LenslessGeometry.make("circular", (24, 24), psf.shape[-2:])
    else:
        op = LenslessOperator(psf, (24, 24), "crop", scene_shape=(20, 20), conv_shape=(40, 40))
        geometry = LenslessGeometry.make("crop", (24, 24), psf.shape[-2:], scene_shape=(20, 20), conv_shape=(40, 40))
    x = rng.random((3, *geometry.scene_shape)).astype(np.float32)
    fwd = ForwardModel(psf, geometry)
    want = op.A(torch.from_numpy(x)[None])[0].numpy()
    np.testing.assert_allclose(fwd(x), want, atol=1e-5)
    assert fwd.consistency(x, want) < 1e-5 and fwd.consistency(np.zeros_like(x), want) == pytest.approx(1.0)
    with pytest.raises(OpticsError, match="scene grid"):
        fwd(np.zeros((3, 7, 7), np.float32))


def test_run_reports_consistency_every_n_frames(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stats = tmp_path / "stats.json"
    assert edge_main(["run", "--frames", "7", "--quiet", "--stats", str(stats)]) == 0
    s = json.loads(stats.read_text())
    c = s["consistency"]
    assert c["count"] == 1 and c["every_frames"] == 30  # frames 1, 31, 61, ...: one check in 7 frames
    assert 0 <= c["last"] < 0.5 and s["stages"]["consistency"]["count"] == 1
