"""nsdd_edge.timing: the one timing protocol (warm-up, timed calls, median; wall and CPU time)."""

from __future__ import annotations

import pytest

from nsdd_edge.timing import Timings, time_calls


def test_warmup_calls_are_not_timed_and_sync_follows_every_call():
    log: list[str] = []
    t = time_calls(lambda: log.append("call"), repeats=3, warmup=2, sync=lambda: log.append("sync"))
    # two warm-up calls, one sync after them, then call + sync for each timed call
    assert log == ["call", "call", "sync"] + ["call", "sync"] * 3
    assert len(t.wall_s) == len(t.cpu_s) == 3 and all(w >= 0 for w in t.wall_s)


def test_medians_are_in_milliseconds():
    t = Timings(wall_s=(0.003, 0.001, 0.002), cpu_s=(0.010, 0.030, 0.020))
    assert t.median_ms == pytest.approx(2.0) and t.cpu_median_ms == pytest.approx(20.0)
    assert t.wall_ms == pytest.approx([3.0, 1.0, 2.0])


def test_cpu_time_counts_work_and_not_sleep():
    import time

    busy = time_calls(lambda: sum(i * i for i in range(200_000)), repeats=2, warmup=0)
    asleep = time_calls(lambda: time.sleep(0.02), repeats=2, warmup=0)
    assert busy.cpu_median_ms > 1.0
    assert asleep.median_ms >= 19.0 and asleep.cpu_median_ms < asleep.median_ms / 2


@pytest.mark.parametrize("repeats, warmup", [(0, 1), (2, -1)])
def test_bad_counts_are_named(repeats, warmup):
    with pytest.raises(ValueError, match="repeats >= 1 and warmup >= 0"):
        time_calls(lambda: None, repeats=repeats, warmup=warmup)
