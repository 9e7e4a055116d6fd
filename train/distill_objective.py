"""The distillation objective and its schedules: the distance to the teacher (null-space or full, L1 or L2, on the
whole grid or the student's window), the LPIPS term on the same window, the learning-rate and EMA schedules."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from train.distill_data import DistillError
from train.physics import LenslessOperator, center_crop


def learning_rate(step: int, base: float, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``0.1 · base`` at ``total``."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def distill_loss(x_hat: torch.Tensor, target: torch.Tensor, physics: LenslessOperator, objective: str,
                 norm: str, window: tuple[int, int] | None = None) -> torch.Tensor:
    """``mean |r|`` (l1) or ``mean r²`` (l2) of ``r = (I − A†A)(x̂ − T)`` (nullspace) or ``x̂ − T`` (full);
    ``window``: the mean over the centred window ``C_w r`` only (where the student's ``g`` acts)."""
    r = x_hat.float() - target.float()
    if objective == "nullspace":
        r = physics.null_project(r)
    if window is not None:
        r = center_crop(r, window)
    return r.abs().mean() if norm == "l1" else r.pow(2).mean()


def loss_window(setting: str, support: tuple[int, int] | None, scene_shape: Sequence[int]) -> tuple[int, int] | None:
    """``--loss-window``: None for ``grid``; the support window for ``support`` (a named error without one);
    ``auto``: the support window when there is one smaller than the grid, else the grid.

    ``support`` suits a scene grid much larger than the scenes (a cg camera whose 64² faces sit on a 256² grid):
    there the targets are black padding that real scenes do not have, the student's ``g`` cannot reach it, and on
    the whole grid it dilutes the loss on the window the student fills (LPIPS 16x at 64 on 256)."""
    smaller = support is not None and tuple(support) != tuple(int(v) for v in scene_shape)
    if setting == "grid" or (setting == "auto" and not smaller):
        return None
    if support is None or tuple(support) == tuple(int(v) for v in scene_shape):
        raise DistillError("--loss-window support needs a support window smaller than the scene grid "
                           f"{tuple(scene_shape)} (--support)")
    return (int(support[0]), int(support[1]))


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], net: torch.nn.Module, decay: float) -> None:
    """``θ_ema ← d θ_ema + (1 − d) θ`` for floating tensors; other buffers are copied."""
    for k, v in net.state_dict().items():
        if v.is_floating_point():
            ema[k].mul_(decay).add_(v.detach(), alpha=1.0 - decay)
        else:
            ema[k].copy_(v)


def ema_decay(step: int, decay: float) -> float:
    """EMA warm-up: ``min(d, (1 + s) / (10 + s))`` so early averages are not dominated by the init."""
    return min(decay, (1.0 + step) / (10.0 + step))


def windowed_lpips(lpips_net: torch.nn.Module, x_hat: torch.Tensor, target: torch.Tensor,
                   window: tuple[int, int] | None) -> torch.Tensor:
    """LPIPS(x̂, T) per image, on the centred loss ``window`` (None: the whole grid): the objective's LPIPS term."""
    if window is not None:
        x_hat, target = center_crop(x_hat, window), center_crop(target, window)
    return lpips_net(x_hat.float(), target.float())
