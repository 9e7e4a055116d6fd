"""``tcp://host:port``: frames served by ``nsdd-edge serve-camera`` (protocol in :mod:`nsdd_edge.framing`)."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from nsdd_edge.sources.base import (
    EndOfStream,
    Frame,
    FrameSource,
    ParsedUri,
    SourceError,
    SourceStalled,
    _Options,
)

TOKEN_ENV = "NSDD_CAMERA_TOKEN"


DEFAULT_MAX_FRAME_BYTES = 256 << 20
NO_TIMEOUT_DEADLINE_S = 32.0  # a read without a timeout still ends: the host answers 'stalled' after 30 s
DEADLINE_GRACE_S = 2.0


class TcpSource(FrameSource):
    """``tcp://host:port``: raw frames from a capture host running ``nsdd-edge serve-camera`` (protocol in
    :mod:`nsdd_edge.framing`). Options ``token=`` (default: ``$NSDD_CAMERA_TOKEN``), ``connect_timeout=``
    (5 s, also the deadline of the whole handshake), ``reconnect=1`` (after a lost connection, reconnect once
    per read), ``max_frame_bytes=`` (256 MiB: a frame header announcing more is refused before anything is
    allocated), ``grace=`` (2 s, see below).

    The capture host is not trusted: a frame's announced payload length must equal what its shape and dtype
    say, and the whole answer to a read must arrive within the read's timeout + ``grace`` (a host trickling
    bytes cannot hold the reader: :class:`SourceStalled`)."""

    scheme = "tcp"

    def __init__(self, uri: str, parsed: ParsedUri, options: _Options):
        super().__init__(uri)
        o = options
        try:
            host, port = parsed.netloc.rsplit(":", 1)
            self.host, self.port = host.strip("[]"), int(port)
        except ValueError:
            raise ValueError(f"camera source {uri!r}: tcp:// needs host:port, e.g. tcp://raspberrypi.local:5000") \
                from None
        if not self.host or not 0 < self.port < 65536 or parsed.path.strip("/"):
            raise ValueError(f"camera source {uri!r}: tcp:// needs host:port with a port in 1–65535 and no path")
        self.token = o.str("token") or os.environ.get(TOKEN_ENV, "")
        self.connect_timeout = o.float("connect_timeout", 5.0, positive=True)
        self.reconnect = o.bool("reconnect", True)
        self.max_frame_bytes = o.int("max_frame_bytes", DEFAULT_MAX_FRAME_BYTES, minimum=1)
        self.grace = o.float("grace", DEADLINE_GRACE_S, positive=True)
        options.finish()
        self.is_live = True
        self._sock: socket.socket | None = None
        self.remote: dict[str, Any] = {}

    def _connect(self) -> None:
        from nsdd_edge import framing

        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except OSError as exc:
            raise SourceError(f"{self.uri}: cannot connect to the capture host {self.host}:{self.port} ({exc}); "
                              "is 'nsdd-edge serve-camera' running there?") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = time.monotonic() + self.connect_timeout
        try:
            framing.send_message(sock, {"type": "hello", "version": framing.VERSION, "token": self.token})
            header, _ = framing.recv_message(sock, deadline=deadline, max_payload=0)
        except (OSError, framing.FramingError) as exc:
            sock.close()
            raise SourceError(f"{self.uri}: handshake with the capture host failed ({exc})") from None
        if header["type"] != "welcome":
            sock.close()
            raise SourceError(f"{self.uri}: capture host refused the connection: {header.get('message', header)}")
        self.remote = dict(header.get("source") or {})
        fr = self.remote.get("frame_rate")
        self.frame_rate = float(fr) if fr else None
        self._sock = sock

    def _open(self) -> None:
        self._connect()

    def _request(self, timeout: float | None) -> tuple[dict[str, Any], bytearray]:
        from nsdd_edge import framing

        sock = self._sock
        assert sock is not None
        # the host answers 'stalled' itself after `timeout`; the whole answer must be here shortly after
        wait = NO_TIMEOUT_DEADLINE_S if timeout is None else timeout + self.grace
        sock.settimeout(wait)
        framing.send_message(sock, {"type": "read", "timeout": timeout})
        return framing.recv_message(sock, deadline=time.monotonic() + wait, expect_payload=self._expected_payload)

    def _expected_payload(self, header: dict[str, Any]) -> int:
        """Payload bytes a message may carry: a frame exactly what its header says (≤ ``max_frame_bytes``),
        anything else none."""
        from nsdd_edge import framing

        if header["type"] != "frame":
            return 0
        return framing.frame_spec(header, self.max_frame_bytes)[2]

    def _read(self, timeout: float | None) -> Frame:
        from nsdd_edge import framing

        try:
            if self._sock is None:
                self._connect()
            header, payload = self._request(timeout)
        except TimeoutError:
            self._drop()
            raise SourceStalled(f"{self.uri}: no complete answer from the capture host within the read's "
                                f"deadline ({timeout} s + {self.grace:g} s)") from None
        except framing.FramingError as exc:  # a host that breaks the protocol or lies about sizes
            self._drop()
            raise SourceError(f"{self.uri}: bad message from the capture host, refused ({exc})") from None
        except OSError as exc:
            self._drop()
            if not self.reconnect:
                raise SourceError(f"{self.uri}: connection lost ({exc})") from None
            try:
                self._connect()
                header, payload = self._request(timeout)
            except (OSError, framing.FramingError) as exc2:
                self._drop()
                raise SourceError(f"{self.uri}: connection lost and reconnecting failed ({exc2})") from None
        kind = header["type"]
        if kind == "frame":
            try:
                data, index, stamp, meta = framing.decode_frame(header, payload)
            except framing.FramingError as exc:
                self._drop()
                raise SourceError(f"{self.uri}: bad frame from the capture host ({exc})") from None
            meta = {**meta, "remote_timestamp": stamp}
            return Frame(data=data, index=index, timestamp=time.monotonic(), meta=meta)
        message = f"{self.uri}: {header.get('message', kind)}"
        if kind == "stalled":
            raise SourceStalled(message)
        if kind == "end":
            raise EndOfStream(message)
        raise SourceError(message)

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def _close(self) -> None:
        from nsdd_edge import framing

        if self._sock is not None:
            try:
                self._sock.settimeout(1.0)
                framing.send_message(self._sock, {"type": "bye"})
            except OSError:
                pass
        self._drop()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"kind": "network capture host", "host": self.host, "port": self.port, "remote": self.remote})
        return d
