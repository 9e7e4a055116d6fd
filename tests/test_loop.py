"""The real-time loop with scripted sources: stale-frame dropping, fault recovery, rejection, back-pressure
(a slow disk loses no frame), disk full, stop requests. Outcomes are forced by events, never by timing."""

from __future__ import annotations

import errno
import json
import threading
import time

import numpy as np
import pytest

from nsdd_edge.atomic import atomic_write_bytes
from nsdd_edge.bundle import PreprocessConfig, write_bundle
from nsdd_edge.engines import Engine, NumpyWienerEngine
from nsdd_edge.loop import LatestSlot, LoopConfig, LoopError, ReconstructionLoop
from nsdd_edge.optics import LenslessGeometry, WienerFilter
from nsdd_edge.preprocess import Preprocessor
from nsdd_edge.psf_sim import simulate_psf
from nsdd_edge.recorder import Recorder, read_recorded_raw
from nsdd_edge.sources import EndOfStream, Frame, SourceError, SourceStalled

SIZE = 24


class ScriptedSource:
    """Frames from a list; ``faults[k]`` is raised instead of the k-th read; ``open_failures`` reopens fail first."""

    uri = "scripted://test"
    is_live = True
    frame_rate = None

    def __init__(self, frames, faults=None, open_failures=0, endless=False, hold=None):
        self.frames, self.faults, self.hold = frames, dict(faults or {}), hold
        self.open_failures, self.endless = open_failures, endless
        self.reads = self.opens = self.closes = self.delivered = 0
        self.exhausted = threading.Event()

    def open(self):
        self.opens += 1
        if self.opens > 1 and self.open_failures > 0:
            self.open_failures -= 1
            raise SourceError("camera not found (still unplugged)")
        return self

    def read(self, timeout=None):
        k = self.reads
        self.reads += 1
        if k in self.faults:
            raise self.faults[k]
        if self.delivered >= len(self.frames):
            if self.endless:
                self.delivered = 0
            else:
                self.exhausted.set()
                raise EndOfStream("no more frames")
        i = self.delivered
        if i >= 1 and self.hold is not None:
            assert self.hold.wait(10)  # frames after the first wait until the engine is busy with it
        self.delivered += 1
        return Frame(data=self.frames[i], index=self.reads - 1, timestamp=float(i), meta={"k": i})

    def close(self):
        self.closes += 1

    def describe(self):
        return {"uri": self.uri}


@pytest.fixture
def bundle(tmp_path):
    psf = simulate_psf("contour", (SIZE, SIZE), 3)
    return write_bundle(tmp_path / "bundle", psf=psf, geometry=LenslessGeometry.make("circular", (SIZE, SIZE)),
                        lam=1e-2, channels=3, preprocess=PreprocessConfig(normalization="fixed", scale=1000.0))


def raw_frames(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 1000, (SIZE, SIZE, 3), dtype=np.uint16) for _ in range(n)]


def make_loop(bundle, source, engine=None, **kw):
    recorder = kw.pop("recorder", None)
    cfg = LoopConfig(console_interval=0.0, backoff_initial=0.001, backoff_max=0.01,
                     expected_input_shape=bundle.input_shape, **kw)
    return ReconstructionLoop(source, Preprocessor(bundle.preprocess, bundle.root), engine or NumpyWienerEngine(bundle),
                              config=cfg, recorder=recorder, log=lambda m: None, frame_meta={"engine": "wiener"})


class GatedEngine(Engine):
    """Wiener engine whose first call waits for ``gate`` (so the capture thread races ahead deterministically)."""

    name = "gated"

    def __init__(self, inner, gate):
        self.inner, self.gate, self.seen = inner, gate, []
        self.busy = threading.Event()

    def infer(self, y):
        if not self.seen:
            self.busy.set()
            assert self.gate.wait(10)
        self.seen.append(y.copy())
        return self.inner.infer(y)


def test_latest_slot_keeps_newest():
    slot = LatestSlot()
    assert slot.put(1) is False and slot.put(2) is True
    assert slot.get(0.1) == 2 and slot.empty()


def test_live_mode_drops_stale_frames_and_keeps_the_newest(bundle):
    raws = raw_frames(30)
    busy = threading.Event()
    source = ScriptedSource(raws, hold=busy)
    engine = GatedEngine(NumpyWienerEngine(bundle), source.exhausted)
    engine.busy = busy
    loop = make_loop(bundle, source, engine)
    s = loop.run()
    prep = Preprocessor(bundle.preprocess, bundle.root)
    # frame 0 entered the engine; frames 1..28 were replaced in the slot while it waited; 29 is the newest
    assert (s["frames_in"], s["frames_out"], s["dropped"]) == (30, 2, 28)
    np.testing.assert_array_equal(engine.seen[-1][0], prep(raws[-1]))
    np.testing.assert_allclose(loop.last_pair[1], WienerFilter(bundle.psf, bundle.geometry, bundle.lam)(prep(raws[-1])))
    assert loop.end_reason == "end of stream" and source.closes >= 1


def test_source_faults_are_recovered_and_counted(bundle):
    raws = raw_frames(10)
    faults = {3: SourceError("USB disconnected"), 6: SourceStalled("no frame within 2 s"), 8: RuntimeError("driver")}
    source = ScriptedSource(raws, faults=faults, open_failures=2)
    loop = make_loop(bundle, source, lossless=True)
    s = loop.run()
    assert s["frames_out"] == 10 and s["frames_in"] == 10
    assert s["source_faults"] == 3 + 2  # three read faults, two failed reopen attempts
    assert s["reopens"] == 3 and source.opens == 1 + 3 + 2
    kinds = [e["kind"] for e in s["events"]]
    assert kinds.count("source") >= 5


def test_source_that_never_returns_gives_up_clearly(bundle):
    source = ScriptedSource(raw_frames(5), faults={1: SourceError("unplugged")}, open_failures=100)
    loop = make_loop(bundle, source, max_reopen_attempts=3)
    with pytest.raises(LoopError, match="gave up after 3 failed reopen attempts.*still unplugged"):
        loop.run()
    assert loop.telemetry.counters["frames_out"] == 1


def test_bad_frames_are_rejected_and_counted(bundle):
    raws = raw_frames(6)
    nan_frame = raws[2].astype(np.float32)
    nan_frame[0, 0, 0] = np.nan
    frames = [raws[0], raws[1], nan_frame, raws[3][:10], raws[4], np.zeros((2, 2, 2, 2), np.uint16)]
    loop = make_loop(bundle, ScriptedSource(frames), lossless=True)
    s = loop.run()
    assert (s["frames_out"], s["rejected"]) == (3, 3)


def test_first_frame_of_the_wrong_size_is_a_bundle_mismatch(bundle):
    rng = np.random.default_rng(0)
    big = [rng.integers(0, 1000, (SIZE * 2, SIZE * 2, 3), dtype=np.uint16) for _ in range(3)]
    with pytest.raises(LoopError, match=r"bundle expects measurements of shape \(3, 24, 24\).*\(3, 48, 48\)"):
        make_loop(bundle, ScriptedSource(big)).run()


def test_slow_disk_loses_no_frame_and_applies_backpressure(bundle, tmp_path):
    def slow_writer(path, data, **kw):
        time.sleep(0.01)  # an injected slow disk
        atomic_write_bytes(path, data, **kw)

    raws = raw_frames(24)
    recorder = Recorder(tmp_path / "rec", writer=slow_writer)
    loop = make_loop(bundle, ScriptedSource(raws), recorder=recorder, queue_size=2, record_queue_size=2)
    s = loop.run()
    assert s["frames_in"] == s["frames_out"] == s["recorded"] == 24 and s["dropped"] == 0
    assert s["backpressure_waits"] >= 1 and s["backpressure_blocked_ms"] > 0
    prep = Preprocessor(bundle.preprocess, bundle.root)
    wiener = WienerFilter(bundle.psf, bundle.geometry, bundle.lam)
    for k in range(24):
        meta = json.loads((recorder.root / f"{k:08d}.json").read_text())
        assert meta["engine"] == "wiener" and meta["source_meta"] == {"k": k}
        raw = read_recorded_raw(recorder.root / meta["raw"]["file"])
        np.testing.assert_array_equal(raw, raws[k])
        np.testing.assert_allclose(np.load(recorder.root / meta["recon"]["file"]), wiener(prep(raws[k])), atol=1e-6)


@pytest.mark.parametrize("policy", ["stop", "continue"])
def test_disk_full_stops_the_run_or_goes_on_without_recording(bundle, tmp_path, policy):
    writes = {"n": 0}
    alerts = []

    def writer(path, data, **kw):
        writes["n"] += 1
        if writes["n"] > 1 + 4 * 3:  # session.json + three complete frames
            raise OSError(errno.ENOSPC, "No space left on device")
        atomic_write_bytes(path, data, **kw)

    recorder = Recorder(tmp_path / "rec", writer=writer)
    source = ScriptedSource(raw_frames(10), endless=policy == "stop")
    loop = make_loop(bundle, source, recorder=recorder, on_record_error=policy, alert_interval=0.0)
    loop.alert = alerts.append
    s = loop.run()
    assert s["recorded"] == 3 and loop.recording_stopped and "disk full" in loop.recording_stopped
    assert s["frames_in"] == s["recorded"] + s["unrecorded"]  # every captured frame is accounted for
    assert any("RECORDING STOPPED" in a and "disk full" in a for a in alerts)
    if policy == "stop":  # an endless camera: the run ends by itself, nothing is left unrecorded silently
        # at most what was in flight: the failed frame, the record queue (8), the frame queue (4), the frame being
        # reconstructed and the one the capture thread holds
        assert loop.end_reason == "recording stopped" and s["unrecorded"] <= 1 + 8 + 4 + 1 + 1
    else:
        assert s["frames_out"] == 10 and s["unrecorded"] == 7
        assert any("NOT RECORDING" in a for a in alerts)
    assert sorted(p.name for p in recorder.root.glob("*.json")) == ["00000000.json", "00000001.json",
                                                                     "00000002.json", "session.json"]


def test_stop_request_drains_and_flushes_everything_captured(bundle, tmp_path):
    source = ScriptedSource(raw_frames(5), endless=True)
    recorder = Recorder(tmp_path / "rec")
    loop = make_loop(bundle, source, recorder=recorder, stats_path=tmp_path / "stats.json",
                     snapshot_path=tmp_path / "snap.png")
    tel = loop.telemetry

    def stopper():
        while tel.counters["recorded"] < 12:
            time.sleep(0.005)
        loop.request_stop("SIGTERM")

    t = threading.Thread(target=stopper)
    t.start()
    s = loop.run()
    t.join()
    assert loop.end_reason == "SIGTERM"
    assert s["frames_in"] == s["frames_out"] == s["recorded"] >= 12
    assert len(list(recorder.root.glob("0*.json"))) == s["recorded"]
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["recorded"] == s["recorded"] and stats["info"]["end_reason"] == "SIGTERM"
    assert (tmp_path / "snap.png").stat().st_size > 0


def test_a_failing_recorder_never_hangs_the_loop(bundle, tmp_path):
    def broken_writer(path, data, **kw):
        if path.name != "session.json":
            raise ValueError("encoder bug")
        atomic_write_bytes(path, data, **kw)

    recorder = Recorder(tmp_path / "rec", writer=broken_writer)
    loop = make_loop(bundle, ScriptedSource(raw_frames(12)), recorder=recorder, record_queue_size=1,
                     on_record_error="continue")
    s = loop.run()
    assert s["frames_out"] == 12 and s["recorded"] == 0 and s["unrecorded"] == 12
    assert "recorder failed on frame 0 (ValueError: encoder bug)" in loop.recording_stopped


def test_telemetry_statistics_and_atomic_json(tmp_path):
    from nsdd_edge.telemetry import Telemetry

    tel = Telemetry(window=100)
    for ms in range(1, 101):  # 1..100 ms
        tel.add_time("infer", float(ms))
    tel.count("frames_in", 5)
    tel.count("dropped", 2)
    s = tel.snapshot()["stages"]["infer"]
    assert s["count"] == 100 and s["mean_ms"] == 50.5 and s["median_ms"] == 50.5 and s["p95_ms"] == 95.05
    tel.add_time("infer", 1000.0)  # the window keeps the last 100 samples, the count keeps all
    s = tel.snapshot()["stages"]["infer"]
    assert s["count"] == 101 and s["mean_ms"] == pytest.approx((sum(range(2, 101)) + 1000) / 100)
    tel.write_json(tmp_path / "stats.json")
    data = json.loads((tmp_path / "stats.json").read_text())
    assert data["frames_in"] == 5 and data["dropped"] == 2 and data["stages"]["capture"]["mean_ms"] is None
    assert "in 5" in tel.line() and "drop 2" in tel.overlay_lines()[0]


class ScaledEngine(Engine):
    """Returns a constant-gradient reconstruction ×``gain`` (scenes in y's units, as a camera profile's are)."""

    name = "scaled"

    def __init__(self, gain):
        self.gain = gain

    def infer(self, y):
        ramp = np.linspace(0.0, 1.0, y.shape[-1], dtype=np.float32)
        return np.broadcast_to(ramp, y.shape).astype(np.float32) * self.gain


@pytest.mark.parametrize("view_scale, gain, bright_fraction", [
    (1.0, 20.0, (0.9, 1.0)),   # clipped to [0, 1]: nearly all white (what a profile bundle showed before)
    (None, 20.0, (0.0, 0.05)),  # auto: the ramp is a ramp again
    (20.0, 20.0, (0.0, 0.05)),  # a fixed scale does the same
])
def test_views_show_reconstructions_at_the_view_scale(bundle, tmp_path, view_scale, gain, bright_fraction):
    import cv2

    recorder = Recorder(tmp_path / "rec")
    loop = make_loop(bundle, ScriptedSource(raw_frames(4)), ScaledEngine(gain), recorder=recorder,
                     snapshot_path=tmp_path / "snap.png", view_scale=view_scale)
    loop.run()
    view = cv2.imread(str(sorted(recorder.root.glob("*.recon.png"))[-1]), cv2.IMREAD_UNCHANGED).astype(np.float32)
    white = float((view >= 250).mean())
    assert bright_fraction[0] <= white <= bright_fraction[1]
    assert np.load(sorted(recorder.root.glob("*.recon.npy"))[-1]).max() == pytest.approx(gain)  # data unscaled
    if view_scale is None:
        assert loop.telemetry.info["view_scale"] == pytest.approx(gain * 0.995, rel=0.02)


def test_view_scale_argument_is_named_and_follows_the_bundle(bundle):
    import argparse

    from nsdd_edge.commands.run import view_scale, view_scale_arg

    assert view_scale_arg("auto") == "auto" and view_scale_arg("2.5") == 2.5
    for bad in ("0", "-1", "nan", "inf", "bright"):
        with pytest.raises(argparse.ArgumentTypeError, match="auto nor a finite number"):
            view_scale_arg(bad)
    assert view_scale(None, bundle) is None  # a fixed-scale (camera profile) bundle: auto
    assert view_scale(3.0, bundle) == 3.0 and view_scale("auto", bundle) is None
