"""Raw sensor buffers (V4L2 / picamera2): fourcc table, unpacking of 16-bit and MIPI-packed Bayer/mono
data, libcamera raw format names."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from nsdd_edge.sources.base import SourceError

# V4L2 fourcc → (Bayer pattern or None for mono, bits, packing: "u16" | "mipi10" | "mipi12")
V4L2_RAW_FORMATS: dict[str, tuple[str | None, int, str]] = {
    **{f"{c}10": (p, 10, "u16") for c, p in (("RG", "RGGB"), ("BA", "GRBG"), ("GB", "GBRG"), ("BG", "BGGR"))},
    **{f"{c}12": (p, 12, "u16") for c, p in (("RG", "RGGB"), ("BA", "GRBG"), ("GB", "GBRG"), ("BG", "BGGR"))},
    "RG16": ("RGGB", 16, "u16"), "GR16": ("GRBG", 16, "u16"), "GB16": ("GBRG", 16, "u16"), "BYR2": ("BGGR", 16, "u16"),
    **{f"p{c}AA": (p, 10, "mipi10") for c, p in (("R", "RGGB"), ("g", "GRBG"), ("G", "GBRG"), ("B", "BGGR"))},
    **{f"p{c}CC": (p, 12, "mipi12") for c, p in (("R", "RGGB"), ("g", "GRBG"), ("G", "GBRG"), ("B", "BGGR"))},
    "Y10 ": (None, 10, "u16"), "Y12 ": (None, 12, "u16"), "Y16 ": (None, 16, "u16"),
}


ALIGNMENTS = ("lsb", "msb")


def unpack_raw(buffer: np.ndarray | bytes, width: int, height: int, packing: str,
               bytes_per_line: int | None = None, *, bits: int | None = None, align: str = "lsb") -> np.ndarray:
    """Raw sensor buffer → uint16 ``(height, width)`` counts in ``[0, 2**bits − 1]``.

    ``u16``: little-endian 16-bit containers (V4L2 RG10/RG12, picamera2 unpacked ``SBGGR12``). ``align`` says
    where a ``bits``-bit value sits in its 16-bit word: ``lsb`` (Pi 4 Unicam, most UVC/USB sensors) as is;
    ``msb`` (Jetson Xavier/Orin VI RAW10/12, Raspberry Pi 5 PiSP ``SBGGR16``): ``value = word >> (16 − bits)``
    (low bits are zero or replicated MSBs). An ``lsb`` frame holding values above ``2**bits − 1`` is refused
    with :class:`SourceError` — that is MSB-aligned data, ×16–×64 too bright.
    ``mipi10``: 4 pixels in 5 bytes (4 high bytes, then the 2-bit remainders); ``mipi12``: 2 pixels in 3 bytes
    (2 high bytes, then the two 4-bit remainders); alignment does not apply. Rows may be padded
    (``bytes_per_line``, default: the buffer size / height)."""
    if align not in ALIGNMENTS:
        raise ValueError(f"unknown raw alignment {align!r}; use lsb or msb")
    if bits is not None and not 1 <= bits <= 16:
        raise ValueError(f"raw bit depth {bits} does not fit 16-bit words")
    raw = np.frombuffer(buffer, dtype=np.uint8) if isinstance(buffer, (bytes, bytearray, memoryview)) \
        else np.ascontiguousarray(buffer).reshape(-1).view(np.uint8)
    row_bytes = {"u16": 2 * width, "mipi10": (width * 5 + 3) // 4, "mipi12": (width * 3 + 1) // 2}.get(packing)
    if row_bytes is None:
        raise ValueError(f"unknown raw packing {packing!r}; use u16, mipi10 or mipi12")
    stride = bytes_per_line or (raw.size // height if height and raw.size % height == 0 else 0)
    if stride < row_bytes or raw.size < stride * height:
        raise SourceError(f"raw buffer of {raw.size} bytes is too small for {width}x{height} {packing} "
                          f"(needs {row_bytes} bytes per row)")
    rows = raw[: stride * height].reshape(height, stride)[:, :row_bytes]
    if packing == "u16":
        words = np.ascontiguousarray(rows).view("<u2").astype(np.uint16, copy=False)
        if bits is None or bits == 16:
            return words
        if align == "msb":
            return words >> np.uint16(16 - bits)
        peak = int(words.max())
        if peak > 2 ** bits - 1:
            raise SourceError(f"raw {bits}-bit frame holds values up to {peak} > {2 ** bits - 1}: the data is "
                              f"MSB-aligned in its 16-bit words (Jetson VI, Raspberry Pi 5); use align=msb")
        return words
    if packing == "mipi10":
        groups = rows[:, : (width // 4) * 5].reshape(height, -1, 5).astype(np.uint16)
        out = np.empty((height, groups.shape[1], 4), np.uint16)
        for k in range(4):
            out[..., k] = (groups[..., k] << 2) | ((groups[..., 4] >> (2 * k)) & 0x3)
        return out.reshape(height, -1)[:, :width]
    groups = rows[:, : (width // 2) * 3].reshape(height, -1, 3).astype(np.uint16)
    out = np.empty((height, groups.shape[1], 2), np.uint16)
    out[..., 0] = (groups[..., 0] << 4) | (groups[..., 2] & 0xF)
    out[..., 1] = (groups[..., 1] << 4) | (groups[..., 2] >> 4)
    return out.reshape(height, -1)[:, :width]


def is_tegra() -> bool:
    """A Jetson (Tegra SoC): ``/etc/nv_tegra_release`` or an ``nvidia,tegra`` device-tree compatible."""
    if Path("/etc/nv_tegra_release").exists():
        return True
    try:
        return b"nvidia,tegra" in Path("/proc/device-tree/compatible").read_bytes()
    except OSError:
        return False


def parse_libcamera_raw_format(fmt: str) -> tuple[str | None, int, bool]:
    """``'SBGGR12'`` → ``('BGGR', 12, False)``; ``'SRGGB10_CSI2P'`` → ``('RGGB', 10, True)`` (packed);
    ``'R12'`` (mono) → ``(None, 12, False)``."""
    m = re.fullmatch(r"S?(RGGB|BGGR|GRBG|GBRG)(\d+)(_CSI2P)?", fmt) or re.fullmatch(r"()R(\d+)(_CSI2P)?", fmt)
    if not m:
        raise SourceError(f"picamera2: raw format {fmt!r} is not an uncompressed Bayer/mono format "
                          "(request an unpacked format such as SBGGR12; Pi 5 compressed PISP formats are lossy)")
    return (m.group(1) or None), int(m.group(2)), bool(m.group(3))
