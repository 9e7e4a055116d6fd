"""The tcp frame protocol between ``nsdd-edge serve-camera`` (capture host) and a ``tcp://`` source.

Every message is ``prefix + header + payload``::

    prefix   20 bytes, big-endian: magic b"NSDF", version u8, 3 zero bytes, header length u32, payload length u64
    header   UTF-8 JSON object with a "type"
    payload  raw bytes (frames: the C-contiguous array, little-endian)

Conversation (the client speaks first; one request, one answer)::

    client {"type": "hello", "version": 1, "token": T}   server {"type": "welcome", "source": {...}} | error
    client {"type": "read", "timeout": s}                 server frame | {"type": "stalled"|"end"|"error", "message"}
    client {"type": "bye"}

A frame header is ``{"type": "frame", "shape", "dtype", "index", "timestamp", "meta"}``.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

import numpy as np

MAGIC = b"NSDF"
VERSION = 1
PREFIX = struct.Struct(">4sB3xIQ")
MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 1 << 30
FRAME_DTYPES = ("uint8", "uint16", "int16", "int32", "float32", "float64")


class FramingError(ValueError):
    """A malformed or unexpected message (wrong magic/version, bad header, size mismatch)."""


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def pack_message(header: dict[str, Any], payload: bytes | memoryview = b"") -> list[bytes | memoryview]:
    """The byte chunks of one message (prefix, JSON header, payload)."""
    head = json.dumps(header, default=_json_default, separators=(",", ":")).encode()
    if len(head) > MAX_HEADER_BYTES:
        raise FramingError(f"message header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    payload = memoryview(payload).cast("B")
    return [PREFIX.pack(MAGIC, VERSION, len(head), payload.nbytes), head, payload]


def send_message(sock: socket.socket, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
    for chunk in pack_message(header, payload):
        if len(chunk):
            sock.sendall(chunk)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"connection closed by the peer after {got} of {n} bytes")
        got += k
    return buf


def recv_message(sock: socket.socket) -> tuple[dict[str, Any], bytearray]:
    """Read one message; :class:`FramingError` for anything that is not this protocol."""
    magic, version, head_len, payload_len = PREFIX.unpack(bytes(_recv_exact(sock, PREFIX.size)))
    if magic != MAGIC:
        raise FramingError(f"not an nsdd-edge frame stream (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise FramingError(f"frame protocol version {version}, this side speaks {VERSION}")
    if head_len > MAX_HEADER_BYTES or payload_len > MAX_PAYLOAD_BYTES:
        raise FramingError(f"message too large (header {head_len} B, payload {payload_len} B)")
    try:
        header = json.loads(bytes(_recv_exact(sock, head_len)).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FramingError(f"message header is not JSON ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise FramingError("message header must be a JSON object with a 'type'")
    payload = _recv_exact(sock, payload_len) if payload_len else bytearray()
    return header, payload


def frame_message(data: np.ndarray, index: int, timestamp: float, meta: dict[str, Any]
                  ) -> tuple[dict[str, Any], memoryview]:
    """Header and payload of a frame (little-endian, C order)."""
    a = np.asarray(data)
    if a.dtype.name not in FRAME_DTYPES:
        raise FramingError(f"cannot send a frame of dtype {a.dtype}; use one of {', '.join(FRAME_DTYPES)}")
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    header = {"type": "frame", "shape": list(a.shape), "dtype": a.dtype.name, "index": int(index),
              "timestamp": float(timestamp), "meta": meta}
    return header, memoryview(a).cast("B")


def decode_frame(header: dict[str, Any], payload: bytearray) -> tuple[np.ndarray, int, float, dict[str, Any]]:
    """``(data, index, timestamp, meta)`` from a frame message, checking dtype and size."""
    try:
        dtype = np.dtype(str(header["dtype"]))
        shape = tuple(int(v) for v in header["shape"])
        index, timestamp = int(header["index"]), float(header["timestamp"])
        meta = dict(header.get("meta") or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise FramingError(f"bad frame header ({type(exc).__name__}: {exc})") from None
    if dtype.name not in FRAME_DTYPES or len(shape) not in (2, 3) or any(s <= 0 for s in shape):
        raise FramingError(f"bad frame header: dtype {dtype}, shape {shape}")
    expected = int(np.prod(shape)) * dtype.itemsize
    if expected != len(payload):
        raise FramingError(f"frame payload has {len(payload)} bytes, header says {shape} {dtype} = {expected}")
    data = np.frombuffer(payload, dtype=dtype.newbyteorder("<")).reshape(shape).astype(dtype, copy=False)
    return data, index, timestamp, meta
