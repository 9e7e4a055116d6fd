"""Distillation over a range of PSF scales (``nsdd-train distill --psf-scale-range``) at tiny size: the scales
drawn, the measurements simulated from the targets through each sample's scaled PSF, the per-sample operators,
the recorded range, resuming, and named errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_distill import make_problem, settings

from nsdd_edge.psf_warp import PsfWarp, warp_psf
from train.cli import main as cli_main
from train.data import LenslessDataset
from train.distill import DistillError, train_student
from train.distill_data import TargetSet
from train.physics import LenslessOperator
from train.scale_range import OperatorBatch, ScaleOperators, ScaleRangeData, check_scale_range, grid_scale
from train.students import load_student


def scale_data(data, targets, scale_range=(0.85, 1.2), noise_std=0.0):
    dataset = LenslessDataset(data)
    ids = dataset.ids("train")
    operators = ScaleOperators(dataset, model=None, lam=1e-3, projector="tikhonov", device=torch.device("cpu"))
    return dataset, ScaleRangeData(TargetSet(dataset, targets, ids, (32, 32)), operators, scale_range, seed=3,
                                   noise_std=noise_std), ids


def test_scales_are_drawn_in_the_range_on_a_grid_and_depend_only_on_seed_step_and_sample(tmp_path):
    data, targets = make_problem(tmp_path)
    _, sd, ids = scale_data(data, targets)
    drawn = [s for key in range(20) for s in sd.scales(ids, key)]
    assert 0.85 * 0.997 <= min(drawn) and max(drawn) <= 1.2 * 1.003 and len(set(drawn)) > 20
    assert all(s == grid_scale(s) for s in drawn)
    assert sd.scales(ids[:3], 7) == sd.scales(ids, 7)[:3]  # a sample's draw does not depend on its batch
    assert sd.scales(ids, 7) != sd.scales(ids, 8)
    _, single, _ = scale_data(data, targets, (1, 1))
    assert set(single.scales(ids, 0)) == {1.0} and grid_scale(1.0) == 1.0


def test_measurements_are_the_targets_through_each_samples_scaled_psf_and_operators_are_per_sample(tmp_path):
    data, targets = make_problem(tmp_path)
    dataset, sd, ids = scale_data(data, targets)
    y, t, ops = sd.batch(ids[:4], key=5)
    scales = sd.scales(ids[:4], 5)
    for i, s in enumerate(scales):
        forward = LenslessOperator(warp_psf(dataset.psf, PsfWarp(s)), (32, 32), "circular", lam=1e-3)
        want = forward.A(t[i : i + 1].clamp(0, 1)).clamp(0, 1)[0]
        torch.testing.assert_close(y[i], want, atol=1e-5, rtol=0)
        recon = LenslessOperator(warp_psf(dataset.psf, PsfWarp(s)), (32, 32), "circular", lam=1e-3)
        torch.testing.assert_close(ops.A_dagger(y)[i], recon.A_dagger(y[i : i + 1])[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(ops.null_project(t)[i], recon.null_project(t[i : i + 1])[0], atol=1e-5, rtol=0)
    assert isinstance(ops, OperatorBatch) and ops.scene_shape == (32, 32)
    with pytest.raises(DistillError, match="applied to a batch"):
        ops.A_dagger(y[:2])
    _, noisy, _ = scale_data(data, targets, noise_std=0.01)
    y2, _, _ = noisy.batch(ids[:4], key=5)
    assert 0.005 < float((y2 - y).std()) < 0.015  # the dataset's noise level on top (clipped at 0 and 1)
    torch.testing.assert_close(noisy.batch(ids[:4], key=5)[0], y2)  # the same noise on a rerun


def test_distill_over_a_scale_range_records_it_and_resumes_to_the_same_weights(tmp_path):
    data, targets = make_problem(tmp_path)
    full = train_student(settings(data, targets, tmp_path / "a", psf_scale_range=[0.85, 1.2]))
    assert np.isfinite(full["final_loss"])
    cfg = json.loads((tmp_path / "a/config.json").read_text())
    assert cfg["psf_scale_range"] == [0.85, 1.2] and cfg["training"]["scale_range"]["noise_std"] == 0.005
    student = load_student(tmp_path / "a")  # an ordinary student directory
    assert student.config["psf_sha256"] == LenslessDataset(data).physics().psf_hash  # the calibrated PSF's

    def stop_at_5(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_student(settings(data, targets, tmp_path / "b", psf_scale_range=[0.85, 1.2]), callback=stop_at_5)
    resumed = train_student(settings(data, targets, tmp_path / "b", psf_scale_range=[0.85, 1.2]))
    assert [h[:2] for h in resumed["history"]] == [h[:2] for h in full["history"]]
    with pytest.raises(DistillError, match="psf_scale_range"):  # another range does not resume this run
        train_student(settings(data, targets, tmp_path / "b", psf_scale_range=[0.9, 1.1]))


def test_bad_ranges_are_refused_by_name(tmp_path, capsys):
    for bad in ((1.2, 0.85), (0.1, 1.0), (1.0, float("nan"))):
        with pytest.raises(DistillError, match="--psf-scale-range"):
            check_scale_range(bad)
    data, targets = make_problem(tmp_path)
    assert cli_main(["distill", "--data", str(data), "--targets", str(targets), "--out", str(tmp_path / "s"),
                     "--psf-scale-range", "1.3", "0.9", "--steps", "2", "--quiet"]) == 2
    assert "--psf-scale-range 1.3 0.9" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
