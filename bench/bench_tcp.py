#!/usr/bin/env python3
"""tcp:// bytes per frame and the frame-rate ceiling of the link: raw frames against ``serve-camera --model``.

A Raspberry Pi HQ camera frame (2028×1520 Bayer, 12 bits in uint16) is sent as it is, or binned/cropped on the
Pi with a bundle's preprocessing (``nsdd_edge.preprocess.Preprocessor``, the code both sides run) and sent as
``y`` (float32). For each case: the bytes of one frame message exactly as ``nsdd_edge.framing`` writes it
(prefix + JSON header with picamera2-like metadata + payload), and the frame-rate ceiling

    fps_max = link_bits_per_s × 1448 / 1538 / (8 × bytes_per_message)

(1448 TCP payload bytes per 1538-byte Ethernet frame at MTU 1500 with TCP timestamps; Wi-Fi taken at a net
50 Mbit/s with the same factor). The ceiling ignores everything else on the link and the capture rate.
Preprocessing milliseconds are measured on *this* machine (median of ``--repeats``), not on a Pi.

    python bench/bench_tcp.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nsdd_edge import framing
from nsdd_edge.bundle import PreprocessConfig
from nsdd_edge.preprocess import Preprocessor

HQ_SIZE = (1520, 2028)  # rows, columns of the HQ camera's 2x2-binned 12-bit mode
LINKS = {"1 GbE": 1e9, "50 Mbit/s": 50e6}
TCP_EFFICIENCY = 1448 / 1538
PI_META = {"source": "picamera2", "bayer_pattern": "BGGR", "bit_depth": 12, "raw_format": "SBGGR12",
           "alignment": "lsb", "black_level": 256.0, "white_level": 4095.0, "exposure_us": 10000,
           "analogue_gain": 1.0, "gain": 1.0, "colour_gains": [1.0, 1.0], "sensor_timestamp_ns": 123456789012,
           "sensor_temperature": 41.0}


def hq_profile(sensor: int | None, downsample: int) -> PreprocessConfig:
    """The HQ camera's preprocessing for a bundle of ``sensor``² (None: binning only): bin 2×2, box-downsample,
    centre crop."""
    crop = None
    if sensor is not None:
        h, w = HQ_SIZE[0] // 2 // downsample, HQ_SIZE[1] // 2 // downsample
        crop = [(h - sensor) // 2, (w - sensor) // 2, sensor, sensor]
    return PreprocessConfig(black_level=256.0, white_level=4095.0, bayer_pattern="BGGR", demosaic="bin2x2",
                            downsample=downsample, crop=crop, normalization="fixed", scale=3800.0)


def message_bytes(data: np.ndarray, meta: dict) -> int:
    """Bytes of one frame message on the wire (prefix, header, payload)."""
    head, payload = framing.frame_message(data, 12345, 1.0e9, meta)
    return sum(len(c) if isinstance(c, bytes) else c.nbytes for c in framing.pack_message(head, payload))


def fps_ceiling(nbytes: int, bits_per_s: float) -> float:
    return bits_per_s * TCP_EFFICIENCY / (8 * nbytes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    raw = (256 + rng.integers(0, 3000, size=HQ_SIZE)).astype(np.uint16)
    rows = [("raw frame (no --model)", raw.shape, raw.dtype.name, message_bytes(raw, PI_META), None)]
    for label, sensor, down in (("--model, bundle 128² (bin2x2, ↓4, crop)", 128, 4),
                                ("--model, bundle 256² (bin2x2, ↓2, crop)", 256, 2),
                                ("--model, bundle 512² (bin2x2, crop)", 512, 1),
                                ("--model, binning only (bin2x2)", None, 1)):
        pre = Preprocessor(hq_profile(sensor, down))
        times = []
        for _ in range(max(1, args.repeats)):
            t0 = time.perf_counter()
            y = pre(raw, PI_META)
            times.append((time.perf_counter() - t0) * 1e3)
        meta = {**PI_META, "preprocessed": {"digest": pre.digest, "bundle": "hq", "raw_shape": list(raw.shape),
                                            "raw_dtype": "uint16"}}
        if y.nbytes >= raw.nbytes:  # serve-camera sends the raw frame then
            label += " → sent raw (y larger)"
            rows.append((label, y.shape, "float32", message_bytes(raw, PI_META), statistics.median(times)))
        else:
            rows.append((label, y.shape, "float32", message_bytes(y, meta), statistics.median(times)))
    print("tcp:// frames from a Raspberry Pi HQ camera (2028x1520, 12-bit); fps ceilings at "
          f"{TCP_EFFICIENCY:.3f} TCP efficiency; preprocessing ms on this machine")
    print(f"{'case':<52} {'shape':>16} {'dtype':>7} {'bytes/frame':>12} "
          + " ".join(f"{'fps ' + k:>15}" for k in LINKS) + f" {'prep ms':>8}")
    for label, shape, dtype, nbytes, ms in rows:
        fps = " ".join(f"{fps_ceiling(nbytes, bps):>15.1f}" for bps in LINKS.values())
        print(f"{label:<52} {'x'.join(map(str, shape)):>16} {dtype:>7} {nbytes:>12,} {fps} "
              f"{'' if ms is None else f'{ms:8.1f}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
