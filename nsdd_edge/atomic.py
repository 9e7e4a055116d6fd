"""Atomic file writes: a reader sees the old file or the whole new one, never a half-written file.

The one mechanism (:func:`atomic_write`), used by the device runtime, ``train`` and ``export`` alike:

1. create the parent directories;
2. ``tempfile.mkstemp`` in the target's own directory (same file system, so the rename is atomic), named
   ``.NAME.XXXXXXXX.tmp`` (hidden; a run killed mid-write leaves only such files, easy to sweep with
   the glob ``.*.tmp``);
3. set the permissions to ``mode`` (default ``0o644``, like a normal file; ``mkstemp`` makes ``0o600``);
4. ``write(f)`` with the open binary file, then flush and ``fsync``;
5. ``os.replace`` the temporary file over the target.

On any exception (``BaseException``: also ``KeyboardInterrupt``) the temporary file is removed and the
exception re-raised unchanged, so e.g. an ``OSError`` with ``errno.ENOSPC`` reaches the caller as such;
the old file, if any, is untouched.

Thin wrappers: :func:`atomic_write_bytes`, :func:`atomic_write_text`, :func:`atomic_write_json`,
:func:`atomic_save_npy`. Anything else (PNG via ``cv2.imencode``, ``np.savez``, ``torch.save``,
``fig.savefig``, ``onnx.save_model``) uses the callback form::

    atomic_write(path, lambda f: torch.save(obj, f))

Depends on numpy only (no torch), as all of ``nsdd_edge``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = ["FILE_MODE", "atomic_save_npy", "atomic_write", "atomic_write_bytes", "atomic_write_json",
           "atomic_write_text"]

FILE_MODE = 0o644
"""Permissions of written files (``rw-r--r--``), whatever the umask: readable like a normal file."""


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any], *, mode: int | None = FILE_MODE) -> None:
    """Write ``path`` atomically by calling ``write(f)`` on a temporary file in the same directory.

    ``f`` is a binary file opened for writing; ``f.name`` is the temporary file's path (some writers,
    e.g. ``onnx.save_model``, look at it). ``write`` must not close ``f``. ``mode``: the written file's
    permissions (``None`` keeps ``mkstemp``'s private ``0o600``). Parent directories are created. On any
    exception the temporary file is removed and the exception re-raised; ``path`` is then unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.close(fd)
        if mode is not None:
            os.chmod(tmp, mode)
        with open(tmp, "wb") as f:  # opened by name so that f.name is a path
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview, *,
                       mode: int | None = FILE_MODE) -> None:
    """Write the bytes ``data`` to ``path`` atomically (see :func:`atomic_write`); ``mode``: its permissions
    (``0o600`` for files holding anything private: session files, tokens)."""
    atomic_write(path, lambda f: f.write(data), mode=mode)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically, encoded with ``encoding`` (no newline translation)."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, **json_kwargs: Any) -> None:
    """Write ``json.dumps(obj, **json_kwargs)`` plus a final newline to ``path`` atomically (UTF-8).

    ``json_kwargs`` default to ``indent=2``; e.g. ``sort_keys=True``, ``default=str``, ``allow_nan=False``.
    """
    json_kwargs.setdefault("indent", 2)
    atomic_write_text(path, json.dumps(obj, **json_kwargs) + "\n")


def atomic_save_npy(path: str | os.PathLike, array: Any, *, allow_pickle: bool = False) -> None:
    """``np.save`` ``array`` to ``path`` (the exact name: no ``.npy`` is appended) atomically."""
    atomic_write(path, lambda f: np.save(f, np.asanyarray(array), allow_pickle=allow_pickle))
