"""``file://``: a video, an image directory, a ``.npy`` stack or a single image."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from nsdd_edge.optics import (
    ARRAY_SUFFIXES,
    IMAGE_SUFFIXES,
    OpticsError,
    read_image_native,
)
from nsdd_edge.sources.base import (
    EndOfStream,
    Frame,
    FrameSource,
    FrameUnreadable,
    ParsedUri,
    SourceError,
    _Options,
    _Pacer,
)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv")


def _file_path(parsed: ParsedUri) -> Path:
    """``file:///abs/path`` → /abs/path; ``file://rel/path`` → rel/path; ``file://~/x`` → home."""
    raw = parsed.netloc + parsed.path if parsed.netloc not in ("", "localhost") else parsed.path
    if not raw:
        raise ValueError(f"camera source {parsed.uri!r}: file:// needs a path (file:///path/to/video.mp4)")
    from urllib.parse import unquote

    return Path(unquote(raw)).expanduser()


class FileSource(FrameSource):
    """``file://PATH``: a video (cv2.VideoCapture; frames in RGB), a directory of images (sorted by name;
    16-bit PNG/TIFF stay uint16; ``.npy`` frames allowed), a ``.npy`` stack ``(N, H, W[, C])`` or a
    single image. Options: ``loop=1``, ``fps=`` (media rate; video default from the file),
    ``realtime=1`` (pace at ``fps`` like a camera), ``start=`` (first frame), and frame metadata
    ``bayer=``, ``black_level=``, ``white_level=``, ``gain=``. A JSON sidecar (``PATH.json`` or
    ``DIR/meta.json``) is merged into every frame's meta.

    Not a live camera (unless ``realtime=1``): the loop processes every frame (lossless). An image of a folder
    that cannot be decoded raises :class:`FrameUnreadable` naming it, and the next read goes on with the next
    file (its index is skipped, so the gap shows). Closing and reopening (the loop does so after a fault)
    resumes at the frame after the last one delivered, never back at ``start``."""

    scheme = "file"

    def __init__(self, uri: str, parsed: ParsedUri, options: _Options):
        super().__init__(uri)
        o = options
        self.path = _file_path(parsed)
        self.loop = o.bool("loop", False)
        self.fps = o.float("fps", None, positive=True)
        self.realtime = o.bool("realtime", False)
        self.start = o.int("start", 0, minimum=0)
        meta: dict[str, Any] = {}
        bayer = o.bayer("bayer")
        if bayer:
            meta["bayer_pattern"] = bayer
        for key in ("black_level", "white_level", "gain"):
            v = o.float(key, None, minimum=0.0)
            if v is not None:
                meta[key] = v
        options.finish()
        self._option_meta = meta
        self.is_live = False
        self.kind = "unknown"
        self._count: int | None = None
        self._stack: np.ndarray | None = None
        self._files: list[Path] = []
        self._cap: Any = None
        self._pos = 0
        self._index = 0
        self._meta: dict[str, Any] = {}
        self._pacer: _Pacer | None = None
        self._resume: tuple[int, int] | None = None  # (position, index) to continue at after a reopen

    def _sidecar_meta(self) -> dict[str, Any]:
        if self.path.is_dir():
            candidates = [self.path / "meta.json"]
        else:
            candidates = [self.path.with_name(self.path.name + ".json")]
        for c in candidates:
            if c.is_file():
                try:
                    d = json.loads(c.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise SourceError(f"{c}: corrupted metadata sidecar ({exc})") from None
                if not isinstance(d, dict):
                    raise SourceError(f"{c}: metadata sidecar must hold a JSON object")
                return d
        return {}

    def _open(self) -> None:
        p = self.path
        if not p.exists():
            raise SourceError(f"file source {self.uri!r}: {p} does not exist")
        suffix = p.suffix.lower()
        if p.is_dir():
            self.kind = "image directory"
            self._files = sorted(f for f in p.iterdir()
                                 if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES + (".npy",))
            if not self._files:
                raise SourceError(f"file source {self.uri!r}: directory {p} holds no images "
                                  f"({', '.join(IMAGE_SUFFIXES)}) or .npy frames")
            self._count = len(self._files)
        elif suffix == ".npy":
            self.kind = "npy stack"
            try:
                stack = np.load(p, mmap_mode="r", allow_pickle=False)
            except Exception as exc:  # noqa: BLE001 - numpy raises many types for a corrupt file
                raise SourceError(f"file source {self.uri!r}: {p} is not a readable .npy ({exc})") from None
            if stack.ndim == 2 or (stack.ndim == 3 and stack.shape[-1] in (3, 4) and stack.shape[0] > 4):
                stack = stack[None]  # a single frame
            if stack.ndim not in (3, 4) or (stack.ndim == 4 and stack.shape[-1] not in (1, 3, 4)):
                raise SourceError(f"file source {self.uri!r}: {p} has shape {stack.shape}; expected a stack "
                                  "(N, H, W) or (N, H, W, C) with C in {1, 3, 4}")
            if stack.shape[0] == 0:
                raise SourceError(f"file source {self.uri!r}: {p} holds no frames")
            if not (np.issubdtype(stack.dtype, np.integer) or np.issubdtype(stack.dtype, np.floating)):
                raise SourceError(f"file source {self.uri!r}: {p} has non-numeric dtype {stack.dtype}")
            self._stack = stack
            self._count = stack.shape[0]
        elif suffix in IMAGE_SUFFIXES or suffix in ARRAY_SUFFIXES:
            self.kind = "image"
            self._files = [p]
            self._count = 1
        else:
            import cv2

            self.kind = "video"
            cap = cv2.VideoCapture(str(p))
            if not cap.isOpened():
                raise SourceError(f"file source {self.uri!r}: OpenCV cannot open {p} as a video "
                                  f"(supported: {', '.join(VIDEO_SUFFIXES)} with the codecs of this OpenCV build)")
            self._cap = cap
            n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            self._count = n if n > 0 else None
            if self.fps is None:
                fps = float(cap.get(cv2.CAP_PROP_FPS))
                self.fps = fps if fps > 0 and math.isfinite(fps) else None
        if self._count is not None and self.start >= self._count:
            raise SourceError(f"file source {self.uri!r}: start={self.start} but it holds {self._count} frames")
        self.frame_rate = self.fps
        self._meta = {"source": "file", "path": str(p), **self._sidecar_meta(), **self._option_meta}
        position, self._index = self._resume if self._resume is not None else (self.start, 0)
        if self._count is not None and position >= self._count and not self.loop:
            position = self._count  # everything was delivered before the reopen: the next read ends the stream
        self._seek(position)
        if self.realtime:
            if self.fps is None:
                raise SourceError(f"file source {self.uri!r}: realtime=1 needs fps= (the file has no frame rate)")
            self._pacer = _Pacer(self.fps)
            self._pacer.start()
            self.is_live = True

    def _seek(self, pos: int) -> None:
        self._pos = pos
        if self._cap is not None:
            import cv2

            self._cap.set(cv2.CAP_PROP_POS_FRAMES, pos)

    def _load(self, pos: int) -> np.ndarray | None:
        if self._stack is not None:
            if pos >= self._stack.shape[0]:
                return None
            a = np.array(self._stack[pos])
            if a.ndim == 3 and a.shape[-1] == 1:
                return a[..., 0]
            return a[..., :3] if a.ndim == 3 and a.shape[-1] == 4 else a
        if self._files:
            if pos >= len(self._files):
                return None
            f = self._files[pos]
            try:
                if f.suffix.lower() in ARRAY_SUFFIXES:
                    a = np.load(f, allow_pickle=False)
                    if isinstance(a, np.lib.npyio.NpzFile):
                        with a:
                            a = a[a.files[0]]
                    return np.asarray(a)
                return read_image_native(f)
            except OpticsError as exc:
                raise FrameUnreadable(f"file source {self.uri!r}: frame {pos} skipped: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - numpy raises many types for a corrupt file
                raise FrameUnreadable(f"file source {self.uri!r}: frame {pos} skipped: {f} unreadable "
                                      f"({type(exc).__name__}: {exc})") from None
        ok, bgr = self._cap.read()
        if not ok or bgr is None:
            return None
        return np.ascontiguousarray(bgr[:, :, ::-1]) if bgr.ndim == 3 else bgr

    def _read(self, timeout: float | None) -> Frame:
        try:
            data = self._load(self._pos)
        except FrameUnreadable:
            self._pos += 1  # skip it: the next read delivers the next frame
            self._index += 1
            raise
        if data is None:
            if not self.loop or self._pos == self.start:
                raise EndOfStream(f"{self.uri}: end of {self.kind} after {self._index} frames")
            self._seek(self.start)
            data = self._load(self._pos)
            if data is None:
                raise SourceError(f"file source {self.uri!r}: could not rewind {self.path}")
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            pass  # delivered as is: the preprocessor rejects non-finite frames and the loop counts them
        pos = self._pos
        self._pos += 1
        index = self._index
        self._index += 1
        if self._pacer is not None:
            stamp = self._pacer.wait_for(index, timeout)
        else:
            stamp = index / self.fps if self.fps else float(index)
        return Frame(data=data, index=index, timestamp=stamp, meta={**self._meta, "position": pos})

    def _close(self) -> None:
        self._resume = (self._pos, self._index)
        if self._cap is not None:
            self._cap.release()
            self._cap = None
        self._stack = None

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"kind": self.kind, "path": str(self.path), "frames": self._count, "loop": self.loop})
        return d
