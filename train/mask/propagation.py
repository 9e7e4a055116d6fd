"""Amplitude mask → PSF on the sensor grid: angular-spectrum (Fresnel) propagation and the geometric shadow.

Geometry: a thin amplitude mask ``t(x, y)`` (values in [0, 1], one value per fabrication cell of side
``feature_um``) sits at distance ``d`` in front of the sensor; a distant point source gives a plane wave, so
the PSF of one colour channel is the intensity of the transmitted field after a free-space distance ``d``,
integrated over each sensor pixel (pitch ``sensor_pitch_um``) and normalised to unit sum (the project's PSF
convention: exposure absorbs the mask's throughput)::

    U_d = F⁻¹[ F(t) · T_λ ],   T_λ(f) = exp(i 2π d √(1/λ² − |f|²)) · 𝟙[|f_x|, |f_y| < f_lim],
    f_lim = 1 / (λ √((2 d Δf)² + 1)),   Δf = 1 / (N δ)                      (band-limited angular spectrum,
                                                                            Matsushima & Shimobaba 2009)
    PSF_λ[i, j] = Σ_{pixel (i, j)} |U_d|²  /  Σ |U_d|²

on a simulation grid of pitch ``δ = feature_um / oversample``, zero-padded ×2 against wrap-around;
evanescent waves (``|f| > 1/λ``) are dropped. One wavelength per colour channel (R, G, B).

Geometric-shadow fast path: for a large Fresnel number of one cell, ``N_F = feature² / (λ_max d)``, the
field is the mask's shadow and ``PSF = box-integrate(t²)`` for every channel (no FFT). ``method="auto"``
takes it when ``N_F ≥ SHADOW_FRESNEL_NUMBER``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from nsdd_edge.optics import OpticsError
from train.physics import fit_to_grid

Method = Literal["auto", "fresnel", "shadow"]
#: a cell's Fresnel number above which ``method="auto"`` uses the geometric shadow (diffraction blur
#: √(λd) is then below a fifth of a cell)
SHADOW_FRESNEL_NUMBER = 25.0
RGB_WAVELENGTHS_NM = (620.0, 540.0, 460.0)


@dataclass(frozen=True)
class MaskOptics:
    """Physical layout of a mask camera (lengths in micrometres; distance in millimetres).

    ``sensor_pitch_um``: pixel pitch of the sensor grid the PSF is sampled on (after any binning);
    ``feature_um``: the fabrication pitch (one mask cell); ``oversample``: simulation samples per cell.
    ``sensor_pitch_um`` must be a whole number of simulation samples.
    """

    distance_mm: float = 0.5
    sensor_pitch_um: float = 10.0
    feature_um: float = 10.0
    wavelengths_nm: tuple[float, ...] = RGB_WAVELENGTHS_NM
    oversample: int = 2

    def __post_init__(self):
        if not (self.distance_mm > 0 and self.sensor_pitch_um > 0 and self.feature_um > 0):
            raise OpticsError(f"mask optics: distance, sensor pitch and feature size must be > 0 ({self})")
        if self.oversample < 1 or not self.wavelengths_nm or min(self.wavelengths_nm) <= 0:
            raise OpticsError(f"mask optics: need oversample ≥ 1 and positive wavelengths ({self})")
        ratio = self.sensor_pitch_um / self.sample_um
        if abs(ratio - round(ratio)) > 1e-6 or round(ratio) < 1:
            raise OpticsError(f"mask optics: the sensor pitch {self.sensor_pitch_um} µm is not a whole number of "
                              f"simulation samples ({self.sample_um:g} µm = feature {self.feature_um} µm / "
                              f"oversample {self.oversample}); choose feature, pitch and oversample to match")

    @property
    def sample_um(self) -> float:
        """Simulation pitch ``δ``."""
        return self.feature_um / self.oversample

    @property
    def samples_per_pixel(self) -> int:
        return round(self.sensor_pitch_um / self.sample_um)

    def fresnel_number(self, feature_um: float | None = None) -> float:
        """``N_F = w² / (λ_max d)`` of a feature of width ``w`` (default one cell) at the longest wavelength."""
        w = self.feature_um if feature_um is None else feature_um
        return w ** 2 / (max(self.wavelengths_nm) * 1e-3 * self.distance_mm * 1e3)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["wavelengths_nm"] = list(self.wavelengths_nm)
        return d

    @staticmethod
    def from_dict(d: dict) -> MaskOptics:
        d = dict(d)
        d["wavelengths_nm"] = tuple(d["wavelengths_nm"])
        return MaskOptics(**d)


def angular_spectrum_transfer(shape: Sequence[int], pitch_um: float, distance_um: float, wavelength_um: float,
                              band_limit: bool = True) -> torch.Tensor:
    """``T(f) = exp(i 2π d √(1/λ² − |f|²))`` on the DFT grid of ``shape`` (complex128); evanescent
    frequencies and, with ``band_limit``, those beyond the sampling limit ``f_lim`` are zeroed."""
    h, w = int(shape[0]), int(shape[1])
    fy = torch.fft.fftfreq(h, d=pitch_um, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(w, d=pitch_um, dtype=torch.float64)[None, :]
    kz_sq = 1.0 / wavelength_um ** 2 - fx ** 2 - fy ** 2
    keep = kz_sq > 0
    if band_limit:
        def limit(n: int) -> float:
            return 1.0 / (wavelength_um * math.sqrt((2.0 * distance_um / (n * pitch_um)) ** 2 + 1.0))

        keep = keep & (fx.abs() < limit(w)) & (fy.abs() < limit(h))
    phase = 2.0 * math.pi * distance_um * torch.sqrt(kz_sq.clamp_min(0.0))
    return torch.polar(keep.to(torch.float64), phase)


def angular_spectrum(field: torch.Tensor, pitch_um: float, distance_um: float, wavelength_um: float,
                     band_limit: bool = True) -> torch.Tensor:
    """Propagate a complex field ``(..., H, W)`` sampled at ``pitch_um`` by ``distance_um`` (circular grid:
    pad the field first if its light must not wrap around)."""
    t = angular_spectrum_transfer(field.shape[-2:], pitch_um, distance_um, wavelength_um, band_limit)
    return torch.fft.ifft2(torch.fft.fft2(field.to(torch.complex128)) * t)


class MaskToPsf(torch.nn.Module):
    """``mask (Hm, Wm) → PSF (C, H, W)``, differentiable, for one optics, mask grid and PSF grid.

    The transfer functions of the ``C`` wavelengths are computed once. The mask is centred on the PSF's
    window (cells outside the window are cut; the surround is opaque). ``method``: ``fresnel`` (angular
    spectrum), ``shadow`` (geometric), ``auto`` (shadow when the cell's Fresnel number is large).
    """

    def __init__(self, optics: MaskOptics, psf_shape: Sequence[int], method: Method = "auto"):
        super().__init__()
        if method not in ("auto", "fresnel", "shadow"):
            raise OpticsError(f"unknown propagation method {method!r}; use auto, fresnel or shadow")
        self.optics = optics
        self.psf_shape = (int(psf_shape[0]), int(psf_shape[1]))
        self.method = ("shadow" if optics.fresnel_number() >= SHADOW_FRESNEL_NUMBER else "fresnel") \
            if method == "auto" else method
        k = optics.samples_per_pixel
        self.window = (self.psf_shape[0] * k, self.psf_shape[1] * k)
        self.grid = (2 * self.window[0], 2 * self.window[1])
        if self.method == "fresnel":
            transfer = torch.stack([angular_spectrum_transfer(self.grid, optics.sample_um, optics.distance_mm * 1e3,
                                                              lam * 1e-3) for lam in optics.wavelengths_nm])
            self.register_buffer("transfer", transfer, persistent=False)

    @property
    def channels(self) -> int:
        return len(self.optics.wavelengths_nm)

    def field(self, mask: torch.Tensor) -> torch.Tensor:
        """The amplitude transmittance on the simulation window: each cell repeated ``oversample`` times."""
        if mask.ndim != 2:
            raise OpticsError(f"mask must be 2-D (cells), got shape {tuple(mask.shape)}")
        o = self.optics.oversample
        fine = mask.repeat_interleave(o, dim=0).repeat_interleave(o, dim=1)
        return fit_to_grid(fine, self.window)

    def intensity(self, mask: torch.Tensor) -> torch.Tensor:
        """Unnormalised sensor-plane intensity ``(C, Hw, Ww)`` on the simulation window."""
        t = self.field(mask)
        if self.method == "shadow":
            return (t * t).to(torch.float64).expand(self.channels, *t.shape)
        u = torch.fft.ifft2(torch.fft.fft2(fit_to_grid(t.to(torch.complex128), self.grid)) * self.transfer)
        return fit_to_grid(u.real ** 2 + u.imag ** 2, self.window)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """PSF ``(C, H, W)`` float64: the intensity integrated over each sensor pixel, each channel summing to one."""
        k = self.optics.samples_per_pixel
        pix = F.avg_pool2d(self.intensity(mask)[None], k)[0] * (k * k)
        total = pix.sum(dim=(-2, -1), keepdim=True)
        if not bool((total > 0).all()):
            raise OpticsError("the mask lets no light through (its PSF is all zero)")
        return pix / total


def mask_psf(mask: np.ndarray, optics: MaskOptics, psf_shape: Sequence[int], method: Method = "auto") -> np.ndarray:
    """Numpy convenience: the float32 ``(C, H, W)`` PSF of a fixed mask (sums to one per channel)."""
    with torch.no_grad():
        psf = MaskToPsf(optics, psf_shape, method)(torch.as_tensor(np.asarray(mask, dtype=np.float64)))
    return psf.numpy().astype(np.float32)
