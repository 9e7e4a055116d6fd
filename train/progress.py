"""Time estimates for the long commands (``prior``, ``teacher``, ``distill``, ``evaluate``).

After the first units of work (steps, images) a command prints one line with the measured rate and the
time the rest will take, so a run that would take days is seen to in its first minute, with or without a
progress bar (logs of ``--no-progress`` / ``--quiet`` runs get it too)::

    prior: 9.06 s/step over steps 2–4; 99,996 steps left: about 10.5 days (ends around Sat 26 Nov 18:40)

The first call is the warm-up (allocation, first-call compilation) and is not timed: the rate is measured
from the end of the first update to the update that completes ``after`` more units,
``rate = (done − done₀) / (t − t₀)``, ``left = (total − done) / rate``. Work that will end within
``min_left`` seconds gets no line.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def format_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.4 h``, ``10.5 days``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_rate(seconds_per_unit: float, unit: str) -> str:
    """``9.06 s/step``, ``35 ms/img``, ``48.2 steps/s`` (whichever reads best)."""
    if seconds_per_unit >= 1.0:
        return f"{seconds_per_unit:.3g} s/{unit}"
    if seconds_per_unit >= 0.02:
        return f"{1e3 * seconds_per_unit:.3g} ms/{unit}"
    return f"{1.0 / max(seconds_per_unit, 1e-12):.3g} {unit}s/s"


def say(line: str) -> None:
    """Print ``line`` to stderr without breaking an active tqdm progress bar."""
    try:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)  # keeps an active progress bar intact
    except ImportError:
        print(line, file=sys.stderr, flush=True)


class TimeEstimate:
    """Prints, once, the time ``total`` units of work will take, measured over the first ones.

    ``update(done)`` after each step, image or batch (``done``: units finished so far, including those a
    resumed run found done). Returns the line when it printed it, else ``None``.
    """

    def __init__(self, label: str, total: int, unit: str = "step", *, after: int = 3, min_left: float = 10.0,
                 write: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        self.label, self.total, self.unit = label, int(total), unit
        self.after, self.min_left = max(1, int(after)), float(min_left)
        self.write = write or say
        self.clock, self.wall_clock = clock, wall_clock
        self._start: tuple[int, float] | None = None
        self.line: str | None = None

    def update(self, done: int) -> str | None:
        if self.line is not None:
            return None
        now = self.clock()
        if self._start is None:  # the first update ends the warm-up: timing starts here
            self._start = (int(done), now)
            return None
        done0, t0 = self._start
        if done - done0 < self.after:
            return None
        per_unit = (now - t0) / (done - done0)
        left = max(self.total - int(done), 0)
        if per_unit * left < self.min_left:
            self.line = ""  # nothing worth saying: the rest takes seconds
            return None
        ends = time.strftime("%a %d %b %H:%M", time.localtime(self.wall_clock() + per_unit * left))
        first, last = done0 + 1, int(done)
        self.line = (f"{self.label}: {format_rate(per_unit, self.unit)} over {self.unit}s {first:,}–{last:,}; "
                     f"{left:,} {self.unit}s left: about {format_duration(per_unit * left)} (ends around {ends})")
        self.write(self.line)
        return self.line
