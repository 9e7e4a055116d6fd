"""Fault tests (issue 15): a full disk that also holds the stats and the snapshot, an unreadable frame in a
folder, serve-camera under unauthenticated clients that trickle or lie about sizes while a real client reads,
and the tcp:// client against a capture host that lies. Everything on loopback and in temporary directories;
outcomes are decided by events and byte counts, the one rate comparison is against a paced (25 fps) camera."""

from __future__ import annotations

import builtins
import errno
import json
import re
import socket
import struct
import threading
import time
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest

import nsdd_edge.atomic
from nsdd_edge import framing
from nsdd_edge.bundle import PreprocessConfig, load_bundle, write_bundle
from nsdd_edge.cli import main
from nsdd_edge.commands.run import default_bundle_path, open_camera
from nsdd_edge.commands.serve_camera import CameraServer
from nsdd_edge.optics import LenslessGeometry
from nsdd_edge.recorder import read_recorded_raw
from nsdd_edge.sources import FrameUnreadable, SourceError, SourceStalled, open_source


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


# ------------------------------------------------------------------------------------------------
# Disk full, with the stats and the snapshot on the same disk
# ------------------------------------------------------------------------------------------------


class CappedDisk:
    """A disk of ``capacity`` bytes under ``root``: every file opened for writing there by
    :func:`nsdd_edge.atomic.atomic_write` (recorder, stats, snapshot) draws on the same budget, and a write
    that does not fit raises ``OSError(ENOSPC)`` like a full file system."""

    def __init__(self, root: Path, capacity: int):
        self.root, self.capacity, self.used = root.resolve(), capacity, 0
        self.lock = threading.Lock()
        self.refused = 0

    def open(self, file, mode="r", *args, **kwargs):
        f = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115 - a stand-in for open(): the caller closes it
        if "w" in mode and Path(file).resolve().is_relative_to(self.root):
            return _CappedFile(f, self)
        return f


class _CappedFile:
    def __init__(self, f, disk: CappedDisk):
        self._f, self._disk = f, disk

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        with self._disk.lock:
            if self._disk.used + n > self._disk.capacity:
                self._disk.refused += 1
                raise OSError(errno.ENOSPC, "No space left on device", self._f.name)
            self._disk.used += n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.parametrize("policy", ["stop", "continue"])
def test_disk_full_with_stats_and_snapshot_on_the_same_disk(tmp_path, capsys, monkeypatch, policy):
    disk_root = tmp_path / "disk"
    disk_root.mkdir()
    disk = CappedDisk(disk_root, capacity=1_500_000)  # about four recorded 128x128 frames
    monkeypatch.setattr(nsdd_edge.atomic, "open", disk.open, raising=False)
    rc = main(["run", "--source", "sim://?realtime=0", "--engine", "wiener", "--quiet",
               "--frames", "0" if policy == "stop" else "12", "--on-record-error", policy,
               "--record", str(disk_root / "rec"), "--stats", str(disk_root / "stats.json"),
               "--snapshot", str(disk_root / "preview.png")])
    err = capsys.readouterr().err
    assert rc == 3 and "Traceback" not in err and disk.refused >= 1
    assert "RECORDING STOPPED" in err and "disk full" in err and "intact" in err  # said despite --quiet
    assert re.search(r"could not write the (stats|snapshot) file .*No space left on device\); not fatal", err)
    m = re.search(r"(\d+) frames reconstructed, .* (\d+) recorded, (\d+) NOT recorded", err)
    assert m, err
    out, recorded, unrecorded = (int(v) for v in m.groups())
    if policy == "continue":
        assert out == 12 and "reconstructing WITHOUT recording" in err
    else:
        assert "stopping the run" in err and "(recording stopped)" in err
    metas = sorted((disk_root / "rec").glob("0*.json"))
    assert len(metas) == recorded >= 1 and unrecorded >= 1
    for path in metas:  # what was recorded before the disk filled is complete and readable
        meta = json.loads(path.read_text())
        assert read_recorded_raw(disk_root / "rec" / meta["raw"]["file"]).shape == (128, 128, 3)
        assert np.load(disk_root / "rec" / meta["recon"]["file"]).shape == (3, 128, 128)
    assert not list(disk_root.rglob(".*.tmp"))  # no half-written file anywhere


# ------------------------------------------------------------------------------------------------
# An unreadable frame in a folder (and in sim://?images=)
# ------------------------------------------------------------------------------------------------


def test_bad_frame_in_a_folder_is_skipped_and_reported(tmp_path, capsys):
    bundle = load_bundle(default_bundle_path())
    cam = open_camera("sim://?realtime=0&seed=2", bundle)
    folder = tmp_path / "frames"
    folder.mkdir()
    raws = {}
    for i in range(6):
        path = folder / f"f{i:02d}.png"
        if i == 2:
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)  # a PNG signature, then garbage
            continue
        raws[i] = cam.raw_frame(i)
        assert cv2.imwrite(str(path), np.ascontiguousarray(raws[i][..., ::-1]))  # 16-bit RGB, written as BGR
    rec = tmp_path / "rec"
    rc = main(["run", "--model", str(bundle.root), "--source", f"file://{folder}", "--engine", "wiener", "--quiet",
               "--record", str(rec), "--stats", "stats.json", "--snapshot", ""])
    err = capsys.readouterr().err
    assert rc == 0 and "Traceback" not in err
    assert "skipped an unreadable frame" in err and "f02.png" in err
    stats = json.loads(Path("stats.json").read_text())
    assert stats["unreadable"] == 1 and stats["frames_out"] == stats["recorded"] == 5 and stats["dropped"] == 0
    positions = []
    for path in sorted(rec.glob("0*.json")):  # each good frame once, in order: no rewind, nothing repeated
        meta = json.loads(path.read_text())
        position = meta["source_meta"]["position"]
        positions.append(position)
        np.testing.assert_array_equal(read_recorded_raw(rec / meta["raw"]["file"]), raws[position])
    assert positions == [0, 1, 3, 4, 5]
    # without --record a folder is still processed losslessly (it is not a live camera)
    assert main(["run", "--model", str(bundle.root), "--source", f"file://{folder}", "--engine", "wiener",
                 "--quiet", "--stats", "stats2.json", "--snapshot", ""]) == 0
    stats = json.loads(Path("stats2.json").read_text())
    assert stats["frames_out"] == 5 and stats["dropped"] == 0 and stats["info"]["lossless"] is True


def test_sim_with_a_broken_image_goes_on_with_the_others(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a.png", "c.png"):
        cv2.imwrite(str(folder / name), (rng.random((20, 20, 3)) * 255).astype(np.uint8))
    (folder / "b.png").write_bytes(b"not an image")
    src = open_source(f"sim://?realtime=0&size=16&images={folder}&motion=static&hold=0.04&fps=25")
    delivered, skipped = [], []
    for _ in range(6):
        try:
            delivered.append(src.read(1.0).index)
        except FrameUnreadable as exc:
            skipped.append(str(exc))
    src.close()
    assert len(skipped) == 1 and "b.png" in skipped[0]
    assert len(delivered) == 5 and delivered == sorted(set(delivered)) and max(delivered) == 5  # no rewind


# ------------------------------------------------------------------------------------------------
# serve-camera: unauthenticated clients that trickle or lie, while a real client reads
# ------------------------------------------------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (4096 / 2**20)


@pytest.fixture()
def paced_server():
    source = open_source("sim://?fps=25&size=16&noise=0&photons=0")
    server = CameraServer(source, "127.0.0.1", 0, token="tok", log=lambda m: None, handshake_timeout=1.0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_s": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    thread.join(5)
    source.close()


def _frame_rate(client, n: int) -> float:
    client.read(timeout=5)  # settle
    t0 = time.monotonic()
    for _ in range(n):
        client.read(timeout=5)
    return n / (time.monotonic() - t0)


def test_serve_camera_keeps_serving_under_trickling_and_oversized_hellos(paced_server):
    port = paced_server.address[1]
    client = open_source(f"tcp://127.0.0.1:{port}?token=tok")
    baseline = _frame_rate(client, 30)
    stop = threading.Event()
    dropped = {"n": 0}

    def trickle():  # one byte of a hello every 0.1 s: never completes; reconnects when dropped
        hello = framing.pack_message({"type": "hello", "version": 1, "token": "guess"})
        data = b"".join(bytes(c) for c in hello)
        while not stop.is_set():
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                try:
                    for b in data:
                        if stop.is_set():
                            return
                        s.sendall(bytes([b]))
                        time.sleep(0.1)
                    s.recv(1)
                except OSError:
                    pass
                dropped["n"] += 1

    def oversized():  # hellos announcing a 1 GiB payload or a 16 MiB header, then nothing
        while not stop.is_set():
            for head_len, payload_len in ((40, 1 << 30), (16 << 20, 0)):
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(framing.PREFIX.pack(framing.MAGIC, framing.VERSION, head_len, payload_len))
                    s.settimeout(5)
                    try:
                        assert s.recv(1) == b""  # closed by the server at once, nothing read or allocated
                    except OSError:
                        pass
            time.sleep(0.05)

    rss0 = _rss_mb()
    attackers = [threading.Thread(target=trickle, daemon=True) for _ in range(6)]
    attackers.append(threading.Thread(target=oversized, daemon=True))
    for t in attackers:
        t.start()
    try:
        time.sleep(0.3)
        under_attack = _frame_rate(client, 30)
        deadline = time.monotonic() + 10
        while dropped["n"] < 6 and time.monotonic() < deadline:  # every trickler hits the handshake deadline
            time.sleep(0.1)
    finally:
        stop.set()
        for t in attackers:
            t.join(10)
    client.close()
    assert under_attack >= 0.8 * baseline, (baseline, under_attack)
    assert dropped["n"] >= 6 and paced_server.refused >= 8
    assert _rss_mb() - rss0 < 200  # a 1 GiB hello is refused before anything is allocated


def test_one_authorised_reader_at_a_time(paced_server):
    port = paced_server.address[1]
    first = open_source(f"tcp://127.0.0.1:{port}?token=tok")
    first.read(timeout=5)
    second = open_source(f"tcp://127.0.0.1:{port}?token=tok&reconnect=0")
    with pytest.raises(SourceError, match="busy"):
        second.read(timeout=5)
    with pytest.raises(SourceError, match="authentication failed"):
        open_source(f"tcp://127.0.0.1:{port}?token=wrong").read(timeout=5)
    first.close()  # says bye: the camera is free again
    deadline = time.monotonic() + 5
    while True:
        try:
            assert second.read(timeout=5).data.shape == (16, 16, 3)
            break
        except SourceError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    second.close()


def test_serve_camera_off_loopback_needs_a_token(capsys, monkeypatch):
    monkeypatch.delenv("NSDD_CAMERA_TOKEN", raising=False)
    source = open_source("sim://?size=16")
    with pytest.raises(SourceError, match="token is required"):
        CameraServer(source, "0.0.0.0", 0, log=lambda m: None)
    assert main(["serve-camera", "--source", "sim://?size=16", "--bind", "0.0.0.0:0"]) == 2
    assert "token is required" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# The tcp:// client against a capture host that lies
# ------------------------------------------------------------------------------------------------


class LyingHost:
    """Answers hello with welcome, then every read with ``reply(sock)`` (raw bytes it chooses to send)."""

    def __init__(self, reply, welcome: bool = True):
        self.reply, self.welcome = reply, welcome
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self.listener.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                try:
                    conn.settimeout(5)
                    framing.recv_message(conn)  # hello
                    if not self.welcome:
                        self.stop.wait(10)
                        continue
                    framing.send_message(conn, {"type": "welcome", "source": {}})
                    framing.recv_message(conn)  # read
                    self.reply(conn, self.stop)
                    self.stop.wait(10)
                except OSError:
                    pass

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.listener.close()


def _frame_bytes(shape, dtype="uint16", payload_len=None, payload=b"") -> bytes:
    head = json.dumps({"type": "frame", "shape": list(shape), "dtype": dtype, "index": 0, "timestamp": 0.0,
                       "meta": {}}).encode()
    n = len(payload) if payload_len is None else payload_len
    return framing.PREFIX.pack(framing.MAGIC, framing.VERSION, len(head), n) + head + payload


@pytest.mark.parametrize("case", ["length_lie", "over_protocol_limit", "over_client_limit", "trickle", "silent"])
def test_tcp_client_against_a_lying_host(case):
    good = np.arange(16, dtype=np.uint16).reshape(4, 4)
    replies = {
        # a 4x4 frame that announces a 1 GiB payload
        "length_lie": lambda c, stop: c.sendall(_frame_bytes((4, 4), payload_len=1 << 30)),
        # 100000x100000 uint16: more than the protocol's 1 GiB
        "over_protocol_limit": lambda c, stop: c.sendall(_frame_bytes((100000, 100000), payload_len=2 * 10**10)),
        # 20000x20000 uint16 = 800 MB, consistent with its header but above the client's 256 MiB
        "over_client_limit": lambda c, stop: c.sendall(_frame_bytes((20000, 20000), payload_len=800_000_000)),
        # a valid frame, one byte every 0.2 s
        "trickle": lambda c, stop: [c.sendall(bytes([b])) or stop.wait(0.2)
                                    for b in _frame_bytes((4, 4), payload=good.tobytes()) if not stop.is_set()],
        "silent": None,
    }
    host = LyingHost(replies[case], welcome=case != "silent")
    client = open_source(f"tcp://127.0.0.1:{host.port}?reconnect=0&connect_timeout=1")
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(SourceError) as err:
            client.read(timeout=0.3)
        elapsed = time.monotonic() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        client.close()
        host.close()
    assert peak < 16 << 20, f"the client allocated {peak} bytes for a lie"
    assert elapsed < 5.0  # read timeout 0.3 s + 2 s grace, or connect_timeout 1 s: never held longer
    message = str(err.value)
    expected = {"length_lie": "implies 32", "over_protocol_limit": "too large", "over_client_limit": "more than",
                "trickle": "", "silent": "handshake"}[case]
    assert expected in message
    if case == "trickle":
        assert isinstance(err.value, SourceStalled)


def test_tcp_client_reads_an_honest_frame_after_all():
    good = np.arange(12, dtype=np.uint16).reshape(3, 4)
    host = LyingHost(lambda c, stop: c.sendall(_frame_bytes((3, 4), payload=good.astype("<u2").tobytes())))
    client = open_source(f"tcp://127.0.0.1:{host.port}?reconnect=0")
    try:
        np.testing.assert_array_equal(client.read(timeout=2).data, good)
    finally:
        client.close()
        host.close()
    assert struct.calcsize(">4sB3xIQ") == framing.PREFIX.size


# ------------------------------------------------------------------------------------------------
# Secrets, and preprocessing that cannot fit the camera
# ------------------------------------------------------------------------------------------------


def test_tokens_never_reach_stats_session_files_or_the_console(tmp_path, capsys, monkeypatch):
    camera_token, preview_token = "cam-SECRET-7f3a", "view-SECRET-91bc"
    bundle = load_bundle(default_bundle_path())
    stack = np.stack([open_camera("sim://?realtime=0", bundle).raw_frame(i) for i in range(3)])
    np.save(tmp_path / "stack.npy", stack)
    served = open_source(f"file://{tmp_path / 'stack.npy'}")
    server = CameraServer(served, "127.0.0.1", 0, token=camera_token, log=lambda m: None)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_s": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setattr("sys.argv", ["nsdd-edge", "run", "--token", preview_token])
    try:
        rc = main(["run", "--source", f"tcp://127.0.0.1:{server.address[1]}?token={camera_token}", "--engine",
                   "wiener", "--frames", "3", "--record", "rec", "--stats", "stats.json", "--snapshot", "",
                   "--preview", "http://127.0.0.1:0", "--token", preview_token])
    finally:
        server.shutdown()
        thread.join(5)
        served.close()
    err = capsys.readouterr().err
    assert rc == 0, err
    session = Path("rec/session.json")
    assert (session.stat().st_mode & 0o777) == 0o600
    assert "token=***" in json.loads(session.read_text())["source"]
    texts = [err] + [p.read_text() for p in [Path("stats.json"), *Path("rec").glob("*.json")]]
    for text in texts:
        assert camera_token not in text and preview_token not in text


def test_preprocessing_that_cannot_fit_the_camera_is_a_clear_error(tmp_path, capsys):
    base = load_bundle(default_bundle_path())
    small = write_bundle(tmp_path / "b", psf=base.psf[:, 56:72, 56:72].copy(), lam=1e-2, channels=3,
                         geometry=LenslessGeometry.make("circular", (16, 16)),
                         preprocess=PreprocessConfig(**{**vars(base.preprocess), "crop": [4, 4, 16, 16]}))
    np.save(tmp_path / "frames.npy", np.full((2, 12, 12, 3), 1000, np.uint16))  # smaller than the crop
    rc = main(["run", "--model", str(small.root), "--source", f"file://{tmp_path / 'frames.npy'}", "--quiet",
               "--snapshot", "", "--stats", ""])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "preprocessing cannot handle the frames" in err and "crop [4, 4, 16, 16] does not fit" in err
