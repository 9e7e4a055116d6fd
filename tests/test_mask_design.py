"""``nsdd-train design-mask`` at tiny scale, its outputs and exact fabrication constraints, and a designed
mask carried through simulate → prior → teacher → distill → export → ``nsdd-edge run --source sim://``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from export.cli import main as export_main
from nsdd_edge.cli import main as edge_main
from nsdd_edge.optics import load_psf, read_image01
from train.cli import main as train_main
from train.mask.design import DesignError, DesignSettings, build_system, train_system
from train.mask.fabrication import feature_violations, lcd_violations
from train.mask.propagation import MaskToPsf
from train.mask.systems import SensorNoise, decoder_loss, encoder_loss

TINY = ["--limit", "20", "--n-test", "4", "--scene", "16", "--sensor", "32", "--steps", "3", "--batch", "4",
        "--width", "4", "--depth", "1", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def designed(shared, tmp_path_factory):
    out = tmp_path_factory.mktemp("design")
    argv = ["design-mask", "--images", str(shared / "data/faces/utkface"), "--out", str(out),
            "--designs", "kd,kd-enc,e2e,mura,radial", "--radial-psf", str(shared / "data/psf/radial_6per_256.npy"),
            "--min-feature", "3", *TINY]
    assert train_main(argv) == 0
    return out, argv


def test_design_outputs_and_exact_fabrication_constraints(designed):
    out, _ = designed
    record = json.loads((out / "design.json").read_text())
    assert record["designs"] == ["teacher", "kd", "kd-enc", "e2e", "mura", "radial"] and record["primary"] == "kd"
    # the printable mask is binary and has no feature below 3 cells, exactly
    mask = read_image01(out / "mask.png")[0]
    assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0.0, 1.0} and mask.sum() > 0
    assert feature_violations(mask, 3) == {"open": 0, "opaque": 0, "non_binary": 0}
    np.testing.assert_array_equal(mask, np.load(out / "designs/kd/mask.npy"))
    assert "<rect" in (out / "mask.svg").read_text()
    for name in ("kd", "kd-enc", "e2e", "mura"):
        check = record["results"][name]["constraint"]
        assert check["satisfied"] and check["thin_open"] == check["thin_opaque"] == 0, name
    # the PSF is ready for simulate: (3, 32, 32), unit sum per channel, loads through the one PSF loader
    psf = load_psf(out / "psf.npy")
    assert psf.shape == (3, 32, 32)
    np.testing.assert_allclose(np.load(out / "psf.npy").sum(axis=(1, 2)), 1.0, atol=1e-5)
    for name, r in record["results"].items():
        assert r["condition_number"] > 1 and 0 < r["gram_coherence"] <= 1, name
        assert 5 < r["decoder"]["psnr"] < 60 and len(r["decoder"]["psnr_per_image"]) == 4, name
    report = (out / "report.md").read_text()
    assert "| kd | binary |" in report and "| radial | PSF only (real) |" in report
    assert "kd − e2e:" in report and (out / "report.png").stat().st_size > 10_000


def test_design_resumes_finished_designs(designed, capsys):
    out, argv = designed
    before = (out / "designs/kd/state.pt").stat().st_mtime_ns
    assert train_main(argv) == 0
    assert "kd: reusing" in capsys.readouterr().err
    assert (out / "designs/kd/state.pt").stat().st_mtime_ns == before


def test_lcd_student_obeys_its_grid(shared, tmp_path):
    out = tmp_path / "lcd"
    assert train_main(["design-mask", "--images", str(shared / "data/faces/utkface"), "--out", str(out),
                       "--designs", "e2e", "--constraint", "lcd", "--lcd-pitch", "4", "--lcd-dead", "1", *TINY]) == 0
    mask = np.load(out / "designs/e2e/mask.npy")
    inner = mask[4:28, 4:28]  # a 24-cell aperture of 6 x 6 LCD pixels on the 32-cell grid
    assert lcd_violations(inner, 4, 1) == {"dead": 0, "mixed": 0, "non_binary": 0}
    assert mask.sum() == inner.sum()


def test_bad_settings_are_refused(shared, tmp_path, capsys):
    faces = str(shared / "data/faces/utkface")
    assert train_main(["design-mask", "--images", faces, "--out", str(tmp_path / "a"), "--designs", "kd,nope",
                       *TINY]) == 2
    assert "unknown ['nope']" in capsys.readouterr().err
    assert train_main(["design-mask", "--images", faces, "--out", str(tmp_path / "b"), "--designs", "radial",
                       *TINY]) == 2
    assert "--radial-psf" in capsys.readouterr().err
    assert train_main(["design-mask", "--images", faces, "--out", str(tmp_path / "c"), "--feature-um", "15",
                       *TINY]) == 2
    assert "whole number of simulation samples" in capsys.readouterr().err


def test_transfer_losses_pull_the_student_towards_the_teacher():
    """The encoder and decoder losses are zero for identical systems and their gradients reach the student's
    mask (through the straight-through estimator) and decoder."""
    s = DesignSettings(scene=16, sensor=32, width=4, depth=1, steps=2, batch=2)
    to_psf = MaskToPsf(s.optics, (32, 32))
    teacher, student = build_system("teacher", s, to_psf), build_system("kd", s, to_psf)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, t_psf, _ = teacher(x, None)
        t_features = list(teacher.decoder.features)
    assert float(encoder_loss(t_psf, t_psf)) == 0.0 and float(decoder_loss(t_features, t_features)) == 0.0
    _, _, soft = student(x, None, 0.5, soft=True)
    loss = encoder_loss(soft, t_psf, "mtf") + decoder_loss(student.decoder.features, t_features)
    loss.backward()
    assert float(student.encoder.theta.grad.abs().sum()) > 0
    assert float(next(student.decoder.net.parameters()).grad.abs().sum()) > 0
    history = train_system(student, x.repeat(2, 1, 1, 1), 2, s, teacher=teacher, enc_weight=1.0, dec_weight=1.0,
                           progress=False)
    assert {"rec", "enc", "dec"} <= set(history[-1])
    # the mask-space encoder loss compares the pre-binarisation mask with the teacher's transmittance
    t_mask = teacher.encoder.soft_mask.detach()
    assert float(encoder_loss(t_mask, t_mask, "mask")) == 0.0
    student.zero_grad()
    student(x, None, 0.5)
    encoder_loss(student.encoder.soft_mask, t_mask, "mask").backward()
    assert float(student.encoder.theta.grad.abs().sum()) > 0


def test_noise_follows_the_mask_throughput():
    """The exposure is set for a mask passing half the light: a mask passing a quarter sees twice the read
    noise relative to its signal, and a PSF-only design (throughput unknown) the nominal σ."""
    s = DesignSettings(scene=16, sensor=32, width=4, depth=1, noise_std=0.01)
    to_psf = MaskToPsf(s.optics, (32, 32))
    system = build_system("mura", s, to_psf)
    system.encoder(to_psf)
    tau = float(system.encoder.throughput)
    assert 0.2 < tau < 0.6 and float(system.throughput_ratio()) == pytest.approx(tau / 0.5)
    y = torch.full((1, 3, 4, 4), 0.3)
    assert torch.allclose(system.noise.std(y, system.throughput_ratio()), torch.full_like(y, 0.01 * 0.5 / tau))
    assert build_system("contour", s, to_psf).throughput_ratio() == 1.0
    s.reference_throughput = None
    assert build_system("mura", s, to_psf).throughput_ratio() == 1.0


def test_camera_profile_noise_is_poisson_gaussian_at_the_camera_level():
    """With a profile: y is brought to the camera's 99th percentile, var = σ_r² + g·y there, then back."""
    noise = SensorNoise(read_std=0.002, shot_gain=0.01, signal_p99=0.5)
    y = torch.linspace(0.0, 0.1, 100).reshape(1, 1, 10, 10)
    level = 0.5 / float(torch.quantile(y.flatten(), 0.99))
    for ratio in (1.0, 0.5):
        expected = torch.sqrt(0.002 ** 2 + 0.01 * level * ratio * y) / (level * ratio)
        torch.testing.assert_close(noise.std(y, ratio), expected)
    # halving the light raises the relative noise (more where read noise dominates)
    assert bool((noise.std(y, 0.5) > noise.std(y, 1.0)).all())


def test_design_takes_the_noise_of_a_camera_profile(tmp_path):
    from nsdd_edge.bundle import PreprocessConfig
    from nsdd_edge.camera import CameraProfile, NoiseModel
    from nsdd_edge.optics import LenslessGeometry

    psf = np.zeros((1, 16, 16), dtype=np.float32)
    psf[0, 8, 8] = 1.0
    profile = CameraProfile(name="test", preprocess=PreprocessConfig(), psf=psf,
                            geometry=LenslessGeometry.make("circular", (16, 16)), lam=1e-3,
                            noise=NoiseModel(read_std=0.003, shot_gain=0.02), signal={"p99": 0.4})
    root = profile.save(tmp_path / "cam")
    s = DesignSettings(scene=16, sensor=32, width=4, depth=1, profile=str(root))
    noise = build_system("e2e", s, MaskToPsf(s.optics, (32, 32))).noise
    assert noise == SensorNoise(read_std=0.003, shot_gain=0.02, signal_p99=0.4)
    s.profile = str(tmp_path / "missing")
    with pytest.raises(DesignError, match="--profile"):
        build_system("e2e", s, MaskToPsf(s.optics, (32, 32)))


@pytest.mark.slow
def test_designed_mask_goes_through_the_whole_chain_to_the_edge_loop(designed, shared, tmp_path):
    """A mask that did not exist before: its PSF → simulate → prior → teacher → distill → export → bundle →
    ``nsdd-edge run --source sim://`` with that bundle."""
    out, _ = designed
    psf = out / "psf.npy"
    ds, prior, teacher, student = (tmp_path / n for n in ("faces", "prior", "teacher", "student"))
    assert train_main(["simulate", "--images", str(shared / "data/faces/utkface"), "--psf", str(psf), "--size", "16",
                       "--noise-std", "0.005", "--seed", "0", "--limit", "10", "--n-test", "2", "--out", str(ds)]) == 0
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["forward"]["sensor_shape"] == [32, 32] and meta["psf"]["shape"] == [3, 32, 32]
    assert train_main(["prior", "--images", str(ds), "--size", "16", "--base-channels", "8", "--channel-mults", "1,2",
                       "--num-res-blocks", "1", "--attention-resolutions", "", "--steps", "2", "--batch", "4",
                       "--checkpoint-every", "2", "--sample-count", "1", "--sample-steps", "2", "--no-progress",
                       "--out", str(prior)]) == 0
    assert train_main(["teacher", "--data", str(ds), "--prior", str(prior), "--split", "train", "--steps", "2",
                       "--batch", "4", "--shard-size", "4", "--limit", "4", "--out", str(teacher)]) == 0
    assert train_main(["distill", "--data", str(ds), "--targets", str(teacher), "--student", "edge", "--lam", "1e-3",
                       "--limit", "4", "--width", "8", "--depth", "2", "--max-width", "16", "--steps", "2",
                       "--batch", "2", "--checkpoint-every", "2", "--quiet", "--out", str(student)]) == 0
    onnx = tmp_path / "model.onnx"
    assert export_main(["onnx", "--student", str(student), "--psf", str(ds / "psf.npy"), "--size", "32", "32",
                        "--out", str(onnx)]) == 0
    from nsdd_edge.sources import open_source

    # the bundle's preprocessing matches the simulated camera's raw frames (black level, bit depth)
    camera = open_source("sim://?seed=1", psf=np.load(ds / "psf.npy"),
                         geometry={"model": "circular", "sensor_shape": [32, 32]})
    preprocess = tmp_path / "preprocess.json"
    preprocess.write_text(json.dumps(camera.matching_preprocess()))
    bundle = tmp_path / "bundle"
    assert export_main(["bundle", "--onnx", str(onnx), "--psf", str(ds / "psf.npy"), "--preprocess", str(preprocess),
                        "--out", str(bundle)]) == 0
    stats = tmp_path / "stats.json"
    assert edge_main(["run", "--model", str(bundle), "--source", "sim://?seed=1", "--engine", "onnx", "--frames",
                      "3", "--preview", "none", "--stats", str(stats), "--snapshot", str(tmp_path / "preview.png")]) == 0
    figures = json.loads(stats.read_text())
    assert figures["frames_out"] == 3 and figures["rejected"] == 0 and figures["info"]["engine_kind"] == "onnx"
    bundled = json.loads((bundle / "bundle.json").read_text())
    assert bundled["channels"] == 3
    np.testing.assert_allclose(load_psf(bundle / bundled["psf"]["file"]), load_psf(psf), atol=1e-6)
