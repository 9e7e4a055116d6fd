"""nsdd_edge.atomic: a written file appears complete or not at all, with normal permissions."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from nsdd_edge.atomic import (
    atomic_save_npy,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)


def leftovers(directory) -> list[str]:
    """Temporary files left beside the targets (``.NAME.XXXXXXXX.tmp``)."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_writes_bytes_text_json_and_npy(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01data")
    atomic_write_text(tmp_path / "b.txt", "héllo\n")
    atomic_write_json(tmp_path / "c.json", {"b": 1, "a": [1.5, None]}, sort_keys=True)
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    atomic_save_npy(tmp_path / "d.npy", a)
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01data"
    assert (tmp_path / "b.txt").read_bytes() == "héllo\n".encode()
    assert (tmp_path / "c.json").read_text() == json.dumps({"a": [1.5, None], "b": 1}, indent=2) + "\n"
    back = np.load(tmp_path / "d.npy")
    assert back.dtype == a.dtype
    np.testing.assert_array_equal(back, a)
    assert leftovers(tmp_path) == []


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "model.bin"
    atomic_write_bytes(target, b"old content")

    def half_then_fail(f):
        f.write(b"new content, first half")
        f.flush()
        raise RuntimeError("writer crashed")

    with pytest.raises(RuntimeError, match="writer crashed"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_a_failed_first_write_leaves_nothing(tmp_path):
    def fail(f):
        f.write(b"partial")
        raise KeyboardInterrupt  # BaseException too: Ctrl-C mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "x.npy", fail)
    assert list(tmp_path.iterdir()) == []


def test_disk_full_propagates_as_oserror_enospc_and_cleans_up(tmp_path):
    target = tmp_path / "00000001.raw.png"
    atomic_write_bytes(target, b"frame 1")

    def disk_full(f):
        f.write(b"some bytes")
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    with pytest.raises(OSError) as info:
        atomic_write(target, disk_full)
    assert info.value.errno == errno.ENOSPC and type(info.value) is OSError
    assert target.read_bytes() == b"frame 1"
    assert leftovers(tmp_path) == []


def test_fsync_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "stats.json"
    atomic_write_text(target, "old")

    def failing_fsync(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="I/O error"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_parent_directories_are_created(tmp_path):
    target = tmp_path / "a" / "b" / "c" / "out.json"
    atomic_write_json(target, {"ok": True})
    assert json.loads(target.read_text()) == {"ok": True}


def test_permissions_are_0644_whatever_the_umask(tmp_path):
    old = os.umask(0o077)  # mkstemp alone would give 0600
    try:
        atomic_write_bytes(tmp_path / "f.bin", b"x")
        atomic_save_npy(tmp_path / "f.npy", np.zeros(3))
    finally:
        os.umask(old)
    for name in ("f.bin", "f.npy"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644


def test_mode_none_keeps_the_file_private(tmp_path):
    atomic_write(tmp_path / "secret", lambda f: f.write(b"k"), mode=None)
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600


def test_replaces_an_existing_file_and_callback_sees_a_temp_path(tmp_path):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"old")
    names = []

    def write(f):
        names.append(f.name)
        f.write(b"new")

    atomic_write(target, write)
    assert target.read_bytes() == b"new"
    tmp = os.path.basename(names[0])
    assert os.path.dirname(names[0]) == str(tmp_path)
    assert tmp.startswith(".out.onnx.") and tmp.endswith(".tmp")
    assert leftovers(tmp_path) == []


def test_nsdd_edge_atomic_does_not_import_torch():
    code = "import sys, nsdd_edge.atomic, nsdd_edge.telemetry; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
