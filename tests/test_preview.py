"""Previews: side-by-side composition, MJPEG over HTTP to a real client, token enforcement, headless Chromium."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from nsdd_edge.preview import (
    BOUNDARY,
    HttpPreview,
    PreviewError,
    WindowPreview,
    compose,
    display_available,
    is_loopback,
    open_preview,
    parse_http_url,
)


def test_compose_side_by_side():
    y = np.zeros((3, 32, 32), np.float32)
    y[0, 8:16, 8:16] = 500.0  # measurement in counts: autoscaled to full range
    x = np.zeros((3, 32, 32), np.float32)
    x[1] = 0.5
    img = compose(y, x, ["12.0 fps", "ms: infer 3.0"], height=64)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.shape[0] > 64 and img.shape[1] == 64 + 4 + 64
    left, right = img[:64, :64], img[:64, 68:]
    assert left[24:31, 20:30, 2].min() == 255  # red (BGR index 2), autoscaled
    assert abs(int(right[40, 40, 1]) - 128) <= 1 and right[40, 40, 0] == 0  # green 0.5, clipped view
    assert img[64:].std() > 0  # the text bar carries the figures


def test_url_parsing_and_loopback():
    assert parse_http_url("http://127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_http_url("http://0.0.0.0:0") == ("0.0.0.0", 0)
    with pytest.raises(PreviewError, match="expected http://HOST:PORT"):
        parse_http_url("ftp://x:1")
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    with pytest.raises(PreviewError, match="use window, http://HOST:PORT or none"):
        open_preview("vnc://x")
    assert open_preview("none") is None


def test_window_preview_without_display_fails_clearly(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert not display_available()[0]
    with pytest.raises(PreviewError, match="no display.*--preview http://127.0.0.1:8080"):
        WindowPreview()


def test_window_preview_with_headless_opencv_fails_clearly(monkeypatch):
    import cv2

    monkeypatch.setenv("DISPLAY", ":99")
    try:
        cv2.namedWindow("probe")
    except cv2.error:
        with pytest.raises(PreviewError, match="no GUI support.*--preview http://127.0.0.1:8080"):
            WindowPreview()
    else:  # an OpenCV with a GUI and a display: the window opens and closes
        cv2.destroyAllWindows()
        WindowPreview().close()


def _frame(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = rng.random((3, 48, 48), dtype=np.float32)
    return compose(y, 1.0 - y, [f"frame {seed}"], height=96)


def _read_multipart_jpeg(resp, max_bytes: int = 2_000_000) -> bytes:
    """Read one part of a multipart/x-mixed-replace stream; return the JPEG body."""
    buf = b""
    marker = f"--{BOUNDARY}".encode()
    while len(buf) < max_bytes:
        buf += resp.read1(65536) if hasattr(resp, "read1") else resp.read(4096)
        start = buf.find(marker)
        if start < 0:
            continue
        head_end = buf.find(b"\r\n\r\n", start)
        if head_end < 0:
            continue
        headers = buf[start:head_end].decode().split("\r\n")
        length = int(next(h.split(":")[1] for h in headers if h.lower().startswith("content-length")))
        body_start = head_end + 4
        while len(buf) < body_start + length:
            buf += resp.read1(65536)
        return buf[body_start : body_start + length]
    raise AssertionError("no JPEG part in the stream")


def _publisher(preview: HttpPreview, stop: threading.Event):
    def run():
        i = 0
        while not stop.is_set():
            preview.show(_frame(i))
            i += 1
            stop.wait(0.05)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_http_preview_serves_mjpeg_to_a_real_client():
    import cv2

    stats = {"fps": 12.5, "recent_fps": 12.0, "frames_in": 3, "frames_out": 3, "dropped": 0, "rejected": 0,
             "stages": {"infer": {"mean_ms": 4.0}}}
    preview = HttpPreview("127.0.0.1", 0, stats=lambda: stats)
    stop = threading.Event()
    pub = _publisher(preview, stop)
    base = f"http://127.0.0.1:{preview.port}"
    try:
        page = urllib.request.urlopen(base + "/", timeout=5).read().decode()
        assert "/stream.mjpg" in page and "/stats.json" in page
        assert json.loads(urllib.request.urlopen(base + "/stats.json", timeout=5).read())["fps"] == 12.5
        with urllib.request.urlopen(base + "/stream.mjpg", timeout=5) as resp:
            assert resp.headers["Content-Type"] == f"multipart/x-mixed-replace; boundary={BOUNDARY}"
            jpeg = _read_multipart_jpeg(resp)
            jpeg2 = _read_multipart_jpeg(resp)
        for data in (jpeg, jpeg2):
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            assert img is not None and img.shape[1] == 96 + 4 + 96
        single = urllib.request.urlopen(base + "/frame.jpg", timeout=5)
        assert single.headers["Content-Type"] == "image/jpeg" and single.read()[:2] == b"\xff\xd8"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "/nothing", timeout=5)
        assert err.value.code == 404
    finally:
        stop.set()
        pub.join()
        preview.close()


def test_token_required_when_bound_wider(tmp_path):
    logged = []
    with pytest.raises(PreviewError, match="token is required"):
        HttpPreview("0.0.0.0", 0, log=logged.append)  # nowhere to put a generated token: refused
    token_file = tmp_path / "preview.token"
    preview = HttpPreview("0.0.0.0", 0, token_file=token_file, log=logged.append)
    stop = threading.Event()
    pub = _publisher(preview, stop)
    base = f"http://127.0.0.1:{preview.port}"
    try:
        assert preview.token_generated and preview.token and len(preview.token) >= 16
        assert token_file.read_text().strip() == preview.token and (token_file.stat().st_mode & 0o777) == 0o600
        assert logged and str(token_file) in logged[0] and preview.token not in " ".join(logged)
        assert preview.token not in preview.describe()
        for path in ("/", "/stats.json", "/stream.mjpg", "/frame.jpg", "/stats.json?token=wrong"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(base + path, timeout=5)
            assert err.value.code == 403
        page = urllib.request.urlopen(f"{base}/?token={preview.token}", timeout=5).read().decode()
        assert "/stream.mjpg" in page and preview.token not in page  # the page takes it from its own address
        req = urllib.request.Request(base + "/frame.jpg", headers={"X-NSDD-Token": preview.token})
        assert urllib.request.urlopen(req, timeout=5).read()[:2] == b"\xff\xd8"
        req = urllib.request.Request(base + "/stats.json", headers={"Authorization": f"Bearer {preview.token}"})
        assert urllib.request.urlopen(req, timeout=5).status == 200
    finally:
        stop.set()
        pub.join()
        preview.close()
    explicit = HttpPreview("0.0.0.0", 0, token="s3cret-token-123", log=logged.append)
    try:
        assert not explicit.token_generated and explicit.token == "s3cret-token-123"
    finally:
        explicit.close()


def test_stats_answer_never_holds_a_token():
    stats = {"fps": 1.0, "info": {"source": "tcp://pi:5000?token=abc123secret", "token": "abc123secret"}}
    preview = HttpPreview("127.0.0.1", 0, stats=lambda: stats)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{preview.port}/stats.json", timeout=5).read().decode()
    finally:
        preview.close()
    assert "abc123secret" not in body and json.loads(body)["info"]["source"] == "tcp://pi:5000?token=***"


def test_half_open_connections_are_capped_and_timed_out():
    """Idle connections that never send a request: beyond the cap they are answered 503 at once, and each one
    is closed by the server after the connection timeout, so the preview serves again."""
    preview = HttpPreview("127.0.0.1", 0, max_connections=3, timeout=2.0)
    stop = threading.Event()
    pub = _publisher(preview, stop)
    idle = []
    try:
        for _ in range(3):
            idle.append(socket.create_connection(("127.0.0.1", preview.port), timeout=5))
        with socket.create_connection(("127.0.0.1", preview.port), timeout=5) as extra:
            assert extra.recv(100).startswith(b"HTTP/1.0 503")  # the cap is reached: refused at once
        assert preview.server.refused == 1
        for s in idle:  # the server hung up on each idle connection (timeout), nothing was answered
            s.settimeout(5)
            assert s.recv(100) == b""
        jpeg = urllib.request.urlopen(f"http://127.0.0.1:{preview.port}/frame.jpg", timeout=5).read()
        assert jpeg[:2] == b"\xff\xd8"
    finally:
        for s in idle:
            s.close()
        stop.set()
        pub.join()
        preview.close()


def test_port_in_use_is_a_clear_error():
    first = HttpPreview("127.0.0.1", 0)
    try:
        with pytest.raises(PreviewError, match="cannot listen"):
            HttpPreview("127.0.0.1", first.port)
    finally:
        first.close()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_page_renders_in_headless_chromium(tmp_path):
    import cv2

    preview = HttpPreview("127.0.0.1", 0, stats=lambda: {"fps": 1.0, "recent_fps": 1.0, "frames_in": 1,
                                                         "frames_out": 1, "dropped": 0, "rejected": 0,
                                                         "stages": {}})
    stop = threading.Event()
    pub = _publisher(preview, stop)
    shot = tmp_path / "page.png"
    try:
        with tempfile.TemporaryDirectory() as profile:
            cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--screenshot={shot}",
                   "--window-size=640,480", "--timeout=3000", f"http://127.0.0.1:{preview.port}/"]
            subprocess.run(cmd, capture_output=True, timeout=90)
    finally:
        stop.set()
        pub.join()
        preview.close()
    assert shot.exists(), "chromium wrote no screenshot"
    img = cv2.imread(str(shot), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[:2] == (480, 640)
    # not blank: the dark page plus the noisy frame (many distinct colours) is visible
    assert img.std() > 10
    region = img[60:300, 10:300].reshape(-1, 3)
    assert len(np.unique(region, axis=0)) > 500, "the MJPEG frame did not render"
