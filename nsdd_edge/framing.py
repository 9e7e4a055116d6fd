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

Bounds (a peer is untrusted until it has authenticated, and a capture host may lie): a request (hello, read,
bye) has a header of at most :data:`MAX_REQUEST_HEADER_BYTES` and no payload, so the server reads at most
20 + 4096 bytes before checking the token; headers are nested at most :data:`MAX_HEADER_DEPTH` levels; a
frame's payload length must equal what its header's shape and dtype say (``expect_payload``) and is checked
*before* anything is allocated; :func:`recv_message` takes an overall ``deadline`` (``time.monotonic()``) so a
peer trickling one byte at a time cannot hold a reader beyond it (:class:`TimeoutError`).
"""

from __future__ import annotations

import json
import math
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import numpy as np

MAGIC = b"NSDF"
VERSION = 1
PREFIX = struct.Struct(">4sB3xIQ")
MAX_HEADER_BYTES = 1 << 20
MAX_REQUEST_HEADER_BYTES = 4096
MAX_HEADER_DEPTH = 16
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


def _recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytearray:
    """Exactly ``n`` bytes; with a ``deadline`` (``time.monotonic()``) every wait is bounded by the time left, and
    :class:`TimeoutError` is raised once it has passed, however the bytes trickle in."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"message incomplete at the deadline ({got} of {n} bytes)")
            sock.settimeout(left)
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"connection closed by the peer after {got} of {n} bytes")
        got += k
    return buf


def _depth(obj: Any) -> int:
    deepest, stack = 0, [(obj, 1)]
    while stack and deepest <= MAX_HEADER_DEPTH:
        o, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return deepest


def recv_message(sock: socket.socket, *, deadline: float | None = None, max_header: int = MAX_HEADER_BYTES,
                 max_payload: int = MAX_PAYLOAD_BYTES,
                 expect_payload: Callable[[dict[str, Any]], int | None] | None = None
                 ) -> tuple[dict[str, Any], bytearray]:
    """Read one message; :class:`FramingError` for anything that is not this protocol or exceeds the bounds,
    :class:`TimeoutError` past ``deadline``. ``expect_payload(header)`` (may raise :class:`FramingError`) gives the
    payload length the header implies (None: any up to ``max_payload``); a different announced length is refused
    before the payload is read or allocated."""
    magic, version, head_len, payload_len = PREFIX.unpack(bytes(_recv_exact(sock, PREFIX.size, deadline)))
    if magic != MAGIC:
        raise FramingError(f"not an nsdd-edge frame stream (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise FramingError(f"frame protocol version {version}, this side speaks {VERSION}")
    if head_len > max_header or payload_len > max_payload:
        raise FramingError(f"message too large (header {head_len} B of at most {max_header}, payload {payload_len} B "
                           f"of at most {max_payload})")
    try:
        header = json.loads(bytes(_recv_exact(sock, head_len, deadline)).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FramingError(f"message header is not JSON ({exc})") from None
    except RecursionError:
        raise FramingError("message header is nested too deeply") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise FramingError("message header must be a JSON object with a 'type'")
    if _depth(header) > MAX_HEADER_DEPTH:
        raise FramingError(f"message header is nested more than {MAX_HEADER_DEPTH} levels")
    if expect_payload is not None:
        expected = expect_payload(header)
        if expected is not None and expected != payload_len:
            raise FramingError(f"{header['type']} message announces {payload_len} payload bytes, its header implies "
                               f"{expected}: refused before reading it")
    payload = _recv_exact(sock, payload_len, deadline) if payload_len else bytearray()
    return header, payload


def frame_spec(header: dict[str, Any], max_bytes: int = MAX_PAYLOAD_BYTES) -> tuple[np.dtype, tuple[int, ...], int]:
    """``(dtype, shape, payload bytes)`` a frame header announces, checked: a known dtype, 2 or 3 positive sides,
    at most ``max_bytes``; :class:`FramingError` otherwise."""
    try:
        dtype = np.dtype(str(header["dtype"]))
        raw_shape = header["shape"]
        if not isinstance(raw_shape, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                      for v in raw_shape):
            raise TypeError(f"shape {raw_shape!r} is not a list of integers")
        shape = tuple(raw_shape)
    except (KeyError, TypeError, ValueError) as exc:
        raise FramingError(f"bad frame header ({type(exc).__name__}: {exc})") from None
    if dtype.name not in FRAME_DTYPES or len(shape) not in (2, 3) or any(s <= 0 for s in shape):
        raise FramingError(f"bad frame header: dtype {dtype}, shape {shape}")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_bytes:
        raise FramingError(f"frame of shape {shape} {dtype} would be {nbytes} bytes, more than {max_bytes}")
    return dtype, shape, nbytes


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
    dtype, shape, expected = frame_spec(header)
    try:
        index, timestamp = int(header["index"]), float(header["timestamp"])
        meta = header.get("meta") or {}
        if not isinstance(meta, dict):
            raise TypeError(f"meta is a {type(meta).__name__}, not an object")
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise FramingError(f"bad frame header ({type(exc).__name__}: {exc})") from None
    if not math.isfinite(timestamp):
        raise FramingError(f"bad frame header: timestamp {timestamp}")
    if expected != len(payload):
        raise FramingError(f"frame payload has {len(payload)} bytes, header says {shape} {dtype} = {expected}")
    data = np.frombuffer(payload, dtype=dtype.newbyteorder("<")).reshape(shape).astype(dtype, copy=False)
    return data, index, timestamp, dict(meta)
