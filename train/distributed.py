"""Data-parallel plumbing for ``nsdd-train prior`` and ``nsdd-train distill`` under ``torchrun``.

``torchrun`` starts one process per GPU (or CPU worker) and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``. Without them (or with ``WORLD_SIZE=1``) :func:`init_distributed`
returns a single-process :class:`DistContext` whose methods do nothing: the default path is unchanged.

Same global batch ``B`` on ``W`` ranks: every rank draws the same global batch (indices and, for the prior,
the noise) from its seeded stream and keeps rows ``[r·B/W, (r+1)·B/W)`` (:meth:`DistContext.rows`).
DistributedDataParallel averages the gradients over ranks, so

    ∇ = (1/W) Σ_r ∇ mean_{i ∈ rows(r)} ℓ_i = ∇ mean_{i ∈ B} ℓ_i,

the single-process gradient up to float rounding. Every rank then holds the same weights, optimiser
state, EMA, data position and noise stream, so rank 0's checkpoint is the whole state and resumes with
any world size. Rank 0 alone writes files and logs; the others print nothing to stdout.

Backends: NCCL on GPUs (rank ``r`` uses ``cuda:LOCAL_RANK``), gloo on CPUs.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

T = TypeVar("T")
TIMEOUT_ENV = "NSDD_DIST_TIMEOUT"  # seconds a rank waits in a collective (rank 0 writing a checkpoint)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, its ``device`` and the collective backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- data sharding -------------------------------------------------------------------------
    def rows(self, batch: int) -> slice:
        """This rank's rows ``[r·B/W, (r+1)·B/W)`` of a global batch of ``batch``."""
        share = batch // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def local(self, items: Sequence[T]) -> list[T]:
        """This rank's part of the global batch ``items`` (all of it in one process)."""
        return list(items) if not self.enabled else list(items[self.rows(len(items))])

    def check_batch(self, batch: int, error: type[Exception] = ValueError) -> None:
        """The global batch must split evenly over the ranks (equal local batches keep the mean exact)."""
        if batch % self.world_size:
            raise error(f"--batch {batch} (the global batch) does not split evenly over {self.world_size} "
                        f"processes; use a multiple of {self.world_size}")

    # ---- collectives (identity in one process) -------------------------------------------------
    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average of a tensor over ranks (equal-sized local batches: the global batch mean)."""
        if not self.enabled:
            return value
        reduced = value.detach().float().clone()
        torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM)
        return reduced / self.world_size

    def any(self, *flags: bool) -> list[bool]:
        """Each flag, true on every rank when it is true on one (a signal or a deadline seen by one rank
        stops all of them at the same step); one all-reduce for all the flags."""
        if not self.enabled:
            return [bool(f) for f in flags]
        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return [bool(v > 0) for v in t.tolist()]

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over ranks (e.g. the step count that fits every rank's time budget)."""
        if not self.enabled:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return int(t.item())

    def from_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 and hand its result to every rank (or raise its exception on every rank):
        rank 0 reads the checkpoint, so the other machines need no copy of the output folder."""
        if not self.enabled:
            return fn()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as exc:  # noqa: BLE001  (re-raised on every rank below: none waits forever)
                box[0] = ("error", exc)
        torch.distributed.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    # ---- model, RNG, output --------------------------------------------------------------------
    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``DistributedDataParallel(module)`` (gradient all-reduce in backward); ``module`` itself in one process."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def seed_local_rng(self, seed: int, step: int) -> None:
        """Give each rank its own global torch stream (dropout masks) from ``(seed, step, rank)``; the noise
        of the diffusion loss comes from the shared training generator and is not affected."""
        if self.enabled:
            torch.manual_seed((int(seed) * 1_000_003 + int(step)) * 1_009 + self.rank + 1)

    @contextlib.contextmanager
    def quiet_unless_main(self) -> Iterator[None]:
        """Rank 0 prints; the other ranks' stdout is dropped (their errors still reach stderr)."""
        if self.is_main:
            yield
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                yield

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def describe(self) -> dict:
        return {"world_size": self.world_size, "backend": self.backend}


def launched_by_torchrun() -> bool:
    """True when this process is one of several started by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def local_device(requested: torch.device) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` for ``cuda`` under ``torchrun``, else ``requested``."""
    if requested.type == "cuda" and requested.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return requested


def init_distributed(requested: torch.device, error: type[Exception] = ValueError) -> DistContext:
    """Join the process group ``torchrun`` describes (NCCL for CUDA, gloo for CPU), or return the
    single-process context. Problems raise ``error`` (the command's named error)."""
    if not launched_by_torchrun():
        return DistContext(device=requested)
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as exc:
        raise error(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but RANK/LOCAL_RANK are missing or not integers "
                    "(start the command with torchrun)") from exc
    if not torch.distributed.is_available():
        raise error("this torch build has no torch.distributed; run in one process (without torchrun)")
    if requested.type == "cuda":
        if requested.index is not None:
            raise error(f"--device {requested} under torchrun: each process uses cuda:LOCAL_RANK; pass --device "
                        "cuda (or auto)")
        if local_rank >= torch.cuda.device_count():
            raise error(f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                        "start at most that many processes per node (torchrun --nproc-per-node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = requested, "gloo"
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, timeout=timeout)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)
