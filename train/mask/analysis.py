"""How well a PSF conditions the camera: the forward matrix of the crop model, its condition number and
Gram coherence, and the MTF.

For one colour channel the crop model ``A = C F⁻¹ H F P`` (:class:`train.physics.LenslessOperator`) is a
``sensor² × scene²`` matrix; at design scale (32² scenes, 64² sensor: 4096 × 1024) it is formed column by
column (``A e_k``) and decomposed exactly:

- condition number ``κ(A) = σ_max / σ_min`` (from the eigenvalues ``σ²`` of ``AᵀA``);
- Gram coherence ``μ(A) = max_{i≠j} |a_iᵀ a_j| / (‖a_i‖ ‖a_j‖)``, the largest off-diagonal entry of the
  normalised Gram matrix ``AᵀA`` (how alike the sensor patterns of two scene pixels are);
- MTF: ``|H(f)|`` on the sensor grid, averaged over rings of radius ``|f|`` (cycles per pixel).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from nsdd_edge.optics import psf_transfer_function
from train.physics import LenslessOperator
from train.simulate import centred_conv_shape

#: largest number of scene pixels for which the forward matrix is formed and decomposed
MAX_COLUMNS = 4096


def forward_matrix(psf: np.ndarray, sensor: Sequence[int], scene: Sequence[int], batch: int = 256) -> np.ndarray:
    """``A`` (float64, ``sensor_pixels × scene_pixels``) of the crop model for a one-channel PSF ``(H, W)``."""
    sensor, scene = tuple(int(v) for v in sensor), tuple(int(v) for v in scene)
    n = scene[0] * scene[1]
    if n > MAX_COLUMNS:
        raise ValueError(f"a {scene} scene has {n} pixels; forming A is limited to {MAX_COLUMNS} columns")
    op = LenslessOperator(np.asarray(psf, dtype=np.float64)[None], sensor, "crop", scene_shape=scene,
                          conv_shape=centred_conv_shape(sensor, scene))
    cols = []
    eye = torch.eye(n, dtype=torch.float64)
    for k in range(0, n, batch):
        basis = eye[k : k + batch].reshape(-1, 1, *scene)
        cols.append(op.A(basis).reshape(basis.shape[0], -1))
    return torch.cat(cols).T.numpy()


def conditioning(psf: np.ndarray, sensor: Sequence[int], scene: Sequence[int]) -> dict[str, float]:
    """``{"condition_number": κ(A), "gram_coherence": μ(A)}`` of a one-channel PSF."""
    a = forward_matrix(psf, sensor, scene)
    gram = a.T @ a
    eig = np.linalg.eigvalsh(gram)  # σ² of A, ascending (cheaper than an SVD of the tall A)
    norms = np.sqrt(np.diag(gram))
    coherence = gram / np.maximum(np.outer(norms, norms), 1e-300)
    np.fill_diagonal(coherence, 0.0)
    return {"condition_number": float(np.sqrt(eig[-1] / eig[0])) if eig[0] > 0 else float("inf"),
            "gram_coherence": float(np.abs(coherence).max())}


def radial_mtf(psf: np.ndarray, bins: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(f, MTF)``: ring averages of ``|H(f)|`` per channel on the PSF's own grid; ``f`` in cycles/pixel
    (0 … 0.5), ``MTF`` of shape ``(C, bins)`` (``|H(0)| = 1`` for a unit-sum PSF)."""
    psf = np.asarray(psf, dtype=np.float64)
    if psf.ndim == 2:
        psf = psf[None]
    h, w = psf.shape[-2:]
    mag = np.abs(psf_transfer_function(psf, (h, w)))
    radius = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.fftfreq(w)[None, :] ** 2)
    bins = bins or min(h, w) // 2
    edges = np.linspace(0.0, 0.5, bins + 1)
    idx = np.clip(np.digitize(radius, edges) - 1, 0, bins)
    centres = 0.5 * (edges[:-1] + edges[1:])
    out = np.zeros((psf.shape[0], bins))
    for b in range(bins):
        sel = idx == b
        out[:, b] = mag[:, sel].mean(axis=1) if sel.any() else np.nan
    return centres, out
