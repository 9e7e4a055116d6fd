"""``csi://N`` (Jetson, GStreamer ``nvarguscamerasrc``) and ``v4l2:///dev/videoN`` through ``cv2.VideoCapture``."""

from __future__ import annotations

import re
import threading
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


class _PendingRead:
    """One ``cap.read()`` running in its own thread. ``done`` is set when it returns; ``result`` is
    ``(ok, img, error)``. :meth:`release_when_done` hands ``cap.release()`` to this thread, so a capture is
    never released while a read is inside it."""

    def __init__(self, cap: Any):
        self.cap = cap
        self.done = threading.Event()
        self.result: tuple[bool, Any, BaseException | None] = (False, None, None)
        self._lock = threading.Lock()
        self._release = False
        threading.Thread(target=self._run, name="nsdd-capture-read", daemon=True).start()

    def _run(self) -> None:
        try:
            ok, img = self.cap.read()
            self.result = (bool(ok), img, None)
        except Exception as exc:  # noqa: BLE001 - reported to the reader as SourceError
            self.result = (False, None, exc)
        with self._lock:
            self.done.set()
            release = self._release
        if release:
            self.cap.release()

    def release_when_done(self) -> bool:
        """Ask this thread to release the capture after its read; False if the read has already returned
        (then the caller releases it)."""
        with self._lock:
            if self.done.is_set():
                return False
            self._release = True
            return True


class _CaptureSource(FrameSource):
    """Shared ``cv2.VideoCapture`` reading with a watchdog for ``timeout``.

    ``cap.read()`` blocks, so it runs in a helper thread (:class:`_PendingRead`) and a dead camera becomes
    :class:`SourceStalled`. One read at a time: a read that timed out stays pending and the next ``read()``
    waits for that same read instead of starting a second one on the same ``VideoCapture``; ``close()`` never
    releases a capture a thread is still reading — that thread releases it when its read returns — so a
    camera stall cannot crash the process (OpenCV/GStreamer are not safe against concurrent read/release)."""

    _cap: Any = None
    _pending: _PendingRead | None = None

    def _grab(self, timeout: float | None) -> np.ndarray:
        if self._pending is None:
            self._pending = _PendingRead(self._cap)
        pending = self._pending
        if not pending.done.wait(timeout):
            raise SourceStalled(f"{self.uri}: no frame within {timeout} s")
        self._pending = None
        ok, img, error = pending.result
        if error is not None:
            raise SourceError(f"{self.uri}: capture failed ({error})")
        if not ok or img is None:
            raise SourceError(f"{self.uri}: the camera returned no frame (unplugged or busy?)")
        return img

    def _close(self) -> None:
        cap, self._cap = self._cap, None
        pending, self._pending = self._pending, None
        if cap is None:
            return
        if pending is not None and pending.release_when_done():
            return  # the stalled read's thread releases it when (if ever) the driver returns
        cap.release()


# sRGB decoding (IEC 61966-2-1) of 8-bit ISP output to linear intensity, as 16-bit counts
SRGB_TO_LINEAR_U16: np.ndarray = np.rint(65535.0 * np.where(
    np.arange(256) / 255.0 <= 0.04045, np.arange(256) / 255.0 / 12.92,
    ((np.arange(256) / 255.0 + 0.055) / 1.055) ** 2.4)).astype(np.uint16)
LINEARIZATIONS = ("srgb", "none")


class CsiSource(_CaptureSource):
    """``csi://N``: a Jetson CSI camera through GStreamer ``nvarguscamerasrc sensor-id=N``.

    The Argus ISP always demosaics and tone-maps: these frames are *not* raw. To come as close to ``y = Ax`` as
    the ISP allows, the pipeline locks auto exposure and auto white balance (``aelock``, ``awblock``,
    ``wbmode=0``), fixes exposure and analogue gain (``exposure_us=`` 10000, ``gain=`` 1), sets the ISP digital
    gain to 1, turns temporal noise reduction and edge enhancement off (``tnr-mode=0``, ``ee-mode=0``) and
    anti-banding off; ``linearize=srgb`` (default) undoes the output tone curve with the sRGB decoding, as
    uint16 counts 0–65535 — an approximation (the ISP's exact curve is not published); ``linearize=none``
    keeps the ISP's uint8. Every frame's meta says so (``raw: false``). Where the sensor driver allows,
    prefer ``v4l2:///dev/videoN?pixelformat=RG10`` (true raw Bayer). Options ``size=WxH`` (1920x1080),
    ``fps=`` (30), ``flip=`` (nvvidconv flip-method 0–7)."""

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
        self.exposure_us = o.float("exposure_us", 10000.0, positive=True)
        self.gain = o.float("gain", 1.0, minimum=1.0)
        self.linearize = o.str("linearize", "srgb", LINEARIZATIONS)
        options.finish()
        if self.exposure_us > 1e6 / self.fps:
            raise ValueError(f"camera source {uri!r}: exposure_us={self.exposure_us:g} is longer than a frame at "
                             f"fps={self.fps:g} ({1e6 / self.fps:.0f} µs)")
        self.frame_rate = self.fps
        self.is_live = True
        self._index = 0

    def isp_settings(self) -> dict[str, str]:
        """The ``nvarguscamerasrc`` properties that fix exposure and gain and turn the ISP's adaptive steps off."""
        exposure_ns = round(self.exposure_us * 1000)
        return {"aelock": "true", "awblock": "true", "wbmode": "0", "aeantibanding": "0",
                "exposurecompensation": "0", "exposuretimerange": f'"{exposure_ns} {exposure_ns}"',
                "gainrange": f'"{self.gain:g} {self.gain:g}"', "ispdigitalgainrange": '"1 1"',
                "tnr-mode": "0", "ee-mode": "0", "saturation": "1"}

    def pipeline(self) -> str:
        w, h = self.size
        isp = " ".join(f"{k}={v}" for k, v in self.isp_settings().items())
        return (f"nvarguscamerasrc sensor-id={self.sensor_id} {isp} ! video/x-raw(memory:NVMM),width={w},height={h},"
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
                              f"(pipeline: {self.pipeline()}); check the cable, 'systemctl status nvargus-daemon' "
                              "and that /tmp/argus_socket is visible (no PrivateTmp)")
        self._cap = cap
        self._index = 0

    def _read(self, timeout: float | None) -> Frame:
        img = np.ascontiguousarray(self._grab(timeout)[:, :, ::-1])  # BGR → RGB
        index = self._index
        self._index += 1
        meta: dict[str, Any] = {"source": "csi", "sensor_id": self.sensor_id, "bayer_pattern": None, "black_level": 0.0,
                                "raw": False, "isp": "Argus ISP: AE/AWB locked, TNR/EE off, digital gain 1",
                                "exposure_us": self.exposure_us, "analogue_gain": self.gain,
                                "linearization": self.linearize}
        if self.linearize == "srgb":
            img = SRGB_TO_LINEAR_U16[img]
            meta.update({"bit_depth": 16, "white_level": 65535.0})
        else:
            meta.update({"bit_depth": 8, "white_level": 255.0})
        return Frame(data=img, index=index, timestamp=time.monotonic(), meta=meta)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"kind": "Jetson CSI camera (GStreamer, Argus ISP: not raw)", "pipeline": self.pipeline(),
                  "raw": False, "linearization": self.linearize, "exposure_us": self.exposure_us, "gain": self.gain,
                  "note": "ISP-processed RGB with locked exposure/white balance, linearised approximately; "
                          "prefer v4l2:// raw (pixelformat=RG10) where the sensor driver allows"})
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
