"""Lossless recorder: every captured measurement, its reconstruction and its metadata, each file atomic.

Per frame ``NNNNNNNN`` (the recorder's own sequence number; the source's frame index is in the metadata,
since a camera that is reopened may restart its count). Recording into a directory that already holds a
recording continues the numbering after its last frame and writes ``session-K.json``: nothing is overwritten.

- ``NNNNNNNN.raw.png`` — integer raw data of ≤ 16 bits, shape (H, W) or (H, W, 3): 8/16-bit PNG, lossless
  (3-channel frames are RGB and stored in PNG's usual colour order); anything else (float, 32-bit, other
  layouts) ``NNNNNNNN.raw.npy``, bit-exact.
- ``NNNNNNNN.recon.npy`` (float32 (C, H, W), the whole engine output) and ``NNNNNNNN.recon.png`` (8-bit
  view, clipped to [0, 1]; of the ``view`` given, e.g. the bundle's support window, else of the whole output).
- ``NNNNNNNN.json`` — frame index, timestamps, source metadata, bundle hash, engine, file names.

``session.json`` describes the run (mode 0600; any token in it is masked, :mod:`nsdd_edge.redact`). Each file
is written to a temporary file in the same directory,
fsynced and renamed into place (:func:`nsdd_edge.atomic.atomic_write_bytes`), so a crash or power cut never leaves a half-written file. When the disk
is full (ENOSPC) the recorder stops, keeps everything already written, and says so in ``stopped_reason``.
"""

from __future__ import annotations

import errno
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nsdd_edge.atomic import FILE_MODE, atomic_write_bytes
from nsdd_edge.redact import redact_obj

Writer = Callable[..., None]  # writer(path, data, *, mode) — atomic_write_bytes, or a fault-injecting stand-in
SESSION_MODE = 0o600


class RecorderError(RuntimeError):
    """The recorder cannot write (bad directory, disk full, I/O error)."""


class DiskFull(RecorderError):
    """ENOSPC while writing: recording stopped, earlier files kept."""


def _json_default(o: Any):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def encode_png(img: np.ndarray) -> bytes:
    """Encode an (H, W) or (H, W, 3 RGB) uint8/uint16 array as PNG bytes (lossless)."""
    import cv2

    if img.ndim == 3:
        img = np.ascontiguousarray(img[..., ::-1])  # RGB -> BGR for OpenCV
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise RecorderError(f"OpenCV could not encode a PNG of shape {img.shape} dtype {img.dtype}")
    return buf.tobytes()


def encode_npy(a: np.ndarray) -> bytes:
    bio = io.BytesIO()
    np.save(bio, np.ascontiguousarray(a), allow_pickle=False)
    return bio.getvalue()


def raw_png_ok(raw: np.ndarray) -> bool:
    """True when PNG stores ``raw`` exactly: unsigned ≤ 16-bit integers, (H, W) or (H, W, 3)."""
    return raw.dtype in (np.uint8, np.uint16) and (raw.ndim == 2 or (raw.ndim == 3 and raw.shape[2] == 3))


def to_view8(x: np.ndarray) -> np.ndarray:
    """(C, H, W) float in [0, 1] → (H, W) or (H, W, 3) uint8 (clipped, rounded)."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0)
    img = np.clip(np.rint(np.clip(x, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)
    return img[0] if img.shape[0] == 1 else np.moveaxis(img[:3], 0, -1)


@dataclass
class Recorder:
    """Writes frames under ``root``; see the module docstring. ``writer(path, data, mode=…)`` is the atomic file
    writer (replaceable to inject faults or delays in tests)."""

    root: Path
    session: dict = field(default_factory=dict)
    writer: Writer = atomic_write_bytes
    recorded: int = 0
    stopped_reason: str | None = None
    _files: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.root = Path(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise RecorderError(f"--record {self.root}: exists and is not a directory")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RecorderError(f"--record {self.root}: cannot create the directory ({exc.strerror})") from exc
        if not os.access(self.root, os.W_OK):
            raise RecorderError(f"--record {self.root}: directory is not writable")
        stems = [int(p.name[:8]) for p in self.root.glob("[0-9]" * 8 + ".*") if p.name[:8].isdigit()]
        self.next_sequence = max(stems) + 1 if stems else 0
        name, k = "session.json", 1
        while (self.root / name).exists():
            k += 1
            name = f"session-{k}.json"
        self.session = redact_obj({"started": time.time(), "first_sequence": self.next_sequence, **self.session})
        self.session_file = name
        self._write(name, (json.dumps(self.session, indent=2, default=_json_default) + "\n").encode(),
                    mode=SESSION_MODE)

    @property
    def active(self) -> bool:
        return self.stopped_reason is None

    def _write(self, name: str, data: bytes, mode: int = FILE_MODE) -> None:
        path = self.root / name
        try:
            self.writer(path, data, mode=mode)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self.stopped_reason = (f"disk full while writing {path}: recording stopped; the {self.recorded} "
                                       f"frame(s) already recorded in {self.root} are intact")
                raise DiskFull(self.stopped_reason) from exc
            self.stopped_reason = f"cannot write {path} ({exc.strerror or exc}); recording stopped"
            raise RecorderError(self.stopped_reason) from exc

    def record(self, index: int, raw: np.ndarray, recon: np.ndarray | None, meta: dict,
               view: np.ndarray | None = None) -> list[str]:
        """Write one frame (source frame ``index``): raw data, reconstruction (if any) and metadata, under
        the next sequence number; returns the file names. ``view``: what the 8-bit PNG shows (default
        ``recon``; the loop passes the support crop of a bundle with a support window).

        The metadata JSON is written last, so its presence means the frame's other files are complete.
        Raises :class:`DiskFull` / :class:`RecorderError` (and stops) when a file cannot be written.
        """
        if not self.active:
            raise RecorderError(self.stopped_reason or "recorder stopped")
        sequence = self.next_sequence
        stem = f"{sequence:08d}"
        raw = np.asarray(raw)
        files: list[str] = []
        if raw_png_ok(raw):
            name, data = f"{stem}.raw.png", encode_png(raw)
        else:
            name, data = f"{stem}.raw.npy", encode_npy(raw)
        self._write(name, data)
        files.append(name)
        if recon is not None:
            recon = np.asarray(recon, dtype=np.float32)
            self._write(f"{stem}.recon.npy", encode_npy(recon))
            self._write(f"{stem}.recon.png", encode_png(to_view8(recon if view is None else view)))
            files += [f"{stem}.recon.npy", f"{stem}.recon.png"]
        recon_record = None
        if recon is not None:
            recon_record = {"file": files[1], "view": files[2]}
            if view is not None:
                recon_record["view_shape"] = list(np.shape(view))
        full = {"sequence": sequence, "frame_index": int(index), "recorded_at": time.time(), **meta,
                "raw": {"file": files[0], "dtype": str(raw.dtype), "shape": list(raw.shape)},
                "recon": recon_record}
        self._write(f"{stem}.json", (json.dumps(full, indent=2, default=_json_default) + "\n").encode())
        files.append(f"{stem}.json")
        self.recorded += 1
        self.next_sequence += 1
        return files


def read_recorded_raw(path: str | os.PathLike) -> np.ndarray:
    """Read back a recorded raw frame exactly as captured (PNG in RGB order, or .npy)."""
    import cv2

    p = Path(path)
    if p.suffix == ".npy":
        return np.load(p, allow_pickle=False)
    img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise RecorderError(f"{p}: not a readable PNG")
    return img[..., ::-1] if img.ndim == 3 else img
