"""``nsdd-edge run|info|bench`` end to end through ``nsdd_edge.cli.main``: the simulated camera and the
shipped bundle, recording, the HTTP preview, SIGINT, and clear errors for bad bundles, URIs and engines."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from nsdd_edge.bundle import PreprocessConfig, load_bundle, write_bundle
from nsdd_edge.cli import main
from nsdd_edge.commands.run import default_bundle_path
from nsdd_edge.optics import LenslessGeometry, WienerFilter
from nsdd_edge.preprocess import Preprocessor
from nsdd_edge.recorder import read_recorded_raw
from nsdd_edge.sources import open_source


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _default_engine() -> str:
    """What ``nsdd-edge run`` picks for the shipped bundle here: Wiener-only bundle, or the student's ONNX."""
    import importlib.util

    has_student = "onnx_fp32" in load_bundle(default_bundle_path()).models
    return "onnx" if has_student and importlib.util.find_spec("onnxruntime") is not None else "wiener"


def test_default_bundle_is_shipped_and_verifies():
    b = load_bundle(default_bundle_path())
    assert b.geometry.sensor_shape == (128, 128) and b.channels == 3 and set(b.models) <= {"onnx_fp32"}


def test_run_with_no_arguments_writes_a_preview_and_stats(tmp_path, capsys):
    assert main(["run", "--frames", "6", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "6 frames reconstructed" in err
    if _default_engine() == "wiener":
        assert "engine numpy Wiener" in err and "fallback" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing beside runs/ (issue 16, item 11)
    img = cv2.imread(str(tmp_path / "runs" / "nsdd-edge-preview.png"), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[1] == 3 * 256 + 2 * 4 and img.std() > 5
    stats = json.loads((tmp_path / "runs" / "nsdd-edge-stats.json").read_text())
    assert stats["frames_out"] == 6 and stats["rejected"] == 0
    assert stats["stages"]["infer"]["count"] == 6 and stats["stages"]["infer"]["mean_ms"] > 0
    assert stats["info"]["engine_kind"] == _default_engine()


def test_recording_is_lossless_and_correct(tmp_path):
    rec = tmp_path / "rec"
    assert main(["run", "--source", "sim://?realtime=0&seed=5", "--frames", "5", "--record", str(rec),
                 "--engine", "wiener", "--quiet", "--snapshot", "", "--stats", str(tmp_path / "s.json")]) == 0
    bundle = load_bundle(default_bundle_path())
    cam = open_source("sim://?realtime=0&seed=5", psf=bundle.psf, geometry=bundle.sim_geometry(), channels=3)
    prep = Preprocessor(bundle.preprocess, bundle.root)
    wiener = WienerFilter(bundle.psf, bundle.geometry, bundle.lam)
    metas = sorted(rec.glob("0*.json"))
    assert len(metas) == 5 and json.loads((tmp_path / "s.json").read_text())["recorded"] == 5
    session = json.loads((rec / "session.json").read_text())
    assert session["engine"] == "wiener" and len(session["bundle_sha256"]) == 64
    for m in metas:
        meta = json.loads(m.read_text())
        raw = read_recorded_raw(rec / meta["raw"]["file"])
        assert raw.dtype == np.uint16
        np.testing.assert_array_equal(raw, cam.raw_frame(meta["frame_index"]))  # bit-exact raw counts
        np.testing.assert_allclose(np.load(rec / meta["recon"]["file"]), wiener(prep(raw)), atol=1e-5)
        assert meta["psf_sha256"] == bundle.psf_sha256 and meta["source_meta"]["source"] == "sim"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_preview_during_a_run(tmp_path):
    port = _free_port()
    got: dict = {}

    def client():
        end = time.monotonic() + 30
        while time.monotonic() < end and "jpeg" not in got:
            try:
                stats = urllib.request.urlopen(f"http://127.0.0.1:{port}/stats.json", timeout=2).read()
                got["stats"] = json.loads(stats)
                got["jpeg"] = urllib.request.urlopen(f"http://127.0.0.1:{port}/frame.jpg", timeout=2).read()
            except OSError:
                time.sleep(0.05)

    t = threading.Thread(target=client)
    t.start()
    rc = main(["run", "--frames", "90", "--preview", f"http://127.0.0.1:{port}", "--quiet"])
    t.join()
    assert rc == 0
    img = cv2.imdecode(np.frombuffer(got["jpeg"], np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[1] == 3 * 256 + 2 * 4
    assert "frames_in" in got["stats"] and "stages" in got["stats"]


def test_sigint_flushes_the_recorder(tmp_path, capsys):
    rec = tmp_path / "rec"
    stats = tmp_path / "stats.json"

    def interrupt():
        while len(list(rec.glob("0*.json"))) < 4:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    t = threading.Thread(target=interrupt, daemon=True)
    t.start()
    rc = main(["run", "--source", "sim://?fps=60", "--frames", "0", "--record", str(rec), "--stats", str(stats),
               "--quiet"])
    t.join(10)
    assert rc == 0 and "SIGINT: stopping" in capsys.readouterr().err
    s = json.loads(stats.read_text())
    assert s["info"]["end_reason"] == "SIGINT"
    assert s["frames_in"] == s["recorded"] == len(list(rec.glob("0*.json"))) >= 4
    assert not list(rec.glob(".*tmp-*"))


def _copy_default(tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(default_bundle_path(), dst)
    return dst


@pytest.mark.parametrize("case", ["missing", "not_a_bundle", "psf_tampered", "json_corrupt"])
def test_bad_bundles_are_refused(tmp_path, capsys, case):
    path = tmp_path / "nothing"
    if case == "not_a_bundle":
        path.mkdir()
    elif case == "psf_tampered":
        path = _copy_default(tmp_path)
        psf = np.load(path / "psf.npy")
        np.save(path / "psf.npy", psf[:, ::-1].copy())
    elif case == "json_corrupt":
        path = _copy_default(tmp_path)
        (path / "bundle.json").write_text("{ truncated")
    assert main(["run", "--model", str(path), "--frames", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err
    expected = {"missing": "does not exist", "not_a_bundle": "no bundle.json", "psf_tampered": "PSF hash mismatch",
                "json_corrupt": "corrupted"}[case]
    assert expected in err
    assert not (tmp_path / "runs" / "nsdd-edge-preview.png").exists()


def test_bundle_for_another_camera_is_refused(tmp_path, capsys):
    # a simulated camera with its own PSF: not the bundle's PSF
    assert main(["run", "--source", "sim://?size=128&seed=3", "--frames", "2", "--quiet"]) == 2
    assert "PSF" in capsys.readouterr().err
    # frames of the wrong size (a 64×64 bundle fed 128×128 frames from a file)
    bundle = load_bundle(default_bundle_path())
    small = write_bundle(tmp_path / "small", psf=bundle.psf[:, 32:96, 32:96].copy(),
                         geometry=LenslessGeometry.make("circular", (64, 64)), lam=1e-3, channels=3,
                         preprocess=PreprocessConfig(**vars(bundle.preprocess)))
    np.save(tmp_path / "frames.npy", np.full((3, 128, 128, 3), 1000, np.uint16))
    rc = main(["run", "--model", str(small.root), "--source", f"file://{tmp_path}/frames.npy", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "bundle expects measurements of shape (3, 64, 64)" in err and "(3, 128, 128)" in err


@pytest.mark.parametrize("uri, message", [("bogus://cam", "unknown scheme"), ("webcam", "not a URI"),
                                          ("sim://?fps=fast", "fps"), ("file:///no/such/file.mp4", "no/such")])
def test_bad_source_uris(capsys, uri, message):
    assert main(["run", "--source", uri, "--frames", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error" in err and message in err


def test_unavailable_engine_and_preview(capsys, monkeypatch):
    from nsdd_edge.engines import runtime_availability

    if not runtime_availability()["trt"][0]:
        assert main(["run", "--engine", "trt", "--frames", "2", "--quiet"]) == 2
        assert "no TensorRT plan" in capsys.readouterr().err
    if not load_bundle(default_bundle_path()).models:
        assert main(["run", "--engine", "onnx", "--frames", "2", "--quiet"]) == 2
        assert "no ONNX model" in capsys.readouterr().err
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert main(["run", "--preview", "window", "--frames", "2", "--quiet"]) == 2
    assert "no display" in capsys.readouterr().err
    assert main(["run", "--preview", "vnc://x", "--frames", "2", "--quiet"]) == 2


def test_info_and_bench(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert load_bundle(default_bundle_path()).name in out and f"auto → {_default_engine()}" in out
    assert "sim://" in out
    assert "verified:" in out and "SHA-256 of the file matches" in out and "array hash" in out
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bundle"]["verified"] and report["engines"]["wiener"]["available"]
    checks = " | ".join(report["bundle"]["checks"])  # what "verified" means, file by file
    assert "bundle.json" in checks and "psf.npy" in checks and "student_nullspace.onnx" in checks
    if _default_engine() == "onnx":
        assert "ONNX Runtime loads it and one inference gives a finite" in checks
    else:
        assert any("student_nullspace.onnx" in n for n in report["bundle"]["not_verified"])
    assert report["bundle"]["name"] == "default-sim-contour128-paper-student"  # what it holds
    assert main(["info", "--model", "/no/such/bundle"]) == 2
    assert "REFUSED" in capsys.readouterr().out
    assert main(["bench", "--frames", "4", "--json", "bench.json"]) == 0
    out = capsys.readouterr().out
    assert "overhead" in out and "infer" in out
    result = json.loads(Path("bench.json").read_text())
    assert result["frames"] == result["frames_out"] == 4 and result["engine_fps"] > 0


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root to mount a tmpfs")
def test_run_recording_onto_a_full_disk(tmp_path, capsys):
    """A real 2 MiB filesystem fills up, with the stats and the snapshot on it too: the run stops with exit
    status 3 and a clear message (also under --quiet), every captured frame is recorded or counted as not
    recorded, what was written is intact, no traceback and no temporary file is left."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mount -t tmpfs not permitted here")
    try:
        rc = main(["run", "--source", "sim://?realtime=0", "--frames", "0", "--record", str(mnt / "rec"),
                   "--quiet", "--stats", str(mnt / "s.json"), "--snapshot", str(mnt / "p.png")])
        err = capsys.readouterr().err
        assert rc == 3 and "RECORDING STOPPED" in err and "disk full" in err and "intact" in err
        assert "Traceback" not in err
        metas = sorted((mnt / "rec").glob("0*.json"))
        assert metas
        for m in metas:
            meta = json.loads(m.read_text())
            assert read_recorded_raw(mnt / "rec" / meta["raw"]["file"]).shape == (128, 128, 3)
            assert np.load(mnt / "rec" / meta["recon"]["file"]).shape == (3, 128, 128)
        assert not list((mnt / "rec").glob(".*.tmp")) and not list(mnt.glob(".*.tmp"))
        m = re.search(r"(\d+) recorded, (\d+) NOT recorded", err)
        assert m and int(m.group(1)) == len(metas) and int(m.group(2)) >= 1
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_run_with_an_onnx_bundle_picks_onnx_runtime(tmp_path, capsys):
    """A bundle holding an exported Wiener-only graph (export.graph, DFT-by-matmul): auto picks ONNX Runtime and
    reproduces the numpy Wiener reconstruction."""
    pytest.importorskip("torch")
    graph_mod = pytest.importorskip("export.graph")
    from export.onnx_graph import export_graph

    base = load_bundle(default_bundle_path())
    psf = base.psf[:, 32:96, 32:96].copy()
    psf /= psf.sum()
    geometry = LenslessGeometry.make("circular", (64, 64))
    onnx_path = export_graph(graph_mod.ReconstructionGraph(psf, (64, 64), 1e-3, objective="wiener", channels=3),
                             tmp_path / "wiener64.onnx", batch=1)
    bundle = write_bundle(tmp_path / "onnx_bundle", psf=psf, geometry=geometry, lam=1e-3, channels=3,
                          preprocess=PreprocessConfig(**vars(base.preprocess)), models={"onnx_fp32": onnx_path})
    rec = tmp_path / "rec"
    assert main(["run", "--model", str(bundle.root), "--source", "sim://?realtime=0", "--frames", "3",
                 "--record", str(rec), "--threads", "1", "--quiet"]) == 0
    assert "engine ONNX Runtime" in capsys.readouterr().err
    prep = Preprocessor(bundle.preprocess, bundle.root)
    wiener = WienerFilter(psf, geometry, 1e-3)
    for m in sorted(rec.glob("0*.json")):
        meta = json.loads(m.read_text())
        assert meta["engine"] == "onnx"
        x = np.load(rec / meta["recon"]["file"])
        ref = wiener(prep(read_recorded_raw(rec / meta["raw"]["file"])))
        assert np.abs(x - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
