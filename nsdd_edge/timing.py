"""The one timing protocol of every speed figure: ``warmup`` untimed calls, then ``repeats`` timed calls (batch 1
where a batch is involved), the median reported; wall clock (``perf_counter``) and this process's CPU time
(``process_time``, all its threads) both. ``sync`` (e.g. ``torch.cuda.synchronize``) runs after each call, so
asynchronous work is counted where it is queued. The thread count is the caller's to state."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Timings:
    """Seconds of each timed call: wall clock and process CPU time."""

    wall_s: tuple[float, ...]
    cpu_s: tuple[float, ...]

    @property
    def wall_ms(self) -> list[float]:
        return [1e3 * t for t in self.wall_s]

    @property
    def median_ms(self) -> float:
        """Median wall time of one call, ms."""
        return 1e3 * statistics.median(self.wall_s)

    @property
    def cpu_median_ms(self) -> float:
        """Median CPU time of one call (this process, all threads), ms."""
        return 1e3 * statistics.median(self.cpu_s)


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1,
               sync: Callable[[], object] | None = None) -> Timings:
    """:class:`Timings` of ``repeats`` calls of ``fn()`` after ``warmup`` untimed ones."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"time_calls: need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    done = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    done()
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        done()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return Timings(tuple(wall), tuple(cpu))
