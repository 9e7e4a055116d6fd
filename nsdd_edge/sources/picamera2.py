"""``picamera2://N``: Raspberry Pi cameras through libcamera (raw Bayer)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from nsdd_edge.sources.base import (
    Frame,
    FrameSource,
    ParsedUri,
    SourceError,
    SourceStalled,
    _Options,
)
from nsdd_edge.sources.raw import parse_libcamera_raw_format, unpack_raw


class PiCamera2Source(FrameSource):
    """``picamera2://[N]``: raw Bayer frames from a Raspberry Pi camera (HQ camera: 2028×1520 12-bit).

    The unpacked raw format of the chosen sensor mode is requested and viewed as uint16; the Bayer order
    comes from ``camera_configuration()['raw']['format']`` (the HQ camera reports SBGGR12 because it is
    mounted upside down). Exposure, analogue gain and colour gains are locked (``exposure_us=``,
    ``gain=``, ``colour_gains=R,B``); ``fps=`` fixes the frame duration; ``size=WxH``, ``bits=``.

    Frames are always in the sensor mode's own ``bits``: a Pi 4 (Unicam) delivers ``SBGGR12`` with the values in
    the low bits; a Pi 5 (PiSP) delivers unpacked raw as ``SBGGR16`` with the 12-bit values in the high bits,
    which are shifted down (and ``SensorBlackLevels``, on a 16-bit scale, scaled alike), so one bundle fits both.
    """

    scheme = "picamera2"

    def __init__(self, uri: str, parsed: ParsedUri, options: _Options):
        super().__init__(uri)
        o = options
        num = (parsed.netloc or parsed.path.strip("/") or "0")
        if not num.isdigit():
            raise ValueError(f"camera source {uri!r}: picamera2://N takes a camera number, got {num!r}")
        self.camera_num = int(num)
        self.size = o.size("size", (2028, 1520))
        self.bits = o.int("bits", 12, minimum=8)
        self.exposure_us = o.int("exposure_us", 10000, minimum=1)
        self.gain = o.float("gain", 1.0, minimum=1.0)
        cg = o.str("colour_gains", "1.0,1.0") or "1.0,1.0"
        try:
            r, b = (float(v) for v in cg.split(","))
        except ValueError:
            raise ValueError(f"camera source {uri!r}: colour_gains={cg!r} must be R,B such as 1.8,1.5") from None
        self.colour_gains = (r, b)
        self.fps = o.float("fps", 40.0, positive=True)
        self.frame_rate = self.fps
        self.buffer_count = o.int("buffers", 4, minimum=2)
        options.finish()
        self.is_live = True
        self._cam: Any = None
        self._job: Any = None
        self._index = 0
        self._pattern: str | None = None
        self._raw_bits = self.bits
        self._raw_size = self.size
        self._raw_format = ""
        self._align = "lsb"

    def _open(self) -> None:
        try:
            from picamera2 import Picamera2  # type: ignore[import-not-found]
        except ImportError as exc:
            raise SourceError(f"{self.uri}: the picamera2 library is not installed ({exc}); on Raspberry Pi OS "
                              "run 'sudo apt install python3-picamera2' and use a venv with "
                              "--system-site-packages (deploy/pi/setup.sh)") from None
        try:
            cam = Picamera2(camera_num=self.camera_num)
        except Exception as exc:  # noqa: BLE001 - libcamera raises many types for a missing camera
            raise SourceError(f"{self.uri}: cannot open Raspberry Pi camera {self.camera_num} "
                              f"({type(exc).__name__}: {exc})") from None
        try:
            modes = [m for m in cam.sensor_modes if tuple(m["size"]) == self.size and m["bit_depth"] == self.bits]
            if not modes:
                have = ", ".join(f"{m['size'][0]}x{m['size'][1]}@{m['bit_depth']}bit" for m in cam.sensor_modes)
                raise SourceError(f"{self.uri}: the sensor has no {self.size[0]}x{self.size[1]} {self.bits}-bit "
                                  f"mode (it has {have})")
            mode = modes[0]
            frame_us = round(1e6 / self.fps)
            config = cam.create_video_configuration(
                raw={"format": mode["unpacked"], "size": mode["size"]},
                sensor={"output_size": mode["size"], "bit_depth": mode["bit_depth"]},
                buffer_count=self.buffer_count,
                controls={"AeEnable": False, "AwbEnable": False, "ExposureTime": self.exposure_us,
                          "AnalogueGain": self.gain, "ColourGains": self.colour_gains,
                          "FrameDurationLimits": (frame_us, frame_us)})
            cam.configure(config)
            raw_cfg = cam.camera_configuration()["raw"]
            self._pattern, container_bits, packed = parse_libcamera_raw_format(str(raw_cfg["format"]))
            if packed:
                raise SourceError(f"{self.uri}: libcamera gave the packed format {raw_cfg['format']}; "
                                  "an unpacked one is needed")
            self._raw_format = str(raw_cfg["format"])
            self._raw_bits = int(mode["bit_depth"])
            # Pi 5: SBGGR16 holds the sensor's bits MSB-aligned; Pi 4: SBGGR12 holds them LSB-aligned
            self._align = "msb" if container_bits > self._raw_bits else "lsb"
            self._raw_size = tuple(raw_cfg["size"])
            cam.start()
        except BaseException:
            cam.close()
            raise
        self._cam = cam
        self._index = 0

    def _read(self, timeout: float | None) -> Frame:
        cam = self._cam
        try:
            if self._job is None:  # a request that timed out last time is still pending: keep waiting for it
                self._job = cam.capture_request(wait=False)
            request = cam.wait(self._job, timeout=timeout)  # Job.get_result → concurrent.futures TimeoutError
        except TimeoutError:
            raise SourceStalled(f"{self.uri}: no frame within {timeout} s") from None
        except Exception as exc:  # noqa: BLE001
            self._job = None
            raise SourceError(f"{self.uri}: capture failed ({type(exc).__name__}: {exc})") from None
        self._job = None
        try:
            buf = request.make_array("raw")
            md = request.get_metadata()
        finally:
            request.release()
        w, h = self._raw_size
        data = unpack_raw(buf, w, h, "u16", bytes_per_line=buf.shape[1] if buf.ndim == 2 else None,
                          bits=self._raw_bits, align=self._align)
        black16 = md.get("SensorBlackLevels", [4096])  # libcamera reports them on a 16-bit scale
        black = float(np.mean(black16)) / 2 ** (16 - self._raw_bits)
        meta = {"source": "picamera2", "bayer_pattern": self._pattern, "bit_depth": self._raw_bits,
                "raw_format": self._raw_format, "alignment": self._align,
                "black_level": black, "white_level": float(2 ** self._raw_bits - 1),
                "exposure_us": md.get("ExposureTime"), "analogue_gain": md.get("AnalogueGain"),
                "gain": 1.0, "colour_gains": md.get("ColourGains"), "sensor_timestamp_ns": md.get("SensorTimestamp"),
                "sensor_temperature": md.get("SensorTemperature")}
        index = self._index
        self._index += 1
        return Frame(data=data, index=index, timestamp=time.monotonic(), meta=meta)

    def _close(self) -> None:
        if self._cam is not None:
            self._job = None
            try:
                self._cam.stop()
            finally:
                self._cam.close()
                self._cam = None

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"kind": "Raspberry Pi camera (libcamera raw)", "camera": self.camera_num,
                  "size": list(self._raw_size), "bit_depth": self._raw_bits, "bayer_pattern": self._pattern,
                  "exposure_us": self.exposure_us, "gain": self.gain, "colour_gains": list(self.colour_gains)})
        return d
