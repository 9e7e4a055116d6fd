"""The Fourier multipliers of an exported reconstruction graph, packed as the graph uses them.

One implementation for both sides of the export: ``export.graph.ReconstructionGraph`` bakes these arrays in as
constants (the default, fixed-spectra graph), and a graph exported with ``nsdd-export onnx --spectra-input``
takes them as inputs beside ``y``, so the runtime can compute them here (numpy only) for another PSF — the
calibrated one warped to the current depth (:func:`nsdd_edge.psf_warp.warp_psf`) — and swap them between frames
without re-exporting (``nsdd-edge run --refocus``).

Half spectra (``rfft2`` layout, ``Wr = W // 2 + 1`` on the convolution grid) packed ``[Re | Im]`` along the last
axis, float32 ``(C_psf, H, 2·Wr)``, from :class:`nsdd_edge.optics.WienerSpectra`:

- ``circular``: ``g_spec = [Re G | Im G]`` (``A† = F⁻¹ G F``) and ``null_spec = [1 − R | 1 − R]``
  (``I − A†A = F⁻¹ (1 − R) F``);
- ``crop``: ``g_spec = [Re G | Im G]`` and ``h_spec = [Re H | Im H]`` (``A = C F⁻¹ H F P``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nsdd_edge.optics import LenslessGeometry, OpticsError, Projector, WienerSpectra, check_projector

SPECTRA_NAMES: dict[str, tuple[str, str]] = {"circular": ("g_spec", "null_spec"), "crop": ("g_spec", "h_spec")}
SPECTRA_KINDS = ("fixed", "input")  # a graph's spectra: constants in the graph, or inputs fed by the runtime


def pack_half_spectrum(spectrum: np.ndarray) -> np.ndarray:
    """Complex ``(C, H, Wr)`` → real ``(C, H, 2Wr)`` ``[Re | Im]`` (float64)."""
    s = np.asarray(spectrum)
    return np.concatenate([s.real, s.imag], axis=-1).astype(np.float64)


def spectra_names(geometry: LenslessGeometry) -> tuple[str, str]:
    """The two spectra a graph of ``geometry``'s model uses, in the order of its inputs after ``y``."""
    return SPECTRA_NAMES[geometry.model]


def spectra_shape(geometry: LenslessGeometry, psf_channels: int) -> tuple[int, int, int]:
    """``(C_psf, H, 2·Wr)`` of every spectrum on ``geometry``'s convolution grid."""
    h, w = geometry.conv_shape
    return (int(psf_channels), int(h), 2 * (int(w) // 2 + 1))


def graph_spectra(psf: np.ndarray, geometry: LenslessGeometry, lam: float,
                  projector: Projector = "tikhonov") -> dict[str, np.ndarray]:
    """The packed float32 spectra of ``psf`` for a graph of ``geometry`` (see the module docstring).

    ``circular``: ``{"g_spec": [Re G | Im G], "null_spec": [1 − R | 1 − R]}``; ``crop``: ``{"g_spec", "h_spec":
    [Re H | Im H]}``; ``G``, ``R``, ``H`` of :meth:`WienerSpectra.from_psf` on the convolution grid (float64, then
    cast). Raises :class:`OpticsError` for a PSF that does not fit the grid."""
    check_projector(projector, geometry.model)
    psf = np.asarray(psf, dtype=np.float32)
    if geometry.model == "circular" and (psf.shape[-2] > geometry.conv_shape[0] or psf.shape[-1] > geometry.conv_shape[1]):
        raise OpticsError(f"PSF of size {tuple(psf.shape[-2:])} is larger than the circular grid {geometry.conv_shape}")
    spectra = WienerSpectra.from_psf(psf, geometry.conv_shape, lam, projector)
    out = {"g_spec": pack_half_spectrum(spectra.half("G")).astype(np.float32)}
    if geometry.model == "crop":
        out["h_spec"] = pack_half_spectrum(spectra.half("H")).astype(np.float32)
    else:
        null = 1.0 - spectra.half("R").real  # the I − A†A multiplier, float64 before the cast
        out["null_spec"] = np.concatenate([null, null], axis=-1).astype(np.float32)
    return out


def check_feeds(feeds: dict[str, np.ndarray], names: Sequence[str], shapes: dict[str, tuple[int, ...]],
                where: str) -> dict[str, np.ndarray]:
    """``feeds`` as contiguous float32 arrays if it holds exactly ``names`` with the ``shapes`` a graph declares
    (a ``None``/str dimension matches anything) and finite values; else :class:`OpticsError` naming the problem."""
    if set(feeds) != set(names):
        raise OpticsError(f"{where}: spectra {sorted(feeds)} given, the graph takes {list(names)}")
    out = {}
    for name in names:
        a = np.ascontiguousarray(feeds[name], dtype=np.float32)
        want = shapes.get(name)
        if want is not None and (len(want) != a.ndim or any(isinstance(w, int) and w != n for w, n in zip(want, a.shape))):
            raise OpticsError(f"{where}: spectrum {name} has shape {a.shape}, the graph takes {tuple(want)}")
        if not np.all(np.isfinite(a)):
            raise OpticsError(f"{where}: spectrum {name} has NaN/Inf values")
        out[name] = a
    return out


class SpectraFeed:
    """What a spectra-input graph is fed beside ``y``: :func:`graph_spectra` of a PSF for the bundle's geometry,
    λ and pseudo-inverse kind. ``feeds(psf)`` computes them (numpy; a few ms at 256²), e.g. for a warped PSF."""

    def __init__(self, geometry: LenslessGeometry, lam: float, projector: Projector = "tikhonov"):
        self.geometry, self.lam, self.projector = geometry, float(lam), projector
        self.names = spectra_names(geometry)

    def feeds(self, psf: np.ndarray) -> dict[str, np.ndarray]:
        return graph_spectra(psf, self.geometry, self.lam, self.projector)
