"""Soak test: N frames through the real loop with recording and injected faults; prints frames captured,
recorded and lost, and the RSS drift.

    nice -n 10 python bench/soak.py --frames 100000 --size 16 --out runs/soak

The camera is ``sim://?realtime=0`` (every frame delivered, none dropped by pacing) through a small Wiener
bundle written to ``OUT/bundle`` (``--size`` pixels a side), or with ``--tcp`` the same camera served by an
in-process ``serve-camera`` and read as ``tcp://127.0.0.1:PORT`` (then a disconnect is a real one: the server
drops the connection and the client reconnects). Every frame is recorded (lossless mode, back-pressure) into
``OUT/rec``. Faults, each at its own period in captured frames:

- ``--stall-every``: the camera delivers nothing for longer than the read timeout (:class:`SourceStalled`);
  the loop closes and reopens it;
- ``--disconnect-every``: the camera fails (``SourceError``, or with ``--tcp`` the server hangs up);
- ``--disk-full-every``: the recorder's next write fails with ENOSPC; the run stops as ``nsdd-edge run`` does
  (exit status 3, every captured frame either recorded or counted as not recorded), space is "freed" and a
  new run (segment) appends to the same recording;
- ``--sigterm-every``: SIGTERM to this process; the handler of ``nsdd-edge run`` stops the loop, which drains
  and flushes; a new segment starts.

A checker thread verifies recorded frames as they complete (the metadata JSON, written last, names files that
exist and are non-empty; the raw frame reads back) and deletes them (``--keep`` keeps them), so the disk use
stays bounded; no ``.*.tmp`` file may remain at a segment's end. Lost = captured − recorded − not recorded
(the frames the loop reported it could not record because of the injected full disk); it must be 0. RSS is
read from ``/proc/self/statm`` after ``--warmup`` frames and at the end.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nsdd_edge.atomic import atomic_write_bytes
from nsdd_edge.bundle import PreprocessConfig, load_bundle, write_bundle
from nsdd_edge.commands.run import make_preprocessor, open_camera, stop_on_signals
from nsdd_edge.engines import NumpyWienerEngine
from nsdd_edge.loop import LoopConfig, ReconstructionLoop
from nsdd_edge.optics import LenslessGeometry, normalize
from nsdd_edge.psf_sim import simulate_psf
from nsdd_edge.recorder import Recorder, read_recorded_raw
from nsdd_edge.sources import SourceError, SourceStalled, open_source
from nsdd_edge.telemetry import Telemetry


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Schedule:
    """Fires once every ``period`` captured frames (0: never), counted over the whole soak."""

    def __init__(self, period: int, offset: int = 0):
        self.period, self.next = period, (period + offset if period else None)
        self.fired = 0

    def due(self, captured: int) -> bool:
        if self.next is None or captured < self.next:
            return False
        self.next += self.period
        self.fired += 1
        return True


class FaultySource:
    """Wraps a source; stalls and fails it on schedule (FrameSource interface: open/read/close/describe)."""

    def __init__(self, inner, counter, stall: Schedule, disconnect: Schedule, stall_s: float, server=None):
        self.inner, self.counter, self.stall, self.disconnect = inner, counter, stall, disconnect
        self.stall_s, self.server = stall_s, server
        self.uri, self.is_live, self.frame_rate = inner.uri, False, None

    def open(self):
        self.inner.open()
        return self

    def read(self, timeout=None):
        n = self.counter()
        if self.stall.due(n):
            time.sleep(self.stall_s)
            raise SourceStalled(f"{self.uri}: injected stall ({self.stall_s:.2f} s without a frame)")
        if self.disconnect.due(n):
            if self.server is not None:  # a real disconnect: the capture host hangs up; the client reconnects
                self.server._drop_client("soak: injected disconnect")
            else:
                raise SourceError(f"{self.uri}: injected disconnect")
        return self.inner.read(timeout)

    def close(self):
        self.inner.close()

    def describe(self):
        return {"uri": self.uri, "faulty": True}


class DiskFullWriter:
    """The recorder's writer; when armed, the next write fails with ENOSPC (then the disk is "freed")."""

    def __init__(self):
        self.armed = False
        self.failures = 0

    def __call__(self, path, data, **kw):
        if self.armed:
            self.armed = False
            self.failures += 1
            raise OSError(errno.ENOSPC, "No space left on device (injected)", str(path))
        atomic_write_bytes(path, data, **kw)


class Checker:
    """Verifies recorded frames as they complete and deletes them (unless ``keep``)."""

    def __init__(self, root: Path, keep: bool):
        self.root, self.keep = root, keep
        self.verified, self.problems = 0, []
        self.gaps = self.restarts = 0  # source indices missing between recorded frames / counts restarted
        self._last_index: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_once(self, final: bool = False) -> None:
        # a frame's metadata JSON is written last (atomically): once it exists, the frame's files are complete
        for m in sorted(self.root.glob("[0-9]" * 8 + ".json")):
            try:
                meta = json.loads(m.read_text())
                names = [meta["raw"]["file"]] + ([meta["recon"]["file"], meta["recon"]["view"]]
                                                 if meta.get("recon") else [])
                for name in names:
                    if (self.root / name).stat().st_size == 0:
                        raise ValueError(f"{name} is empty")
                if self.verified % 97 == 0:  # read some raw frames back in full
                    read_recorded_raw(self.root / meta["raw"]["file"])
            except (OSError, ValueError, KeyError) as exc:
                self.problems.append(f"{m.name}: {exc}")
                continue
            self.verified += 1
            index = int(meta["frame_index"])
            if self._last_index is not None:
                if index > self._last_index:
                    self.gaps += index - self._last_index - 1
                else:
                    self.restarts += 1
            self._last_index = index
            if not self.keep:
                for name in names:
                    (self.root / name).unlink()
                m.unlink()

    def _run(self):
        while not self._stop.wait(2.0):
            self.check_once()

    def start(self):
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="soak-checker", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.check_once(final=True)


def make_bundle(out: Path, size: int):
    psf = normalize(simulate_psf("contour", (size, size), 0), "sum")
    cam = open_source("sim://?realtime=0", psf=psf, channels=3)
    return write_bundle(out, psf=psf, geometry=LenslessGeometry.make("circular", (size, size)), lam=1e-2, channels=3,
                        preprocess=PreprocessConfig(**cam.matching_preprocess()), name=f"soak-wiener{size}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=10000, help="frames to capture in all")
    ap.add_argument("--size", type=int, default=16, help="sensor side of the soak bundle (pixels)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "soak")
    ap.add_argument("--model", type=Path, default=None, help="use this bundle instead of a small Wiener one")
    ap.add_argument("--tcp", action="store_true", help="read the camera through serve-camera on loopback")
    ap.add_argument("--stall-every", type=int, default=5000)
    ap.add_argument("--disconnect-every", type=int, default=7000)
    ap.add_argument("--disk-full-every", type=int, default=30000)
    ap.add_argument("--sigterm-every", type=int, default=20000)
    ap.add_argument("--read-timeout", type=float, default=0.2)
    ap.add_argument("--warmup", type=int, default=2000, help="frames before the first RSS reading")
    ap.add_argument("--keep", action="store_true", help="keep the recorded frames (default: verify, then delete)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    bundle = load_bundle(args.model) if args.model else make_bundle(args.out / "bundle", args.size)
    rec_dir = args.out / "rec"
    preprocess = make_preprocessor(bundle)
    engine = NumpyWienerEngine(bundle)
    server = server_thread = None
    if args.tcp:
        from nsdd_edge.commands.serve_camera import CameraServer

        served = open_camera("sim://?realtime=0", bundle)
        server = CameraServer(served, "127.0.0.1", 0, token="soak-token", log=lambda m: None)
        server_thread = threading.Thread(target=server.serve_forever, kwargs={"poll_s": 0.05}, daemon=True)
        server_thread.start()
        inner = open_source(f"tcp://127.0.0.1:{server.address[1]}?token=soak-token")
    else:
        inner = open_camera("sim://?realtime=0", bundle)
    totals = {"captured": 0, "recorded": 0, "unrecorded": 0, "rejected": 0, "unreadable": 0, "source_faults": 0,
              "reopens": 0}
    live = {"captured": 0}
    stall, disconnect = Schedule(args.stall_every), Schedule(args.disconnect_every, offset=args.disconnect_every // 3)
    disk_full, sigterm = Schedule(args.disk_full_every), Schedule(args.sigterm_every, offset=args.sigterm_every // 2)
    source = FaultySource(inner, lambda: live["captured"], stall, disconnect, args.read_timeout + 0.05, server)
    writer = DiskFullWriter()
    checker = Checker(rec_dir, args.keep)
    rss_warm = rss_end = rss_max = None
    rows, problems = [], []
    t_start = time.monotonic()
    segment = 0
    print(f"soak: {args.frames} frames, bundle {bundle.name} {bundle.input_shape}, camera "
          f"{'tcp:// via serve-camera' if args.tcp else 'sim://?realtime=0'}, faults every: stall {args.stall_every}, "
          f"disconnect {args.disconnect_every}, disk full {args.disk_full_every}, SIGTERM {args.sigterm_every}",
          flush=True)
    while totals["captured"] < args.frames:
        segment += 1
        tel = Telemetry()
        remaining = args.frames - totals["captured"]
        recorder = Recorder(rec_dir, session={"soak_segment": segment}, writer=writer)
        config = LoopConfig(max_frames=remaining, console_interval=0.0, read_timeout=args.read_timeout,
                            backoff_initial=0.01, backoff_max=0.05, expected_input_shape=bundle.input_shape)
        loop = ReconstructionLoop(source, preprocess, engine, config=config, recorder=recorder, telemetry=tel,
                                  log=lambda m: None, alert=lambda m: None)
        base = totals["captured"]
        done = threading.Event()
        in_run = {"yes": False}
        signal_lock = threading.Lock()

        def watch(loop=loop, tel=tel, base=base, done=done, in_run=in_run, signal_lock=signal_lock):
            nonlocal rss_warm, rss_max
            last_report = time.monotonic()
            while not done.wait(0.01):
                n = base + tel.counters["frames_in"]
                live["captured"] = n
                if rss_warm is None and n >= args.warmup:
                    rss_warm = rss_mb()
                if rss_warm is not None:
                    rss_max = max(rss_max or 0.0, rss_mb())
                if disk_full.due(n):
                    writer.armed = True
                with signal_lock:  # only while run's SIGTERM handler is installed
                    if in_run["yes"] and not loop.stopping and sigterm.due(n):
                        os.kill(os.getpid(), signal.SIGTERM)
                if time.monotonic() - last_report >= 30:
                    last_report = time.monotonic()
                    rate = n / (time.monotonic() - t_start)
                    eta = (args.frames - n) / rate if rate > 0 else float("nan")
                    print(f"soak: {n}/{args.frames} frames, {rate:.0f} fps, RSS {rss_mb():.1f} MB, "
                          f"ETA {eta / 60:.1f} min", flush=True)

        watcher = threading.Thread(target=watch, daemon=True)
        checker.start()
        watcher.start()
        t0 = time.monotonic()
        with stop_on_signals(loop.request_stop):  # the SIGINT/SIGTERM handling of `nsdd-edge run`
            in_run["yes"] = True
            s = loop.run()
            with signal_lock:
                in_run["yes"] = False
        done.set()
        watcher.join()
        checker.stop()
        leftovers = sorted(p.name for p in rec_dir.glob(".*.tmp"))
        if leftovers:
            problems.append(f"segment {segment}: temporary files left: {leftovers[:5]}")
        seg = {"segment": segment, "end": loop.end_reason, "captured": s["frames_in"], "recorded": s["recorded"],
               "unrecorded": s["unrecorded"], "rejected": s["rejected"], "unreadable": s["unreadable"],
               "source_faults": s["source_faults"], "reopens": s["reopens"],
               "fps": s["frames_in"] / max(time.monotonic() - t0, 1e-9)}
        rows.append(seg)
        for k in totals:
            totals[k] += seg[k]
        live["captured"] = totals["captured"]
        if s["frames_in"] == 0:
            problems.append(f"segment {segment} captured nothing ({loop.end_reason})")
            break
    elapsed = time.monotonic() - t_start
    rss_end = rss_mb()
    if server is not None:
        server.shutdown()
        server_thread.join(5)
    engine.close()
    lost = totals["captured"] - totals["recorded"] - totals["unrecorded"]
    problems += checker.problems
    head = (f"{'segment':>7} {'end':<18} {'captured':>9} {'recorded':>9} {'not rec.':>8} {'faults':>6} "
            f"{'reopens':>7} {'fps':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['segment']:>7} {r['end']:<18} {r['captured']:>9} {r['recorded']:>9} {r['unrecorded']:>8} "
              f"{r['source_faults']:>6} {r['reopens']:>7} {r['fps']:>7.1f}")
    print("-" * len(head))
    print(f"{'total':>7} {'':<18} {totals['captured']:>9} {totals['recorded']:>9} {totals['unrecorded']:>8} "
          f"{totals['source_faults']:>6} {totals['reopens']:>7} {totals['captured'] / elapsed:>7.1f}")
    print(f"\nframes captured {totals['captured']}, recorded {totals['recorded']} (verified on disk: "
          f"{checker.verified}), not recorded (injected disk full, reported) {totals['unrecorded']}, "
          f"lost {lost}")
    sigterms = sum(r["end"] == "SIGTERM" for r in rows)
    print(f"source frame indices missing from the recording: {checker.gaps} (the frames not recorded above are "
          f"among them; a camera reopened {checker.restarts} time(s) restarted its count, which hides gaps there)")
    print(f"faults injected: {stall.fired} stalls, {disconnect.fired} disconnects, {writer.failures} disk-full, "
          f"{sigterms} SIGTERM (each ended its segment); {totals['rejected']} rejected, "
          f"{totals['unreadable']} unreadable")
    if rss_warm is not None:
        print(f"RSS after {args.warmup} frames {rss_warm:.1f} MB, at the end {rss_end:.1f} MB: drift "
              f"{rss_end - rss_warm:+.1f} MB (max {rss_max:.1f} MB)")
    print(f"wall time {elapsed / 60:.1f} min ({totals['captured'] / elapsed:.0f} frames/s)")
    ok = lost == 0 and checker.verified == totals["recorded"] and not problems
    for p in problems[:20]:
        print(f"PROBLEM: {p}")
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "totals": totals, "lost": lost,
              "index_gaps": checker.gaps, "index_restarts": checker.restarts,
              "verified": checker.verified, "segments": rows, "rss_warm_mb": rss_warm, "rss_end_mb": rss_end,
              "rss_max_mb": rss_max, "elapsed_s": elapsed, "faults": {"stall": stall.fired,
                                                                     "disconnect": disconnect.fired,
                                                                     "disk_full": writer.failures,
                                                                     "sigterm": sigterms},
              "problems": problems, "ok": ok}
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(result, indent=2) + "\n").encode())
    print("soak: OK" if ok else "soak: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
