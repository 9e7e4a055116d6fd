"""``csi://N`` (Jetson, GStreamer ``nvarguscamerasrc``) and ``v4l2:///dev/videoN`` through ``cv2.VideoCapture``."""

from __future__ import annotations

import re
import time
from pathlib import Path
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
from nsdd_edge.sources.raw import ALIGNMENTS, V4L2_RAW_FORMATS, is_tegra, unpack_raw


def _gstreamer_available() -> bool:
    import cv2

    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line.split(":", 1)[1]
    return False


def _v4l2_available() -> bool:
    import cv2

    for line in cv2.getBuildInformation().splitlines():
        if "v4l" in line.lower() and ":" in line:
            return "YES" in line.split(":", 1)[1]
    return False


class _CaptureSource(FrameSource):
    """Shared ``cv2.VideoCapture`` reading with a watchdog for ``timeout``."""

    _cap: Any = None

    def _grab(self, timeout: float | None) -> np.ndarray:
        # cv2.VideoCapture.read blocks; run it in a helper thread so a dead camera becomes SourceStalled.
        import threading

        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["ok"], result["img"] = self._cap.read()
            except Exception as exc:  # noqa: BLE001
                result["error"] = exc

        if timeout is None:
            work()
        else:
            t = threading.Thread(target=work, daemon=True)
            t.start()
            t.join(timeout)
            if t.is_alive():
                raise SourceStalled(f"{self.uri}: no frame within {timeout} s")
        if "error" in result:
            raise SourceError(f"{self.uri}: capture failed ({result['error']})")
        if not result.get("ok") or result.get("img") is None:
            raise SourceError(f"{self.uri}: the camera returned no frame (unplugged or busy?)")
        return result["img"]

    def _close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class CsiSource(_CaptureSource):
    """``csi://N``: a Jetson CSI camera through GStreamer ``nvarguscamerasrc sensor-id=N`` (ISP-processed
    RGB, uint8). Options ``size=WxH`` (1920x1080), ``fps=`` (30), ``flip=`` (nvvidconv flip-method 0–7)."""

    scheme = "csi"

    def __init__(self, uri: str, parsed: ParsedUri, options: _Options):
        super().__init__(uri)
        o = options
        num = parsed.netloc or parsed.path.strip("/")
        if not num.isdigit():
            raise ValueError(f"camera source {uri!r}: csi://N takes a sensor id such as csi://0")
        self.sensor_id = int(num)
        self.size = o.size("size", (1920, 1080))
        self.fps = o.float("fps", 30.0, positive=True)
        self.flip = o.int("flip", 0, minimum=0)
        options.finish()
        self.frame_rate = self.fps
        self.is_live = True
        self._index = 0

    def pipeline(self) -> str:
        w, h = self.size
        return (f"nvarguscamerasrc sensor-id={self.sensor_id} ! video/x-raw(memory:NVMM),width={w},height={h},"
                f"format=NV12,framerate={round(self.fps)}/1 ! nvvidconv flip-method={self.flip} ! "
                "video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=1")

    def _open(self) -> None:
        import cv2

        if not _gstreamer_available():
            raise SourceError(f"{self.uri}: this OpenCV build has no GStreamer support "
                              "(cv2.getBuildInformation() says GStreamer: NO); on Jetson use the system OpenCV "
                              "from JetPack (python3-opencv) in a venv with --system-site-packages")
        cap = cv2.VideoCapture(self.pipeline(), cv2.CAP_GSTREAMER)
        if not cap.isOpened():
            raise SourceError(f"{self.uri}: GStreamer could not open CSI camera {self.sensor_id} "
                              f"(pipeline: {self.pipeline()}); check the cable and 'nvargus-daemon'")
        self._cap = cap
        self._index = 0

    def _read(self, timeout: float | None) -> Frame:
        img = self._grab(timeout)
        index = self._index
        self._index += 1
        return Frame(data=np.ascontiguousarray(img[:, :, ::-1]), index=index, timestamp=time.monotonic(),
                     meta={"source": "csi", "sensor_id": self.sensor_id, "bit_depth": 8, "black_level": 0.0,
                           "white_level": 255.0, "bayer_pattern": None})

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"kind": "Jetson CSI camera (GStreamer)", "pipeline": self.pipeline()})
        return d


class V4l2Source(_CaptureSource):
    """``v4l2:///dev/videoN``: a V4L2 camera. With ``pixelformat=`` a raw Bayer fourcc (``RG10``, ``BG12``,
    ``pRAA``, ...) the driver's buffer is read unconverted (CAP_PROP_CONVERT_RGB off) and unpacked to
    uint16 counts (:func:`~nsdd_edge.sources.raw.unpack_raw`); otherwise frames are RGB uint8. Options
    ``size=WxH``, ``fps=``, ``black_level=``, ``align=auto|msb|lsb``: where RAW10/12 sit in 16-bit words —
    ``auto`` is ``msb`` on a Jetson (the Tegra VI writes them MSB-aligned) and ``lsb`` elsewhere."""

    scheme = "v4l2"

    def __init__(self, uri: str, parsed: ParsedUri, options: _Options):
        super().__init__(uri)
        o = options
        self.device = parsed.path or ("/dev/" + parsed.netloc if parsed.netloc else "")
        if not re.fullmatch(r"/dev/\S+", self.device):
            raise ValueError(f"camera source {uri!r}: v4l2 needs a device path such as v4l2:///dev/video0")
        self.pixelformat = o.str("pixelformat")
        if self.pixelformat is not None:
            self.pixelformat = self.pixelformat.ljust(4)
            if self.pixelformat not in V4L2_RAW_FORMATS:
                raise ValueError(f"camera source {uri!r}: pixelformat={self.pixelformat.strip()!r} is not a raw "
                                 f"format this source unpacks ({', '.join(k.strip() for k in V4L2_RAW_FORMATS)})")
        self.size = o.size("size")
        self.fps = o.float("fps", None, positive=True)
        self.black_level = o.float("black_level", None, minimum=0.0)
        align = o.str("align", "auto", ("auto", *ALIGNMENTS))
        self.align = ("msb" if is_tegra() else "lsb") if align == "auto" else align
        options.finish()
        self.frame_rate = self.fps
        self.is_live = True
        self._index = 0

    def _open(self) -> None:
        import cv2

        if not Path(self.device).exists():
            raise SourceError(f"{self.uri}: no such device {self.device} (is the camera connected? 'v4l2-ctl "
                              "--list-devices' lists them)")
        cap = cv2.VideoCapture(self.device, cv2.CAP_V4L2)
        if not cap.isOpened():
            raise SourceError(f"{self.uri}: OpenCV could not open {self.device} with V4L2 (busy, or no permission: "
                              "add the user to the 'video' group)")
        if self.size:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.size[0])
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.size[1])
        if self.fps:
            cap.set(cv2.CAP_PROP_FPS, self.fps)
        if self.pixelformat:
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*self.pixelformat))
            cap.set(cv2.CAP_PROP_CONVERT_RGB, 0)
        self._cap = cap
        self._width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        self._height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        self._index = 0

    def _read(self, timeout: float | None) -> Frame:
        img = self._grab(timeout)
        meta: dict[str, Any] = {"source": "v4l2", "device": self.device}
        if self.pixelformat:
            pattern, bits, packing = V4L2_RAW_FORMATS[self.pixelformat]
            data = unpack_raw(img, self._width, self._height, packing, bits=bits, align=self.align)
            meta.update({"bayer_pattern": pattern, "bit_depth": bits, "white_level": float(2 ** bits - 1),
                         "pixelformat": self.pixelformat.strip(), "alignment": self.align})
        else:
            data = np.ascontiguousarray(img[:, :, ::-1]) if img.ndim == 3 else img
            meta.update({"bayer_pattern": None, "bit_depth": 8, "white_level": 255.0})
        if self.black_level is not None:
            meta["black_level"] = self.black_level
        index = self._index
        self._index += 1
        return Frame(data=data, index=index, timestamp=time.monotonic(), meta=meta)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"kind": "V4L2 camera", "device": self.device, "pixelformat": self.pixelformat,
                  "alignment": self.align})
        return d
