"""Held-out teacher labels during distillation (``nsdd-train distill --holdout N``): no ground truth.

The last N labelled measurements are not trained on; at every checkpoint the EMA student's objective on them,
``d(x̂, T) + w · LPIPS(x̂, T)`` with the training distance ``d`` (null-space or full, L1 or L2), is logged beside
the training loss. A held-out curve that stops falling while the training loss still does is the student
memorising its few labels: more labels, not more steps, is then the remedy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from train.distill_data import DistillError, TargetSet
from train.distill_objective import windowed_lpips


def split_holdout(ids: Sequence[str], holdout: int) -> tuple[list[str], list[str]]:
    """``(train, held)``: the last ``holdout`` ids are held out (teacher labels are written in id order, so a later
    block is the one a growing label set adds to last)."""
    ids = list(ids)
    if holdout < 0:
        raise DistillError(f"--holdout must be >= 0, got {holdout}")
    if holdout and holdout >= len(ids):
        raise DistillError(f"--holdout {holdout} leaves nothing to train on: {len(ids)} labelled measurements "
                           "(lower --holdout or label more)")
    return (ids[:-holdout], ids[-holdout:]) if holdout else (ids, [])


@torch.no_grad()
def held_out_loss(reconstruct: Callable[[torch.Tensor], torch.Tensor], held: TargetSet,
                  distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                  lpips_net: torch.nn.Module | None, lpips_weight: float, window: tuple[int, int] | None,
                  batch: int, device: torch.device) -> dict[str, float]:
    """Mean over the held-out labels of the training objective's terms: ``distance`` (its data term), ``lpips``
    (LPIPS on the loss window, when weighted) and ``loss = distance + lpips_weight · lpips``."""
    sums = {"distance": 0.0, "lpips": 0.0}
    for start in range(0, len(held.ids), batch):
        ids = held.ids[start:start + batch]
        y, target = held.batch(ids)
        y, target = y.to(device), target.to(device)
        x_hat = reconstruct(y)
        sums["distance"] += float(distance(x_hat, target)) * len(ids)
        if lpips_net is not None:
            sums["lpips"] += float(windowed_lpips(lpips_net, x_hat, target, window).sum())
    n = len(held.ids)
    out = {k: v / n for k, v in sums.items()}
    out["loss"] = out["distance"] + (lpips_weight * out["lpips"] if lpips_net is not None else 0.0)
    if lpips_net is None:
        del out["lpips"]
    return out
