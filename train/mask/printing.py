"""Printable files of a binary mask: a PNG with one pixel per fabrication cell and an SVG of its openings.

- PNG: 8-bit grayscale, open = 255 (white, transmits), opaque = 0; its ``pHYs`` chunk records the
  fabrication pitch (pixels per metre = 10⁶ / pitch_µm), so a photoplotter or a print dialog that honours
  it reproduces the physical size.
- SVG: the openings as axis-aligned rectangles (runs of open cells in a row, merged with identical runs in
  the rows below), in a ``viewBox`` of cells, with ``width``/``height`` in millimetres. The opaque
  background is a black rectangle, the openings are white.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from nsdd_edge.atomic import atomic_write_bytes, atomic_write_text


def _binary(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2 or not np.isin(m, (0, 1)).all():
        raise ValueError(f"a printable mask must be a 2-D array of 0/1, got shape {m.shape} "
                         f"with values {np.unique(m)[:5]}")
    return m.astype(bool)


def png_bytes(mask: np.ndarray, pitch_um: float) -> bytes:
    """PNG of a 0/1 mask (one pixel per cell) with the physical pitch in its ``pHYs`` chunk."""
    from PIL import Image

    img = Image.fromarray(np.where(_binary(mask), 255, 0).astype(np.uint8), mode="L")
    dpi = 25400.0 / float(pitch_um)
    buf = io.BytesIO()
    img.save(buf, format="PNG", dpi=(dpi, dpi))
    return buf.getvalue()


def write_png(path: str | os.PathLike, mask: np.ndarray, pitch_um: float) -> Path:
    atomic_write_bytes(path, png_bytes(mask, pitch_um))
    return Path(path)


def open_rectangles(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """The openings as ``(row, col, height, width)`` rectangles that tile them exactly, without overlap."""
    m = _binary(mask)
    rects: list[list[int]] = []
    active: dict[tuple[int, int], list[int]] = {}  # (col, width) -> rectangle still growing downwards
    for r in range(m.shape[0]):
        row = np.concatenate([[False], m[r], [False]]).astype(np.int8)
        starts = np.flatnonzero(np.diff(row) == 1)
        ends = np.flatnonzero(np.diff(row) == -1)
        runs = {(int(s), int(e - s)) for s, e in zip(starts, ends)}
        grown = {}
        for run in runs:
            if run in active:
                active[run][2] += 1
                grown[run] = active[run]
            else:
                rect = [r, run[0], 1, run[1]]
                rects.append(rect)
                grown[run] = rect
        active = grown
    return [tuple(r) for r in sorted(rects)]


def svg_text(mask: np.ndarray, pitch_um: float) -> str:
    """SVG of the openings (white) on the opaque background (black), physical size in millimetres."""
    m = _binary(mask)
    h, w = m.shape
    mm = float(pitch_um) / 1000.0
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * mm:.6g}mm" height="{h * mm:.6g}mm" '
         f'viewBox="0 0 {w} {h}" shape-rendering="crispEdges">'),
        f'<!-- binary amplitude mask: {h}x{w} cells of {pitch_um:g} µm; white = open -->',
        f'<rect x="0" y="0" width="{w}" height="{h}" fill="black"/>',
        '<g fill="white">',
    ]
    lines += [f'<rect x="{c}" y="{r}" width="{cw}" height="{rh}"/>' for r, c, rh, cw in open_rectangles(m)]
    lines += ["</g>", "</svg>", ""]
    return "\n".join(lines)


def write_svg(path: str | os.PathLike, mask: np.ndarray, pitch_um: float) -> Path:
    atomic_write_text(path, svg_text(mask, pitch_um))
    return Path(path)
