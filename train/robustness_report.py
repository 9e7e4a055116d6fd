"""Tables and figures of ``nsdd-train robustness`` (:mod:`train.robustness`).

- ``results.json``: per kind, level and method the mean (and std) of each score over the faces, the ground
  truth's own consistency under the true model (``reference``: the noise floor), the settings and the notes;
  ``per_image`` holds every face's scores.
- ``results.csv``: one row per (kind, level, method).
- ``table.md``: per kind, methods × levels (PSNR / LPIPS, then consistency), and the mean change from the
  no-mismatch cell over each kind's mismatched levels.
- ``robustness_psnr.png``, ``robustness_lpips.png``, ``robustness_consistency.png``: four panels (one per kind),
  one curve per method; the consistency panels also show the ground truth's (the floor).
- ``grid.png``: the first face reconstructed by every method at the ``--grid`` perturbations.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from nsdd_edge.atomic import atomic_write_text
from train.evaluate import _jsonable, _write_json

METRICS = (("psnr", "PSNR (dB) ↑"), ("lpips", "LPIPS ↓"), ("consistency", "‖A_true x̂ − y‖/‖y‖ ↓"))
SCORES = ("psnr", "ssim", "lpips", "consistency", "consistency_calibrated")
AXIS = {"shift": "shift along x (px)", "scale": "PSF scale s (depth)", "rotation": "rotation (°)",
        "psf_snr": "calibration PSF SNR (dB)"}


def _mean(values):
    return float(np.mean(values)) if values else None


def summarise(cell: Mapping) -> dict:
    """Mean and std over the faces of each score of a cell."""
    out: dict = {}
    for k in SCORES:
        v = cell["scores"].get(k)
        if v:
            out[k] = float(np.mean(v))
            out[f"{k}_std"] = float(np.std(v))
    out["n"] = len(cell["scores"]["psnr"])
    return out


def _fmt(value, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def write_outputs(cfg, faces, perturbations: Mapping, cells: Mapping[str, Mapping[str, dict]],
                  measurements: Mapping[str, np.ndarray], references: Mapping[str, float], notes: list[str]) -> dict:
    """Write every output file of the study into ``cfg.out``; returns ``{"table": markdown, "results": …}``."""
    from train.robustness import Perturbation, format_level

    methods = [s.name for s in cfg.sources]
    results: dict = {}
    reference: dict = {}
    rows = []
    for kind, levels in cfg.levels.items():
        results[kind], reference[kind] = {}, {}
        for level in levels:
            label = Perturbation(kind, level).label
            key = format_level(level)
            reference[kind][key] = references[label]
            results[kind][key] = {m: summarise(cells[m][label]) for m in methods}
            for m in methods:
                s = results[kind][key][m]
                rows.append([kind, key, m, *(s.get(k) for k in SCORES), references[label], s["n"]])
    doc = {
        "command": cfg.command, "data": str(cfg.data), "split": cfg.split, "ids": faces.ids, "n": len(faces.ids),
        "shift_axis": "x (columns); the PSF moves by +level pixels",
        "levels": {k: [format_level(v) for v in vs] for k, vs in cfg.levels.items()},
        "methods": {s.name: {"method": s.spec, "path": str(s.path) if s.path else None,
                             "settings": _jsonable(s.settings)} for s in cfg.sources},
        "consistency": "‖A x̂ − y‖/‖y‖ under the true forward model (the one that made y); consistency_calibrated: "
                       "under the calibrated forward model",
        "notes": notes, "reference": reference, "results": results,
        "per_image": {m: {label: cells[m][label]["scores"] for label in cells[m]} for m in methods},
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    _write_json(cfg.out / "results.json", doc)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["kind", "level", "method", *SCORES, "ground_truth_consistency", "n"])
    writer.writerows([[f"{v:.6g}" if isinstance(v, float) else v for v in r] for r in rows])
    atomic_write_text(cfg.out / "results.csv", buf.getvalue())
    table = markdown_tables(results, reference, methods)
    atomic_write_text(cfg.out / "table.md", f"# PSF mismatch ({cfg.data}, {len(faces.ids)} faces)\n\n" + table)
    for metric, title in METRICS:
        save_curves(cfg.out / f"robustness_{metric}.png", results, reference if metric == "consistency" else None,
                    methods, metric, title)
    grid = [p for p in perturbations.values() if p.label == "none"] + [p for p in cfg.grid if not p.is_identity]
    if grid:
        save_picture_grid(cfg.out / "grid.png", grid, cells, methods, measurements, faces, cfg.out)
    return {"table": table, "results": results}


def markdown_tables(results: Mapping, reference: Mapping, methods: list[str]) -> str:
    """Per kind: methods × levels with ``PSNR / LPIPS``, then consistency (and the ground truth's), then the mean
    change from the no-mismatch cell over the mismatched levels."""
    from train.robustness import IDENTITY, UNITS, format_level

    parts = []
    for kind, by_level in results.items():
        levels = list(by_level)
        head = "| method | " + " | ".join(f"{lv} {UNITS[kind]}" for lv in levels) + " |"
        rule = "|---|" + "|".join("---:" for _ in levels) + "|"
        parts.append(f"### {kind}: PSNR (dB) / LPIPS\n\n{head}\n{rule}")
        for m in methods:
            parts.append(f"| {m} | " + " | ".join(
                f"{_fmt(by_level[lv][m].get('psnr'), '.2f')} / {_fmt(by_level[lv][m].get('lpips'), '.3f')}"
                for lv in levels) + " |")
        parts.append(f"\n### {kind}: consistency ‖A_true x̂ − y‖/‖y‖\n\n{head}\n{rule}")
        for m in methods:
            parts.append(f"| {m} | " + " | ".join(_fmt(by_level[lv][m].get("consistency"), ".4f") for lv in levels)
                         + " |")
        parts.append("| *ground truth (floor)* | " + " | ".join(_fmt(reference[kind][lv], ".4f") for lv in levels)
                     + " |\n")
    ident = {k: format_level(v) for k, v in IDENTITY.items()}
    kinds = [k for k in results if ident[k] in results[k] and len(results[k]) > 1]
    if kinds:
        parts.append("### Mean change from no mismatch over the mismatched levels: ΔPSNR (dB) / ΔLPIPS\n")
        parts.append("| method | " + " | ".join(kinds) + " |\n|---|" + "|".join("---:" for _ in kinds) + "|")
        for m in methods:
            cols = []
            for k in kinds:
                base = results[k][ident[k]][m]
                other = [v[m] for lv, v in results[k].items() if lv != ident[k]]
                dp = _mean([o["psnr"] - base["psnr"] for o in other])
                dl = _mean([o["lpips"] - base["lpips"] for o in other if "lpips" in o and "lpips" in base])
                cols.append(f"{_fmt(dp, '+.2f')} / {_fmt(dl, '+.3f')}")
            parts.append(f"| {m} | " + " | ".join(cols) + " |")
        parts.append("")
    return "\n".join(parts) + "\n"


def _positions(kind: str, levels: list[str]) -> tuple[list[float], list[str] | None]:
    """x positions of a kind's levels: the levels themselves, or (psf_snr, with ∞) evenly spaced in order."""
    if kind == "psf_snr":
        return list(range(len(levels))), ["∞" if lv == "inf" else lv for lv in levels]
    return [float(lv) for lv in levels], None


def save_curves(path: Path, results: Mapping, reference: Mapping | None, methods: list[str], metric: str,
                title: str) -> Path:
    """Four panels (one per kind), one curve per method; the no-mismatch level is a dotted vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from train.report import save_figure
    from train.robustness import IDENTITY, format_level

    kinds = list(results)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds) + 2.4, 4.0), squeeze=False)
    markers = "osD^vP*Xh<>p"
    colours = plt.get_cmap("tab10").colors
    for ax, kind in zip(axes[0], kinds):
        levels = list(results[kind])
        xs, ticks = _positions(kind, levels)
        for k, m in enumerate(methods):
            ys = [results[kind][lv][m].get(metric, math.nan) for lv in levels]
            ax.plot(xs, ys, marker=markers[k % len(markers)], color=colours[k % len(colours)], label=m, lw=1.5, ms=5)
        if reference is not None:
            ax.plot(xs, [reference[kind][lv] for lv in levels], "k--", lw=1.2, label="ground truth (noise floor)")
            ax.set_yscale("log")
        ident = format_level(IDENTITY[kind])
        if ident in levels:
            ax.axvline(xs[levels.index(ident)], color="grey", ls=":", lw=1)
        if ticks is not None:
            ax.set_xticks(xs, ticks)
        ax.set_xlabel(AXIS[kind])
        ax.set_title(kind)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(title)
    handles, labels = axes[0][0].get_legend_handles_labels()  # beside the last panel: tight_layout makes room
    axes[0][-1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9, frameon=False)
    fig.suptitle(f"{title} under PSF mismatch")
    return save_figure(fig, path)


def save_picture_grid(path: Path, perturbations: list, cells: Mapping, methods: list[str],
                      measurements: Mapping[str, np.ndarray], faces, out: Path) -> Path:
    """The first face: rows = perturbations, columns = measurement, every method, ground truth."""
    import torch

    from train.evaluate import _safe
    from train.physics import center_crop
    from train.report import save_grid

    shape = tuple(faces.truth.shape[-2:])
    recons = {m: [center_crop(torch.from_numpy(np.load(out / "cells" / _safe(m) / f"{p.label}.npy")), shape).numpy()
                  for p in perturbations] for m in methods}
    return save_grid(path, [p.title for p in perturbations], [measurements[p.label] for p in perturbations], recons,
                     [faces.truth[0].numpy()] * len(perturbations))
