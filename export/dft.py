"""Real 2-D DFT as matrix products (exportable to ONNX MatMul/Slice/Add/Sub/Concat, TensorRT 10.x).

Orthonormal scaling on both axes: the forward transform is ``U = F / √(H W)`` and the inverse
``Uᴴ = √(H W) F⁻¹``, so ``Uᴴ M U = F⁻¹ M F`` for any Fourier multiplier ``M``: the Wiener spectra of
:class:`nsdd_edge.optics.WienerSpectra` are used unchanged (the 1/√N per-axis scalings are folded
into the cos/sin matrices), and a white 256² frame has DC 256 instead of 65536 (finite in FP16).

Real input is exploited along the last axis: only the ``W // 2 + 1`` non-negative frequencies are
computed (as ``rfft2``), and the inverse is the Hermitian ``irfft2`` (``w_k`` = 1 for DC/Nyquist,
2 otherwise).

Layout of a half spectrum in this module: a real tensor ``(..., H, 2·Wr)`` = ``[Re | Im]`` along the
last axis, ``Wr = W // 2 + 1``.

:class:`CentredRDFT2` is the same transform on a grid that the image only partly fills (the crop model's
convolution grid): ``rfft2(P x)`` of ``x`` zero-padded centrally and ``C irfft2(z)`` centre-cropped, with the
padding and the crop folded into the matrices (only the rows/columns of the window are kept), so no Pad or
Slice of images is needed and the zeros are never multiplied.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from nsdd_edge.graph_spectra import pack_half_spectrum  # noqa: F401  (the packing of the spectra, re-exported)


def rdft_matrices(height: int, width: int) -> dict[str, np.ndarray]:
    """Float64 matrices of the orthonormal real 2-D DFT and its inverse.

    ``w_fwd`` (W, 2Wr) = ``[cos | −sin] / √W``: ``y @ w_fwd`` is the rfft along W.
    ``h_stack`` (2H, H) = ``[cos; sin] / √H``: the H-axis transform ``(C ∓ iS)`` from one product.
    ``w_inv`` (2Wr, W) = ``[w_k cos; −w_k sin] / √W``: ``[Re | Im] @ w_inv`` is the irfft along W.
    """
    wr = width // 2 + 1
    n = np.arange(width)[:, None]
    k = np.arange(wr)[None, :]
    ang_w = 2.0 * np.pi * n * k / width  # (W, Wr)
    w_fwd = np.concatenate([np.cos(ang_w), -np.sin(ang_w)], axis=1) / np.sqrt(width)
    weight = np.full(wr, 2.0)
    weight[0] = 1.0
    if width % 2 == 0:
        weight[-1] = 1.0
    w_inv = np.concatenate([weight[:, None] * np.cos(ang_w.T), -weight[:, None] * np.sin(ang_w.T)],
                           axis=0) / np.sqrt(width)
    m = np.arange(height)
    ang_h = 2.0 * np.pi * np.outer(m, m) / height  # (H, H), symmetric
    h_stack = np.concatenate([np.cos(ang_h), np.sin(ang_h)], axis=0) / np.sqrt(height)
    return {"w_fwd": w_fwd, "w_inv": w_inv, "h_stack": h_stack}


class MatmulRDFT2(torch.nn.Module):
    """Orthonormal ``rfft2``/``irfft2`` on ``(..., H, W)`` by matrix products.

    ``forward(x)`` returns ``[Re | Im]`` of ``U x`` (``(..., H, 2Wr)``); ``inverse(z)`` maps it back with
    ``Uᴴ`` (Hermitian completion along W). Matrices are float32 buffers (persistent, so they become
    ONNX initializers).
    """

    def __init__(self, height: int, width: int):
        super().__init__()
        self.height, self.width = int(height), int(width)
        self.wr = self.width // 2 + 1
        mats = rdft_matrices(self.height, self.width)
        for name, m in mats.items():
            self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32)))

    def _h_axis(self, t: torch.Tensor, inverse: bool) -> torch.Tensor:
        """Complex DFT along H of ``[Re | Im]``: ``(C − iS) z`` (forward) or ``(C + iS) z`` (inverse)."""
        return _combine_h(torch.matmul(self.h_stack, t), self.height, self.wr, inverse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[Re | Im]`` of ``rfft2(x, norm='ortho')``."""
        return self._h_axis(torch.matmul(x, self.w_fwd), inverse=False)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """``irfft2(Re + i Im, s=(H, W), norm='ortho')``."""
        return torch.matmul(self._h_axis(z, inverse=True), self.w_inv)


def _combine_h(u: torch.Tensor, rows: int, wr: int, inverse: bool) -> torch.Tensor:
    """``(C ∓ iS) z`` from ``u = [C; S] z`` (``(..., 2·rows, 2Wr)``: ``[[C re, C im], [S re, S im]]``)."""
    c_re, c_im = u[..., :rows, :wr], u[..., :rows, wr:]
    s_re, s_im = u[..., rows:, :wr], u[..., rows:, wr:]
    if inverse:
        return torch.cat([c_re - s_im, c_im + s_re], dim=-1)
    return torch.cat([c_re + s_im, c_im - s_re], dim=-1)


def centred_rdft_matrices(grid: Sequence[int], window: Sequence[int]) -> dict[str, np.ndarray]:
    """Float64 matrices of :class:`CentredRDFT2`: those of :func:`rdft_matrices` on ``grid`` restricted to the
    centred ``window`` (offsets ``(G − n) // 2``, as :func:`nsdd_edge.optics.center_pad`).

    ``w_fwd`` (w, 2Wr): the rows of the padded input that are not zero. ``h_fwd`` (2H, h): ``[cos; sin]``'s
    columns of the window's rows. ``h_inv`` (2h, H): ``[cos; sin]``'s rows of the window (the crop after the
    H-axis inverse). ``w_inv`` (2Wr, w): the columns of the window.
    """
    gh, gw = int(grid[0]), int(grid[1])
    h, w = int(window[0]), int(window[1])
    if not (0 < h <= gh and 0 < w <= gw):
        raise ValueError(f"window {(h, w)} does not fit the grid {(gh, gw)}")
    full = rdft_matrices(gh, gw)
    top, left = (gh - h) // 2, (gw - w) // 2
    cos_sin = full["h_stack"]  # (2H, H) = [cos; sin], each symmetric
    return {"w_fwd": full["w_fwd"][left : left + w], "h_fwd": cos_sin[:, top : top + h],
            "h_inv": np.concatenate([cos_sin[top : top + h], cos_sin[gh + top : gh + top + h]]),
            "w_inv": full["w_inv"][:, left : left + w]}


class CentredRDFT2(torch.nn.Module):
    """Orthonormal ``rfft2`` on ``grid`` of an image filling its centred ``window``, and the inverse cropped
    back to that window, by matrix products:

    ``forward(x)`` = ``[Re | Im]`` of ``rfft2(P x, norm='ortho')`` for ``x`` ``(..., h, w)`` (``P``: centred
    zero-padding to the grid), ``(..., H, 2Wr)``; ``inverse(z)`` = ``C irfft2(z, s=grid, norm='ortho')``
    (``C``: the centred crop to the window), ``(..., h, w)``. With the window equal to the grid it is
    :class:`MatmulRDFT2`.
    """

    def __init__(self, grid: Sequence[int], window: Sequence[int]):
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.window = (int(window[0]), int(window[1]))
        self.wr = self.grid[1] // 2 + 1
        for name, m in centred_rdft_matrices(self.grid, self.window).items():
            self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[Re | Im]`` of ``rfft2(P x, norm='ortho')`` on the grid."""
        return _combine_h(torch.matmul(self.h_fwd, torch.matmul(x, self.w_fwd)), self.grid[0], self.wr, False)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """``C irfft2(z, s=grid, norm='ortho')``: only the window's rows and columns are computed."""
        return torch.matmul(_combine_h(torch.matmul(self.h_inv, z), self.window[0], self.wr, True), self.w_inv)


def complex_multiply_packed(z: torch.Tensor, m: torch.Tensor, wr: int) -> torch.Tensor:
    """``[Re | Im]`` of ``m · z`` for packed complex ``z`` (..., H, 2Wr) and ``m`` (C, H, 2Wr)."""
    z_re, z_im = z[..., :wr], z[..., wr:]
    m_re, m_im = m[..., :wr], m[..., wr:]
    return torch.cat([m_re * z_re - m_im * z_im, m_re * z_im + m_im * z_re], dim=-1)
