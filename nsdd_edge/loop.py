"""The real-time loop: capture thread → bounded queue → reconstruction (preprocess + infer) → outputs.

Live mode (a live camera without a recorder, or ``lossless=False``): the capture thread keeps only the
newest frame (a one-slot queue); a frame that is replaced before the reconstruction thread takes it is counted
as ``dropped``. The preview stays live whatever the reconstruction speed.

Lossless mode (recording, a source that is not live — a folder, a video file, a stack, ``sim://?realtime=0`` —
or ``lossless=True``): every captured frame goes through a bounded queue to the reconstruction and on through a
bounded queue to the recorder thread; when the disk is slow the queues fill and the capture thread *blocks*
(back-pressure; counted and warned about), nothing is dropped.

Faults: a source that raises, stalls (:class:`~nsdd_edge.sources.SourceStalled`) or disconnects is closed
and reopened with exponential back-off while the loop keeps running; :class:`~nsdd_edge.sources.EndOfStream`
ends the run; a frame the source could not read (:class:`~nsdd_edge.sources.FrameUnreadable`) is counted as
``unreadable``, reported and skipped, and the source goes on. Frames the preprocessor rejects (NaN, wrong size,
…) are counted as ``rejected`` (and still recorded raw when recording). A preprocessor that takes ``meta``
(:class:`nsdd_edge.preprocess.Preprocessor`) gets each frame's metadata, so a camera whose frames do not fit the
bundle's profile (bit depth, Bayer order, black level) stops the run at the first frame with the reason
(:class:`~nsdd_edge.preprocess.ProfileMismatch`); preprocessing settings that cannot fit the camera's frames at
all (a crop outside the image, …) end the run at the first frame with a :class:`LoopError`.

Outputs: a stats or snapshot file that cannot be written (disk full, permissions) is reported through ``alert``
(at most every few seconds) and never ends the run. When the recorder cannot go on (disk full, I/O error) the
loop stops (``on_record_error="stop"``, the default: nothing captured afterwards goes unrecorded silently) or,
with ``"continue"``, keeps reconstructing and says every few seconds that it is NOT recording; frames that
were captured but could not be recorded are counted as ``unrecorded``. :meth:`ReconstructionLoop.request_stop`
(SIGINT/SIGTERM) stops capture, drains what was captured, flushes the recorder and closes everything.
"""

from __future__ import annotations

import inspect
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nsdd_edge.atomic import atomic_write_bytes
from nsdd_edge.bundle import BundleError
from nsdd_edge.engines import Engine, EngineError
from nsdd_edge.optics import center_crop
from nsdd_edge.preprocess import FrameRejected, ProfileMismatch
from nsdd_edge.preview import Preview, compose
from nsdd_edge.recorder import Recorder, RecorderError
from nsdd_edge.sources import EndOfStream, FrameUnreadable, SourceError, SourceStalled
from nsdd_edge.telemetry import Telemetry

_END = object()


class LoopError(RuntimeError):
    """The loop cannot go on (source gone for good, bundle does not fit the source)."""


@dataclass
class LoopConfig:
    """Settings of :class:`ReconstructionLoop`.

    ``max_frames``: stop after this many frames (live: reconstructed + rejected; lossless: captured).
    ``lossless``: None (default) = lossless when recording or when the source is not live; True/False force it
    (a recorder always makes the loop lossless).
    ``max_reopen_attempts``: give up on a source after this many failed reopens in a row (None: never).
    ``on_record_error``: ``stop`` (default) ends the run when recording cannot go on; ``continue`` keeps
    reconstructing without recording and says so every ``alert_interval`` seconds.
    ``display_support``: the bundle's support window; the preview, the snapshot and the recorder's 8-bit view
    show that centred crop of the reconstruction (the recorded ``.recon.npy`` stays the whole engine output).
    ``view_scale``: those views show ``x̂ / view_scale`` clipped to [0, 1]; ``None`` follows the 99.5th
    percentile of the shown part, smoothed over frames (scenes of a camera profile are in y's units, not [0, 1]).
    """

    max_frames: int | None = None
    lossless: bool | None = None
    queue_size: int = 4
    record_queue_size: int = 8
    read_timeout: float = 2.0
    backoff_initial: float = 0.1
    backoff_max: float = 5.0
    max_reopen_attempts: int | None = None
    console_interval: float = 1.0
    stats_path: Path | None = None
    stats_interval: float = 2.0
    snapshot_path: Path | None = None
    backpressure_warn_ms: float = 100.0
    expected_input_shape: tuple[int, int, int] | None = None
    consistency_every: int = 30  # frames between two ‖A x̂ − y‖/‖y‖ checks (0: never)
    display_support: tuple[int, int] | None = None  # preview/snapshot/recorder view: this centred crop of x̂
    view_scale: float | None = 1.0  # the x̂ value shown as white in the views; None: auto (see _view)
    on_record_error: str = "stop"  # stop | continue
    alert_interval: float = 5.0


class LatestSlot:
    """A one-item mailbox: ``put`` replaces the waiting item (returns True if one was replaced)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._item: Any = None
        self._has = False

    def put(self, item) -> bool:
        with self._cond:
            replaced = self._has
            self._item, self._has = item, True
            self._cond.notify()
            return replaced

    def get(self, timeout: float):
        with self._cond:
            if not self._cond.wait_for(lambda: self._has, timeout=timeout):
                raise queue.Empty
            item, self._item, self._has = self._item, None, False
            return item

    def empty(self) -> bool:
        with self._cond:
            return not self._has


class ReconstructionLoop:
    """Run ``source`` → ``preprocess`` → ``engine`` → preview / recorder; see the module docstring.

    ``preprocess(raw[, meta]) -> y (C, H, W) float32`` raises ``FrameRejected`` for bad frames (and, given the
    frame's ``meta``, ``ProfileMismatch`` for a camera the bundle was not made for). ``frame_meta`` is added to
    every recorded frame's metadata (bundle hash, engine, …).
    """

    def __init__(self, source, preprocess: Callable[[np.ndarray], np.ndarray], engine: Engine, *,
                 config: LoopConfig | None = None, preview: Preview | None = None,
                 recorder: Recorder | None = None, telemetry: Telemetry | None = None,
                 frame_meta: dict | None = None, log: Callable[[str], None] | None = None,
                 consistency: Callable[[np.ndarray, np.ndarray], float | dict[str, float]] | None = None,
                 alert: Callable[[str], None] | None = None, observe: Callable[[np.ndarray], None] | None = None):
        self.source, self.preprocess, self.engine = source, preprocess, engine
        # (x̂, y) -> ‖A x̂ − y‖/‖y‖ with the bundle's forward model, or several such figures by name
        self.consistency = consistency
        self.observe = observe  # sees every accepted measurement y before inference (the live refocus keeps a few)
        try:
            self._preprocess_takes_meta = "meta" in inspect.signature(preprocess).parameters
        except (TypeError, ValueError):  # a builtin without a signature
            self._preprocess_takes_meta = False
        self.config = config or LoopConfig()
        if self.config.on_record_error not in ("stop", "continue"):
            raise ValueError(f"on_record_error must be 'stop' or 'continue', got {self.config.on_record_error!r}")
        self.preview, self.recorder = preview, recorder
        self.telemetry = telemetry or Telemetry()
        self.frame_meta = dict(frame_meta or {})
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.alert = alert or self.log  # what must be seen even when the console line is off (--quiet)
        lossless = self.config.lossless
        if lossless is None:
            lossless = not getattr(source, "is_live", True)
        self.lossless = bool(lossless) or recorder is not None
        self._stop = threading.Event()
        self._capture_done = threading.Event()
        self._frames: queue.Queue | LatestSlot = (queue.Queue(maxsize=self.config.queue_size) if self.lossless
                                                 else LatestSlot())
        self._record_q: queue.Queue = queue.Queue(maxsize=self.config.record_queue_size)
        self._fatal: BaseException | None = None
        self._captured = 0
        self._processed = 0
        self._checked_shape = False
        self._last_warn = 0.0
        self._last_alert: dict[str, float] = {}
        self.last_pair: tuple[np.ndarray, np.ndarray] | None = None  # (y, shown x̂ / view scale)
        self._auto_scale: float | None = None  # the smoothed view scale of config.view_scale = None
        self.last_truth: np.ndarray | None = None  # the sim:// scene of the last frame, if any
        self.last_preview: np.ndarray | None = None
        self.end_reason = "running"
        self.recording_stopped: str | None = None
        self.written: dict[str, bool] = {}  # final outputs: "snapshot"/"stats" → whether the file was written
        self.telemetry.info.update({"recording": recorder is not None, "lossless": self.lossless,
                                    "engine": engine.describe()})

    # -- control -----------------------------------------------------------------------------------
    def request_stop(self, reason: str = "stop requested") -> None:
        if not self._stop.is_set():
            self.end_reason = reason
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def _warn(self, message: str, kind: str = "warning", every: float = 5.0) -> None:
        self.telemetry.event(kind, message)
        now = time.monotonic()
        if now - self._last_warn >= every:
            self._last_warn = now
            self.log(f"nsdd-edge: {message}")

    def _alert(self, message: str, kind: str, every: float | None = None) -> None:
        """A message that must be seen (through ``alert``, even with the console line off), at most once every
        ``every`` seconds per ``kind`` (default ``alert_interval``); always recorded as an event."""
        self.telemetry.event(kind, message)
        now = time.monotonic()
        every = self.config.alert_interval if every is None else every
        if now - self._last_alert.get(kind, -1e18) >= every:
            self._last_alert[kind] = now
            self.alert(f"nsdd-edge: {message}")

    # -- capture thread ----------------------------------------------------------------------------
    def _reopen(self) -> bool:
        """Close and reopen the source with exponential back-off; False if stopping or given up."""
        cfg, tel = self.config, self.telemetry
        try:
            self.source.close()
        except Exception as exc:  # noqa: BLE001 - a broken source may fail to close; reopening is what matters
            tel.event("source", f"close after fault failed: {exc}")
        delay, attempts = cfg.backoff_initial, 0
        while not self._stop.is_set():
            self._sleep(delay)
            if self._stop.is_set():
                return False
            try:
                self.source.open()
            except Exception as exc:  # noqa: BLE001 - any failure to open is retried with back-off
                attempts += 1
                tel.count("source_faults")
                self._warn(f"reopening {self._source_name()} failed (attempt {attempts}: {exc}); "
                           f"retrying in {min(delay * 2, cfg.backoff_max):.1f} s", "source")
                if cfg.max_reopen_attempts is not None and attempts >= cfg.max_reopen_attempts:
                    self._fatal = LoopError(f"{self._source_name()}: gave up after {attempts} failed reopen "
                                            f"attempts (last error: {exc})")
                    return False
                delay = min(delay * 2, cfg.backoff_max)
                continue
            tel.count("reopens")
            self._warn(f"{self._source_name()} reopened after a fault", "source", every=0.0)
            return True
        return False

    def _source_name(self) -> str:
        uri = getattr(self.source, "uri", None)
        if uri:
            return str(uri)
        try:
            return str(self.source.describe())
        except Exception:  # noqa: BLE001
            return type(self.source).__name__

    def _capture_main(self) -> None:
        cfg, tel = self.config, self.telemetry
        try:
            while not self._stop.is_set():
                if self.lossless and cfg.max_frames is not None and self._captured >= cfg.max_frames:
                    break
                t0 = time.perf_counter()
                try:
                    frame = self.source.read(cfg.read_timeout)
                except EndOfStream:
                    self.end_reason = "end of stream"
                    break
                except FrameUnreadable as exc:
                    tel.count("unreadable")
                    self._alert(f"skipped an unreadable frame ({exc}); going on with the next one", "unreadable",
                                every=1.0)
                    continue
                except (SourceStalled, SourceError, OSError, RuntimeError) as exc:
                    tel.count("source_faults")
                    kind = "stalled" if isinstance(exc, SourceStalled) else "failed"
                    self._warn(f"{self._source_name()} {kind} ({exc}); reopening", "source", every=0.0)
                    if not self._reopen():
                        break
                    continue
                tel.add_time("capture", (time.perf_counter() - t0) * 1e3)
                tel.count("frames_in")
                self._captured += 1
                item = (frame, time.time())
                if isinstance(self._frames, LatestSlot):
                    if self._frames.put(item):
                        tel.count("dropped")
                else:
                    self._put_blocking(self._frames, item, "reconstruction")
        except BaseException as exc:  # noqa: BLE001 - reported by run()
            self._fatal = exc
        finally:
            self._capture_done.set()

    def _put_blocking(self, q: queue.Queue, item, what: str) -> None:
        """Blocking put that measures back-pressure and warns when the consumer cannot keep up."""
        try:
            q.put_nowait(item)
            return
        except queue.Full:
            pass
        t0 = time.perf_counter()
        while True:
            try:
                q.put(item, timeout=0.5)
                break
            except queue.Full:
                if what == "recorder" and not self._recorder_alive():
                    self._not_recorded()
                    return
                if self._fatal is not None:
                    return
        ms = (time.perf_counter() - t0) * 1e3
        self.telemetry.add_blocked(ms)
        if ms >= self.config.backpressure_warn_ms:
            self._warn(f"back-pressure: the {what} cannot keep up, capture waited {ms:.0f} ms "
                       "(no frame dropped; a live camera may skip frames meanwhile)", "backpressure")

    # -- recorder thread ---------------------------------------------------------------------------
    def _recorder_alive(self) -> bool:
        return self.recorder is not None and self.recorder.active

    def _record_main(self) -> None:
        tel = self.telemetry
        while True:
            item = self._record_q.get()
            if item is _END:
                return
            if not self._recorder_alive():
                self._not_recorded()
                continue
            index, raw, x, view, meta = item
            t0 = time.perf_counter()
            try:
                self.recorder.record(index, raw, x, meta, view=view)
            except Exception as exc:  # noqa: BLE001 - RecorderError, or a bug: either way recording stops, loudly
                if not isinstance(exc, RecorderError):
                    exc = RecorderError(f"recorder failed on frame {index} ({type(exc).__name__}: {exc}); "
                                        "recording stopped")
                    self.recorder.stopped_reason = str(exc)
                self._recording_failed(str(exc))
                continue
            tel.add_time("record", (time.perf_counter() - t0) * 1e3)
            tel.count("recorded")

    def _recording_failed(self, reason: str) -> None:
        """The recorder stopped: say so (always), count the frame, and stop the run unless told to go on."""
        self.recording_stopped = reason
        self.telemetry.count("unrecorded")
        self.telemetry.info["recording_stopped"] = reason
        if self.config.on_record_error == "stop":
            self._alert(f"RECORDING STOPPED: {reason}; stopping the run",
                        "recorder", every=0.0)
            self.request_stop("recording stopped")
        else:
            self._alert(f"RECORDING STOPPED: {reason}; reconstructing WITHOUT recording (--on-record-error "
                        "continue)", "recorder", every=0.0)
            self._last_alert["not-recording"] = time.monotonic()

    def _not_recorded(self) -> None:
        """A frame meant for the stopped recorder: counted, and (when going on) a reminder every few seconds."""
        tel = self.telemetry
        tel.count("unrecorded")
        if self.config.on_record_error == "continue":
            n = tel.counters["unrecorded"]
            self._alert(f"NOT RECORDING since: {self.recording_stopped}; {n} frame(s) reconstructed but not "
                        "recorded", "not-recording")

    def _to_recorder(self, frame, t_capture: float, x: np.ndarray | None, extra: dict,
                     view: np.ndarray | None = None) -> None:
        if self.recorder is None:
            return
        if not self._recorder_alive():
            self._not_recorded()
            return
        index = int(getattr(frame, "index", self._captured))
        meta = {**self.frame_meta, "source_timestamp": getattr(frame, "timestamp", None),
                "captured_at": t_capture, "source_meta": dict(getattr(frame, "meta", None) or {}), **extra}
        self._put_blocking(self._record_q, (index, np.asarray(frame.data), x, view, meta), "recorder")

    VIEW_PERCENTILE = 99.5
    VIEW_SMOOTHING = 0.2  # weight of the newest frame in the auto view scale (no flicker between frames)

    def _view(self, shown: np.ndarray) -> np.ndarray:
        """``shown / view_scale`` for the 8-bit views; auto: the scale follows the shown part's 99.5th percentile
        (of its non-negative values) with exponential smoothing. Returns ``shown`` itself at scale 1."""
        scale = self.config.view_scale
        if scale is None:
            level = float(np.percentile(np.maximum(np.nan_to_num(shown, nan=0.0, posinf=0.0, neginf=0.0), 0.0),
                                        self.VIEW_PERCENTILE))
            if level > 0:
                previous = self._auto_scale
                self._auto_scale = level if previous is None else (
                    (1 - self.VIEW_SMOOTHING) * previous + self.VIEW_SMOOTHING * level)
            scale = self._auto_scale or 1.0
            self.telemetry.info["view_scale"] = round(float(scale), 6)
        return shown if scale == 1.0 else shown / np.float32(scale)

    def _shown(self, x: np.ndarray) -> np.ndarray:
        """The part of the reconstruction that is displayed: the centred support window, if any."""
        s = self.config.display_support
        if s is None or tuple(x.shape[-2:]) == tuple(s) or s[0] > x.shape[-2] or s[1] > x.shape[-1]:
            return x
        return center_crop(x, s)

    # -- reconstruction (caller's thread) ----------------------------------------------------------
    def _process(self, item) -> None:
        frame, t_capture = item
        tel, cfg = self.telemetry, self.config
        t0 = time.perf_counter()
        try:
            try:
                if self._preprocess_takes_meta:
                    y = self.preprocess(frame.data, meta=getattr(frame, "meta", None))
                else:
                    y = self.preprocess(frame.data)
                y = np.asarray(y, dtype=np.float32)
            except (FrameRejected, ProfileMismatch):
                raise
            except ValueError as exc:  # settings that cannot fit this camera's frames (crop, background, …)
                if not self._checked_shape:
                    raise LoopError(f"the bundle's preprocessing cannot handle the frames of {self._source_name()} "
                                    f"(raw frame {np.shape(frame.data)} {getattr(frame.data, 'dtype', '?')}): "
                                    f"{exc}") from None
                raise FrameRejected(f"frame {getattr(frame, 'index', '?')}: {exc}") from None
            if not np.all(np.isfinite(y)):
                raise FrameRejected(f"frame {getattr(frame, 'index', '?')}: measurement has NaN/Inf values")
            expected = cfg.expected_input_shape
            if expected is not None and tuple(y.shape) != tuple(expected):
                if not self._checked_shape:
                    raise LoopError(str(BundleError(
                        f"the bundle expects measurements of shape {tuple(expected)} but "
                        f"{self._source_name()} gives {tuple(y.shape)} after preprocessing: use a bundle "
                        "made for this camera/size (or adjust the bundle's preprocess crop/downsample)")))
                raise FrameRejected(f"frame {getattr(frame, 'index', '?')}: shape {y.shape} != {expected}")
            self._checked_shape = True
        except FrameRejected as exc:
            tel.add_time("preprocess", (time.perf_counter() - t0) * 1e3)
            tel.count("rejected")
            self._warn(f"rejected {exc}", "rejected", every=2.0)
            self._to_recorder(frame, t_capture, None, {"rejected": str(exc)})
            self._processed += 1
            return
        tel.add_time("preprocess", (time.perf_counter() - t0) * 1e3)
        if self.observe is not None:
            self.observe(y)
        with tel.time("infer"):
            try:
                x = self.engine.infer(y[None])[0]
            except EngineError:
                raise
            except Exception as exc:  # noqa: BLE001 - a runtime's own error types: named, with the engine
                raise EngineError(f"{self.engine.describe()}: inference failed ({type(exc).__name__}: {exc})") \
                    from None
        tel.count("frames_out")
        self._processed += 1
        every = cfg.consistency_every
        if self.consistency is not None and every and (self._processed - 1) % every == 0:
            with tel.time("consistency"):
                values = self.consistency(x, y)
                for name, value in (values if isinstance(values, dict) else {"consistency": values}).items():
                    tel.gauge(name, value, every_frames=every)
        with tel.time("output"):
            shown = self._shown(x)
            view = self._view(shown)
            truth = getattr(frame, "truth", None)
            self.last_pair, self.last_truth = (y, view), truth
            if self.preview is not None:
                self.last_preview = compose(y, view, tel.overlay_lines(), truth=truth)
                self.preview.show(self.last_preview)
            self._to_recorder(frame, t_capture, x, {}, view=view if view is not x else None)

    def run(self) -> dict:
        """Run until ``max_frames``, end of stream, :meth:`request_stop` or a fatal error; returns the
        final telemetry snapshot. The source must not be open yet (it is opened here, errors raised)."""
        cfg, tel = self.config, self.telemetry
        self.source.open()
        capture = threading.Thread(target=self._capture_main, name="nsdd-capture", daemon=True)
        recorder = (threading.Thread(target=self._record_main, name="nsdd-recorder", daemon=True)
                    if self.recorder is not None else None)
        if recorder:
            recorder.start()
        capture.start()
        last_console = last_stats = time.monotonic()
        try:
            while True:
                try:
                    item = self._frames.get(timeout=0.05)
                except queue.Empty:
                    if self._capture_done.is_set() and self._frames.empty():
                        break
                    if self._stop.is_set() and not self.lossless:
                        break
                else:
                    if self._stop.is_set() and not self.lossless:
                        break  # live mode: a frame taken after stop is not worth processing
                    self._process(item)
                    if not self.lossless and cfg.max_frames is not None and self._processed >= cfg.max_frames:
                        self.request_stop(f"{cfg.max_frames} frames")
                now = time.monotonic()
                if cfg.console_interval and now - last_console >= cfg.console_interval:
                    last_console = now
                    self.log(tel.line())
                if cfg.stats_path and now - last_stats >= cfg.stats_interval:
                    last_stats = now
                    self._write_output("stats", cfg.stats_path, lambda: tel.write_json(cfg.stats_path))
        except BaseException as exc:
            self._fatal = self._fatal or exc
        finally:
            self._stop.set()
            capture.join(timeout=max(5.0, cfg.read_timeout + 1.0))
            if recorder:
                self._record_q.put(_END)
                recorder.join()
            if self.end_reason == "running":
                self.end_reason = f"{cfg.max_frames} frames" if cfg.max_frames else "finished"
            try:
                self.source.close()
            except Exception as exc:  # noqa: BLE001
                tel.event("source", f"close failed: {exc}")
            if capture.is_alive():
                tel.event("source", "capture thread did not stop within the timeout (source read blocked)")
            self.finish()
        if self._fatal is not None:
            raise self._fatal
        return tel.snapshot()

    def _write_output(self, what: str, path: Path, write: Callable[[], None]) -> bool:
        """Write a stats/snapshot file; a failure (disk full, permissions) is reported, counted, never fatal."""
        try:
            write()
            self.written[what] = True
            return True
        except OSError as exc:
            self.written[what] = False
            self.telemetry.count("output_failures")
            self._alert(f"could not write the {what} file {path} ({exc.strerror or exc}); not fatal",
                        f"output-{what}")
            return False

    def finish(self) -> None:
        """Final outputs: stats JSON, snapshot PNG (last side-by-side frame, with the sim truth if known)."""
        cfg, tel = self.config, self.telemetry
        tel.info["end_reason"] = self.end_reason
        if self.recorder is not None:
            tel.info["recorded_to"] = str(self.recorder.root)
            tel.info["recording_stopped"] = self.recording_stopped
        if cfg.snapshot_path and self.last_pair is not None:
            import cv2

            img = compose(*self.last_pair, tel.overlay_lines(), truth=self.last_truth)
            ok, buf = cv2.imencode(".png", img)
            if ok:
                self._write_output("snapshot", cfg.snapshot_path,
                                   lambda: atomic_write_bytes(cfg.snapshot_path, buf.tobytes()))
        if cfg.stats_path:
            self._write_output("stats", cfg.stats_path, lambda: tel.write_json(cfg.stats_path))
