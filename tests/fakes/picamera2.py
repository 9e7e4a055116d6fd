"""A stand-in for ``picamera2`` (the calls :class:`nsdd_edge.sources.PiCamera2Source` makes) for machines
without a Raspberry Pi camera: ``Picamera2(camera_num)``, ``sensor_modes``, ``create_video_configuration``,
``configure``, ``camera_configuration``, ``start``, ``capture_request(wait=False)``, ``wait(job, timeout)``,
``request.make_array("raw")`` / ``get_metadata()`` / ``release()``, ``stop``, ``close``.

``BOARD`` picks how the raw buffer looks, as picamera2's manual describes the two boards: ``"pi4"`` (Unicam)
returns ``SBGGR12`` with the 12-bit values in the low bits of each 16-bit word; ``"pi5"`` (PiSP) returns
``SBGGR16`` with the same values in the high bits (low bits: the top bits repeated). ``SensorBlackLevels`` is on
a 16-bit scale on both. The scene is :func:`counts` (12-bit, seeded), so a test can compare the two boards.
"""

from __future__ import annotations

import numpy as np

BOARD = "pi4"
SIZE = (64, 48)  # width, height of the fake sensor mode
STRIDE_PAD = 32  # bytes of row padding, as real buffers have


def counts(index: int) -> np.ndarray:
    """The 12-bit Bayer counts of frame ``index``: black level 256 plus a seeded pattern, some saturated."""
    rng = np.random.default_rng(index)
    w, h = SIZE
    c = 256 + rng.integers(0, 3000, size=(h, w))
    c[0, :4] = 4095
    return c.astype(np.uint16)


class _Request:
    def __init__(self, index: int):
        self.index = index
        self.released = False

    def make_array(self, name: str) -> np.ndarray:
        assert name == "raw"
        c = counts(self.index)
        words = c if BOARD == "pi4" else (c << 4) | (c >> 8)
        raw = words.astype("<u2").view(np.uint8)
        return np.concatenate([raw, np.zeros((raw.shape[0], STRIDE_PAD), np.uint8)], axis=1)

    def get_metadata(self) -> dict:
        return {"SensorBlackLevels": [4096, 4096, 4096, 4096], "ExposureTime": 10000, "AnalogueGain": 1.0,
                "ColourGains": (1.0, 1.0), "SensorTimestamp": 1000 * self.index, "SensorTemperature": 40.0}

    def release(self) -> None:
        self.released = True


class Picamera2:
    def __init__(self, camera_num: int = 0):
        self.camera_num = camera_num
        self.sensor_modes = [{"size": SIZE, "bit_depth": 12, "unpacked": "SBGGR12",
                              "format": "SBGGR12_CSI2P" if BOARD == "pi4" else "BGGR16_PISP_COMP1"}]
        self.config: dict | None = None
        self.started = False
        self._index = 0

    def create_video_configuration(self, raw=None, sensor=None, buffer_count=4, controls=None) -> dict:
        return {"raw": dict(raw or {}), "sensor": dict(sensor or {}), "buffer_count": buffer_count,
                "controls": dict(controls or {})}

    def configure(self, config: dict) -> None:
        self.config = config

    def camera_configuration(self) -> dict:
        fmt = "SBGGR12" if BOARD == "pi4" else "SBGGR16"
        return {"raw": {"format": fmt, "size": SIZE, "stride": 2 * SIZE[0] + STRIDE_PAD}}

    def start(self) -> None:
        self.started = True

    def capture_request(self, wait: bool = True):
        job = self._index
        self._index += 1
        return job

    def wait(self, job, timeout=None) -> _Request:
        return _Request(job)

    def stop(self) -> None:
        self.started = False

    def close(self) -> None:
        pass
