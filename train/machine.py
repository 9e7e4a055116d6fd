"""The machine a measurement ran on and how much time and memory it took (``nsdd-train evaluate``).

``machine_info`` names the CPU, cores, torch threads and GPU; ``PeakMemory`` samples the peak RSS increase (CPU)
or reads ``torch.cuda.max_memory_allocated`` (GPU) around a call; ``sync`` waits for queued GPU work.
"""

from __future__ import annotations

import os
import platform
import threading
from pathlib import Path
from typing import Self

import torch


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict:
    """CPU model, cores, torch version/threads, GPU (if any), Python, platform and the device used."""
    info = {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "device": device, "gpu": None}
    if torch.cuda.is_available():
        idx = torch.device(device).index or 0 if device.startswith("cuda") else 0
        props = torch.cuda.get_device_properties(idx)
        info["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
        info["cuda"] = torch.version.cuda
    return info


def _rss_bytes() -> int | None:
    """Resident set size of this process from ``/proc/self/statm`` (``None`` where unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


_LIBC = None


def _release_free_heap() -> None:
    """``malloc_trim(0)`` (glibc): give freed heap pages back to the OS so that RSS starts low.

    Without it memory freed by an earlier call stays resident and a repeated call shows almost no increase.
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


class PeakMemory:
    """Peak memory increase during a ``with`` block, in bytes (``.peak``).

    CPU: freed heap is released first (:func:`_release_free_heap`), then a thread samples the RSS every
    ``interval`` s (and at entry/exit); peak − RSS at entry.
    CUDA: ``torch.cuda.max_memory_allocated − memory_allocated`` at entry (peak stats reset at entry).
    """

    def __init__(self, device: str = "cpu", interval: float = 0.002):
        self.device = device
        self.interval = interval
        self.peak: int | None = None
        self._stop = threading.Event()
        self._max = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            r = _rss_bytes()
            if r is not None and r > self._max:
                self._max = r
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _release_free_heap()
        self._base = _rss_bytes()
        self._max = self._base or 0
        if self._base is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            self.peak = max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
            return
        if self._base is None:
            return
        self._stop.set()
        self._thread.join()
        end = _rss_bytes() or 0
        self.peak = max(0, max(self._max, end) - self._base)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
