"""The one URI registry: scheme → source class, :func:`parse_uri`, :func:`open_source`, :func:`available_sources`."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from nsdd_edge.redact import redact
from nsdd_edge.sources.base import (
    FrameSource,
    ParsedUri,
    _Options,
)
from nsdd_edge.sources.capture import CsiSource, V4l2Source, _gstreamer_available, _v4l2_available
from nsdd_edge.sources.file import FileSource
from nsdd_edge.sources.picamera2 import PiCamera2Source
from nsdd_edge.sources.sim import SimCamera
from nsdd_edge.sources.tcp import TcpSource

SourceFactory = Callable[[str, ParsedUri, _Options], FrameSource]
SOURCE_TYPES: dict[str, SourceFactory] = {"sim": SimCamera, "file": FileSource, "picamera2": PiCamera2Source,
                                           "csi": CsiSource, "v4l2": V4l2Source, "tcp": TcpSource}


def _supported() -> str:
    return ", ".join(f"{s}://" for s in SOURCE_TYPES)


def parse_uri(uri: str) -> ParsedUri:
    """Split ``scheme://netloc/path?query``; ``ValueError`` naming the URI (its token masked) for anything
    malformed."""
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"camera source URI {uri!r} is empty; supported schemes: {_supported()}")
    shown = redact(uri)
    if "://" not in uri:
        raise ValueError(f"camera source {shown!r} is not a URI (expected SCHEME://...); supported schemes: "
                         f"{_supported()} (a file is file:///path/to/video.mp4)")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in SOURCE_TYPES:
        raise ValueError(f"camera source {shown!r}: unknown scheme {scheme or '(none)'!r}; supported schemes: "
                         f"{_supported()}")
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise ValueError(f"camera source {shown!r}: malformed query {redact(parts.query)!r} "
                         f"({redact(exc)})") from None
    query: dict[str, str] = {}
    for k, v in pairs:
        if k in query:
            raise ValueError(f"camera source {shown!r}: option {k!r} given twice")
        query[k] = v
    return ParsedUri(uri=uri, scheme=scheme, netloc=parts.netloc, path=parts.path, query=query)


def open_source(uri: str, **options: Any) -> FrameSource:
    """Create the source for ``uri`` (not yet opened; ``read()`` or ``open()`` opens it).

    ``ValueError`` for a malformed URI, an unknown scheme or a bad option, naming the URI."""
    parsed = parse_uri(uri)
    factory = SOURCE_TYPES[parsed.scheme]
    return factory(uri, parsed, _Options(uri, parsed.query, options))


def available_sources() -> dict[str, tuple[bool, str]]:
    """``{scheme: (available, reason)}`` on this machine (for ``nsdd-edge info``)."""
    out: dict[str, tuple[bool, str]] = {}
    for scheme in SOURCE_TYPES:
        check = _AVAILABILITY.get(scheme)
        out[scheme] = check() if check else (True, "built in")
    return out


_AVAILABILITY: dict[str, Callable[[], tuple[bool, str]]] = {
    "sim": lambda: (True, "simulated lensless camera (numpy)"),
    "file": lambda: (True, "OpenCV video, image directories, .npy stacks"),
    "picamera2": lambda: ((True, "picamera2 installed") if _module_available("picamera2")
                          else (False, "picamera2 not installed (Raspberry Pi: apt install python3-picamera2)")),
    "csi": lambda: ((True, ("OpenCV has GStreamer (needs nvarguscamerasrc, JetPack); ISP-processed, not raw: "
                            "locked AE/AWB, linearised — prefer v4l2:// raw")) if _gstreamer_available()
                    else (False, "this OpenCV build has no GStreamer support")),
    "v4l2": lambda: _v4l2_status(),
    "tcp": lambda: (True, "client of 'nsdd-edge serve-camera'"),
}


def _v4l2_status() -> tuple[bool, str]:
    if not _v4l2_available():
        return False, "this OpenCV build has no V4L2 backend"
    devices = sorted(str(p) for p in Path("/dev").glob("video*"))
    return (True, f"devices: {', '.join(devices)}") if devices else (False, "no /dev/video* devices")


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
