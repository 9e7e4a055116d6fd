"""Live telemetry of the reconstruction loop: per-stage milliseconds, frame counters, FPS.

Stages: ``capture`` (waiting for and reading a frame), ``preprocess`` (raw → y), ``infer`` (y → x̂),
``output`` (preview, snapshot, hand-off to the recorder) and ``record`` (writing files, recorder thread).
Each stage keeps a rolling window of the last ``window`` samples for mean / median / p95 and running
totals. Thread-safe: the capture thread, the reconstruction thread and the recorder thread all report here.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from nsdd_edge.atomic import atomic_write_bytes

STAGES = ("capture", "preprocess", "infer", "output", "record", "consistency")
COUNTERS = ("frames_in", "frames_out", "dropped", "rejected", "recorded", "unrecorded", "unreadable",
            "source_faults", "reopens", "backpressure_waits", "output_failures")


class StageStats:
    """Rolling window of one stage's durations (milliseconds)."""

    def __init__(self, window: int):
        self.samples: deque[float] = deque(maxlen=window)
        self.count = 0
        self.total_ms = 0.0

    def add(self, ms: float) -> None:
        self.samples.append(ms)
        self.count += 1
        self.total_ms += ms

    def summary(self) -> dict:
        if not self.samples:
            return {"count": self.count, "mean_ms": None, "median_ms": None, "p95_ms": None}
        a = np.fromiter(self.samples, dtype=np.float64)
        return {"count": self.count, "mean_ms": round(float(a.mean()), 3),
                "median_ms": round(float(np.median(a)), 3), "p95_ms": round(float(np.percentile(a, 95)), 3)}


class Telemetry:
    """Counters and stage timings of one run; ``snapshot()`` gives a JSON-ready dict."""

    def __init__(self, window: int = 500, clock=time.perf_counter):
        self._lock = threading.Lock()
        self._clock = clock
        self.started = clock()
        self.started_wall = time.time()
        self.stages = {name: StageStats(window) for name in STAGES}
        self.counters = {name: 0 for name in COUNTERS}
        self._out_times: deque[float] = deque(maxlen=60)
        self.blocked_ms = 0.0
        self.events: deque[dict] = deque(maxlen=50)
        self.info: dict = {}
        self.gauges: dict[str, dict] = {}  # sampled values (e.g. consistency every N frames): last, mean, count
        self.sections: dict[str, dict] = {}  # figures a component reports as a whole (e.g. "refocus")

    # -- reporting ---------------------------------------------------------------------------------
    def add_time(self, stage: str, ms: float) -> None:
        with self._lock:
            self.stages[stage].add(ms)

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        t0 = self._clock()
        try:
            yield
        finally:
            self.add_time(stage, (self._clock() - t0) * 1e3)

    def count(self, counter: str, n: int = 1) -> None:
        with self._lock:
            self.counters[counter] += n
            if counter == "frames_out":
                self._out_times.append(self._clock())

    def add_blocked(self, ms: float) -> None:
        with self._lock:
            self.counters["backpressure_waits"] += 1
            self.blocked_ms += ms

    def gauge(self, name: str, value: float, **extra) -> None:
        """Record a sampled value: its last value, running mean and count (plus ``extra`` fields)."""
        with self._lock:
            g = self.gauges.setdefault(name, {"last": None, "mean": 0.0, "count": 0})
            g["count"] += 1
            g["mean"] += (float(value) - g["mean"]) / g["count"]
            g["last"] = float(value)
            g.update(extra)

    def section(self, name: str, values: dict) -> None:
        """Replace the figures of section ``name`` (a JSON-ready dict, e.g. the live refocus's scale and swaps)."""
        with self._lock:
            self.sections[name] = dict(values)

    def event(self, kind: str, message: str) -> None:
        """Remember a notable event (fault, reopen, warning) with its time."""
        with self._lock:
            self.events.append({"t": round(time.time(), 3), "kind": kind, "message": message})

    # -- reading -----------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self._clock() - self.started

    def fps(self) -> float:
        """Frames out per second over the whole run."""
        with self._lock:
            n = self.counters["frames_out"]
        t = self.elapsed()
        return n / t if t > 0 else 0.0

    def recent_fps(self) -> float:
        """Frames out per second over the last (up to) 60 frames."""
        with self._lock:
            times = list(self._out_times)
        if len(times) < 2 or times[-1] <= times[0]:
            return 0.0
        return (len(times) - 1) / (times[-1] - times[0])

    def snapshot(self) -> dict:
        elapsed = self.elapsed()
        with self._lock:
            stages = {name: s.summary() for name, s in self.stages.items()}
            counters = dict(self.counters)
            events = list(self.events)
            blocked = self.blocked_ms
            gauges = {k: dict(v) for k, v in self.gauges.items()}
            sections = {k: dict(v) for k, v in self.sections.items()}
        return {"elapsed_s": round(elapsed, 3), "started": self.started_wall,
                "fps": round(counters["frames_out"] / elapsed, 3) if elapsed > 0 else 0.0,
                "recent_fps": round(self.recent_fps(), 3), **counters,
                "backpressure_blocked_ms": round(blocked, 3), "stages": stages, "events": events,
                "info": dict(self.info), **gauges, **sections}

    def line(self) -> str:
        """One console line: FPS, counters and mean ms per stage."""
        s = self.snapshot()
        parts = [f"{s['recent_fps'] or s['fps']:6.1f} fps", f"in {s['frames_in']}", f"out {s['frames_out']}",
                 f"drop {s['dropped']}", f"rej {s['rejected']}"]
        if s["recorded"] or self.info.get("recording"):
            parts.append(f"rec {s['recorded']}")
        if s["source_faults"]:
            parts.append(f"faults {s['source_faults']}")
        if "refocus" in s:
            parts.append(f"scale {s['refocus']['scale']:.3f} ({s['refocus']['swaps']} swaps)")
        ms = " ".join(f"{k} {v['mean_ms']:.1f}" for k, v in s["stages"].items() if v["mean_ms"] is not None)
        return " | ".join(parts) + (f" | ms: {ms}" if ms else "")

    def overlay_lines(self) -> list[str]:
        """Short lines for a preview overlay (cheap: rolling means only, called every frame)."""
        with self._lock:
            c = dict(self.counters)
            means = {k: sum(st.samples) / len(st.samples) for k, st in self.stages.items()
                     if st.samples and k != "record"}
            refocus = self.sections.get("refocus")
            consistency = self.gauges.get("consistency", {}).get("last")
            support = self.gauges.get("consistency_support", {}).get("last")
        fps = self.recent_fps() or self.fps()
        ms = "  ".join(f"{k[:4]} {v:.1f}" for k, v in means.items())
        lines = [(f"{fps:.1f} fps  in {c['frames_in']} out {c['frames_out']} "
                  f"drop {c['dropped']} rej {c['rejected']}"), f"ms: {ms}"]
        if refocus is not None:
            lines.append(f"refocus: scale {refocus['scale']:.3f}, {refocus['swaps']} swaps"
                         + (f", consistency {consistency:.4f}" if consistency is not None else "")
                         + (f" (window {support:.4f})" if support is not None else ""))
        return lines

    def write_json(self, path: str | os.PathLike) -> None:
        """Write :meth:`snapshot` as JSON, atomically."""
        atomic_write_bytes(path, (json.dumps(self.snapshot(), indent=2) + "\n").encode())
