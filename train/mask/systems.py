"""Imaging systems for mask design: an encoder (mask → PSF) and a decoder (measurement → image).

Encoders (:class:`Encoder`), all on the fabrication grid of ``cells × cells`` inside a centred square
design aperture (opaque outside):

- :class:`RelaxedEncoder` (teacher): continuous amplitude ``t = P_β(cone(σ(θ))) ∈ [0, 1]``: the student's
  density, fabrication filter and projection, without the threshold and the minimum-feature repair.
- :class:`BinaryEncoder` (student, end-to-end binary): density ``ρ = σ(θ)``, fabrication filter and
  projection ``p = P_β(cone(ρ))`` (:mod:`train.mask.fabrication`), then the fabricated mask
  ``M = enforce_min_feature(p > η)``; the forward pass uses ``M`` exactly and the gradient flows through
  ``p`` (straight-through estimator ``M + p − sg(p)``). ``η`` moves off 0.5 only to meet a fill-factor range.
- :class:`LcdEncoder` (student): one binary state per LCD pixel (straight-through), dead space opaque.
- :class:`FixedEncoder`: a given mask or a given PSF (baselines).

Decoder (:class:`WienerRefiner`): ``x̂ = net(C_scene A†_λ y)`` with ``A†_λ`` the Wiener filter of the
current PSF at sensor size (circular model, learned ``λ = e^ℓ``) and ``net`` an :class:`EdgeUNet` with an
input skip. The measurement is the crop model of ``nsdd-train simulate``:
``y = clip(C F⁻¹[H · F(P x)] + n, 0, 1)`` with read (and, from a camera profile, shot) noise whose level
relative to the signal follows the mask's light throughput (:class:`SensorNoise`). Both operators are
:class:`train.physics.LenslessOperator` built with ``differentiable=True`` from the current PSF.

Transfer losses (Suarez-Rodriguez, Jacome & Arguello): the encoder loss compares the student's
pre-binarisation PSF with the teacher's through the circular operator's spectrum ``H`` (the Gram matrix
``AᵀA`` of a convolution is diagonalised by the DFT, eigenvalues ``|H|²``):
``gram: Σ(|H_s|² − |H_t|²)² / Σ|H_t|⁴``, ``mtf: Σ(|H_s| − |H_t|)² / Σ|H_t|²`` (both blind to shifts and
flips of the mask, like the Gram matrix itself); ``mask: Σ(p_s − t_t)² / Σ t_t²`` compares the
pre-binarisation mask with the teacher's directly;
the decoder loss is ``mean_l ‖F_s^l − F_t^l‖² / ‖F_t^l‖²`` over the refinement network's bottleneck and
decoder levels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from train.mask.fabrication import cone_filter, enforce_min_feature, lcd_pattern, project
from train.mask.propagation import MaskToPsf
from train.physics import LenslessOperator, center_crop, psf_transfer_function
from train.simulate import centred_conv_shape
from train.students import EdgeUNet


def aperture_support(cells: int, side: int) -> torch.Tensor:
    """0/1 ``(cells, cells)``: the centred ``side × side`` design aperture."""
    s = torch.zeros(cells, cells)
    o = (cells - side) // 2
    s[o : o + side, o : o + side] = 1.0
    return s


class Encoder(nn.Module):
    """``forward(to_psf, progress, soft) -> (psf, soft_psf)``: the PSF of the mask the camera has and, when
    ``soft``, for the encoder loss, the PSF before binarisation (the same for unconstrained encoders; None
    when not asked for). ``progress`` ∈ [0, 1] is the fraction of training done (projection sharpness).
    A trained encoder keeps its last pre-binarisation mask in ``soft_mask`` (with its autograd graph)."""

    kind = "encoder"
    soft_mask: torch.Tensor | None = None
    #: intensity throughput of the last forward's mask, ``τ = mean_aperture(t²)`` (None: a PSF-only design)
    throughput: torch.Tensor | None = None

    def mask(self) -> np.ndarray | None:
        """The mask as fabricated (0/1 for constrained encoders), or None for a PSF-only design."""
        raise NotImplementedError


class RelaxedEncoder(Encoder):
    """The student's parametrisation with its hard constraints relaxed: ``t = P_β(cone(σ(θ)))`` is used as
    it is, a continuous amplitude in [0, 1] (no threshold, no minimum-feature repair); ``β`` rises
    geometrically over training (``beta``: start, end), so ``t`` sharpens but stays differentiable."""

    kind = "relaxed"

    def __init__(self, support: torch.Tensor, init: torch.Tensor, radius: float = 0.0,
                 beta: tuple[float, float] = (1.0, 16.0)):
        super().__init__()
        self.register_buffer("support", support)
        self.theta = nn.Parameter(init.clone())
        self.radius, self.beta = float(radius), beta
        self.progress = 1.0

    def transmittance(self, progress: float | None = None) -> torch.Tensor:
        b0, b1 = self.beta
        beta = b0 * (b1 / b0) ** min(max(self.progress if progress is None else progress, 0.0), 1.0)
        return self.support * project(cone_filter(torch.sigmoid(self.theta), self.radius, self.support), beta)

    def forward(self, to_psf: MaskToPsf, progress: float = 1.0, soft: bool = False):
        self.progress = progress
        self.soft_mask = self.transmittance()
        self.throughput = (self.soft_mask ** 2).sum() / self.support.sum()
        psf = to_psf(self.soft_mask)
        return psf, psf

    def mask(self) -> np.ndarray:
        return self.transmittance(1.0).detach().numpy().astype(np.float64)


class BinaryEncoder(Encoder):
    """See the module docstring. ``beta`` = (start, end) of the projection's sharpness, geometric in progress."""

    kind = "binary"

    def __init__(self, support: torch.Tensor, init: torch.Tensor, min_feature: int, radius: float,
                 beta: tuple[float, float] = (1.0, 32.0), fill_range: tuple[float, float] | None = None):
        super().__init__()
        self.register_buffer("support", support)
        self.theta = nn.Parameter(init.clone())
        self.min_feature, self.radius = int(min_feature), float(radius)
        self.beta, self.fill_range = beta, fill_range
        self.last_how = ""
        self.eta = 0.5

    def filtered(self) -> torch.Tensor:
        return cone_filter(torch.sigmoid(self.theta), self.radius, self.support)

    def fabricate(self, filtered: torch.Tensor) -> tuple[torch.Tensor, str, float]:
        """``(M, how, η)``: the fabricated 0/1 mask at threshold η (0.5, or bisected into the fill range)."""
        support = self.support > 0
        rows, cols = support.any(dim=1).nonzero()[:, 0], support.any(dim=0).nonzero()[:, 0]
        box = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))

        def make(eta: float):  # the rule is enforced on the aperture's box, with the opaque surround outside it
            inside, how = enforce_min_feature((filtered[box] > eta).float(), self.min_feature)
            m = torch.zeros_like(filtered)
            m[box] = inside
            return m, how

        m, how = make(0.5)
        eta = 0.5
        if self.fill_range is not None:
            lo, hi = self.fill_range
            fill = float(m[support].mean())
            if not lo <= fill <= hi:
                target = lo if fill < lo else hi
                a, b = 0.0, 1.0  # the fill falls as η rises
                for _ in range(20):
                    eta = 0.5 * (a + b)
                    m, how = make(eta)
                    fill = float(m[support].mean())
                    if lo <= fill <= hi:
                        break
                    a, b = (eta, b) if fill > target else (a, eta)
        return m, how, eta

    def forward(self, to_psf: MaskToPsf, progress: float = 1.0, soft: bool = False):
        b0, b1 = self.beta
        beta = b0 * (b1 / b0) ** min(max(progress, 0.0), 1.0)
        filtered = self.filtered()
        with torch.no_grad():
            hard, self.last_how, self.eta = self.fabricate(filtered.detach())
        p = self.support * project(filtered, beta, self.eta)
        self.soft_mask = p
        mask = hard + (p - p.detach())  # forward value: exactly M; gradient: through p
        self.throughput = mask.sum() / self.support.sum()
        return to_psf(mask), (to_psf(p) if soft else None)

    def mask(self) -> np.ndarray:
        with torch.no_grad():
            hard, self.last_how, self.eta = self.fabricate(self.filtered())
        return hard.numpy().astype(np.float64)


class LcdEncoder(Encoder):
    """Binary LCD: ``n × n`` pixels of ``pitch`` cells with ``dead`` opaque cells, centred on the grid."""

    kind = "lcd"

    def __init__(self, cells: int, n: int, pitch: int, dead: int, init: torch.Tensor):
        super().__init__()
        if n * pitch > cells:
            raise ValueError(f"an LCD of {n} pixels of {pitch} cells does not fit {cells} cells")
        self.cells, self.pitch, self.dead = cells, pitch, dead
        self.theta = nn.Parameter(init.clone())

    def _place(self, pattern: torch.Tensor) -> torch.Tensor:
        out = pattern.new_zeros(self.cells, self.cells)
        o = (self.cells - pattern.shape[0]) // 2
        return out.index_put((torch.arange(o, o + pattern.shape[0])[:, None],
                              torch.arange(o, o + pattern.shape[1])[None, :]), pattern)

    def forward(self, to_psf: MaskToPsf, progress: float = 1.0, soft: bool = False):
        s = torch.sigmoid(self.theta)
        states = (s > 0.5).float() + (s - s.detach())
        self.soft_mask = self._place(lcd_pattern(s, self.pitch, self.dead))
        mask = self._place(lcd_pattern(states, self.pitch, self.dead))
        self.throughput = mask.sum() / (self.theta.shape[0] * self.pitch) ** 2
        return to_psf(mask), (to_psf(self.soft_mask) if soft else None)

    def mask(self) -> np.ndarray:
        states = (torch.sigmoid(self.theta) > 0.5).float().detach()
        return self._place(lcd_pattern(states, self.pitch, self.dead)).numpy().astype(np.float64)


class FixedEncoder(Encoder):
    """A fixed design: a mask (its PSF computed once by the propagation) or a PSF given directly."""

    kind = "fixed"

    def __init__(self, mask: np.ndarray | None = None, psf: np.ndarray | torch.Tensor | None = None,
                 aperture_area: float | None = None):
        super().__init__()
        if (mask is None) == (psf is None):
            raise ValueError("FixedEncoder needs a mask or a PSF")
        self._mask = None if mask is None else np.asarray(mask, dtype=np.float64)
        self._psf = None if psf is None else torch.as_tensor(np.asarray(psf), dtype=torch.float64)
        if self._mask is not None:
            self.throughput = torch.tensor(float((self._mask ** 2).sum()) / float(aperture_area or self._mask.size))

    def forward(self, to_psf: MaskToPsf, progress: float = 1.0, soft: bool = False):
        if self._psf is None:
            with torch.no_grad():
                self._psf = to_psf(torch.from_numpy(self._mask))
        return self._psf, self._psf

    def mask(self) -> np.ndarray | None:
        return self._mask


class WienerRefiner(nn.Module):
    """``x̂ = net(C_scene A†_λ y)``, ``λ = e^ℓ`` learned; ``features`` hold the last call's network features."""

    def __init__(self, channels: int, scene: int, sensor: int, width: int = 16, depth: int = 2,
                 lam: float = 1e-3):
        super().__init__()
        self.scene, self.sensor = int(scene), int(sensor)
        self.log_lam = nn.Parameter(torch.tensor(math.log(lam), dtype=torch.float64))
        self.net = EdgeUNet(channels, channels, width=width, depth=depth, max_width=4 * width, blocks=2,
                            activation="silu", skip_input=True)
        self.features: list[torch.Tensor] = []
        levels = [self.net.down[-1] if depth > 0 else self.net.stem, *self.net.up]
        for module in levels:
            module.register_forward_hook(lambda _m, _i, out: self.features.append(out))

    @property
    def lam(self) -> float:
        return float(self.log_lam.detach().exp())

    def wiener(self, y: torch.Tensor, psf: torch.Tensor, lam: float | None = None) -> torch.Tensor:
        """``C_scene A†_λ y`` with the learned λ, or ``lam`` when given."""
        op = LenslessOperator(psf, (self.sensor, self.sensor), "circular",
                              lam=self.log_lam.exp() if lam is None else lam, differentiable=True)
        return center_crop(op.A_dagger(y), (self.scene, self.scene)).float()

    def forward(self, y: torch.Tensor, psf: torch.Tensor) -> torch.Tensor:
        self.features = []
        return self.net(self.wiener(y, psf))


@dataclass(frozen=True)
class SensorNoise:
    """Poisson–Gaussian sensor noise ``var = σ_r² + g · y`` (a camera profile's ``noise``, or read noise alone).

    ``signal_p99`` None: ``y`` is on the scenes' [0, 1] scale and ``σ_r``, ``g`` are in those units. Given (a
    camera profile's ``signal.p99``): each measurement is first brought to the camera's level ``s`` with
    ``p99(s·y) = signal_p99``, as ``nsdd-train simulate --profile`` does. A mask passing ``r`` times the
    reference light (:meth:`MaskSystem.throughput_ratio`) has the signal ``s r y``, so relative to ``y`` the
    noise is ``std = √(σ_r² + g s r y) / (s r)``.
    """

    read_std: float
    shot_gain: float = 0.0
    signal_p99: float | None = None

    def std(self, y: torch.Tensor, ratio: float | torch.Tensor = 1.0) -> torch.Tensor:
        if self.signal_p99 is None:
            level = torch.ones((), dtype=y.dtype)
        else:
            p99 = torch.quantile(y.detach().flatten(1).float(), 0.99, dim=1).clamp_min(1e-12)
            level = (self.signal_p99 / p99).to(y.dtype).reshape(-1, *[1] * (y.ndim - 1))
        scale = level * ratio
        return torch.sqrt(self.read_std ** 2 + self.shot_gain * scale * y.clamp_min(0.0)) / scale


def measure(x: torch.Tensor, psf: torch.Tensor, sensor: int, noise: torch.Tensor | None,
            sensor_noise: SensorNoise, ratio: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``y = C F⁻¹[H · F(P x)] + std(y) n`` with the crop model of ``nsdd-train simulate``, clipped to [0, 1]
    (to ≥ 0 with a camera's signal level, as ``simulate --profile``)."""
    scene = tuple(x.shape[-2:])
    op = LenslessOperator(psf, (sensor, sensor), "crop", scene_shape=scene,
                          conv_shape=centred_conv_shape((sensor, sensor), scene), differentiable=True)
    y = op.A(x)
    if noise is not None:
        y = y + sensor_noise.std(y, ratio) * noise
    return y.clamp_min(0.0) if sensor_noise.signal_p99 is not None else y.clamp(0.0, 1.0)


class MaskSystem(nn.Module):
    """Encoder + decoder; ``forward(x, noise, progress, soft) -> (x̂, psf, soft_psf)``.

    The PSF sums to one whatever the mask lets through, so the light budget enters through the noise: the
    exposure is set for a mask of throughput ``τ_ref``, and a mask of throughput ``τ`` (mean of ``t²`` over
    the aperture) collects ``r = τ / τ_ref`` times that light (:meth:`throughput_ratio`, :class:`SensorNoise`;
    ``reference_throughput=None``, and PSF-only designs, whose throughput is unknown: ``r = 1``).
    """

    def __init__(self, encoder: Encoder, decoder: WienerRefiner, to_psf: MaskToPsf, noise: SensorNoise,
                 reference_throughput: float | None = 0.5):
        super().__init__()
        self.encoder, self.decoder, self.to_psf = encoder, decoder, to_psf
        self.noise = noise
        self.reference_throughput = reference_throughput

    def throughput_ratio(self) -> float | torch.Tensor:
        """``r = τ / τ_ref`` of the encoder's last call (differentiable in the mask)."""
        tau = self.encoder.throughput
        if self.reference_throughput is None or tau is None:
            return 1.0
        return tau.clamp_min(1e-3) / self.reference_throughput

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None, progress: float = 1.0, soft: bool = False):
        psf, soft_psf = self.encoder(self.to_psf, progress, soft)
        y = measure(x, psf, self.decoder.sensor, noise, self.noise, self.throughput_ratio())
        return self.decoder(y, psf), psf, soft_psf


def encoder_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "gram") -> torch.Tensor:
    """``gram`` / ``mtf``: alignment of the sensing operators' spectra on the sensor grid, from the two PSFs
    (see the module docstring); ``mask``: of the masks themselves, ``Σ(p_s − t_t)² / Σ t_t²``."""
    if kind == "mask":
        return ((student - teacher) ** 2).sum() / (teacher ** 2).sum().clamp_min(1e-12)
    psf_student, psf_teacher = student, teacher
    grid = psf_student.shape[-2:]
    hs = psf_transfer_function(psf_student, grid).abs()
    ht = psf_transfer_function(psf_teacher, grid).abs()
    if kind == "gram":
        return ((hs ** 2 - ht ** 2) ** 2).sum() / (ht ** 4).sum()
    if kind == "mtf":
        return ((hs - ht) ** 2).sum() / (ht ** 2).sum()
    raise ValueError(f"unknown encoder loss {kind!r}; use gram, mtf or mask")


def decoder_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """``mean_l ‖F_s^l − F_t^l‖² / ‖F_t^l‖²``."""
    terms = [((s - t) ** 2).mean() / (t ** 2).mean().clamp_min(1e-12) for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()
