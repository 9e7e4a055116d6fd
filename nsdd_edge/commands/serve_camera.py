"""``nsdd-edge serve-camera``: the capture host. Serves raw frames of a local camera to one ``tcp://`` client.

One client at a time; a new client that authenticates takes over from the previous one (so a client that
crashed or lost its network can reconnect at once). The camera stays open between clients. Protocol:
:mod:`nsdd_edge.framing`.

``--model BUNDLE``: bin/crop on the capture host with the bundle's own preprocessing (the same
:class:`~nsdd_edge.preprocess.Preprocessor` the client would run) and send ``y`` (float32) instead of the raw
frame, tagged ``meta.preprocessed.digest``; the client's preprocessor passes it through only if its bundle
has the same settings. A 2028×1520 uint16 HQ frame (6.2 MB) becomes e.g. 3×128×128 float32 (197 kB):
``bench/bench_tcp.py`` prints bytes per frame and the fps ceiling at 1 GbE and 50 Mbit/s. A frame the
preprocessing cannot take (or whose ``y`` would be larger than the raw frame) is sent raw, so the client
decides about it exactly as without ``--model``.
"""

from __future__ import annotations

import argparse
import hmac
import os
import select
import signal
import socket
import sys
import threading
from typing import Any

from nsdd_edge import framing
from nsdd_edge.sources import TOKEN_ENV, EndOfStream, Frame, FrameSource, SourceError, SourceStalled, open_source

HELP = "serve raw camera frames to a tcp:// client (capture host, e.g. a Raspberry Pi)"

HELLO_TIMEOUT_S = 5.0
MAX_READ_TIMEOUT_S = 30.0


def parse_bind(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``0.0.0.0:5000``, ``[::]:5000``, ``:5000``) → (host, port); ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--bind {text!r}: expected HOST:PORT such as 0.0.0.0:5000")
    return (host.strip("[]") or "0.0.0.0"), int(port)


class CameraServer:
    """Serve ``source`` on ``(host, port)``; :meth:`serve_forever` until :meth:`shutdown`."""

    def __init__(self, source: FrameSource, host: str, port: int, *, token: str = "",
                 log: Any = None, preprocess: Any = None, bundle_name: str | None = None):
        self.source = source
        self.token = token
        self.preprocess = preprocess  # a Preprocessor: send y instead of the raw frame (--model)
        self.bundle_name = bundle_name
        self._reduce_note = ""
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((host, port))
        except OSError as exc:
            self._listener.close()
            raise SourceError(f"serve-camera: cannot listen on {host}:{port} ({exc})") from None
        self._listener.listen(4)
        self._stop = threading.Event()
        self._client: socket.socket | None = None
        self.frames_sent = 0
        self.clients_served = 0

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return host, port

    def shutdown(self) -> None:
        self._stop.set()

    def _drop_client(self, reason: str) -> None:
        if self._client is not None:
            try:
                self._client.close()
            finally:
                self._client = None
            self.log(f"serve-camera: client disconnected ({reason})")

    def _accept(self) -> None:
        conn, peer = self._listener.accept()
        conn.settimeout(HELLO_TIMEOUT_S)
        try:
            header, _ = framing.recv_message(conn)
            if header.get("type") != "hello":
                raise framing.FramingError(f"expected hello, got {header.get('type')!r}")
            if int(header.get("version", -1)) != framing.VERSION:
                framing.send_message(conn, {"type": "error", "message": f"protocol version {header.get('version')} "
                                            f"not supported (server speaks {framing.VERSION})"})
                conn.close()
                return
            if self.token and not hmac.compare_digest(str(header.get("token", "")).encode(), self.token.encode()):
                framing.send_message(conn, {"type": "error", "message": "authentication failed: wrong or missing "
                                            f"token (set ?token= or ${TOKEN_ENV})"})
                conn.close()
                self.log(f"serve-camera: refused {peer[0]}:{peer[1]} (bad token)")
                return
            framing.send_message(conn, {"type": "welcome", "source": self._describe()})
        except (OSError, framing.FramingError, ValueError) as exc:
            conn.close()
            self.log(f"serve-camera: dropped {peer[0]}:{peer[1]} during the handshake ({exc})")
            return
        if self._client is not None:
            self._drop_client(f"replaced by {peer[0]}:{peer[1]}")
        conn.settimeout(None)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._client = conn
        self.clients_served += 1
        self.log(f"serve-camera: client {peer[0]}:{peer[1]} connected")

    def _serve_request(self) -> None:
        conn = self._client
        assert conn is not None
        try:
            header, _ = framing.recv_message(conn)
        except (OSError, framing.FramingError) as exc:
            self._drop_client(str(exc))
            return
        kind = header.get("type")
        if kind == "bye":
            self._drop_client("client said bye")
            return
        if kind != "read":
            self._reply(conn, {"type": "error", "message": f"unknown request {kind!r}"})
            return
        timeout = header.get("timeout")
        try:
            timeout = None if timeout is None else min(max(float(timeout), 0.0), MAX_READ_TIMEOUT_S)
        except (TypeError, ValueError):
            timeout = MAX_READ_TIMEOUT_S
        try:
            frame = self.source.read(timeout if timeout is not None else MAX_READ_TIMEOUT_S)
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
            framing.send_message(conn, header, payload)
            return True
        except OSError as exc:
            self._drop_client(str(exc))
            return False

    def serve_forever(self, poll_s: float = 0.2) -> None:
        try:
            while not self._stop.is_set():
                watch = [self._listener] + ([self._client] if self._client is not None else [])
                readable, _, _ = select.select(watch, [], [], poll_s)
                if self._listener in readable:
                    self._accept()
                if self._client is not None and self._client in readable:
                    self._serve_request()
        finally:
            self._drop_client("server stopping")
            self._listener.close()


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default="picamera2://", help="camera URI to serve (see nsdd-edge info)")
    p.add_argument("--bind", default="0.0.0.0:5000", help="HOST:PORT to listen on")
    p.add_argument("--token", default=None,
                   help=f"shared secret clients must present (default: ${TOKEN_ENV}; empty = no authentication)")
    p.add_argument("--model", default=None, metavar="BUNDLE",
                   help="bin/crop here with this bundle's preprocessing and send y instead of raw frames (the client "
                        "must run the same bundle); e.g. 6.2 MB → 0.2 MB per HQ-camera frame")


def main(args: argparse.Namespace) -> int:
    try:
        host, port = parse_bind(args.bind)
        source = open_source(args.source)
    except ValueError as exc:
        print(f"nsdd-edge serve-camera: {exc}", file=sys.stderr)
        return 2
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV, "")
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
        server = CameraServer(source, host, port, token=token, preprocess=preprocess, bundle_name=bundle_name)
    except SourceError as exc:
        source.close()
        print(f"nsdd-edge serve-camera: {exc}", file=sys.stderr)
        return 1
    if not token and host not in ("127.0.0.1", "::1", "localhost"):
        print(f"nsdd-edge serve-camera: warning: serving on {host} without --token; anyone on the network can "
              "read the camera", file=sys.stderr)
    signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
    print(f"nsdd-edge serve-camera: serving {args.source} on {host}:{server.address[1]}"
          + (f", preprocessed with bundle {bundle_name} (digest {preprocess.digest[:12]}…)" if preprocess else ", raw"),
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        source.close()
    print(f"nsdd-edge serve-camera: stopped after {server.frames_sent} frames to {server.clients_served} client(s)",
          file=sys.stderr)
    return 0
