"""Scenes simulated through a camera profile are stored at the captures' signal level ``L · x``: image metrics
must score ``x̂ / L`` against ``x`` (clipping ``L · x`` at 1 saturates most of a face and the scores mean little)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_camera_profile import camera_files, profile_dir  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def profile_data(profile_dir, shared, tmp_path_factory):  # noqa: F811
    from train.cli import main as train_main

    out = tmp_path_factory.mktemp("levels") / "data"
    assert train_main(["simulate", "--images", str(shared / "data/faces/utkface"), "--profile", str(profile_dir[0]),
                       "--size", "16", "--limit", "6", "--n-test", "3", "--out", str(out), "--threads", "1"]) == 0
    return out


def test_simulate_records_each_scenes_level_and_old_data_sets_recover_it(profile_data, tmp_path):
    import shutil

    from train.data import DatasetError, LenslessDataset

    meta = json.loads((profile_data / "dataset.json").read_text())
    ds = LenslessDataset(profile_data)
    ids = ds.ids("all")
    assert sorted(meta["scene_levels"]) == ids
    levels = ds.scene_levels(ids)
    assert torch.all(levels > 1.0)  # these captures are brighter than a [0, 1] scene through the PSF
    assert levels.min() >= meta["profile_match"]["scene_levels"]["min"] - 1e-6
    for sid, level in zip(ids, levels):
        x = ds.ground_truth(sid) / float(level)
        assert x.min() >= 0 and x.max() <= 1 + 1e-5 and x.max() > 0.5  # the [0, 1] image again
    old = tmp_path / "old"
    shutil.copytree(profile_data, old)
    legacy = {k: v for k, v in meta.items() if k != "scene_levels"}  # written before levels were recorded
    (old / "dataset.json").write_text(json.dumps(legacy))
    assert torch.allclose(LenslessDataset(old).scene_levels(ids), levels, rtol=1e-4)
    legacy["settings"]["images"] = str(tmp_path / "gone")
    (old / "dataset.json").write_text(json.dumps(legacy))
    with pytest.raises(DatasetError, match="simulate the data set again"):
        LenslessDataset(old).scene_levels(ids)


def test_metrics_score_the_image_not_its_saturated_signal(profile_data):
    from train.data import LenslessDataset
    from train.scoring import image_scores

    ds = LenslessDataset(profile_data)
    ids = ds.ids("test")
    gt = torch.from_numpy(np.stack([ds.ground_truth(i) for i in ids]))
    levels = ds.scene_levels(ids)
    x = 0.8 * gt  # 20% too dark: a clear error on the image's scale
    scored = image_scores(x, gt, False, None, "cpu", levels=levels)
    scale = levels.reshape(-1, 1, 1, 1)
    direct = image_scores(x / scale, gt / scale, False, None, "cpu")
    assert scored["psnr"] == pytest.approx(direct["psnr"]) and max(scored["psnr"]) < 30
    saturated = image_scores(x, gt, False, None, "cpu")  # the old way: both clipped at 1
    assert min(saturated["psnr"]) > max(scored["psnr"]) + 3  # clipping hid most of the error



def test_data_simulated_without_a_profile_has_no_levels(profile_data, tmp_path):
    import shutil

    from train.data import LenslessDataset

    plain = tmp_path / "plain"
    shutil.copytree(profile_data, plain)
    meta = json.loads((plain / "dataset.json").read_text())
    for key in ("profile_match", "scene_levels"):
        meta.pop(key)
    (plain / "dataset.json").write_text(json.dumps(meta))
    assert LenslessDataset(plain).scene_levels(meta["splits"]["test"]) is None  # scored as stored, L = 1


def test_evaluate_uses_the_levels(profile_data, tmp_path):
    from train.cli import main as train_main

    recon = tmp_path / "recon"
    recon.mkdir()
    meta = json.loads((profile_data / "dataset.json").read_text())
    for sid in meta["splits"]["test"]:  # the ground truth on the reconstruction grid, 10% too bright
        gt = np.load(profile_data / "ground_truth" / f"{sid}.npy")
        grid = meta["recon"]["scene_shape"]
        full = np.zeros((gt.shape[0], *grid), np.float32)
        r, c = (grid[0] - gt.shape[1]) // 2, (grid[1] - gt.shape[2]) // 2
        full[:, r : r + gt.shape[1], c : c + gt.shape[2]] = 1.1 * gt
        np.save(recon / f"{sid}.npy", full)
    out = tmp_path / "eval"
    assert train_main(["evaluate", "--data", str(profile_data), "--recon", str(recon), "--out", str(out),
                       "--no-lpips"]) == 0
    psnr = json.loads((out / "metrics.json").read_text())["recon"]["psnr"]
    assert np.isfinite(psnr) and psnr < 35  # 10% too bright is seen (clipped at 1 it was nearly invisible)


def test_a_black_scene_keeps_level_one():
    from train.scoring import image_scores
    from train.simulate import recover_level, scene_level

    assert scene_level(0.9, 0.3) == pytest.approx(3.0) and scene_level(0.9, 0.0) == 1.0
    black = np.zeros((1, 8, 8), np.float32)
    assert recover_level(black, black) == 1.0 and recover_level(3 * np.ones((1, 2, 2)), np.ones((1, 2, 2))) == 3.0
    x = torch.zeros((1, 1, 16, 16))
    scores = image_scores(x + 0.1, x, False, None, "cpu", levels=torch.tensor([0.0]))  # a level of 0 is ignored
    assert np.isfinite(scores["psnr"][0]) and scores["psnr"][0] == pytest.approx(20.0)
