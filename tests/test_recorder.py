"""Recorder: lossless raw + reconstruction + metadata, atomic files, disk full (ENOSPC) handling."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from nsdd_edge.atomic import atomic_write_bytes
from nsdd_edge.recorder import DiskFull, Recorder, RecorderError, read_recorded_raw


def frames(rng):
    return [rng.integers(0, 4096, (24, 32), dtype=np.uint16),           # 12-bit mono/Bayer counts
            rng.integers(0, 256, (24, 32, 3), dtype=np.uint8),           # RGB 8-bit
            rng.integers(0, 65536, (24, 32, 3), dtype=np.uint16),        # RGB 16-bit
            rng.normal(0, 1, (3, 24, 32)).astype(np.float32)]            # float data -> .npy


def no_temp_files(root: Path) -> bool:
    return not [p for p in root.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def test_records_losslessly_with_metadata(tmp_path):
    rng = np.random.default_rng(0)
    rec = Recorder(tmp_path / "rec", session={"bundle": "b", "engine": "wiener"})
    raws = frames(rng)
    recons = [rng.random((3, 24, 32), dtype=np.float32) for _ in raws]
    for i, (raw, x) in enumerate(zip(raws, recons)):
        rec.record(i, raw, x, {"bundle_sha256": "abc", "engine": "wiener", "source_meta": {"gain": 2.0}})
    rec.record(9, raws[0], None, {"rejected": "NaN values"})
    root = rec.root
    assert rec.recorded == 5 and no_temp_files(root)
    assert json.loads((root / "session.json").read_text())["bundle"] == "b"
    for i, (raw, x) in enumerate(zip(raws, recons)):
        meta = json.loads((root / f"{i:08d}.json").read_text())
        assert meta["frame_index"] == i and meta["engine"] == "wiener" and meta["source_meta"] == {"gain": 2.0}
        back = read_recorded_raw(root / meta["raw"]["file"])
        assert back.dtype == raw.dtype and back.shape == raw.shape
        np.testing.assert_array_equal(back, raw)
        np.testing.assert_array_equal(np.load(root / meta["recon"]["file"]), x)
        assert (root / meta["recon"]["view"]).stat().st_size > 0
    assert (root / "00000000.raw.png").exists() and (root / "00000003.raw.npy").exists()
    rejected = json.loads((root / "00000004.json").read_text())
    assert rejected["recon"] is None and rejected["rejected"] == "NaN values" and rejected["frame_index"] == 9


def test_a_second_recording_never_overwrites_the_first(tmp_path):
    raw = np.arange(12, dtype=np.uint16).reshape(3, 4)
    first = Recorder(tmp_path / "rec", session={"run": 1})
    for i in range(3):
        first.record(i, raw, None, {})
    second = Recorder(tmp_path / "rec", session={"run": 2})  # e.g. the camera restarted its frame count
    for i in range(2):
        second.record(i, raw + 1, None, {})
    root = tmp_path / "rec"
    assert json.loads((root / "session.json").read_text())["run"] == 1
    assert json.loads((root / "session-2.json").read_text())["first_sequence"] == 3
    assert [json.loads((root / f"{k:08d}.json").read_text())["frame_index"] for k in range(5)] == [0, 1, 2, 0, 1]
    np.testing.assert_array_equal(read_recorded_raw(root / "00000002.raw.png"), raw)
    np.testing.assert_array_equal(read_recorded_raw(root / "00000003.raw.png"), raw + 1)


def test_atomic_write_never_leaves_a_half_file(tmp_path, monkeypatch):
    target = tmp_path / "stats.json"
    atomic_write_bytes(target, b"old content")

    def failing_fsync(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new content that never lands")
    assert target.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]


def test_disk_full_stops_recording_and_keeps_what_was_written(tmp_path):
    writes = {"n": 0}

    def writer(path: Path, data: bytes, **kw) -> None:
        writes["n"] += 1
        if writes["n"] > 1 + 4 * 2 + 1:  # session + two full frames + the third frame's raw
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        atomic_write_bytes(path, data, **kw)

    rec = Recorder(tmp_path / "rec", writer=writer)
    raw = np.arange(24 * 32, dtype=np.uint16).reshape(24, 32)
    x = np.zeros((1, 24, 32), np.float32)
    rec.record(0, raw, x, {})
    rec.record(1, raw, x, {})
    with pytest.raises(DiskFull, match="disk full.*2 frame\\(s\\) already recorded.*intact"):
        rec.record(2, raw, x, {})
    assert not rec.active and "disk full" in rec.stopped_reason
    with pytest.raises(RecorderError, match="disk full"):
        rec.record(3, raw, x, {})
    names = sorted(p.name for p in rec.root.iterdir())
    assert "00000000.json" in names and "00000001.json" in names and "00000002.json" not in names
    np.testing.assert_array_equal(read_recorded_raw(rec.root / "00000001.raw.png"), raw)


def test_bad_record_directory(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RecorderError, match="not a directory"):
        Recorder(tmp_path / "afile")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root to mount a tmpfs")
def test_real_full_filesystem(tmp_path):
    """A real 64 KiB tmpfs: the kernel's ENOSPC, not an injected one."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mount -t tmpfs not permitted here")
    try:
        rec = Recorder(mnt / "rec")
        rng = np.random.default_rng(0)
        raw = rng.integers(0, 65536, (64, 64), dtype=np.uint16)  # incompressible: ~8 KiB PNG
        x = rng.random((1, 64, 64), dtype=np.float32)  # 16 KiB .npy
        written = 0
        with pytest.raises(DiskFull):
            for i in range(100):
                rec.record(i, raw, x, {})
                written += 1
        assert 0 < written < 100 and rec.recorded == written
        assert no_temp_files(rec.root)
        for i in range(written):
            meta = json.loads((rec.root / f"{i:08d}.json").read_text())
            np.testing.assert_array_equal(read_recorded_raw(rec.root / meta["raw"]["file"]), raw)
            np.testing.assert_array_equal(np.load(rec.root / meta["recon"]["file"]), x)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
