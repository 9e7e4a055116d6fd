"""Scores of reconstructions against a reference (``nsdd-train evaluate``, the robustness study, ``fit``'s held-out
stage): PSNR / SSIM / LPIPS on the clipped centre window (less ``--border``), at the scenes' signal level, and the
consistency ``‖A x̂ − y‖ / ‖y‖`` under the forward and the reconstruction operators, with the ground truth's own
consistency as the noise floor.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from train import metrics as M
from train.data import DatasetError, LenslessDataset, read_recon_dir
from train.physics import LenslessOperator, center_crop, center_pad


class EvaluationError(ValueError):
    """Bad evaluation arguments or inputs; the message names the argument or path and the problem."""


def fit_to_scene(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``x`` centre-cropped or zero-padded per axis to ``shape`` (the forward operator's scene grid)."""
    from train.students import fit_to_grid

    return fit_to_grid(x, shape)


def score(x_full: torch.Tensor, ids: Sequence[str], ds: LenslessDataset, physics: LenslessOperator,
          use_lpips: bool, lpips_weights: str | None, device: str, name: str,
          reference: torch.Tensor | None = None, border: int = 0) -> dict[str, list]:
    """Per-image PSNR, SSIM, LPIPS (on the clipped centre crop less ``border`` px, against the ground truth or
    ``reference``) and consistency under the forward operator (``consistency``) and the reconstruction operator
    (``consistency_recon``)."""
    if tuple(x_full.shape[-2:]) != physics.scene_shape:
        raise EvaluationError(f"{name}: reconstructions are {tuple(x_full.shape[-2:])}, the dataset's "
                              f"reconstruction operator works on {physics.scene_shape} ({physics.model} model)")
    y = ds.measurements(ids)
    if x_full.shape[1] != y.shape[1]:
        raise EvaluationError(f"{name}: reconstructions have {x_full.shape[1]} channels, measurements {y.shape[1]}")
    cons = forward_consistency(x_full, y, ds.forward_physics().to(device))
    cons_recon = M.consistency(x_full.to(device), y.to(device), physics).cpu()
    out: dict[str, list] = {"consistency": [float(v) for v in cons],
                            "consistency_recon": [float(v) for v in cons_recon]}
    if reference is None:
        if not all(ds.has_ground_truth(i) for i in ids):
            missing = [i for i in ids if not ds.has_ground_truth(i)]
            if len(missing) < len(ids):
                raise EvaluationError(f"{ds.root}: ground truth missing for {len(missing)} of {len(ids)} ids "
                                      f"(first: {missing[:3]}); image metrics need all of them")
            return out  # real captures: consistency only
        reference = torch.from_numpy(np.stack([ds.ground_truth(i) for i in ids]))
    try:
        levels = ds.scene_levels(ids)
    except DatasetError as exc:
        raise EvaluationError(str(exc)) from None
    out.update(image_scores(x_full, reference, use_lpips, lpips_weights, device, name, levels, border))
    return out


def image_scores(x_full: torch.Tensor, reference: torch.Tensor, use_lpips: bool, lpips_weights: str | None,
                 device: str, name: str = "method", levels: torch.Tensor | None = None,
                 border: int = 0) -> dict[str, list]:
    """Per-image PSNR, SSIM and LPIPS of ``x_full`` centre-cropped to the reference's size and both clipped to
    [0, 1] (the scene sits in the centre of the reconstruction grid). ``levels`` ``(N,)``: scenes simulated at
    level ``L`` (a camera profile's signal scale) are scored as ``x̂ / L`` against ``x / L``, on the [0, 1] scale
    of the image (clipping ``L · x`` at 1 would saturate most of a face). ``border`` > 0: both lose their outer
    ``border`` pixels first (the inside of the window alone)."""
    gh, gw = reference.shape[-2:]
    if x_full.shape[-2] < gh or x_full.shape[-1] < gw:
        raise EvaluationError(f"{name}: reconstructions {tuple(x_full.shape[-2:])} are smaller than the reference "
                              f"{(gh, gw)}")
    if border:
        check_border(border, min(gh, gw), use_lpips)
    x = center_crop(x_full, (gh, gw))
    gt = reference
    if border:
        x, gt = x[..., border:gh - border, border:gw - border], gt[..., border:gh - border, border:gw - border]
    if levels is not None:
        scale = torch.where(levels > 0, levels, torch.ones_like(levels)).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        x, gt = x / scale, gt / scale.to(gt.dtype)
    x, gt = x.clamp(0, 1), gt.clamp(0, 1)
    out = {"psnr": [float(v) for v in M.psnr(x, gt)], "ssim": [float(v) for v in M.ssim(x, gt)]}
    if use_lpips:
        out["lpips"] = [float(v) for v in M.lpips(x.to(device), gt.to(device), lpips_weights)]
    return out


def check_border(border: int, side: int, use_lpips: bool) -> None:
    """``--border``: what is left of a ``side`` px window must hold SSIM's window (16 px) and LPIPS's input."""
    from train.lpips import MIN_SIZE

    need = MIN_SIZE if use_lpips else 16
    if side - 2 * border < need:
        raise EvaluationError(f"--border {border}: the {side} px scene window would keep {side - 2 * border} px, "
                              f"less than the {need} px " + ("LPIPS needs" if use_lpips else "SSIM needs"))


def forward_consistency(x_full: torch.Tensor, y: torch.Tensor, forward: LenslessOperator) -> torch.Tensor:
    """``‖A x̂ − y‖ / ‖y‖`` per image under a forward operator ``A`` (e.g. the one that made ``y``), ``x̂``
    centre-cropped or zero-padded to its scene grid; on the CPU."""
    device = forward.singular_values().device
    return M.consistency(fit_to_scene(x_full, forward.scene_shape).to(device), y.to(device), forward).cpu()


def against_reference(ds: LenslessDataset, ids: Sequence[str], directory: Path) -> torch.Tensor:
    """Reference reconstructions ``DIR/ID.npy`` cut to the ground truth's size (or the forward scene grid)."""
    ref = read_recon_dir(directory, ids)
    shape = (ds.ground_truth(ids[0]).shape[-2:] if ds.has_ground_truth(ids[0])
             else tuple(ds.forward_physics().scene_shape))
    return fit_to_scene(ref, shape)


def ground_truth_consistency(ds: LenslessDataset, ids: Sequence[str], physics: LenslessOperator) -> dict | None:
    """Mean ``‖A x − y‖ / ‖y‖`` of the ground truth ``x`` under the forward operator (``forward``: the noise
    floor, what a perfect reconstruction scores) and under the reconstruction operator (``recon``: the noise
    floor plus that operator's model error; ``None`` when x does not fit its grid). A method below the floor
    fits noise. ``None`` when a ground truth is missing."""
    if not ids or not all(ds.has_ground_truth(i) for i in ids):
        return None
    gt = torch.from_numpy(np.stack([ds.ground_truth(i) for i in ids]))
    y = ds.measurements(ids)
    if gt.shape[1] != y.shape[1]:
        return None
    device = physics.singular_values().device
    gt, y = gt.to(device), y.to(device)
    forward = ds.forward_physics().to(device)
    out = {"forward": float(M.consistency(fit_to_scene(gt, forward.scene_shape), y, forward).mean()), "recon": None}
    if gt.shape[-2] <= physics.scene_shape[0] and gt.shape[-1] <= physics.scene_shape[1]:
        out["recon"] = float(M.consistency(center_pad(gt, physics.scene_shape), y, physics).mean())
    return out
