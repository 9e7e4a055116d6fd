"""``--threads`` of the training commands: torch's intra-op threads, defaulting to the measured rule of
:data:`nsdd_edge.cli_common.THREAD_RULES` (``0``: leave torch's own choice)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from nsdd_edge.cli_common import resolve_threads


@contextmanager
def torch_threads(value: int | None, kind: str = "train") -> Iterator[int]:
    """Run a command with torch's CPU threads from ``--threads`` (unset: the default of ``kind``); yields the
    count in use and restores the previous one afterwards (commands also run in-process, e.g. in tests)."""
    before = torch.get_num_threads()
    n = resolve_threads(value, kind)
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
