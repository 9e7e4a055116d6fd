"""Camera sources by URI: parsing, sim://, file://, hardware error messages, raw unpacking, tcp:// via serve-camera."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from nsdd_edge import framing
from nsdd_edge.commands.serve_camera import CameraServer, parse_bind
from nsdd_edge.optics import LenslessGeometry
from nsdd_edge.psf_sim import simulate_psf
from nsdd_edge.sources import (
    EndOfStream,
    FileSource,
    FrameSource,
    SimCamera,
    SourceError,
    SourceStalled,
    _gstreamer_available,
    available_sources,
    open_source,
    parse_libcamera_raw_format,
    unpack_raw,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def psf32() -> np.ndarray:
    return simulate_psf("contour", (32, 32), 1)


# ------------------------------------------------------------------------------------------------
# URI parsing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("uri, words", [
    ("", ["empty", "sim://"]),
    ("video.mp4", ["not a URI", "file://"]),
    ("rtsp://cam/stream", ["unknown scheme", "'rtsp'", "sim://", "tcp://"]),
    ("sim://?fps=fast", ["fps='fast'", "number"]),
    ("sim://?fps=-3", ["fps"]),
    ("sim://?colour=red", ["unknown option", "colour"]),
    ("sim://?fps=1&fps=2", ["given twice"]),
    ("sim://?motion=spin", ["motion", "pan"]),
    ("sim://somewhere/else", ["no host or path"]),
    ("sim://?format=bayer&bayer=RGBG", ["Bayer pattern"]),
    ("file://", ["needs a path"]),
    ("tcp://camera-host", ["host:port"]),
    ("tcp://camera-host:99999", ["port"]),
    ("csi://front", ["sensor id"]),
    ("v4l2://", ["device path"]),
    ("v4l2:///dev/video0?pixelformat=XXXX", ["pixelformat", "RG10"]),
    ("picamera2://left", ["camera number"]),
    ("picamera2://0?size=big", ["WIDTHxHEIGHT"]),
])
def test_bad_uris_name_the_uri_and_the_problem(uri, words):
    with pytest.raises(ValueError) as info:
        open_source(uri)
    message = str(info.value)
    assert repr(uri) in message
    for w in words:
        assert w in message


def test_good_uris_parse_into_their_sources():
    sim = open_source("sim://?fps=30&seed=0&noise=0.005&motion=pan", size=32)
    assert isinstance(sim, SimCamera) and sim.frame_rate == 30.0 and sim.noise == 0.005 and sim.is_live
    tcp = open_source("tcp://raspberrypi.local:5000?token=abc")
    assert (tcp.host, tcp.port, tcp.token) == ("raspberrypi.local", 5000, "abc")
    v4l2 = open_source("v4l2:///dev/video3?pixelformat=RG10&size=1920x1080")
    assert v4l2.device == "/dev/video3" and v4l2.size == (1920, 1080)
    csi = open_source("csi://1?size=1280x720&fps=60")
    assert "sensor-id=1" in csi.pipeline() and "width=1280" in csi.pipeline() and "framerate=60/1" in csi.pipeline()
    assert "nvarguscamerasrc" in csi.pipeline() and "appsink" in csi.pipeline()
    pi = open_source("picamera2://0?exposure_us=5000&gain=2&colour_gains=1.5,1.8")
    assert (pi.camera_num, pi.exposure_us, pi.gain, pi.colour_gains) == (0, 5000, 2.0, (1.5, 1.8))
    assert pi.size == (2028, 1520) and pi.bits == 12
    # keyword options win over the query
    assert open_source("sim://?fps=10", fps=25, size=32).frame_rate == 25.0


def test_available_sources_reports_every_scheme():
    avail = available_sources()
    assert set(avail) == {"sim", "file", "picamera2", "csi", "v4l2", "tcp"}
    for ok, reason in avail.values():
        assert isinstance(ok, bool) and isinstance(reason, str) and reason
    assert avail["sim"][0] and avail["file"][0]
    assert avail["csi"][0] == _gstreamer_available()


# ------------------------------------------------------------------------------------------------
# sim://
# ------------------------------------------------------------------------------------------------


def test_sim_frames_have_raw_layout_metadata_and_rate(psf32):
    src = open_source("sim://?fps=30&seed=0&realtime=0&frames=3", psf=psf32)
    frames = list(src)
    assert [f.index for f in frames] == [0, 1, 2]
    assert [f.timestamp for f in frames] == pytest.approx([0, 1 / 30, 2 / 30])
    for f in frames:
        assert f.data.shape == (32, 32, 3) and f.data.dtype == np.uint16
        assert f.data.max() <= 4095 and f.data.min() >= 0
        assert f.meta["black_level"] == 256 and f.meta["gain"] == 3800 and f.meta["bit_depth"] == 12
        assert f.meta["white_level"] == 4095
    assert not np.array_equal(frames[0].data, frames[2].data)  # the scene pans
    with pytest.raises(EndOfStream):
        src.read()
    d = src.describe()
    assert d["frame_rate"] == 30.0 and d["preprocess"]["scale"] == 3800 and d["geometry"]["model"] == "circular"

    bayer = open_source("sim://?realtime=0&format=bayer&bayer=BGGR", psf=psf32).read()
    assert bayer.data.shape == (64, 64) and bayer.meta["bayer_pattern"] == "BGGR"
    mono = open_source("sim://?realtime=0&channels=1", psf=psf32).read()
    assert mono.data.shape == (32, 32) and mono.meta["bayer_pattern"] is None


def test_sim_content_is_deterministic_per_seed(psf32):
    def first(seed):
        return open_source(f"sim://?realtime=0&seed={seed}", psf=psf32).read().data

    np.testing.assert_array_equal(first(3), first(3))
    assert not np.array_equal(first(3), first(4))
    a = open_source("sim://?realtime=0&seed=5", psf=psf32)
    b = open_source("sim://?realtime=0&seed=5", psf=psf32)
    np.testing.assert_array_equal(a.raw_frame(7), b.raw_frame(7))  # per (seed, index), not per call order
    np.testing.assert_array_equal(a.raw_frame(7), a.raw_frame(7))


def test_sim_forward_model_is_the_shared_convolution(psf32):
    """The noiseless measurement equals the circular convolution with the PSF (via WienerSpectra.H)."""
    src = open_source("sim://?realtime=0&motion=static", psf=psf32)
    x = src.scene(0)
    y = src.measurement(0)
    kernel = np.fft.ifftshift(psf32[0])
    direct = np.real(np.fft.ifft2(np.fft.fft2(x) * np.fft.fft2(kernel)))
    np.testing.assert_allclose(y, direct, atol=1e-5)
    assert x.min() >= 0 and x.max() <= 1


def test_sim_crop_geometry_and_point_scene(psf32):
    geom = LenslessGeometry.make("crop", (32, 32), scene_shape=(16, 16), conv_shape=(64, 64))
    src = open_source("sim://?realtime=0&scene=point&channels=1&noise=0&photons=0", psf=psf32, geometry=geom)
    f = src.read()
    assert f.data.shape == (32, 32)
    y = src.measurement(0)
    assert y.max() == pytest.approx(0.8, rel=1e-5)  # point_level
    # a point at the scene centre images the (centred) PSF
    np.testing.assert_allclose(y[0] / y.sum(), psf32[0] / psf32.sum(), atol=1e-6)


def test_sim_live_pacing_and_stall(psf32):
    src = open_source("sim://?fps=200", psf=psf32)
    assert src.is_live
    frames = [src.read(timeout=1.0) for _ in range(3)]
    idx = [f.index for f in frames]
    assert idx == sorted(set(idx))
    stamps = [f.timestamp for f in frames]
    assert stamps == sorted(stamps)
    slow = open_source("sim://?fps=0.01", psf=psf32)
    slow.read(timeout=1.0)  # frame 0 is due at once
    with pytest.raises(SourceStalled):
        slow.read(timeout=0.0)  # the next one is 100 s away


def test_sim_user_images(tmp_path, psf32):
    d = tmp_path / "imgs"
    d.mkdir()
    cv2.imwrite(str(d / "a.png"), np.full((40, 50, 3), (0, 0, 255), np.uint8))  # BGR: pure red
    cv2.imwrite(str(d / "b.png"), np.full((40, 50, 3), (255, 0, 0), np.uint8))  # pure blue
    src = open_source(f"sim://?realtime=0&images={d}&hold=0.1&fps=10&motion=static", psf=psf32)
    x0, x1 = src.scene(0), src.scene(1)
    np.testing.assert_allclose(x0[:, 10:20, 10:20].mean(axis=(1, 2)), [1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(x1[:, 10:20, 10:20].mean(axis=(1, 2)), [0, 0, 1], atol=1e-6)
    # start=N begins at the N-th image of the sorted folder
    late = open_source(f"sim://?realtime=0&images={d}&hold=0.1&fps=10&motion=static&start=1", psf=psf32)
    np.testing.assert_allclose(late.scene(0)[:, 10:20, 10:20].mean(axis=(1, 2)), [0, 0, 1], atol=1e-6)
    with pytest.raises(SourceError, match="start=5"):
        open_source(f"sim://?realtime=0&images={d}&start=5", psf=psf32).open()
    with pytest.raises(SourceError, match="not a directory"):
        open_source(f"sim://?images={tmp_path / 'missing'}", psf=psf32).open()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no image files"):
        open_source(f"sim://?images={tmp_path / 'empty'}", psf=psf32).open()


def test_sim_static_shows_one_image_for_the_whole_run_unless_hold_is_given(tmp_path, psf32):
    """issue 16: motion=static keeps image `start` however late the frame (the picture must not depend on
    machine speed); an explicit hold= cycles; pan/zoom cycle every 3 s by default."""
    d = tmp_path / "imgs"
    d.mkdir()
    for name, bgr in (("a", (0, 0, 255)), ("b", (255, 0, 0)), ("c", (0, 255, 0))):
        cv2.imwrite(str(d / f"{name}.png"), np.full((40, 50, 3), bgr, np.uint8))
    static = open_source(f"sim://?realtime=0&images={d}&motion=static&start=1&fps=30", psf=psf32)
    assert static.describe()["hold_s"] is None
    for index in (0, 89, 90, 10_000, 1_000_000):  # 0 s, 3 s, 5.6 min, 9 h at 30 fps
        assert static.image_number(index) == 1
        np.testing.assert_allclose(static.scene(index)[:, 10:20, 10:20].mean(axis=(1, 2)), [0, 0, 1], atol=1e-6)
    cycling = open_source(f"sim://?realtime=0&images={d}&motion=static&start=1&fps=30&hold=3", psf=psf32)
    assert [cycling.image_number(i) for i in (0, 89, 90, 180, 270)] == [1, 1, 2, 0, 1]
    panning = open_source(f"sim://?realtime=0&images={d}&motion=pan&fps=30", psf=psf32)
    assert panning.describe()["hold_s"] == 3.0 and [panning.image_number(i) for i in (0, 90)] == [0, 1]
    with pytest.raises(ValueError, match="hold"):
        open_source(f"sim://?images={d}&motion=static&hold=0", psf=psf32)


# ------------------------------------------------------------------------------------------------
# file://
# ------------------------------------------------------------------------------------------------


def test_file_npy_stack_with_loop_and_sidecar(tmp_path):
    stack = np.random.default_rng(0).integers(0, 4096, size=(3, 6, 8), dtype=np.uint16)
    path = tmp_path / "stack.npy"
    np.save(path, stack)
    (tmp_path / "stack.npy.json").write_text(json.dumps({"black_level": 64, "exposure_us": 1000}))
    src = open_source(f"file://{path}?bayer=RGGB")
    assert isinstance(src, FileSource) and not src.is_live
    frames = list(src)
    assert len(frames) == 3
    for i, f in enumerate(frames):
        np.testing.assert_array_equal(f.data, stack[i])
        assert f.meta["black_level"] == 64 and f.meta["bayer_pattern"] == "RGGB" and f.meta["exposure_us"] == 1000
    looped = open_source(f"file://{path}?loop=1&start=1")
    got = [looped.read() for _ in range(4)]
    assert [g.meta["position"] for g in got] == [1, 2, 1, 2]
    assert [g.index for g in got] == [0, 1, 2, 3]


def test_file_image_directory_keeps_16_bit(tmp_path):
    d = tmp_path / "frames"
    d.mkdir()
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 65535, size=(5, 7), dtype=np.uint16) for _ in range(3)]
    for i, img in enumerate(imgs[::-1]):  # written in reverse; read back sorted by name
        cv2.imwrite(str(d / f"{2 - i:03d}.png"), img)
    rgb = rng.integers(0, 65535, size=(5, 7, 3), dtype=np.uint16)
    cv2.imwrite(str(d / "003.tif"), rgb[:, :, ::-1])
    frames = list(open_source(f"file://{d}"))
    assert len(frames) == 4
    for f, img in zip(frames[:3], imgs):
        assert f.data.dtype == np.uint16
        np.testing.assert_array_equal(f.data, img)
    np.testing.assert_array_equal(frames[3].data, rgb)  # returned in RGB order


def test_file_video_written_by_cv2(tmp_path):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 12, (32, 24))
    assert writer.isOpened()
    for i in range(5):
        writer.write(np.full((24, 32, 3), (200, 100, 20 * i), np.uint8))  # BGR
    writer.release()
    src = open_source(f"file://{path}")
    frames = list(src)
    assert len(frames) == 5 and src.frame_rate == pytest.approx(12)
    for i, f in enumerate(frames):
        assert f.data.shape == (24, 32, 3) and f.data.dtype == np.uint8
        np.testing.assert_allclose(f.data[12, 16].astype(float), [20 * i, 100, 200], atol=6)  # RGB
    assert frames[2].timestamp == pytest.approx(2 / 12)
    looped = open_source(f"file://{path}?loop=1")
    assert len([looped.read() for _ in range(7)]) == 7


def test_file_errors_name_the_path(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        open_source(f"file://{tmp_path / 'nope.npy'}").open()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no images"):
        open_source(f"file://{tmp_path / 'empty'}").open()
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    with pytest.raises(SourceError, match="junk.mp4"):
        open_source(f"file://{tmp_path / 'junk.mp4'}").open()
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 4, 5, 6)))
    with pytest.raises(SourceError, match="shape"):
        open_source(f"file://{tmp_path / 'bad.npy'}").open()


# ------------------------------------------------------------------------------------------------
# Hardware sources on a machine without the hardware
# ------------------------------------------------------------------------------------------------


def test_picamera2_missing_library_is_a_clear_error():
    try:
        import picamera2  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("picamera2 is installed here")
    with pytest.raises(SourceError, match="picamera2") as info:
        open_source("picamera2://0").open()
    assert "apt install python3-picamera2" in str(info.value)


@pytest.mark.skipif(_gstreamer_available(), reason="this OpenCV has GStreamer")
def test_csi_without_gstreamer_is_a_clear_error():
    with pytest.raises(SourceError, match="GStreamer"):
        open_source("csi://0").open()


# nvarguscamerasrc's properties as `gst-inspect-1.0 nvarguscamerasrc` lists them on JetPack 6 (from review of
# NVIDIA's Argus camera documentation; not inspectable here)
NVARGUS_PROPERTIES = {"sensor-id", "sensor-mode", "wbmode", "saturation", "exposuretimerange", "gainrange",
                      "ispdigitalgainrange", "tnr-mode", "tnr-strength", "ee-mode", "ee-strength", "aeantibanding",
                      "exposurecompensation", "aelock", "awblock", "timeout", "silent", "bufapi-version"}


def test_csi_pipeline_locks_the_isp():
    """issue 14 #7: AE/AWB locked, exposure and analogue gain fixed, ISP digital gain 1, TNR and edge enhancement
    off, anti-banding off; every property is one nvarguscamerasrc has and every quoted range is balanced."""
    import shlex

    csi = open_source("csi://0?exposure_us=8000&gain=2&fps=30")
    pipe = csi.pipeline()
    src = pipe.split(" ! ")[0]
    props = dict(tok.split("=", 1) for tok in shlex.split(src)[1:])
    assert set(props) <= NVARGUS_PROPERTIES, set(props) - NVARGUS_PROPERTIES
    assert props["aelock"] == props["awblock"] == "true" and props["wbmode"] == "0"
    assert props["exposuretimerange"] == "8000000 8000000" and props["gainrange"] == "2 2"
    assert props["ispdigitalgainrange"] == "1 1" and props["tnr-mode"] == "0" and props["ee-mode"] == "0"
    assert props["aeantibanding"] == "0" and props["sensor-id"] == "0"
    assert csi.describe()["raw"] is False and "v4l2" in csi.describe()["note"]
    with pytest.raises(ValueError, match="longer than a frame"):
        open_source("csi://0?exposure_us=50000&fps=30")
    with pytest.raises(ValueError, match="linearize"):
        open_source("csi://0?linearize=gamma22")


class _BlockingCapture:
    """A cv2.VideoCapture stand-in whose read() blocks until released by the test (a stalled camera driver).
    It records reads running at once and a release() that lands while a read is inside (both crash OpenCV)."""

    def __init__(self):
        self.unblock = threading.Event()
        self.lock = threading.Lock()
        self.reading = 0
        self.reads_started = 0
        self.max_concurrent = 0
        self.released = 0
        self.released_during_read = False
        self.value = 0

    def read(self):
        with self.lock:
            self.reading += 1
            self.reads_started += 1
            self.max_concurrent = max(self.max_concurrent, self.reading)
        self.unblock.wait(10.0)
        with self.lock:
            self.reading -= 1
            self.value += 40
        return True, np.full((4, 4, 3), self.value, np.uint8)

    def release(self):
        with self.lock:
            self.released += 1
            self.released_during_read |= self.reading > 0


def _opened(uri: str, cap) -> object:
    src = open_source(uri)
    src._cap, src._is_open = cap, True
    return src


def test_capture_stall_never_reads_twice_or_releases_under_a_read():
    """issue 14 #8: after a timed-out read, the next read waits for the same pending read (no second read on the
    VideoCapture), close() does not release the capture under the blocked read, and the reading thread releases
    it once the driver returns."""
    cap = _BlockingCapture()
    src = _opened("v4l2:///dev/video0", cap)
    for _ in range(3):
        with pytest.raises(SourceStalled):
            src.read(timeout=0.05)
    assert cap.reads_started == 1 and cap.max_concurrent == 1
    src.close()
    assert cap.released == 0
    cap.unblock.set()
    deadline = time.monotonic() + 5.0
    while cap.released == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cap.released == 1 and not cap.released_during_read


def test_capture_recovers_the_pending_frame_and_linearises_csi():
    """A stalled read that completes later delivers its frame; csi:// frames are linearised (sRGB decoding) and
    say they are not raw."""
    cap = _BlockingCapture()
    src = _opened("csi://0", cap)
    with pytest.raises(SourceStalled):
        src.read(timeout=0.05)
    cap.unblock.set()
    frame = src.read(timeout=5.0)
    assert cap.reads_started == 1 and frame.index == 0 and frame.data.dtype == np.uint16
    v = 40 / 255.0
    assert frame.data[0, 0, 0] == round(65535 * ((v + 0.055) / 1.055) ** 2.4)
    assert frame.meta["raw"] is False and frame.meta["linearization"] == "srgb" and frame.meta["white_level"] == 65535
    src.close()
    assert cap.released == 1 and not cap.released_during_read
    from nsdd_edge.sources.capture import SRGB_TO_LINEAR_U16

    assert SRGB_TO_LINEAR_U16[0] == 0 and SRGB_TO_LINEAR_U16[255] == 65535 and np.all(np.diff(SRGB_TO_LINEAR_U16) > 0)
    plain = _opened("csi://0?linearize=none", _BlockingCapture())
    plain._cap.unblock.set()
    f = plain.read(timeout=5.0)
    assert f.data.dtype == np.uint8 and f.meta["white_level"] == 255.0 and f.meta["linearization"] == "none"
    plain.close()


def test_v4l2_missing_device_is_a_clear_error():
    with pytest.raises(SourceError, match="/dev/video_nsdd_missing"):
        open_source("v4l2:///dev/video_nsdd_missing").open()


def test_tcp_unreachable_host_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(SourceError, match="serve-camera"):
        open_source(f"tcp://127.0.0.1:{port}?connect_timeout=1").read(timeout=1)


# ------------------------------------------------------------------------------------------------
# Raw buffers
# ------------------------------------------------------------------------------------------------


def _pack_mipi10(px: np.ndarray) -> np.ndarray:
    g = px.reshape(px.shape[0], -1, 4).astype(np.uint16)
    out = np.zeros((px.shape[0], g.shape[1], 5), np.uint8)
    out[..., :4] = (g >> 2).astype(np.uint8)
    out[..., 4] = sum(((g[..., k] & 3) << (2 * k)) for k in range(4)).astype(np.uint8)
    return out.reshape(px.shape[0], -1)


def _pack_mipi12(px: np.ndarray) -> np.ndarray:
    g = px.reshape(px.shape[0], -1, 2).astype(np.uint16)
    out = np.zeros((px.shape[0], g.shape[1], 3), np.uint8)
    out[..., 0] = (g[..., 0] >> 4).astype(np.uint8)
    out[..., 1] = (g[..., 1] >> 4).astype(np.uint8)
    out[..., 2] = ((g[..., 0] & 0xF) | ((g[..., 1] & 0xF) << 4)).astype(np.uint8)
    return out.reshape(px.shape[0], -1)


def test_unpack_raw_formats_with_row_padding():
    rng = np.random.default_rng(2)
    h, w = 4, 8
    px10 = rng.integers(0, 1024, size=(h, w), dtype=np.uint16)
    px12 = rng.integers(0, 4096, size=(h, w), dtype=np.uint16)
    pad = np.zeros((h, 6), np.uint8)
    u16 = np.concatenate([px12.astype("<u2").view(np.uint8), pad], axis=1)  # stride 22 bytes
    np.testing.assert_array_equal(unpack_raw(u16, w, h, "u16"), px12)
    p10 = np.concatenate([_pack_mipi10(px10), pad], axis=1)
    np.testing.assert_array_equal(unpack_raw(p10.tobytes(), w, h, "mipi10", bytes_per_line=p10.shape[1]), px10)
    p12 = _pack_mipi12(px12)
    np.testing.assert_array_equal(unpack_raw(p12, w, h, "mipi12"), px12)
    with pytest.raises(SourceError, match="too small"):
        unpack_raw(np.zeros(10, np.uint8), w, h, "u16")


def _msb(px: np.ndarray, bits: int) -> np.ndarray:
    """How the Jetson VI / Pi 5 store ``bits``-bit values: in the high bits, the low bits repeating the top ones."""
    shift = 16 - bits
    return ((px << shift) | (px >> (bits - shift))).astype(np.uint16)


@pytest.mark.parametrize("bits", [10, 12])
def test_unpack_raw_msb_aligned_words(bits):
    """issue 14 #6: RAW10/12 MSB-aligned in 16-bit words (Tegra VI) unpack to the sensor's counts, not ×16–×64;
    reading such a frame as LSB-aligned is refused with the fix in the message."""
    rng = np.random.default_rng(bits)
    px = rng.integers(0, 2 ** bits, size=(6, 8), dtype=np.uint16)
    px[0, 0] = 2 ** bits - 1
    buf = _msb(px, bits).astype("<u2").view(np.uint8)
    np.testing.assert_array_equal(unpack_raw(buf, 8, 6, "u16", bits=bits, align="msb"), px)
    with pytest.raises(SourceError, match="align=msb"):
        unpack_raw(buf, 8, 6, "u16", bits=bits, align="lsb")
    lsb = px.astype("<u2").view(np.uint8)
    np.testing.assert_array_equal(unpack_raw(lsb, 8, 6, "u16", bits=bits, align="lsb"), px)
    with pytest.raises(ValueError, match="alignment"):
        unpack_raw(lsb, 8, 6, "u16", bits=bits, align="middle")


def test_v4l2_raw_alignment_is_msb_on_a_jetson(monkeypatch):
    from nsdd_edge.sources import capture

    monkeypatch.setattr(capture, "is_tegra", lambda: True)
    assert open_source("v4l2:///dev/video0?pixelformat=RG12").align == "msb"
    assert open_source("v4l2:///dev/video0?pixelformat=RG12&align=lsb").align == "lsb"
    monkeypatch.setattr(capture, "is_tegra", lambda: False)
    src = open_source("v4l2:///dev/video0?pixelformat=RG10")
    assert src.align == "lsb" and src.describe()["alignment"] == "lsb"
    with pytest.raises(ValueError, match="align"):
        open_source("v4l2:///dev/video0?pixelformat=RG10&align=up")


@pytest.fixture
def fake_picamera2(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "fakes"))
    monkeypatch.delitem(sys.modules, "picamera2", raising=False)
    import picamera2

    yield picamera2
    sys.modules.pop("picamera2", None)


def test_picamera2_pi4_and_pi5_give_the_same_12_bit_counts(fake_picamera2):
    """issue 14 #11: a Pi 5 (SBGGR16, MSB-aligned) must deliver what a Pi 4 (SBGGR12) delivers, so a bundle
    calibrated on one works on the other: same counts, bit depth, white and black level."""
    frames = {}
    for board in ("pi4", "pi5"):
        fake_picamera2.BOARD = board
        with open_source("picamera2://0?size=64x48&bits=12") as cam:
            frames[board] = [cam.read(timeout=1.0) for _ in range(2)]
    for f4, f5 in zip(frames["pi4"], frames["pi5"]):
        np.testing.assert_array_equal(f4.data, fake_picamera2.counts(f4.index))
        np.testing.assert_array_equal(f5.data, f4.data)
        for key in ("bit_depth", "white_level", "black_level", "bayer_pattern"):
            assert f5.meta[key] == f4.meta[key], key
    assert frames["pi4"][0].meta["black_level"] == 256.0 and frames["pi4"][0].meta["white_level"] == 4095.0
    assert frames["pi5"][0].meta["alignment"] == "msb" and frames["pi4"][0].meta["alignment"] == "lsb"


def test_libcamera_raw_format_names():
    assert parse_libcamera_raw_format("SBGGR12") == ("BGGR", 12, False)
    assert parse_libcamera_raw_format("SRGGB10_CSI2P") == ("RGGB", 10, True)
    assert parse_libcamera_raw_format("R12") == (None, 12, False)
    with pytest.raises(SourceError, match="compressed"):
        parse_libcamera_raw_format("BGGR16_PISP_COMP1")


# ------------------------------------------------------------------------------------------------
# tcp:// through serve-camera
# ------------------------------------------------------------------------------------------------


def test_framing_round_trip_and_corruption():
    a, b = socket.socketpair()
    with a, b:
        data = np.arange(24, dtype=np.uint16).reshape(4, 6)
        head, payload = framing.frame_message(data, 7, 1.5, {"gain": np.float32(2.0)})
        framing.send_message(a, head, payload)
        header, body = framing.recv_message(b)
        out, index, stamp, meta = framing.decode_frame(header, body)
        np.testing.assert_array_equal(out, data)
        assert (index, stamp, meta) == (7, 1.5, {"gain": 2.0})
        a.sendall(b"GARBAGE" + bytes(13))
        with pytest.raises(framing.FramingError, match="magic"):
            framing.recv_message(b)
    header["shape"] = [5, 6]
    with pytest.raises(framing.FramingError, match="bytes"):
        framing.decode_frame(header, body)


@pytest.fixture()
def served_stack(tmp_path):
    stack = np.random.default_rng(3).integers(0, 4096, size=(4, 6, 8), dtype=np.uint16)
    path = tmp_path / "stack.npy"
    np.save(path, stack)
    source = open_source(f"file://{path}?bayer=GRBG&black_level=64")
    server = CameraServer(source, "127.0.0.1", 0, token="s3cret", allow_takeover=True, log=lambda msg: None)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_s": 0.05}, daemon=True)
    thread.start()
    yield stack, server
    server.shutdown()
    thread.join(5)
    source.close()
    assert not thread.is_alive()


def test_tcp_round_trip_through_serve_camera(served_stack):
    stack, server = served_stack
    port = server.address[1]
    client = open_source(f"tcp://127.0.0.1:{port}?token=s3cret")
    first = client.read(timeout=5)
    np.testing.assert_array_equal(first.data, stack[0])
    assert first.data.dtype == np.uint16 and first.index == 0
    assert first.meta["bayer_pattern"] == "GRBG" and first.meta["black_level"] == 64
    assert client.describe()["remote"]["scheme"] == "file"
    # a second client with the token takes over (--allow-takeover: reconnect after a lost network), continuing the
    # same camera stream
    second = open_source(f"tcp://127.0.0.1:{port}?token=s3cret")
    np.testing.assert_array_equal(second.read(timeout=5).data, stack[1])
    np.testing.assert_array_equal(second.read(timeout=5).data, stack[2])
    np.testing.assert_array_equal(second.read(timeout=5).data, stack[3])
    with pytest.raises(EndOfStream):
        second.read(timeout=5)
    second.close()
    client.close()
    assert server.frames_sent == 4 and server.clients_served == 2


def test_serve_camera_bins_and_crops_with_the_bundles_preprocessing(psf32):
    """issue 14 #12: with the bundle's preprocessing on the capture host the client receives y (float32),
    bit-identical to preprocessing the raw frame itself, in a fraction of the bytes; a client whose bundle
    preprocesses differently refuses it, and a frame the host's preprocessing refuses arrives raw."""
    from nsdd_edge.bundle import PreprocessConfig
    from nsdd_edge.preprocess import Preprocessor, ProfileMismatch

    uri = "sim://?realtime=0&format=bayer&bayer=GBRG&seed=2&frames=6"
    camera = open_source(uri, psf=psf32)
    config = PreprocessConfig(**{**camera.matching_preprocess(), "downsample": 2, "crop": [2, 2, 12, 12]})
    host_pre = Preprocessor(config)
    server = CameraServer(camera, "127.0.0.1", 0, log=lambda msg: None, preprocess=host_pre, bundle_name="b")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_s": 0.05}, daemon=True)
    thread.start()
    reference = open_source(uri, psf=psf32)
    try:
        client = open_source(f"tcp://127.0.0.1:{server.address[1]}")
        client_pre = Preprocessor(config)
        for _ in range(2):
            frame = client.read(timeout=5)
            raw = reference.read()
            assert frame.data.dtype == np.float32 and frame.data.shape == (3, 12, 12) and raw.data.shape == (64, 64)
            assert frame.meta["preprocessed"]["digest"] == client_pre.digest
            assert frame.meta["preprocessed"]["raw_shape"] == [64, 64] and frame.meta["bit_depth"] == 12
            np.testing.assert_array_equal(client_pre(frame.data, frame.meta), Preprocessor(config)(raw.data, raw.meta))
            assert frame.data.nbytes * 4 < raw.data.nbytes
        assert client.describe()["remote"]["preprocess"] == {"bundle": "b", "digest": host_pre.digest}
        other = Preprocessor(PreprocessConfig(**{**vars(config), "crop": None}))
        with pytest.raises(ProfileMismatch, match="other settings"):
            other(frame.data, frame.meta)
        host_pre.config = PreprocessConfig(**{**vars(config), "white_level": 65535.0})  # host now refuses the profile
        host_pre._checked_profile = None
        sent_raw = client.read(timeout=5)
        assert sent_raw.data.dtype == np.uint16 and "preprocessed" not in sent_raw.meta
        client.close()
    finally:
        server.shutdown()
        thread.join(5)
        camera.close()


def test_serve_camera_model_errors_are_named(tmp_path, capsys):
    from nsdd_edge.cli import main

    assert main(["serve-camera", "--source", "sim://", "--bind", "127.0.0.1:0", "--model", str(tmp_path / "nope")]) == 2
    assert "--model" in capsys.readouterr().err


def test_bench_tcp_reports_bytes_and_ceilings(capsys):
    """bench/bench_tcp.py: the HQ raw frame is ~6.2 MB (≤ 19 fps on 1 GbE, ~1 fps at 50 Mbit/s); binned and
    cropped for a 128² bundle it is ~0.2 MB."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_tcp", ROOT / "bench" / "bench_tcp.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    raw = np.zeros(bench.HQ_SIZE, np.uint16)
    nbytes = bench.message_bytes(raw, bench.PI_META)
    assert raw.nbytes < nbytes < raw.nbytes + 2000
    assert 18.5 < bench.fps_ceiling(nbytes, 1e9) < 19.5 and 0.9 < bench.fps_ceiling(nbytes, 50e6) < 1.0
    assert bench.main(["--repeats", "1"]) == 0
    rows = {line.split("  ")[0]: line for line in capsys.readouterr().out.splitlines()}
    line128 = next(v for k, v in rows.items() if "128" in k)
    assert "3x128x128" in line128 and "197,160" in line128
    assert any("sent raw (y larger)" in k for k in rows)


def test_tcp_refuses_a_wrong_token(served_stack):
    _, server = served_stack
    with pytest.raises(SourceError, match="authentication failed"):
        open_source(f"tcp://127.0.0.1:{server.address[1]}?token=wrong").read(timeout=5)


def test_serve_camera_cli_on_loopback(tmp_path):
    stack = np.random.default_rng(4).integers(0, 255, size=(3, 4, 5, 3), dtype=np.uint8)
    np.save(tmp_path / "rgb.npy", stack)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "NSDD_CAMERA_TOKEN": "tok"}
    proc = subprocess.Popen([sys.executable, "-m", "nsdd_edge.cli", "serve-camera", "--source",
                             f"file://{tmp_path / 'rgb.npy'}?loop=1", "--bind", f"127.0.0.1:{port}"],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        client = None
        for _ in range(100):  # wait for the server to listen
            try:
                client = open_source(f"tcp://127.0.0.1:{port}?token=tok&connect_timeout=1")
                client.open()
                break
            except SourceError:
                client = None
                time.sleep(0.1)
        assert client is not None, "serve-camera did not start"
        got = [client.read(timeout=5) for _ in range(4)]
        for i, f in enumerate(got):
            np.testing.assert_array_equal(f.data, stack[i % 3])
        client.close()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "serving" in err and "stopped after 4 frames" in err


def test_parse_bind():
    assert parse_bind("0.0.0.0:5000") == ("0.0.0.0", 5000)
    assert parse_bind(":6000") == ("0.0.0.0", 6000)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_bind("localhost")


def test_runtime_modules_never_import_torch():
    code = ("import sys, nsdd_edge.sources, nsdd_edge.preprocess, nsdd_edge.framing, "
            "nsdd_edge.commands.calibrate, nsdd_edge.commands.serve_camera; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'train', 'export', 'torchvision')); "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_frame_source_is_a_context_manager(psf32):
    with open_source("sim://?realtime=0&frames=1", psf=psf32) as src:
        assert isinstance(src, FrameSource)
        assert src.read().index == 0
        assert src.describe()["open"]
    assert not src.describe()["open"]


def test_sim_static_image_is_the_whole_image_resized_as_simulate_does(tmp_path, psf32):
    """motion=static shows the whole (centre-square-cropped) picture, resized with INTER_AREA, like the
    scenes of `nsdd-train simulate` — a student trained on those sees the same framing live."""
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    img = (rng.random((60, 80, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(d / "a.png"), img)
    src = open_source(f"sim://?realtime=0&images={d}&motion=static", psf=psf32)
    x = src.scene(0)
    sh, sw = src.geometry.scene_shape
    square = img[:, 10:70, ::-1].astype(np.float32) / 255.0  # centre 60x60, BGR → RGB
    want = np.moveaxis(cv2.resize(np.ascontiguousarray(square), (sw, sh), interpolation=cv2.INTER_AREA), -1, 0)
    np.testing.assert_allclose(x, want, atol=1e-5)
