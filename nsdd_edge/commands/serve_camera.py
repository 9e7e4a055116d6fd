"""``nsdd-edge serve-camera``: the capture host. Serves raw frames of a local camera to one ``tcp://`` client.

Protocol: :mod:`nsdd_edge.framing`. The camera stays open between clients.

``--model BUNDLE``: bin/crop on the capture host with the bundle's own preprocessing (the same
:class:`~nsdd_edge.preprocess.Preprocessor` the client would run) and send ``y`` (float32) instead of the raw
frame, tagged ``meta.preprocessed.digest``; the client's preprocessor passes it through only if its bundle
has the same settings. A 2028×1520 uint16 HQ frame (6.2 MB) becomes e.g. 3×128×128 float32 (197 kB):
``bench/bench_tcp.py`` prints bytes per frame and the fps ceiling at 1 GbE and 50 Mbit/s. A frame the
preprocessing cannot take (or whose ``y`` would be larger than the raw frame) is sent raw, so the client
decides about it exactly as without ``--model``.

Security and robustness:

- loopback (``127.0.0.1:5000``) by default; any other address needs a token (``--token`` or
  ``$NSDD_CAMERA_TOKEN``), the server refuses to start without one;
- handshakes run off the serving thread, at most :data:`MAX_PENDING_HANDSHAKES` at once, each within
  :data:`HANDSHAKE_TIMEOUT_S` in total (however slowly its bytes arrive); the hello is at most
  :data:`~nsdd_edge.framing.MAX_REQUEST_HEADER_BYTES` with no payload, and the token is checked before anything
  else is read;
- one authorised reader at a time: while it is connected a second client is refused, unless the server runs
  with ``--allow-takeover`` and a token (then a client with the token takes over: a Jetson that lost its
  network can reconnect at once);
- an authorised client's requests are bounded too (:data:`REQUEST_TIMEOUT_S`, no payload), and a client that
  stops reading is dropped after :data:`SEND_TIMEOUT_S`.
"""

from __future__ import annotations

import argparse
import hmac
import math
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import Any

from nsdd_edge import framing
from nsdd_edge.preview import is_loopback
from nsdd_edge.redact import redact
from nsdd_edge.sources import TOKEN_ENV, EndOfStream, Frame, FrameSource, SourceError, SourceStalled, open_source

HELP = "serve raw camera frames to a tcp:// client (capture host, e.g. a Raspberry Pi)"

DEFAULT_BIND = "127.0.0.1:5000"
HANDSHAKE_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 10.0
MAX_PENDING_HANDSHAKES = 16
MAX_READ_TIMEOUT_S = 30.0


def parse_bind(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``127.0.0.1:5000``, ``0.0.0.0:5000``, ``[::]:5000``, ``:5000``) → (host, port); ValueError
    otherwise. An empty host means every interface (``0.0.0.0``)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--bind {text!r}: expected HOST:PORT such as {DEFAULT_BIND}")
    return (host.strip("[]") or "0.0.0.0"), int(port)


class CameraServer:
    """Serve ``source`` on ``(host, port)``; :meth:`serve_forever` until :meth:`shutdown` (module docstring)."""

    def __init__(self, source: FrameSource, host: str, port: int, *, token: str = "", allow_takeover: bool = False,
                 log: Any = None, preprocess: Any = None, bundle_name: str | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT_S, max_pending_handshakes: int = MAX_PENDING_HANDSHAKES):
        if not token and not is_loopback(host):
            raise SourceError(f"serve-camera: {host} is not a loopback address: a token is required (--token or "
                              f"${TOKEN_ENV}); without one anyone on the network could read the camera")
        self.source = source
        self.preprocess = preprocess  # a Preprocessor: send y instead of the raw frame (--model)
        self.bundle_name = bundle_name
        self._reduce_note = ""
        self.token = token
        self.allow_takeover = bool(allow_takeover and token)
        self.handshake_timeout = handshake_timeout
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((host, port))
        except OSError as exc:
            self._listener.close()
            raise SourceError(f"serve-camera: cannot listen on {host}:{port} ({exc})") from None
        self._listener.listen(16)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._handshake_slots = threading.BoundedSemaphore(max_pending_handshakes)
        self._client: socket.socket | None = None  # owned by the serving thread
        self._client_peer = ""
        self._incoming: tuple[socket.socket, str] | None = None  # admitted by a handshake thread, not yet taken
        self._wake = threading.Event()
        self.frames_sent = 0
        self.clients_served = 0
        self.refused = 0

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return host, port

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()

    # -- accepting and handshakes (not the serving thread) -------------------------------------------
    def _accept_main(self, poll_s: float) -> None:
        self._listener.settimeout(poll_s)
        while not self._stop.is_set():
            try:
                conn, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(poll_s)
                continue
            peer = f"{addr[0]}:{addr[1]}"
            if not self._handshake_slots.acquire(blocking=False):
                self.refused += 1
                conn.close()
                self.log(f"serve-camera: refused {peer}: {MAX_PENDING_HANDSHAKES} handshakes already pending")
                continue
            threading.Thread(target=self._handshake, args=(conn, peer), name=f"nsdd-handshake-{peer}",
                             daemon=True).start()

    def _refuse(self, conn: socket.socket, peer: str, message: str) -> None:
        self.refused += 1
        try:
            conn.settimeout(1.0)
            framing.send_message(conn, {"type": "error", "message": message})
        except OSError:
            pass
        conn.close()
        self.log(f"serve-camera: refused {peer} ({message})")

    def _handshake(self, conn: socket.socket, peer: str) -> None:
        try:
            deadline = time.monotonic() + self.handshake_timeout
            try:
                header, _ = framing.recv_message(conn, deadline=deadline, max_header=framing.MAX_REQUEST_HEADER_BYTES,
                                                 max_payload=0)
            except (OSError, framing.FramingError) as exc:
                conn.close()
                self.refused += 1
                self.log(f"serve-camera: dropped {peer} during the handshake ({exc})")
                return
            if header.get("type") != "hello":
                self._refuse(conn, peer, f"expected hello, got {str(header.get('type'))[:40]!r}")
                return
            if header.get("version") != framing.VERSION:
                self._refuse(conn, peer, f"protocol version {str(header.get('version'))[:20]} not supported "
                                         f"(server speaks {framing.VERSION})")
                return
            offered = header.get("token", "")
            if self.token and not (isinstance(offered, str)
                                   and hmac.compare_digest(offered.encode(), self.token.encode())):
                self._refuse(conn, peer, f"authentication failed: wrong or missing token (set ?token= or ${TOKEN_ENV})")
                return
            self._admit(conn, peer)
        finally:
            self._handshake_slots.release()

    def _admit(self, conn: socket.socket, peer: str) -> None:
        """An authenticated client: refused while another reads (unless takeover is allowed), else welcomed and
        handed to the serving thread (decided under the lock, answered outside it)."""
        with self._lock:
            busy = self._incoming is not None or (self._client is not None and _alive(self._client))
            current = self._incoming[1] if self._incoming is not None else self._client_peer
            replaced = None
            if not busy or self.allow_takeover:
                replaced, self._incoming = self._incoming, (conn, peer)
        if busy and not self.allow_takeover:
            self._refuse(conn, peer, f"busy: another client ({current}) is reading this camera; the server allows a "
                                     "takeover only with a token and --allow-takeover")
            return
        if replaced is not None:  # admitted but not yet taken by the serving thread: replaced at once
            replaced[0].close()
        try:
            conn.settimeout(SEND_TIMEOUT_S)
            framing.send_message(conn, {"type": "welcome", "source": self._describe()})
        except OSError as exc:
            conn.close()  # the serving thread drops it at its next select
            self.log(f"serve-camera: dropped {peer} while welcoming it ({exc})")
            return
        self._wake.set()

    # -- the serving thread --------------------------------------------------------------------------
    def _take_incoming(self) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, None
        if incoming is None:
            return
        conn, peer = incoming
        if self._client is not None:
            self._drop_client(f"replaced by {peer} (--allow-takeover)")
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        with self._lock:
            self._client, self._client_peer = conn, peer
        self.clients_served += 1
        self.log(f"serve-camera: client {peer} connected")

    def _drop_client(self, reason: str) -> None:
        with self._lock:
            conn, self._client = self._client, None
        if conn is not None:
            conn.close()
            self.log(f"serve-camera: client disconnected ({reason})")

    def _serve_request(self, conn: socket.socket) -> None:
        try:
            header, _ = framing.recv_message(conn, deadline=time.monotonic() + REQUEST_TIMEOUT_S,
                                             max_header=framing.MAX_REQUEST_HEADER_BYTES, max_payload=0)
        except (OSError, framing.FramingError) as exc:
            self._drop_client(str(exc))
            return
        kind = header.get("type")
        if kind == "bye":
            self._drop_client("client said bye")
            return
        if kind != "read":
            self._reply(conn, {"type": "error", "message": f"unknown request {str(kind)[:40]!r}"})
            return
        timeout = header.get("timeout")
        try:
            timeout = MAX_READ_TIMEOUT_S if timeout is None else float(timeout)
        except (TypeError, ValueError, OverflowError):
            timeout = MAX_READ_TIMEOUT_S
        timeout = min(max(timeout, 0.0), MAX_READ_TIMEOUT_S) if math.isfinite(timeout) else MAX_READ_TIMEOUT_S
        try:
            frame = self.source.read(timeout)
        except EndOfStream as exc:
            self._reply(conn, {"type": "end", "message": str(exc)})
            return
        except SourceStalled as exc:
            self._reply(conn, {"type": "stalled", "message": str(exc)})
            return
        except SourceError as exc:
            self._reply(conn, {"type": "error", "message": f"capture host camera failed: {exc}"})
            self.source.close()  # reopened on the next read
            return
        data, meta = self._reduce(frame)
        try:
            head, payload = framing.frame_message(data, frame.index, frame.timestamp, meta)
        except framing.FramingError as exc:
            self._reply(conn, {"type": "error", "message": str(exc)})
            return
        if self._reply(conn, head, payload):
            self.frames_sent += 1

    def _describe(self) -> dict[str, Any]:
        d = dict(self.source.describe())
        if self.preprocess is not None:
            d["preprocess"] = {"bundle": self.bundle_name, "digest": self.preprocess.digest}
        return d

    def _reduce(self, frame: Frame) -> tuple[Any, dict[str, Any]]:
        """With ``--model``: ``(y, meta + preprocessed)``; the raw frame when there is no preprocessing, when it
        refuses the frame (the client then refuses it the same way) or when ``y`` would not be smaller."""
        if self.preprocess is None:
            return frame.data, frame.meta
        from nsdd_edge.preprocess import FrameRejected, ProfileMismatch

        try:
            y = self.preprocess(frame.data, frame.meta)
        except (FrameRejected, ProfileMismatch, ValueError) as exc:
            self._note(f"frame {frame.index} sent raw: preprocessing refused it ({exc})")
            return frame.data, frame.meta
        if y.nbytes >= frame.data.nbytes:
            self._note(f"frames sent raw: y {tuple(y.shape)} float32 ({y.nbytes} B) is not smaller than the raw "
                       f"frame ({frame.data.nbytes} B)")
            return frame.data, frame.meta
        done = {"digest": self.preprocess.digest, "bundle": self.bundle_name, "raw_shape": list(frame.data.shape),
                "raw_dtype": str(frame.data.dtype)}
        return y, {**frame.meta, "preprocessed": done}

    def _note(self, message: str) -> None:
        if message != self._reduce_note:
            self._reduce_note = message
            self.log(f"serve-camera: {message}")

    def _reply(self, conn: socket.socket, header: dict[str, Any], payload: Any = b"") -> bool:
        try:
            conn.settimeout(SEND_TIMEOUT_S)
            framing.send_message(conn, header, payload)
            return True
        except OSError as exc:
            self._drop_client(str(exc) or type(exc).__name__)
            return False

    def serve_forever(self, poll_s: float = 0.2) -> None:
        acceptor = threading.Thread(target=self._accept_main, args=(poll_s,), name="nsdd-accept", daemon=True)
        acceptor.start()
        try:
            while not self._stop.is_set():
                self._take_incoming()
                conn = self._client
                if conn is None:
                    self._wake.wait(poll_s)
                    self._wake.clear()
                    continue
                try:
                    readable, _, _ = select.select([conn], [], [], poll_s)
                except (OSError, ValueError):
                    self._drop_client("socket error")
                    continue
                if readable:
                    self._serve_request(conn)
        finally:
            self._stop.set()
            self._drop_client("server stopping")
            with self._lock:
                if self._incoming is not None:
                    self._incoming[0].close()
                    self._incoming = None
            acceptor.join(timeout=max(1.0, 5 * poll_s))
            self._listener.close()


def _alive(conn: socket.socket) -> bool:
    """False if the peer has closed the connection (readable with nothing to read) or the socket is broken."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        if not readable:
            return True
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except (OSError, ValueError):
        return False


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default="picamera2://", help="camera URI to serve (see nsdd-edge info)")
    p.add_argument("--bind", default=DEFAULT_BIND,
                   help="HOST:PORT to listen on (0.0.0.0:5000: every interface; needs a token)")
    p.add_argument("--token", default=None,
                   help=f"shared secret clients must present (default: ${TOKEN_ENV}; required off loopback)")
    p.add_argument("--model", default=None, metavar="BUNDLE",
                   help="bin/crop here with this bundle's preprocessing and send y instead of raw frames (the client "
                        "must run the same bundle); e.g. 6.2 MB → 0.2 MB per HQ-camera frame")
    p.add_argument("--allow-takeover", action="store_true",
                   help="a client with the token may replace the connected one (default: refused while it is "
                        "connected)")


def main(args: argparse.Namespace) -> int:
    shown = redact(args.source)
    try:
        host, port = parse_bind(args.bind)
        source = open_source(args.source)
    except ValueError as exc:
        print(f"nsdd-edge serve-camera: {exc}", file=sys.stderr)
        return 2
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV, "")
    if not token and not is_loopback(host):
        print(f"nsdd-edge serve-camera: error: --bind {args.bind} is not loopback: a token is required (--token or "
              f"${TOKEN_ENV}); without one anyone on the network could read the camera", file=sys.stderr)
        return 2
    if args.allow_takeover and not token:
        print("nsdd-edge serve-camera: error: --allow-takeover needs a token", file=sys.stderr)
        return 2
    preprocess = bundle_name = None
    if args.model:
        from nsdd_edge.bundle import BundleError, load_bundle
        from nsdd_edge.preprocess import Preprocessor

        try:
            bundle = load_bundle(args.model)
            preprocess, bundle_name = Preprocessor(bundle.preprocess, bundle.root), bundle.name
        except (BundleError, ValueError) as exc:
            print(f"nsdd-edge serve-camera: --model: {exc}", file=sys.stderr)
            return 2
    try:
        source.open()
        server = CameraServer(source, host, port, token=token, allow_takeover=args.allow_takeover,
                              preprocess=preprocess, bundle_name=bundle_name)
    except SourceError as exc:
        source.close()
        print(f"nsdd-edge serve-camera: {exc}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
    print(f"nsdd-edge serve-camera: serving {shown} on {host}:{server.address[1]}"
          + (f", preprocessed with bundle {bundle_name} (digest {preprocess.digest[:12]}…)" if preprocess else ", raw")
          + (" (token required)" if token else " (loopback, no token)"), file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        source.close()
    print(f"nsdd-edge serve-camera: stopped after {server.frames_sent} frames to {server.clients_served} client(s)",
          file=sys.stderr)
    return 0
