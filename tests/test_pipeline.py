"""The README walkthrough end to end, at toy size, through the three command-line tools.

simulate → solve → prior → teacher → distill → evaluate → export onnx → quantize → verify → bundle →
nsdd-edge run on the simulated camera with the exported student. Every stage reads what the stage before
wrote, so a change that breaks a hand-over between stages fails here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from export.cli import main as export_main
from nsdd_edge.cli import main as edge_main
from train.cli import main as train_main

pytestmark = pytest.mark.slow


def test_walkthrough_from_faces_to_the_edge_loop(shared, tmp_path):
    faces = shared / "data/faces/utkface"
    psf = shared / "data/psf/radial_6per_256.npy"
    ds, prior, teacher, student = (tmp_path / n for n in ("faces", "prior", "teacher", "student"))

    # 1. a lensless dataset: 32 px faces on a 64 px sensor (radial PSF downsampled x4), noise 0.005
    assert train_main(["simulate", "--images", str(faces), "--psf", str(psf), "--psf-downsample", "4",
                       "--size", "32", "--noise-std", "0.005", "--seed", "0", "--limit", "10", "--n-test", "2",
                       "--out", str(ds)]) == 0
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["forward"]["sensor_shape"] == [64, 64] and len(meta["splits"]["test"]) == 2

    # 2. a classical baseline on the test split
    assert train_main(["solve", "--method", "admm", "--set", "iters=5", "--data", str(ds), "--split", "test",
                       "--out", str(tmp_path / "admm")]) == 0

    # 3. a (tiny) prior of the 32 px faces; the solvers use it on the scenes' centred window of the 64 px grid
    assert train_main(["prior", "--images", str(ds), "--size", "32", "--base-channels", "8",
                       "--channel-mults", "1,2", "--num-res-blocks", "1", "--attention-resolutions", "",
                       "--steps", "2", "--batch", "4", "--checkpoint-every", "2", "--sample-count", "1",
                       "--sample-steps", "2", "--no-progress", "--out", str(prior)]) == 0

    # 4. DDNM+ teacher labels for the first 6 of the 8 train measurements (no ground truth used)
    assert train_main(["teacher", "--data", str(ds), "--prior", str(prior), "--split", "train", "--steps", "3",
                       "--batch", "4", "--shard-size", "4", "--limit", "6", "--out", str(teacher)]) == 0
    train_ids = meta["splits"]["train"]
    assert sorted(p.stem for p in teacher.glob("*.npy")) == sorted(train_ids[:6])

    # 5. the edge student by null-space distillation
    assert train_main(["distill", "--data", str(ds), "--targets", str(teacher), "--student", "edge",
                       "--objective", "nullspace", "--lam", "1e-3", "--limit", "6", "--width", "8", "--depth", "2",
                       "--max-width", "16", "--steps", "3", "--batch", "4", "--checkpoint-every", "3",
                       "--quiet", "--out", str(student)]) == 0
    assert (student / "model.safetensors").exists()
    assert json.loads((student / "config.json").read_text())["support_shape"] == [32, 32]  # --support auto

    # 6. the evaluation report runs the methods itself
    out = tmp_path / "eval"
    assert train_main(["evaluate", "--data", str(ds), "--split", "test", "--methods",
                       f"wiener,student:{student},ddnm", "--prior", str(prior), "--set", "ddnm.steps=2",
                       "--recon", str(tmp_path / "admm"), "--names", "admm,wiener,student,ddnm",
                       "--lpips-weights", str(shared / "weights/lpips/lpips_alex_full_v0.1.pth"),
                       "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"wiener", "admm", "student", "ddnm"}
    assert metrics["student"]["n"] == 2 and metrics["student"]["seconds_per_image"] > 0
    assert (out / "lpips_vs_time.png").exists() and (out / "grid.png").exists()

    # 7. export: student + DFT-by-matmul pseudo-inverse as one graph, FP16, verification, bundle
    onnx32, onnx16 = tmp_path / "model.onnx", tmp_path / "model_fp16.onnx"
    assert export_main(["onnx", "--student", str(student), "--psf", str(ds / "psf.npy"), "--size", "64", "64",
                        "--out", str(onnx32)]) == 0
    assert export_main(["quantize", str(onnx32), "--precision", "fp16", "--out", str(onnx16)]) == 0
    report = tmp_path / "verify.json"
    assert export_main(["verify", str(onnx32), "--data", str(ds), "--student", str(student),
                        "--json", str(report)]) == 0
    figures = json.loads(report.read_text())
    assert figures["ok"] and figures["fp32_vs_torch_max_abs_error"] <= 1e-4

    from nsdd_edge.sources import open_source

    camera = open_source("sim://?seed=1", psf=np.load(ds / "psf.npy"),
                         geometry={"model": "circular", "sensor_shape": [64, 64]})
    preprocess = tmp_path / "preprocess.json"
    preprocess.write_text(json.dumps(camera.matching_preprocess()))
    bundle = tmp_path / "bundle"
    assert export_main(["bundle", "--onnx", f"{onnx32},{onnx16}", "--psf", str(ds / "psf.npy"),
                        "--preprocess", str(preprocess), "--out", str(bundle)]) == 0

    # 8. the device loop on the simulated camera with the exported student
    stats, snapshot = tmp_path / "stats.json", tmp_path / "preview.png"
    assert edge_main(["run", "--model", str(bundle), "--engine", "onnx", "--frames", "4", "--preview", "none",
                      "--stats", str(stats), "--snapshot", str(snapshot), "--record", str(tmp_path / "rec")]) == 0
    figures = json.loads(stats.read_text())
    assert figures["frames_out"] == 4 and figures["rejected"] == 0 and figures["recorded"] == 4
    assert figures["info"]["engine_kind"] == "onnx"
    assert snapshot.exists()
