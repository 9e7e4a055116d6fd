"""What every camera source shares: :class:`Frame`, the errors, :class:`FrameSource`, the parsed URI and its
typed options (:class:`ParsedUri`, :class:`_Options`) and the live-camera clock :class:`_Pacer`."""

from __future__ import annotations

import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

BAYER_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")


class SourceError(RuntimeError):
    """A camera or file source failed (missing library/device, unreadable file, lost connection)."""


class SourceStalled(SourceError):
    """No frame arrived within the requested timeout (the source may recover)."""


class EndOfStream(SourceError):
    """A finite source (file, stack, ``sim://?frames=N``) has no more frames."""


class FrameUnreadable(SourceError):
    """One frame could not be read (an undecodable image in a folder, a broken ``sim://?images=`` file); the
    source has already moved past it, so the next ``read()`` returns the next frame. The loop counts, reports
    and skips it; it is not a source fault (no reopen, no rewind)."""


@dataclass
class Frame:
    """One raw frame: ``data`` as the sensor gives it, ``index`` (frame counter of the source; gaps mean
    dropped frames), ``timestamp`` in seconds, ``meta`` (black_level, white_level, gain, bayer_pattern,
    exposure_us, bit_depth, ...); ``truth``: the scene itself when the source knows it (``sim://``: float32
    ``(C, *scene_shape)`` in [0, 1], for a ground-truth panel), else None."""

    data: np.ndarray
    index: int
    timestamp: float
    meta: dict[str, Any] = field(default_factory=dict)
    truth: np.ndarray | None = None


# ----------------------------------------------------------------------------------------------
# URI parsing and option coercion
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedUri:
    uri: str
    scheme: str
    netloc: str
    path: str
    query: dict[str, str]


class _Options:
    """Typed access to a source's options; every option must be consumed (unknown ones are errors)."""

    def __init__(self, uri: str, query: dict[str, str], kwargs: dict[str, Any]):
        from nsdd_edge.redact import redact

        self.uri = redact(uri)  # for messages; the values themselves (a token=) stay in self.values
        self.values: dict[str, Any] = {**query, **{k: v for k, v in kwargs.items() if v is not None}}
        self.used: set[str] = set()

    def _bad(self, key: str, value: Any, what: str) -> ValueError:
        shown = "***" if key == "token" else repr(value)
        return ValueError(f"camera source {self.uri!r}: option {key}={shown} is not {what}")

    def raw(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        return self.values.get(key, default)

    def str(self, key: str, default: str | None = None, choices: tuple[str, ...] | None = None) -> str | None:
        v = self.raw(key, default)
        if v is None:
            return None
        v = str(v)
        if choices is not None and v not in choices:
            raise ValueError(f"camera source {self.uri!r}: option {key}={v!r} must be one of {', '.join(choices)}")
        return v

    def float(self, key: str, default: float | None = None, *, minimum: float | None = None,
              positive: bool = False) -> float | None:
        v = self.raw(key, default)
        if v is None:
            return None
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise self._bad(key, v, "a number") from None
        if not math.isfinite(f) or (positive and f <= 0) or (minimum is not None and f < minimum):
            raise self._bad(key, v, "a positive number" if positive else f"a finite number ≥ {minimum}")
        return f

    def int(self, key: str, default: int | None = None, *, minimum: int | None = None) -> int | None:
        v = self.raw(key, default)
        if v is None:
            return None
        try:
            i = int(v)
        except (TypeError, ValueError):
            raise self._bad(key, v, "an integer") from None
        if minimum is not None and i < minimum:
            raise self._bad(key, v, f"an integer ≥ {minimum}")
        return i

    def bool(self, key: str, default: bool = False) -> bool:
        v = self.raw(key, default)
        if isinstance(v, bool):
            return v
        s = str(v).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off", ""):
            return False
        raise self._bad(key, v, "a boolean (0/1)")

    def size(self, key: str, default: tuple[int, int] | None = None) -> tuple[int, int] | None:
        """``WxH`` (e.g. ``2028x1520``) → (width, height)."""
        v = self.raw(key, default)
        if v is None or isinstance(v, tuple):
            return v
        m = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", str(v))
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise self._bad(key, v, "a size WIDTHxHEIGHT such as 2028x1520")
        return int(m.group(1)), int(m.group(2))

    def bayer(self, key: str = "bayer") -> str | None:
        v = self.raw(key)
        if v is None or v == "":
            return None
        p = str(v).upper()
        if p not in BAYER_PATTERNS:
            raise self._bad(key, v, f"a Bayer pattern ({', '.join(BAYER_PATTERNS)})")
        return p

    def finish(self) -> None:
        unknown = sorted(set(self.values) - self.used)
        if unknown:
            raise ValueError(f"camera source {self.uri!r}: unknown option(s) {', '.join(unknown)}; "
                             f"this source understands {', '.join(sorted(self.used))}")


# ----------------------------------------------------------------------------------------------
# Base class
# ----------------------------------------------------------------------------------------------


class FrameSource(ABC):
    """A camera or recording that yields raw :class:`Frame` s. Use as a context manager or
    ``open()`` / ``read()`` / ``close()``; ``read()`` opens the source on first use."""

    scheme: ClassVar[str] = ""
    is_live: bool = False
    frame_rate: float | None = None

    def __init__(self, uri: str):
        from nsdd_edge.redact import redact

        self.uri = redact(uri)  # shown in messages, logs and stats: never with its token (kept by the source)
        self._is_open = False

    def open(self) -> FrameSource:
        if not self._is_open:
            self._open()
            self._is_open = True
        return self

    def read(self, timeout: float | None = None) -> Frame:
        """The next frame; raises :class:`SourceStalled` after ``timeout`` s without one,
        :class:`EndOfStream` at the end of a finite source, :class:`SourceError` on failure."""
        if not self._is_open:
            self.open()
        return self._read(timeout)

    def close(self) -> None:
        if self._is_open:
            self._is_open = False
            self._close()

    def describe(self) -> dict[str, Any]:
        return {"uri": self.uri, "scheme": self.scheme, "live": self.is_live, "frame_rate": self.frame_rate,
                "open": self._is_open}

    @abstractmethod
    def _open(self) -> None: ...

    @abstractmethod
    def _read(self, timeout: float | None) -> Frame: ...

    def _close(self) -> None:
        pass

    def __enter__(self) -> FrameSource:  # noqa: PYI034 - typing.Self needs Python 3.11, the package supports 3.10
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Frame]:
        """Frames until :class:`EndOfStream`."""
        while True:
            try:
                yield self.read()
            except EndOfStream:
                return

    def __del__(self) -> None:  # release devices even if the caller forgot
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown: nothing left to report to
            pass


class _Pacer:
    """Deliver frame ``k`` at ``t0 + k / fps`` (a live camera's clock)."""

    def __init__(self, fps: float):
        self.fps = fps
        self.t0: float | None = None

    def start(self) -> None:
        self.t0 = time.monotonic()

    def due_index(self) -> int:
        assert self.t0 is not None
        return math.floor((time.monotonic() - self.t0) * self.fps)

    def wait_for(self, index: int, timeout: float | None) -> float:
        """Sleep until frame ``index`` is due; :class:`SourceStalled` if that is beyond ``timeout``."""
        assert self.t0 is not None
        due = self.t0 + index / self.fps
        wait = due - time.monotonic()
        if wait > 0:
            if timeout is not None and wait > timeout:
                time.sleep(max(timeout, 0.0))
                raise SourceStalled(f"no frame within {timeout:.3f} s (next frame due in {wait:.3f} s)")
            time.sleep(wait)
        return time.monotonic()
