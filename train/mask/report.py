"""The design report: every design side by side (figure) and in one table (Markdown), plus the paired
comparison of the distilled student with end-to-end binary design.

Figure rows: the mask (white = open; "PSF only" for PSF designs), the PSF (RGB, each channel scaled to
its maximum), the radial MTF of the three channels (log scale), one held-out reconstruction by the decoder.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from train.report import machine_lines, save_figure

CHANNEL_COLOURS = ("tab:red", "tab:green", "tab:blue")


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–" if value is None else ("∞" if value > 0 else "−∞")
    return format(value, spec)


def save_figure_side_by_side(path: str | os.PathLike, entries: Sequence[Mapping], truth: np.ndarray) -> Path:
    """``entries``: dicts with name, mask (or None), psf (C, H, W), mtf (f, (C, bins)), recon (C, h, w)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(entries) + 1
    fig, axes = plt.subplots(4, n, figsize=(1.9 * n, 7.6), squeeze=False)
    for k, e in enumerate(entries):
        ax = axes[:, k]
        if e.get("mask") is not None:
            ax[0].imshow(e["mask"], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax[0].text(0.5, 0.5, "PSF only", ha="center", va="center", transform=ax[0].transAxes)
        ax[0].set_title(e["name"], fontsize=9)
        psf = np.asarray(e["psf"], dtype=np.float64)
        rgb = psf / np.maximum(psf.max(axis=(-2, -1), keepdims=True), 1e-30)
        ax[1].imshow(np.moveaxis(rgb, 0, -1) if rgb.shape[0] == 3 else rgb[0], cmap="gray", interpolation="nearest")
        f, mtf = e["mtf"]
        for c, curve in enumerate(mtf):
            ax[2].semilogy(f, np.maximum(curve, 1e-6), color=CHANNEL_COLOURS[c % 3], lw=0.8)
        ax[2].set_ylim(1e-4, 1.5)
        ax[2].tick_params(labelsize=6)
        if k == 0:
            ax[2].set_ylabel("MTF", fontsize=8)
        ax[3].imshow(np.clip(np.moveaxis(e["recon"], 0, -1), 0, 1), interpolation="nearest")
        ax[3].set_xlabel(f"{e.get('psnr', float('nan')):.2f} dB", fontsize=8)
        for a in (ax[0], ax[1], ax[3]):
            a.set_xticks([])
            a.set_yticks([])
    last = axes[:, -1]
    for a in last[:3]:
        a.axis("off")
    last[3].imshow(np.clip(np.moveaxis(truth, 0, -1), 0, 1), interpolation="nearest")
    last[3].set_title("ground truth", fontsize=9)
    last[3].set_xticks([])
    last[3].set_yticks([])
    axes[0, 0].set_ylabel("mask", fontsize=8)
    axes[1, 0].set_ylabel("PSF", fontsize=8)
    axes[3, 0].set_ylabel("decoder", fontsize=8)
    return save_figure(fig, path, dpi=110)


def results_table(results: Mapping[str, Mapping]) -> str:
    """One row per design: constraint, conditioning and scores of the decoder and of Wiener."""
    head = ("| design | mask | fill | constraint | σ | κ(A) | μ(A) | λ | PSNR dec | SSIM dec | LPIPS dec "
            "| PSNR Wiener | SSIM Wiener | LPIPS Wiener |")
    rule = "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    rows = [head, rule]
    for name, r in results.items():
        check = r.get("constraint")
        fill = check["fill_factor"] if check else r.get("fill_factor")
        ok = "–" if check is None else ("exact ✓" if check["satisfied"] else "VIOLATED")
        dec, wie = r["decoder"], r["wiener"]
        rows.append(
            f"| {name} | {r['mask_kind']} | {_fmt(fill, '.2f')} | {ok} | {_fmt(r.get('noise_std'), '.4f')} | "
            f"{_fmt(r['condition_number'], '.3g')} | "
            f"{_fmt(r['gram_coherence'], '.3f')} | {_fmt(r['lam'], '.1e')} | {_fmt(dec['psnr'], '.2f')} | "
            f"{_fmt(dec['ssim'], '.4f')} | {_fmt(dec.get('lpips'), '.4f')} | {_fmt(wie['psnr'], '.2f')} | "
            f"{_fmt(wie['ssim'], '.4f')} | {_fmt(wie.get('lpips'), '.4f')} |")
    return "\n".join(rows)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """Mean of ``a − b`` over the same images, its standard error and the paired t statistic."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "stderr": se, "t": float(d.mean() / se) if se > 0 else float("nan"),
            "n": len(d)}


def comparison_lines(results: Mapping[str, Mapping], baseline: str = "e2e") -> list[str]:
    """The distilled students against ``baseline`` on the same held-out images (decoder PSNR)."""
    if baseline not in results:
        return []
    lines = []
    for name in ("kd", "kd-enc", "kd-dec"):
        if name not in results:
            continue
        d = paired_difference(results[name]["decoder"]["psnr_per_image"],
                              results[baseline]["decoder"]["psnr_per_image"])
        verdict = "meets" if d["mean"] >= 1.0 else "falls short of"
        lines.append(f"- {name} − {baseline}: {d['mean']:+.2f} dB PSNR (± {d['stderr']:.2f} s.e., paired t = "
                     f"{d['t']:.1f}, {d['n']} images): {verdict} the 1 dB target")
    return lines


def write_report(path: str | os.PathLike, results: Mapping[str, Mapping], settings: Mapping, machine: Mapping,
                 command: str, figure: str, primary: str | None, seconds: float) -> Path:
    from nsdd_edge.atomic import atomic_write_text

    optics = settings["optics"]
    lines = [
        "# Mask design report (`nsdd-train design-mask`)",
        "",
        f"Command: `{command}`",
        "",
        *machine_lines(machine),
        f"- wall time: {seconds / 60:.1f} min",
        "",
        "## Camera",
        (f"- amplitude mask {optics['distance_mm']} mm in front of the sensor; sensor grid {settings['sensor']}² "
         f"pixels of {optics['sensor_pitch_um']} µm; fabrication pitch {optics['feature_um']} µm; wavelengths "
         f"{', '.join(f'{w:g}' for w in optics['wavelengths_nm'])} nm; propagation `{settings['propagation']}`"),
        (f"- scenes {settings['scene']}² through the crop model (as `nsdd-train simulate`), noise σ = "
         f"{settings['noise_std'] if not settings.get('profile') else 'of the camera profile ' + settings['profile']} "
         f"at throughput {settings['reference_throughput']}; constraint "
         f"`{settings['constraint']}`, minimum feature {settings['min_feature']} cells; encoder loss `{settings['encoder_loss']}` (w = {settings['enc_weight']}), decoder-feature loss "
         f"w = {settings['dec_weight']}; {settings['steps']} steps × batch {settings['batch']} per design (teacher: "
         f"{settings['teacher_steps'] or 2 * settings['steps']}, before the students)"),
        "",
        "## Designs side by side",
        "",
        ("fill: open fraction of the aperture (teacher: mean transmittance). σ: the mean noise relative to the "
         "signal on the held-out scenes; it grows as τ_ref/τ with the mask's throughput τ (PSF-only designs: "
         "τ = τ_ref). κ(A), μ(A): condition number and "
         "Gram coherence of the green channel's crop-model matrix A (formed and decomposed exactly). λ: the "
         "decoder's learned Wiener λ. Wiener: λ chosen on training scenes."),
        "",
        results_table(results),
        "",
        *comparison_lines(results),
        "",
        f"![designs]({figure})",
        "",
    ]
    if primary:
        lines += [(f"The printable mask (`mask.png`, `mask.svg`) and the PSF (`psf.npy`) in this directory are "
                   f"the `{primary}` design's."), ""]
    atomic_write_text(path, "\n".join(lines))
    return Path(path)
