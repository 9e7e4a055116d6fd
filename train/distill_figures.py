"""What ``nsdd-train distill`` draws while it trains: the loss curve and the sample grids (measurement view | A†y |
student | teacher label), written next to the student's checkpoints."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from nsdd_edge.atomic import atomic_write_bytes
from train.physics import fit_to_grid


def write_loss_curve(history: list[list[float]], path: Path, holdout: list[list] | None = None) -> None:
    """Loss against step (log scale) with a moving average, as a PNG (matplotlib, Agg backend); ``holdout``:
    ``[step, loss, …]`` of the held-out labels, drawn as points on the same axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([h[0] for h in history])
    loss = np.array([h[1] for h in history])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, lw=0.6, alpha=0.4, label="loss")
    if len(loss) >= 5:
        k = max(len(loss) // 50, 5)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=1.5, label=f"mean of {k}")
    held = [h[:2] for h in holdout or [] if h[1] is not None]  # a non-finite held-out loss is logged as None
    if held:
        ax.plot([h[0] for h in held], [h[1] for h in held], "o-", ms=4, lw=1.2,
                label="held-out labels (fp32 EMA weights)")
    if np.all(loss > 0) and all(h[1] > 0 for h in held):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    from train.report import save_figure

    save_figure(fig, path, dpi=100)


def _to_uint8_rgb(img: torch.Tensor) -> np.ndarray:
    a = img.detach().float().cpu().clamp(0, 1).numpy()
    if a.shape[0] == 1:
        a = np.repeat(a, 3, axis=0)
    return (np.moveaxis(a[:3], 0, -1) * 255.0 + 0.5).astype(np.uint8)


def measurement_view(y: torch.Tensor, scene_shape: Sequence[int]) -> torch.Tensor:
    """A measurement on the scene grid, scaled by its own maximum for display."""
    v = fit_to_grid(y, scene_shape)
    return v / v.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None, None]


def write_sample_grid(rows: Sequence[Sequence[torch.Tensor]], path: Path, gap: int = 2) -> None:
    """PNG grid: one row per sample, columns measurement view | A†y | student | teacher."""
    import cv2

    tiles = [[_to_uint8_rgb(t) for t in row] for row in rows]
    h, w = tiles[0][0].shape[:2]
    ncol = len(tiles[0])
    grid = np.full((len(tiles) * (h + gap) - gap, ncol * (w + gap) - gap, 3), 255, np.uint8)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            grid[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = tile
    ok, png = cv2.imencode(".png", np.ascontiguousarray(grid[:, :, ::-1]))  # OpenCV wants BGR
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    atomic_write_bytes(path, png.tobytes())
