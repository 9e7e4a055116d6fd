"""``nsdd-edge bench``: per-stage timing of the real-time loop over N frames, against the engine alone.

The frames are captured from the source first and replayed from memory (so the source's own cost does not
count), then (1) the engine runs alone on the preprocessed frames and (2) the full loop (capture thread,
queue, preprocess, infer, outputs) runs in lossless mode so every frame is processed. Overhead =
``1 − loop FPS / engine FPS``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from nsdd_edge.cli_common import add_threads_argument, resolve_threads
from nsdd_edge.engines import PRECISION_HELP, PRECISIONS

HELP = "time the loop per stage over N frames (bundle/engine/source) against the engine alone; prints a table"


class ReplaySource:
    """In-memory frames replayed once (FrameSource interface: open/read/close/describe)."""

    is_live = False
    frame_rate = None

    def __init__(self, frames: list, uri: str = "replay://memory"):
        self.frames, self.uri, self._i = frames, uri, 0

    def open(self):
        self._i = 0
        return self

    def read(self, timeout: float | None = None):
        from nsdd_edge.sources import EndOfStream

        if self._i >= len(self.frames):
            raise EndOfStream(f"{self.uri}: all {len(self.frames)} frames replayed")
        f = self.frames[self._i]
        self._i += 1
        return f

    def close(self) -> None:
        pass

    def describe(self) -> dict:
        return {"uri": self.uri, "frames": len(self.frames)}


def capture_frames(source, n: int) -> list:
    """Read ``n`` frames (fewer if the source ends)."""
    from nsdd_edge.sources import EndOfStream

    frames = []
    source.open()
    try:
        for _ in range(n):
            try:
                frames.append(source.read(5.0))
            except EndOfStream:
                break
    finally:
        source.close()
    return frames


def benchmark(engine, preprocess, frames: list, *, warmup: int = 3, preview=None,
              display_support: tuple[int, int] | None = None) -> dict:
    """Engine-only FPS and loop FPS (with per-stage statistics) on the same ``frames``; ``display_support``:
    the bundle's support window, shown (cropped) as in ``nsdd-edge run``."""
    from nsdd_edge.loop import LoopConfig, ReconstructionLoop
    from nsdd_edge.telemetry import Telemetry

    ys = [preprocess(f.data) for f in frames]
    for y in ys[:warmup]:
        engine.infer(y[None])
    t0, c0 = time.perf_counter(), time.process_time()
    for y in ys:
        engine.infer(y[None])
    engine_s, engine_cpu = time.perf_counter() - t0, time.process_time() - c0
    tel = Telemetry()
    loop = ReconstructionLoop(ReplaySource(frames), preprocess, engine, telemetry=tel, preview=preview,
                              config=LoopConfig(lossless=True, max_frames=len(frames), console_interval=0.0,
                                                display_support=display_support),
                              log=lambda m: None)
    t0, c0 = time.perf_counter(), time.process_time()
    summary = loop.run()
    loop_s, loop_cpu = time.perf_counter() - t0, time.process_time() - c0
    n = len(frames)
    engine_fps = n / engine_s
    loop_fps = summary["frames_out"] / loop_s
    return {"frames": n, "engine_ms": 1e3 * engine_s / n, "engine_fps": engine_fps, "loop_fps": loop_fps,
            "overhead_pct": 100.0 * (1.0 - loop_fps / engine_fps),
            # CPU time of the whole process per frame: robust to other processes sharing the CPU
            "engine_cpu_ms": 1e3 * engine_cpu / n, "loop_cpu_ms": 1e3 * loop_cpu / max(1, summary["frames_out"]),
            "cpu_overhead_pct": 100.0 * (loop_cpu / max(1, summary["frames_out"]) / max(engine_cpu / n, 1e-9) - 1.0),
            "stages": summary["stages"], "frames_out": summary["frames_out"], "dropped": summary["dropped"],
            "rejected": summary["rejected"]}


def format_table(rows: list[tuple[str, dict]]) -> str:
    """One line per configuration: engine-only vs loop FPS (wall clock) and CPU ms per frame, per-stage means."""
    head = (f"{'configuration':<44} {'frames':>6} {'engine fps':>10} {'loop fps':>9} {'overhead':>8} | "
            f"{'engine cpu ms':>13} {'loop cpu ms':>11} {'cpu overhead':>12} | {'prep ms':>7} {'infer ms':>8} "
            f"{'infer p95':>9} {'output ms':>9}")
    lines = [head, "-" * len(head)]
    for label, r in rows:
        s = r["stages"]
        lines.append(f"{label:<44} {r['frames']:>6} {r['engine_fps']:>10.1f} {r['loop_fps']:>9.1f} "
                     f"{r['overhead_pct']:>7.1f}% | {r['engine_cpu_ms']:>13.2f} {r['loop_cpu_ms']:>11.2f} "
                     f"{r['cpu_overhead_pct']:>11.1f}% | {s['preprocess']['mean_ms']:>7.2f} "
                     f"{s['infer']['mean_ms']:>8.2f} {s['infer']['p95_ms']:>9.2f} {s['output']['mean_ms']:>9.2f}")
    return "\n".join(lines)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="BUNDLE", help="bundle directory (default: the shipped bundle)")
    p.add_argument("--engine", default="auto", choices=["auto", "trt", "onnx", "wiener"],
                   help="reconstruction engine (auto: TensorRT plan > ONNX Runtime > numpy Wiener)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="ONNX Runtime device")
    p.add_argument("--precision", default="auto", choices=list(PRECISIONS), help=PRECISION_HELP)
    add_threads_argument(p, "ONNX Runtime intra-op threads", "loop")
    p.add_argument("--source", default="sim://?realtime=0", help="where the benchmark frames come from")
    p.add_argument("--frames", type=int, default=100, help="frames captured first, then timed")
    p.add_argument("--warmup", type=int, default=3, help="untimed engine calls before the engine-only timing")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")


def main(args: argparse.Namespace) -> int:
    from nsdd_edge.atomic import atomic_write_bytes
    from nsdd_edge.bundle import BundleError
    from nsdd_edge.commands.run import make_preprocessor, open_bundle, open_camera
    from nsdd_edge.engines import EngineError, select_engine
    from nsdd_edge.sources import SourceError

    if args.frames < 1:
        print(f"nsdd-edge bench: error: --frames {args.frames}: must be ≥ 1", file=sys.stderr)
        return 2
    try:
        bundle = open_bundle(args.model)
        source = open_camera(args.source, bundle)
        preprocess = make_preprocessor(bundle)
        engine, choice = select_engine(bundle, args.engine, device=args.device, precision=args.precision,
                                      threads=resolve_threads(args.threads, "loop"))
    except (BundleError, EngineError, SourceError, ValueError) as exc:
        print(f"nsdd-edge bench: error: {exc}", file=sys.stderr)
        return 2
    try:
        frames = capture_frames(source, args.frames)
        if not frames:
            print(f"nsdd-edge bench: error: {args.source} gave no frames", file=sys.stderr)
            return 2
        shape = preprocess(frames[0].data).shape
        if tuple(shape) != bundle.input_shape:
            print(f"nsdd-edge bench: error: the bundle expects {bundle.input_shape}, the source gives {tuple(shape)}",
                  file=sys.stderr)
            return 2
        result = benchmark(engine, preprocess, frames, warmup=args.warmup, display_support=bundle.support_shape)
    finally:
        engine.close()
    label = f"{bundle.name} {choice.kind} {'x'.join(map(str, bundle.input_shape))}"
    if bundle.output_shape != bundle.input_shape:  # crop model: the reconstruction is on the scene grid
        label += f"→{'x'.join(map(str, bundle.output_shape))}"
    print(f"engine: {engine.describe()} ({choice.reason})")
    print(format_table([(label, result)]))
    print("\nper stage (ms)      mean   median      p95")
    for stage, s in result["stages"].items():
        if s["mean_ms"] is not None:
            print(f"  {stage:<14} {s['mean_ms']:>7.2f} {s['median_ms']:>8.2f} {s['p95_ms']:>8.2f}")
    if args.json:
        atomic_write_bytes(Path(args.json), json.dumps({"label": label, "engine": engine.describe(),
                                                        "input_shape": list(bundle.input_shape),
                                                        "output_shape": list(bundle.output_shape), **result},
                                                       indent=2).encode())
    return 0
