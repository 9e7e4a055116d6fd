"""Shard claims: several teacher workers (processes, GPUs, machines) share one output folder.

A worker claims shard ``K`` by creating ``CLAIMS/shard-KKKKK.gNNN.json`` with ``O_CREAT | O_EXCL``: of all
workers that try the same name, exactly one succeeds (local file systems, NFSv3+, Lustre, CephFS). The file
records the worker and the settings that decide the targets' bytes; its modification time is the worker's
heartbeat, refreshed by a background thread every ``timeout / 4`` seconds while the worker lives.

The newest generation ``N`` of a shard is *live* unless

- its heartbeat is older than the holder's ``timeout`` (a crashed process, a lost machine), or
- it was made on this host by a process that no longer exists (reclaimed at once), or by this very process
  (an earlier call that stopped).

A worker takes over a shard that is not live by creating generation ``N + 1``, again with ``O_EXCL``. The
old holder, should it still run, sees the newer generation before its next batch (:meth:`ShardClaims.holds`)
and leaves the shard. Ages are measured on the file system's clock (the modification time of a file the
checker has just touched), so machines whose clocks disagree still agree on what is stale.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

CLAIM_RE = re.compile(r"^shard-(\d{5})\.g(\d{3,})\.json$")
DEFAULT_TIMEOUT = 120.0  # seconds without a heartbeat before a claim is taken over


@dataclass(frozen=True)
class Worker:
    """Who labels: a name (unique per worker), the host and the process id."""

    name: str
    host: str
    pid: int

    @classmethod
    def this_process(cls, name: str | None = None) -> Worker:
        """This process; the default name is ``host-pid``, with the torchrun rank when there is one."""
        host, pid = socket.gethostname(), os.getpid()
        rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else None
        return cls(name or (f"{host}-rank{rank}-{pid}" if rank is not None else f"{host}-{pid}"), host, pid)


@dataclass(frozen=True)
class Claim:
    """Generation ``generation`` of the claim on shard ``shard``, held in ``path``."""

    shard: int
    generation: int
    path: Path


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class ShardClaims:
    """The claims folder of one output directory, seen by ``worker`` with its ``settings``."""

    def __init__(self, directory: str | os.PathLike, worker: Worker, timeout: float = DEFAULT_TIMEOUT,
                 settings: dict | None = None):
        if not timeout > 0:
            raise ValueError(f"claim timeout must be > 0 seconds, got {timeout}")
        self.directory = Path(directory)
        self.worker = worker
        self.timeout = float(timeout)
        self.settings = dict(settings or {})
        self._held: Claim | None = None
        self._lock = threading.Lock()
        self.directory.mkdir(parents=True, exist_ok=True)

    # ---- reading ---------------------------------------------------------------------------------
    def path(self, shard: int, generation: int) -> Path:
        return self.directory / f"shard-{shard:05d}.g{generation:03d}.json"

    def generations(self) -> dict[int, list[int]]:
        """Every shard with claims → its generations, ascending."""
        found: dict[int, list[int]] = {}
        for p in self.directory.iterdir():
            m = CLAIM_RE.match(p.name)
            if m:
                found.setdefault(int(m.group(1)), []).append(int(m.group(2)))
        return {k: sorted(v) for k, v in found.items()}

    def now(self) -> float:
        """The file system's current time: the modification time of a file this worker has just touched
        (its own clock when the folder is read-only)."""
        clock = self.directory / f".clock-{self.worker.host}-{self.worker.pid}"
        try:
            clock.touch()
            os.utime(clock)
            return clock.stat().st_mtime
        except OSError:
            return time.time()

    def describe(self, shard: int, generation: int, now: float | None = None) -> dict | None:
        """The claim's record (``worker``, ``host``, ``pid``, ``settings``) with its ``age`` in seconds and its
        ``state``: ``live``, ``stale``, ``dead`` (its process is gone from this host) or ``ours``; None when
        the file has gone."""
        path = self.path(shard, generation)
        try:
            mtime = path.stat().st_mtime
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
        except json.JSONDecodeError:  # being written at this moment: its fresh mtime decides
            record = {}
        age = (self.now() if now is None else now) - mtime
        host, pid = record.get("host"), record.get("pid")
        if host == self.worker.host and pid == self.worker.pid:
            state = "ours"
        elif age > float(record.get("timeout", self.timeout)):  # the holder's promise, else ours
            state = "stale"
        elif host == self.worker.host and isinstance(pid, int) and not _pid_exists(pid):
            state = "dead"
        else:
            state = "live"
        return {**record, "shard": shard, "generation": generation, "age": age, "state": state}

    def generations_of(self, shard: int) -> int:
        """How many generations ``shard`` has (they are made one after the other and never removed)."""
        n = 0
        while self.path(shard, n).exists():
            n += 1
        return n

    def latest(self, shard: int, now: float | None = None) -> dict | None:
        n = self.generations_of(shard)
        return self.describe(shard, n - 1, now) if n else None

    # ---- claiming --------------------------------------------------------------------------------
    def claim(self, shard: int) -> Claim | None:
        """Claim ``shard`` (a new claim, or the next generation of one that is not live); None when another
        worker holds it or won the race for it."""
        generation = self.generations_of(shard)  # the next one
        if generation:
            latest = self.describe(shard, generation - 1)
            if latest is not None and latest["state"] == "live":
                return None
        path = self.path(shard, generation)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        record = {"worker": self.worker.name, "host": self.worker.host, "pid": self.worker.pid,
                  "settings": self.settings, "timeout": self.timeout,
                  "claimed_at": time.time()}
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        claim = Claim(shard, generation, path)
        with self._lock:
            self._held = claim
        return claim

    def holds(self, claim: Claim) -> bool:
        """True while no newer generation of the claim exists (no other worker has taken the shard over)."""
        return not self.path(claim.shard, claim.generation + 1).exists()

    def release(self, claim: Claim) -> None:
        """Stop the heartbeat of ``claim`` (its file stays, for the record of who did the shard)."""
        with self._lock:
            if self._held == claim:
                self._held = None

    def touch(self) -> None:
        """One heartbeat of the claim held now."""
        with self._lock:
            held = self._held
        if held is not None:
            with suppress(OSError):
                os.utime(held.path)

    @contextmanager
    def heartbeat(self) -> Iterator[ShardClaims]:
        """Refresh the held claim every ``timeout / 4`` seconds from a background thread while in the block."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.timeout / 4):
                self.touch()

        thread = threading.Thread(target=beat, name=f"claim-heartbeat-{self.worker.name}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            with suppress(OSError):
                (self.directory / f".clock-{self.worker.host}-{self.worker.pid}").unlink()

    def conflicts(self) -> list[dict]:
        """Live claims of other workers made with other settings (joining them would mix targets)."""
        now = self.now()
        out = []
        for shard, gens in self.generations().items():
            d = self.describe(shard, gens[-1], now)
            if d and d["state"] == "live" and d.get("settings") not in (None, self.settings):
                out.append(d)
        return out
