"""Previews: the side-by-side frame (measurement | reconstruction [| ground truth of a simulated camera] +
live figures), an OpenCV window and an MJPEG-over-HTTP server.

HTTP routes: ``/`` (a small page), ``/stream.mjpg`` (``multipart/x-mixed-replace`` JPEG stream),
``/frame.jpg`` (latest frame), ``/stats.json`` (telemetry). Bound to 127.0.0.1 by default; on any
non-loopback address a token is required (``?token=…``, ``X-NSDD-Token: …`` or ``Authorization: Bearer …``).
A token that was not given is generated and written to a file of mode 0600 (never printed, never in an
answer: the page reads it from its own address). Each connection has a socket timeout
(:data:`CONNECTION_TIMEOUT_S`: a client that sends its request too slowly or stops reading the stream is
dropped) and at most :data:`MAX_CONNECTIONS` are served at once (more get ``503`` at once).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np

from nsdd_edge.atomic import atomic_write_bytes
from nsdd_edge.redact import redact_obj

BOUNDARY = "nsddframe"
CONNECTION_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 8


class PreviewError(RuntimeError):
    """A preview cannot start (no display, bad URL, port in use); the message says what to do."""


# ------------------------------------------------------------------------------------------------
# Composition
# ------------------------------------------------------------------------------------------------


def to_display(img: np.ndarray, *, autoscale: bool, percentile: float | None = None,
               gamma: float = 1.0) -> np.ndarray:
    """(C, H, W) float → (H, W, 3) uint8 BGR. ``autoscale`` divides by the frame's max (for measurements),
    otherwise values are clipped to [0, 1] (reconstructions). ``percentile``: divide instead by that percentile
    of the non-negative part (a view of real reconstructions robust to a few hot pixels); ``gamma`` < 1 lifts
    faint structure (PSF caustics)."""
    a = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if a.ndim == 2:
        a = a[None]
    if percentile is not None:
        a = np.maximum(a, 0.0)
        m = float(np.percentile(a, percentile))
        a = a / m if m > 0 else a
    elif autoscale:
        m = float(a.max())
        a = a / m if m > 0 else a
    a = np.clip(a, 0.0, 1.0)
    if gamma != 1.0:
        a = a ** gamma
    u8 = np.rint(a * 255.0).astype(np.uint8)
    if u8.shape[0] == 1:
        u8 = np.repeat(u8, 3, axis=0)
    return np.ascontiguousarray(np.moveaxis(u8[:3][::-1], 0, -1))  # RGB -> BGR


def compose(measurement: np.ndarray, reconstruction: np.ndarray | None, lines: list[str] = (),
            *, height: int = 256, truth: np.ndarray | None = None) -> np.ndarray:
    """Side-by-side BGR uint8 image: measurement | reconstruction [| ground truth] (each ``height`` pixels
    tall, nearest scaling), with a text bar of ``lines`` underneath. ``truth``: the simulated scene (a
    ``sim://`` frame's ``truth``), shown as a third panel."""
    import cv2

    panels = [to_display(measurement, autoscale=True)]
    panels.append(to_display(reconstruction, autoscale=False) if reconstruction is not None
                  else np.zeros_like(panels[0]))
    labels = ["measurement y", "reconstruction"]
    if truth is not None:
        panels.append(to_display(truth, autoscale=False))
        labels.append("ground truth (sim)")
    scaled = []
    for p in panels:
        h, w = p.shape[:2]
        new_w = max(1, int(round(w * height / h)))
        interp = cv2.INTER_NEAREST if height >= h else cv2.INTER_AREA
        scaled.append(cv2.resize(p, (new_w, height), interpolation=interp))
    gap = np.full((height, 4, 3), 40, np.uint8)
    top = np.concatenate([part for s in scaled for part in (gap, s)][1:], axis=1)
    x0 = 0
    for lab, s in zip(labels, scaled):
        (tw, th), _ = cv2.getTextSize(lab, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
        cv2.rectangle(top, (x0, 0), (x0 + tw + 10, th + 10), (24, 24, 24), -1)
        cv2.putText(top, lab, (x0 + 5, th + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        x0 += s.shape[1] + gap.shape[1]
    bar = np.full((18 * max(1, len(lines)) + 8, top.shape[1], 3), 24, np.uint8)
    for i, text in enumerate(lines):
        cv2.putText(bar, text, (6, 18 + 18 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (220, 255, 220), 1, cv2.LINE_AA)
    return np.concatenate([top, bar], axis=0)


def encode_jpeg(bgr: np.ndarray, quality: int = 85) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise PreviewError("OpenCV could not encode a JPEG")
    return buf.tobytes()


class Preview:
    """Output interface: ``show(bgr)`` (must not block for long), ``close()``."""

    def show(self, bgr: np.ndarray) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------
# OpenCV window
# ------------------------------------------------------------------------------------------------


def display_available(env: dict | None = None, platform: str = sys.platform) -> tuple[bool, str]:
    """Whether a window can open: on Linux a ``DISPLAY`` or ``WAYLAND_DISPLAY`` must be set."""
    env = os.environ if env is None else env
    if platform.startswith("linux") and not (env.get("DISPLAY") or env.get("WAYLAND_DISPLAY")):
        return False, "no display (DISPLAY and WAYLAND_DISPLAY are not set)"
    return True, "display available"


class WindowPreview(Preview):
    """An OpenCV HighGUI window; closing it (or pressing q / Esc) asks the loop to stop via ``on_quit``."""

    def __init__(self, title: str = "nsdd-edge", on_quit: Callable[[], None] | None = None):
        ok, why = display_available()
        if not ok:
            raise PreviewError(f"--preview window: {why}; use --preview http://127.0.0.1:8080 or --preview none")
        import cv2

        self.cv2, self.title, self.on_quit = cv2, title, on_quit
        try:
            cv2.namedWindow(title, cv2.WINDOW_AUTOSIZE)
        except cv2.error as exc:
            raise PreviewError(f"--preview window: this OpenCV build has no GUI support ({exc.msg.strip()}); "
                               "install opencv-python (not -headless) or use --preview http://127.0.0.1:8080") from exc

    def show(self, bgr: np.ndarray) -> None:
        self.cv2.imshow(self.title, bgr)
        key = self.cv2.waitKey(1) & 0xFF
        closed = self.cv2.getWindowProperty(self.title, self.cv2.WND_PROP_VISIBLE) < 1
        if (key in (ord("q"), 27) or closed) and self.on_quit:
            self.on_quit()

    def describe(self) -> str:
        return f"OpenCV window {self.title!r}"

    def close(self) -> None:
        try:
            self.cv2.destroyWindow(self.title)
        except Exception:
            pass


# ------------------------------------------------------------------------------------------------
# MJPEG over HTTP
# ------------------------------------------------------------------------------------------------

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>nsdd-edge live</title>
<style>body{background:#111;color:#ddd;font:14px sans-serif;margin:16px}
img{display:block;max-width:100%;image-rendering:pixelated;border:1px solid #333}
#stats{font-family:monospace;white-space:pre;margin-top:8px}</style></head>
<body><h3>nsdd-edge &mdash; measurement | reconstruction</h3>
<img id="live" alt="live preview">
<div id="stats">waiting for figures&hellip;</div>
<script>
// the access token (if any) is taken from this page's own address: the server never writes it into an answer
const token = new URLSearchParams(location.search).get("token");
const query = token ? "?token=" + encodeURIComponent(token) : "";
document.getElementById("live").src = "/stream.mjpg" + query;
async function poll() {
  try {
    const r = await fetch("/stats.json" + query);
    const s = await r.json();
    const st = Object.entries(s.stages || {}).filter(([k, v]) => v.mean_ms !== null)
      .map(([k, v]) => k + " " + v.mean_ms.toFixed(1) + " ms").join("  ");
    document.getElementById("stats").textContent =
      (s.recent_fps || s.fps).toFixed(1) + " fps | in " + s.frames_in + " out " + s.frames_out +
      " dropped " + s.dropped + " rejected " + s.rejected + "\\n" + st;
  } catch (e) {}
  setTimeout(poll, 1000);
}
poll();
</script></body></html>
"""


def parse_http_url(url: str) -> tuple[str, int]:
    """``http://HOST:PORT`` → ``(host, port)`` (port 0 = any free port)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise PreviewError(f"--preview {url!r}: expected http://HOST:PORT, e.g. http://127.0.0.1:8080")
    try:
        port = parts.port if parts.port is not None else 8080
    except ValueError as exc:
        raise PreviewError(f"--preview {url!r}: bad port ({exc})") from None
    return parts.hostname, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HttpPreview(Preview):
    """Serve the latest frame as MJPEG and the telemetry as JSON; see the module docstring.

    ``stats`` is called for ``/stats.json``. ``token``: required on non-loopback hosts (generated and
    printed if not given); optional on loopback (if given, enforced there too).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8080, *, token: str | None = None,
                 token_file: str | os.PathLike | None = None, stats: Callable[[], dict] | None = None,
                 quality: int = 85, log=print, max_connections: int = MAX_CONNECTIONS,
                 timeout: float = CONNECTION_TIMEOUT_S):
        self.token_file: Path | None = None
        if not is_loopback(host) and not token:
            if token_file is None:
                raise PreviewError(f"--preview http://{host}:{port}: not loopback, so a token is required: give "
                                   "--token (or $NSDD_PREVIEW_TOKEN) or a --token-file to write a generated one to")
            token = secrets.token_urlsafe(16)
            self.token_generated = True
            self.token_file = Path(token_file)
            try:
                atomic_write_bytes(self.token_file, (token + "\n").encode(), mode=0o600)
            except OSError as exc:
                raise PreviewError(f"--token-file {self.token_file}: cannot write the generated token "
                                   f"({exc.strerror or exc})") from None
        else:
            self.token_generated = False
        self.token = token
        self.max_connections, self.timeout = int(max_connections), float(timeout)
        self.stats = stats or (dict)
        self.quality = quality
        self._cond = threading.Condition()
        self._bgr: np.ndarray | None = None
        self._jpeg: bytes | None = None
        self._jpeg_seq = -1
        self._encode_lock = threading.Lock()
        self._seq = 0
        self._closed = False
        handler = self._make_handler()
        try:
            self.server = _CappedHTTPServer((host, port), handler, self.max_connections)
        except OSError as exc:
            raise PreviewError(f"--preview http://{host}:{port}: cannot listen ({exc.strerror or exc})") from exc
        self.host, self.port = host, self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="nsdd-http-preview", daemon=True)
        self._thread.start()
        if self.token_generated:
            log(f"HTTP preview on {host} (not loopback): access token generated and written to {self.token_file} "
                f"(mode 0600); open {self.url}")

    @property
    def url(self) -> str:
        """The page's address, with ``?token=***`` in place of the token (never printed)."""
        shown = self.host if self.host not in ("0.0.0.0", "::") else socket.gethostname()
        return f"http://{shown}:{self.port}/" + ("?token=***" if self.token else "")

    def describe(self) -> str:
        return f"MJPEG over HTTP at {self.url}"

    def show(self, bgr: np.ndarray) -> None:
        """Publish a frame. JPEG encoding happens lazily in the HTTP threads (once per frame, only if someone
        is watching), so the reconstruction thread pays only for a reference swap."""
        with self._cond:
            self._bgr = bgr
            self._seq += 1
            self._cond.notify_all()

    def wait_frame(self, after: int, timeout: float) -> tuple[int, bytes | None]:
        """The newest frame's sequence number and JPEG, waiting up to ``timeout`` for one newer than ``after``."""
        with self._cond:
            self._cond.wait_for(lambda: self._seq > after or self._closed, timeout=timeout)
            seq, bgr = self._seq, self._bgr
        if bgr is None:
            return seq, None
        with self._encode_lock:  # one encoding per frame, shared by all viewers
            if self._jpeg_seq != seq:
                self._jpeg, self._jpeg_seq = encode_jpeg(bgr, self.quality), seq
            return seq, self._jpeg

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)

    def _authorized(self, path: str, headers) -> bool:
        if not self.token:
            return True
        query = parse_qs(urlsplit(path).query)
        offered = (query.get("token", [None])[0] or headers.get("X-NSDD-Token")
                   or (headers.get("Authorization") or "").removeprefix("Bearer ").strip() or "")
        return hmac.compare_digest(offered.encode(), self.token.encode())

    def _make_handler(self):
        preview = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "nsdd-edge"
            protocol_version = "HTTP/1.0"
            timeout = preview.timeout  # socket timeout of every read and write on the connection

            def log_message(self, fmt, *args):  # keep the console for the live figures
                pass

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                route = urlsplit(self.path).path
                if not preview._authorized(self.path, self.headers):
                    self._send(403, "text/plain; charset=utf-8",
                               b"403: this preview needs its access token (?token=... or X-NSDD-Token header)\n")
                    return
                if route in ("/", "/index.html"):
                    self._send(200, "text/html; charset=utf-8", PAGE.encode())
                elif route == "/stats.json":
                    self._send(200, "application/json", json.dumps(redact_obj(preview.stats())).encode())
                elif route == "/frame.jpg":
                    _, jpeg = preview.wait_frame(0, timeout=5.0)
                    if jpeg is None:
                        self._send(503, "text/plain; charset=utf-8", b"no frame yet\n")
                    else:
                        self._send(200, "image/jpeg", jpeg)
                elif route == "/stream.mjpg":
                    self._stream()
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found\n")

            def _stream(self):
                self.send_response(200)
                self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                seq = 0
                try:
                    # each part is followed at once by the next boundary, so a browser shows it without
                    # waiting for the next frame
                    self.wfile.write(f"--{BOUNDARY}\r\n".encode())
                    while not preview._closed:
                        new_seq, jpeg = preview.wait_frame(seq, timeout=1.0)
                        if jpeg is None:
                            continue
                        # no new frame for a second (stalled camera, paused loop): repeat the last one, which
                        # also lets browsers that show a part only when the next one starts display it
                        seq = new_seq
                        self.wfile.write(f"Content-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode()
                                         + jpeg + f"\r\n--{BOUNDARY}\r\n".encode())
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
                    return  # gone, or stopped reading for longer than the timeout

        return Handler


class _CappedHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that serves at most ``max_connections`` connections at once: one more is answered
    ``503`` and closed at once (from the accepting thread, with a short timeout), never queued."""

    daemon_threads = True

    def __init__(self, address, handler, max_connections: int):
        self._slots = threading.BoundedSemaphore(max_connections)
        self.refused = 0
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                                b"Content-Length: 25\r\n\r\ntoo many connections, retry")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def open_preview(spec: str | None, *, token: str | None = None, token_file: str | os.PathLike | None = None,
                 stats: Callable[[], dict] | None = None, on_quit: Callable[[], None] | None = None,
                 log=print) -> Preview | None:
    """``none``/None → no preview; ``window`` → :class:`WindowPreview`; ``http://HOST:PORT`` → :class:`HttpPreview`."""
    if spec in (None, "", "none"):
        return None
    if spec == "window":
        return WindowPreview(on_quit=on_quit)
    if spec.startswith("http://"):
        host, port = parse_http_url(spec)
        return HttpPreview(host, port, token=token, token_file=token_file, stats=stats, log=log)
    raise PreviewError(f"--preview {spec!r}: use window, http://HOST:PORT or none")


def wait_port(host: str, port: int, timeout: float = 5.0) -> bool:
    """True once ``host:port`` accepts connections (for tests and scripts)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False
