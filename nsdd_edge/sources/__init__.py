"""Camera sources by URI: ``sim://``, ``file://``, ``picamera2://``, ``csi://N``, ``v4l2:///dev/videoN``, ``tcp://``.

``open_source(uri, **options)`` returns a :class:`FrameSource`; ``source.read(timeout)`` returns a
:class:`Frame` holding the *raw* sensor data (uint16 ``(H, W)`` Bayer/mono counts, ``(H, W, 3)``
uint8/uint16 RGB, or float32) with its metadata (black level, gain, Bayer pattern, exposure, ...).
:class:`nsdd_edge.preprocess.Preprocessor` turns a raw frame into the measurement ``y``.

Errors: :class:`SourceError` (the camera/file failed; the message names it), :class:`SourceStalled`
(no frame within ``timeout``), :class:`EndOfStream` (a finite source is exhausted), :class:`FrameUnreadable`
(one frame could not be read and was skipped; the next read goes on). URIs are kept and shown with any
``token=`` masked (:mod:`nsdd_edge.redact`). A bad or unknown
URI raises ``ValueError`` naming the URI and the supported schemes.

Options come from the URI query (``sim://?fps=30&seed=0``) and from keyword arguments (which win);
arrays such as ``psf=`` and ``geometry=`` can only be passed as keywords.

Timestamps: live sources stamp frames with ``time.monotonic()`` at capture; recorded media
(``file://``, ``sim://?realtime=0``) carry the media time ``index / fps``.

Modules: :mod:`.base` (Frame, errors, FrameSource, options, pacer), :mod:`.registry` (schemes, ``open_source``,
``available_sources``, ``parse_uri``), one module per family: :mod:`.sim`, :mod:`.file`, :mod:`.raw` (raw
unpacking), :mod:`.picamera2`, :mod:`.capture` (``csi://``, ``v4l2://``), :mod:`.tcp`.
"""

from nsdd_edge.sources.base import (
    BAYER_PATTERNS,
    EndOfStream,
    Frame,
    FrameSource,
    FrameUnreadable,
    ParsedUri,
    SourceError,
    SourceStalled,
    _Options,  # noqa: F401 - shared with the per-family modules and tests
    _Pacer,  # noqa: F401
)
from nsdd_edge.sources.capture import (  # noqa: F401 - the private helpers are used by tests
    CsiSource,
    V4l2Source,
    _CaptureSource,
    _gstreamer_available,
    _v4l2_available,
)
from nsdd_edge.sources.file import VIDEO_SUFFIXES, FileSource
from nsdd_edge.sources.picamera2 import PiCamera2Source
from nsdd_edge.sources.raw import V4L2_RAW_FORMATS, parse_libcamera_raw_format, unpack_raw
from nsdd_edge.sources.registry import SOURCE_TYPES, SourceFactory, available_sources, open_source, parse_uri
from nsdd_edge.sources.sim import SimCamera
from nsdd_edge.sources.tcp import TOKEN_ENV, TcpSource

__all__ = [
    "BAYER_PATTERNS", "SOURCE_TYPES", "TOKEN_ENV", "V4L2_RAW_FORMATS", "VIDEO_SUFFIXES", "CsiSource", "EndOfStream",
    "FileSource", "Frame", "FrameSource", "FrameUnreadable", "ParsedUri", "PiCamera2Source", "SimCamera",
    "SourceError", "SourceFactory",
    "SourceStalled", "TcpSource", "V4l2Source", "available_sources", "open_source", "parse_libcamera_raw_format",
    "parse_uri", "unpack_raw",
]
