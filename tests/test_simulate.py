"""``nsdd-train simulate``: layout, physics, noise, determinism, resuming, skipped files, errors."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from nsdd_edge.optics import array_hash
from nsdd_edge.psf_sim import simulate_psf
from train.cli import main as train_main
from train.data import LenslessDataset
from train.physics import LenslessOperator
from train.simulate import prepare_scene, split_ids


@pytest.fixture
def images(tmp_path):
    """Six readable images (RGB, grayscale, 16-bit, non-square), one corrupt and one empty file."""
    d = tmp_path / "images"
    d.mkdir()
    rng = np.random.default_rng(0)
    for k in range(4):
        cv2.imwrite(str(d / f"rgb{k}.png"), rng.integers(0, 256, (40, 30 + 10 * k, 3), dtype=np.uint8))
    cv2.imwrite(str(d / "gray.jpg"), rng.integers(0, 256, (50, 50), dtype=np.uint8))
    cv2.imwrite(str(d / "deep.tif"), rng.integers(0, 65536, (36, 36, 3), dtype=np.uint16))
    (d / "broken.png").write_bytes(b"\x89PNG not really")
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.txt").write_text("not an image, ignored")
    return d


@pytest.fixture
def psf_file(tmp_path):
    path = tmp_path / "psf.npy"
    np.save(path, 3.0 * simulate_psf("contour", (32, 32), seed=0))  # any scale: normalised on load
    return path


def run(*argv: str) -> int:
    return train_main(["simulate", *map(str, argv)])


def test_dataset_layout_and_physics(images, psf_file, tmp_path, capsys):
    out = tmp_path / "ds"
    assert run("--images", images, "--psf", psf_file, "--size", 16, "--noise-std", 0.01, "--seed", 5,
               "--n-test", 2, "--out", out) == 0
    printed = capsys.readouterr().out
    assert "broken.png" in printed and "empty.jpg" in printed and "wrote 6 samples" in printed
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["complete"] and meta["count"] == 6 and meta["seed"] == 5 and meta["noise_std"] == 0.01
    assert meta["forward"] == {"model": "crop", "sensor_shape": [32, 32], "scene_shape": [16, 16],
                               "conv_shape": [64, 64]}
    assert meta["recon"] == {"model": "circular", "lam": 1e-6}
    assert sorted(s["file"].rsplit("/", 1)[-1] for s in meta["skipped"]) == ["broken.png", "empty.jpg"]
    assert all(s["reason"] for s in meta["skipped"])
    test, train = meta["splits"]["test"], meta["splits"]["train"]
    assert len(test) == 2 and not set(test) & set(train) and sorted(test + train) == sorted(meta["sources"])

    ds = LenslessDataset(out)
    psf = np.load(out / "psf.npy")
    assert psf.sum() == pytest.approx(1.0, rel=1e-5) and meta["psf"]["sha256"] == array_hash(psf)
    files = sorted(p.name for p in images.iterdir() if p.suffix in (".png", ".jpg", ".tif"))
    op = LenslessOperator(psf, (32, 32), "crop", scene_shape=(16, 16), conv_shape=(64, 64))
    residuals = []
    for sid, name in meta["sources"].items():
        x, y = ds.ground_truth(sid), ds.measurement(sid)
        assert x.shape == (3, 16, 16) and y.shape == (3, 32, 32)
        assert 0.0 <= x.min() and x.max() <= 1.0 and 0.0 <= y.min() and y.max() <= 1.0
        assert files.index(name) == int(sid)  # id = index in the sorted file list
        clean = op.A(torch.from_numpy(x)[None])[0].numpy()
        inside = (clean > 0.05) & (clean < 0.95)  # away from the clip
        residuals.append((y - clean)[inside])
    noise = np.concatenate(residuals)
    assert noise.std() == pytest.approx(0.01, rel=0.1) and abs(noise.mean()) < 1e-3
    assert ds.physics().model == "circular"


def test_bit_identical_twice_and_resumable(images, psf_file, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--images", images, "--psf", psf_file, "--size", 16, "--batch-size", 4]
    assert run(*args, "--out", a) == 0
    assert run(*args, "--out", b) == 0
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    # interrupted run: some outputs missing, dataset.json incomplete; resuming gives the same bytes
    ids = sorted(p.stem for p in (a / "measurements").glob("*.npy"))
    assert len(ids) == 6
    (b / "measurements" / f"{ids[1]}.npy").unlink()
    (b / "ground_truth" / f"{ids[4]}.npy").unlink()
    meta = json.loads((b / "dataset.json").read_text())
    meta["complete"] = False
    (b / "dataset.json").write_text(json.dumps(meta))
    assert run(*args, "--out", b) == 0
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    # another seed into the same directory is refused (nothing the user made is overwritten) ...
    assert run(*args, "--seed", 1, "--out", b) == 2
    first = f"measurements/{ids[0]}.npy"
    assert (a / first).read_bytes() == (b / first).read_bytes()
    # ... unless asked for
    assert run(*args, "--seed", 1, "--overwrite", "--out", b) == 0
    assert (a / first).read_bytes() != (b / first).read_bytes()


def test_options_grayscale_circular_limit_noise_free(images, psf_file, tmp_path):
    out = tmp_path / "g"
    assert run("--images", images, "--psf", psf_file, "--size", 16, "--grayscale", "--model", "circular",
               "--noise-std", 0, "--limit", 4, "--lam", 1e-4, "--test-fraction", 0.5, "--out", out) == 0
    meta = json.loads((out / "dataset.json").read_text())
    # the first 4 files (sorted) include the 2 unreadable ones: 2 samples
    assert meta["channels"] == 1 and meta["count"] == 2 and len(meta["skipped"]) == 2
    assert meta["recon"]["lam"] == 1e-4
    assert meta["forward"]["model"] == "circular" and meta["forward"]["scene_shape"] == [32, 32]
    assert len(meta["splits"]["test"]) == 1
    ds = LenslessDataset(out)
    op = LenslessOperator(ds.psf, (32, 32), "circular")
    first = ds.ids()[0]
    x = torch.from_numpy(ds.ground_truth(first))[None]
    assert x.shape == (1, 1, 16, 16)
    clean = op.A(torch.nn.functional.pad(x, (8, 8, 8, 8)))[0].clamp(0, 1).numpy()
    np.testing.assert_allclose(ds.measurement(first), clean, atol=1e-6)


def test_prepare_scene_centre_crops_and_resizes(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, 10:30] = 255  # the centred square is white, the sides black
    cv2.imwrite(str(tmp_path / "wide.png"), img)
    x = prepare_scene(tmp_path / "wide.png", 8, 3)
    assert x.shape == (3, 8, 8) and np.allclose(x, 1.0)
    g = prepare_scene(tmp_path / "wide.png", 5, 1)
    assert g.shape == (1, 5, 5) and np.allclose(g, 1.0, atol=1e-3)


def test_split_is_deterministic():
    ids = [f"{k:06d}" for k in range(50)]
    s1, s2 = split_ids(ids, 0, 0.2, None), split_ids(ids, 0, 0.2, None)
    assert s1 == s2 and len(s1["test"]) == 10 and s1 != split_ids(ids, 1, 0.2, None)
    with pytest.raises(ValueError, match="--n-test"):
        split_ids(ids, 0, 0.1, 51)


def test_errors_name_the_argument(images, psf_file, tmp_path, capsys):
    assert run("--images", images, "--psf", tmp_path / "missing.npy", "--out", tmp_path / "o") == 2
    assert "missing.npy: no such file" in capsys.readouterr().err
    assert run("--images", tmp_path / "nowhere", "--psf", psf_file, "--out", tmp_path / "o") == 2
    assert "--images" in capsys.readouterr().err
    assert run("--images", images, "--psf", psf_file, "--size", 80, "--out", tmp_path / "o") == 2
    assert "--size 80: the scene is larger than the convolution grid" in capsys.readouterr().err
    empty = tmp_path / "bad_only"
    empty.mkdir()
    (empty / "x.png").write_bytes(b"junk")
    assert run("--images", empty, "--psf", psf_file, "--size", 16, "--out", tmp_path / "o2") == 2
    assert "none of the 1 files could be read" in capsys.readouterr().err


def test_real_faces_and_radial_psf(shared, tmp_path):
    out = tmp_path / "faces"
    assert run("--images", shared / "data/faces/utkface", "--psf", shared / "data/psf/radial_6per_256.npy",
               "--size", 32, "--psf-downsample", 4, "--limit", 4, "--out", out) == 0
    ds = LenslessDataset(out)
    assert len(ds.ids()) == 4 and ds.measurement("000000").shape == (3, 64, 64)
    assert ds.meta["forward"]["conv_shape"] == [128, 128]


def test_recon_model_crop(images, psf_file, tmp_path):
    out = tmp_path / "c"
    assert run("--images", images, "--psf", psf_file, "--size", 16, "--recon-model", "crop", "--lam", 1e-4,
               "--out", out) == 0
    op = LenslessDataset(out).physics()
    assert op.model == "crop" and op.scene_shape == (64, 64) and op.conv_shape == (64, 64)
    assert op.sensor_shape == (32, 32) and op.lam == 1e-4


def test_refuses_a_foreign_output_directory(images, psf_file, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "measurements").mkdir(parents=True)
    keep = out / "measurements" / "000001.npy"
    np.save(keep, np.full((3, 32, 32), 7.0, np.float32))  # something the user put there
    assert run("--images", images, "--psf", psf_file, "--size", 16, "--out", out) == 2
    assert "not empty and holds no dataset.json" in capsys.readouterr().err
    assert np.all(np.load(keep) == 7.0)
    assert run("--images", images, "--psf", psf_file, "--size", 16, "--test-fraction", 1.5,
               "--out", tmp_path / "x") == 2
    assert "--test-fraction must be in [0, 1]" in capsys.readouterr().err


def test_odd_sensor_scene_lands_centred_on_it(images, tmp_path):
    """Sensor 15×20 (odd height), scenes 8×8: a delta PSF must give y = the scene centre-padded to the sensor,
    at the offsets every sensor-size reconstruction (centre crop, support windows) uses."""
    from train.physics import center_pad
    from train.simulate import centred_conv_shape

    assert centred_conv_shape((75, 100), (64, 64)) == (151, 200)  # DiffuserCam ×16
    assert centred_conv_shape((64, 64), (32, 32)) == (128, 128)  # even sizes: the usual 2× grid
    assert centred_conv_shape((75, 100), (63, 63)) == (150, 200)
    psf = np.zeros((15, 20), np.float32)
    psf[7, 10] = 1.0  # the centre pixel (H // 2, W // 2): no shift
    np.save(tmp_path / "delta.npy", psf)
    out = tmp_path / "odd"
    assert run("--images", images, "--psf", tmp_path / "delta.npy", "--size", 8, "--noise-std", 0,
               "--recon-model", "crop", "--recon-support", "scene", "--out", out) == 0
    ds = LenslessDataset(out)
    assert ds.meta["forward"]["conv_shape"] == [31, 40] and ds.meta["recon"]["conv_shape"] == [31, 40]
    for sid in ds.ids():
        gt = torch.from_numpy(np.load(out / "ground_truth" / f"{sid}.npy"))
        y = torch.from_numpy(ds.measurement(sid))
        assert torch.allclose(y, center_pad(gt, (15, 20)), atol=1e-5)
        assert torch.allclose(ds.physics().A(gt[None])[0], y, atol=1e-5)  # the recon crop model agrees


def test_diffusercam_psf_background_non_square(shared, tmp_path):
    """The real DiffuserCam PSF with its corner background removed at ×16 (75×100): the PSF nsdd-train solve
    --capture uses for the same file, a non-square sensor and scenes centred on it."""
    from nsdd_edge.optics import load_psf

    psf_path = shared / "data/lensless/diffusercam/psf_sample.tif"
    out = tmp_path / "dc"
    assert run("--images", shared / "data/faces/utkface", "--psf", psf_path, "--psf-downsample", 16,
               "--psf-background", "corner", "--size", 64, "--limit", 2, "--n-test", 1, "--out", out) == 0
    ds = LenslessDataset(out)
    want = load_psf(psf_path, background="corner", downsample=16)
    assert ds.meta["psf"]["sha256"] == array_hash(want) and ds.meta["psf"]["background"] == "corner"
    assert ds.meta["forward"] == {"model": "crop", "sensor_shape": [75, 100], "scene_shape": [64, 64],
                                  "conv_shape": [151, 200]}
    assert ds.measurement("000000").shape == (3, 75, 100)
    op = ds.physics()
    assert op.model == "circular" and op.scene_shape == (75, 100) and op.psf_hash == array_hash(want)
    assert run("--images", shared / "data/faces/utkface", "--psf", psf_path, "--psf-downsample", 16,
               "--size", 64, "--limit", 2, "--out", tmp_path / "raw") == 0
    assert LenslessDataset(tmp_path / "raw").meta["psf"]["sha256"] != array_hash(want)  # background kept


def test_rerun_with_another_split_is_refused_unless_overwrite(images, psf_file, tmp_path, capsys):
    """A finished dataset keeps its split: another --n-test without --overwrite would move trained-on
    samples into the test split (issue 16, item 2)."""
    out = tmp_path / "ds"
    args = ["--images", images, "--psf", psf_file, "--size", 16, "--out", out]
    assert run(*args, "--n-test", 1) == 0
    before = json.loads((out / "dataset.json").read_text())
    assert run(*args, "--n-test", 1) == 0  # the same command again: nothing changes
    assert json.loads((out / "dataset.json").read_text())["splits"] == before["splits"]
    capsys.readouterr()
    assert run(*args, "--n-test", 4) == 2
    err = capsys.readouterr().err
    assert "already split into train 5 / test 1" in err and "--n-test 1 to keep it" in err
    assert json.loads((out / "dataset.json").read_text()) == before  # untouched, still complete
    assert run(*args, "--overwrite", "--n-test", 4) == 0
    after = json.loads((out / "dataset.json").read_text())
    assert len(after["splits"]["test"]) == 4 and "re-splitting" in capsys.readouterr().err


def test_n_test_larger_than_the_images_fails_before_simulating(images, psf_file, tmp_path, capsys):
    out = tmp_path / "ds"
    assert run("--images", images, "--psf", psf_file, "--size", 16, "--limit", 3, "--n-test", 5, "--out", out) == 2
    assert "--n-test 5 is more than the 3 images of --limit 3" in capsys.readouterr().err
    assert not out.exists()  # nothing half-made left behind


def test_a_test_fraction_of_one_holds_every_sample_out():
    from train.simulate import split_ids

    ids = [f"{k:06d}" for k in range(5)]
    assert split_ids(ids, 1, 1.0, None) == {"train": [], "test": ids}
