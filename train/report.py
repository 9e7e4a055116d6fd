"""Tables, figures and the markdown report of ``nsdd-train evaluate`` (matplotlib, Agg backend).

- :func:`metrics_table`: a markdown table of the per-method means in ``metrics.json``.
- :func:`save_grid`: qualitative grid — rows are samples; columns the measurement (display-normalised
  ``(y − min y) / (max y − min y)``), each method, and the ground truth.
- :func:`save_lpips_vs_time`: LPIPS against seconds per image on a log time axis, one labelled point per
  method (as in the NSDD paper's figure 1).
- :func:`write_report`: a self-contained markdown report with the table, the machine, both figures copied
  next to it and the exact command line.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from nsdd_edge.atomic import atomic_write

COLUMNS = (
    ("psnr", "PSNR (dB) ↑", "{:.2f}"),
    ("ssim", "SSIM ↑", "{:.4f}"),
    ("lpips", "LPIPS ↓", "{:.4f}"),
    ("consistency", "‖Ax̂−y‖/‖y‖ (forward) ↓", "{:.2e}"),
    ("consistency_recon", "‖Ax̂−y‖/‖y‖ (recon op)", "{:.2e}"),
    ("seconds_per_image", "s / image", "{:.4g}"),
    ("peak_mem_mb", "peak mem (MB)", "{:.1f}"),
    ("n", "n", "{:d}"),
)



def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Lay out, write a matplotlib figure as PNG atomically, and close it (also when writing fails)."""
    import matplotlib.pyplot as plt

    out = Path(path)
    try:
        fig.tight_layout()
        atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        plt.close(fig)
    return out

def _fmt(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return fmt.format(value)


def metrics_table(metrics: Mapping[str, Mapping]) -> str:
    """Markdown table, one row per method, columns of :data:`COLUMNS` (``–`` where not measured)."""
    head = "| method | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|---|" + "|".join("---:" for _ in COLUMNS) + "|"
    rows = [f"| {name} | " + " | ".join(_fmt(m.get(key), fmt) for key, _, fmt in COLUMNS) + " |"
            for name, m in metrics.items()]
    return "\n".join([head, rule, *rows]) + "\n"


def machine_lines(machine: Mapping) -> list[str]:
    keys = ("cpu", "cores", "torch_threads", "gpu", "torch", "python", "platform", "device")
    return [f"- {k}: {machine[k]}" for k in keys if machine.get(k) is not None]


def _display(img: np.ndarray, normalise: bool = False) -> np.ndarray:
    """``(C, H, W)`` → ``(H, W[, 3])`` for imshow; optionally stretched to [0, 1] by its min and max."""
    a = np.asarray(img, dtype=np.float32)
    if normalise:
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    a = np.clip(a, 0, 1)
    return a[0] if a.shape[0] == 1 else np.moveaxis(a, 0, -1)


def save_grid(path: str | os.PathLike, ids: Sequence[str], measurements: Sequence[np.ndarray],
              recons: Mapping[str, Sequence[np.ndarray]], ground_truth: Sequence[np.ndarray | None] | None = None,
              dpi: int = 110) -> Path:
    """Qualitative grid PNG: rows ``ids``; columns measurement, each method, ground truth (if any)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_gt = ground_truth is not None and any(g is not None for g in ground_truth)
    cols = ["measurement (normalised)", *recons.keys()] + (["ground truth"] if has_gt else [])
    rows = len(ids)
    fig, axes = plt.subplots(rows, len(cols), figsize=(2.2 * len(cols), 2.3 * rows + 0.3), squeeze=False)
    for r, sample_id in enumerate(ids):
        panels = [_display(measurements[r], normalise=True)]
        panels += [_display(v[r]) for v in recons.values()]
        if has_gt:
            g = ground_truth[r]
            panels.append(_display(g) if g is not None else None)
        for c, img in enumerate(panels):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if img is not None:
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            if r == 0:
                ax.set_title(cols[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(sample_id, fontsize=8)
    return save_figure(fig, path, dpi)


def save_lpips_vs_time(path: str | os.PathLike, metrics: Mapping[str, Mapping], dpi: int = 120) -> Path | None:
    """Scatter of LPIPS (↓) against seconds per image (log axis), one point per method (named in the legend).

    Methods without both numbers are left out; returns ``None`` when no method has both.
    """
    pts = [(name, float(m["seconds_per_image"]), float(m["lpips"])) for name, m in metrics.items()
           if m.get("seconds_per_image") is not None and m.get("lpips") is not None
           and float(m["seconds_per_image"]) > 0]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    markers = "osD^vP*Xh<>p"
    for k, (name, t, d) in enumerate(pts):  # a legend, not labels at the points: close points never overlap
        ax.scatter([t], [d], s=60, zorder=3, marker=markers[k % len(markers)], label=name)
    ax.set_xscale("log")
    ds = [d for _, _, d in pts]
    if min(ds) > 0 and max(ds) / min(ds) > 10:  # one poor method would squash the others on a linear axis
        ax.set_yscale("log")
    ts = [t for _, t, _ in pts]
    ax.set_xlim(min(ts) / 3, max(ts) * 3)
    ax.set_xlabel("seconds per image (log scale)")
    ax.set_ylabel("LPIPS ↓" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=9, frameon=False)
    ax.set_title("quality vs. speed")
    ax.grid(True, which="both", alpha=0.3)
    return save_figure(fig, path, dpi)


def write_report(path: str | os.PathLike, metrics: Mapping[str, Mapping], machine: Mapping, command: str,
                 figures: Mapping[str, str | os.PathLike | None], dataset: str, split: str, n_images: int,
                 notes: Sequence[str] = ()) -> Path:
    """Markdown report at ``path``; figures are copied next to it (``<stem>_<name>.png``) and linked."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    links = []
    for title, fig in figures.items():
        if fig is None or not Path(fig).exists():
            continue
        dest = out.parent / f"{out.stem}_{Path(fig).name}"
        if Path(fig).resolve() != dest.resolve():
            shutil.copyfile(fig, dest)
        links.append(f"### {title}\n\n![{title}]({dest.name})\n")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Reconstruction results", "",
        f"Dataset `{dataset}`, split `{split}`, {n_images} images; generated {stamp}.", "",
        metrics_table(metrics),
        ("PSNR (data range 1), SSIM (11×11 Gaussian window, σ = 1.5) and LPIPS-Alex v0.1 are computed on the "
        "reconstruction clipped to [0, 1] and centre-cropped to the ground-truth size; the consistency "
        "‖A x̂ − y‖ / ‖y‖ (forward) applies the operator that made y to x̂ cut to its scene grid, (recon op) the "
        "reconstruction operator to the full reconstruction. Seconds per "
        "image: median over images after one warm-up call; peak memory: peak RSS increase (CPU) or "
        "torch.cuda.max_memory_allocated (GPU) during the method."), "",
        *[f"- {n}" for n in notes], *([""] if notes else []),
        "## Machine", "", *machine_lines(machine), "",
        "## Figures", "", *links,
        "## Command", "", "```", command, "```", "",
    ]
    out.write_text("\n".join(lines))
    return out
