"""Mask design by knowledge distillation: build, train and score the designs side by side.

Designs (:data:`DESIGNS`), all with the same decoder (:class:`~train.mask.systems.WienerRefiner`), the
same scenes, noise draws, step count and initial weights:

- ``teacher``: the relaxed mask (continuous amplitude), trained end to end with ``L_rec``.
- ``kd``: the constrained student trained with ``L_rec + w_enc L_enc + w_dec L_dec`` against the frozen
  teacher; ``kd-enc`` / ``kd-dec``: one transfer loss only (the ablation).
- ``e2e``: the same constrained student with ``L_rec`` alone (end-to-end binary with the straight-through
  estimator) — the baseline the distillation must beat.
- ``random``, ``mura``, ``mls``: fixed binary masks through the same propagation, obeying the same
  minimum feature (squares of at least ``m`` cells); ``contour``: the PhlatCam-style PSF of
  :func:`nsdd_edge.psf_sim.contour_psf`; ``radial``: the real radial PSF of ``../shared`` (``--radial-psf``),
  box-downsampled to the sensor grid. For fixed designs only the decoder (and λ) is trained.

``L_rec = ‖x̂ − x‖²`` (mean). Scores on held-out scenes with a fixed noise draw: PSNR, SSIM, LPIPS of the
decoder and of Wiener alone (λ chosen on a validation batch of training scenes from a log grid).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from nsdd_edge.optics import load_psf
from nsdd_edge.psf_sim import contour_psf, random_binary_mask
from train.mask.fabrication import feature_violations, fill_factor, lcd_violations
from train.mask.patterns import largest_mls, largest_mura, mls_mask, mura, place
from train.mask.propagation import MaskOptics, MaskToPsf
from train.mask.systems import (
    BinaryEncoder,
    Encoder,
    FixedEncoder,
    LcdEncoder,
    MaskSystem,
    RelaxedEncoder,
    SensorNoise,
    WienerRefiner,
    aperture_support,
    decoder_loss,
    encoder_loss,
    measure,
)
from train.metrics import psnr, ssim

DESIGNS = ("teacher", "kd", "kd-enc", "kd-dec", "e2e", "random", "mura", "mls", "contour", "radial")
STUDENTS = ("kd", "kd-enc", "kd-dec", "e2e")
WIENER_LAMBDAS = tuple(10.0 ** k for k in np.arange(-5.0, 0.01, 0.5))


class DesignError(ValueError):
    """Bad design settings or inputs; the message names the option or path."""


@dataclass
class DesignSettings:
    """Everything that defines a design run (recorded in ``design.json``; a design directory is reused
    only when the settings that shape it are the same)."""

    scene: int = 32
    sensor: int = 64
    optics: MaskOptics = field(default_factory=MaskOptics)
    propagation: str = "auto"
    aperture: float = 0.75
    constraint: str = "binary"
    min_feature: int = 2
    filter_radius: float | None = None
    fill_range: tuple[float, float] | None = None
    lcd_pitch: int = 4
    lcd_dead: int = 1
    noise_std: float = 0.005
    reference_throughput: float | None = 0.5
    profile: str | None = None  # a camera profile: its Poisson–Gaussian noise and signal level replace noise_std
    steps: int = 400
    teacher_steps: int | None = None  # None: 2 × steps
    batch: int = 16
    lr_mask: float = 0.05
    lr_decoder: float = 2e-3
    lam: float = 1e-3
    encoder_loss: str = "mask"
    enc_weight: float = 1.0
    dec_weight: float = 1.0
    beta: tuple[float, float] = (1.0, 32.0)
    teacher_beta: float = 16.0
    width: int = 16
    depth: int = 2
    seed: int = 0
    radial_psf: str | None = None

    def validate(self) -> None:
        if self.constraint not in ("binary", "lcd"):
            raise DesignError(f"--constraint must be binary or lcd, got {self.constraint!r}")
        if self.scene % (2 ** self.depth):
            raise DesignError(f"--scene {self.scene} must be divisible by 2^depth = {2 ** self.depth}")
        if not 0 < self.scene <= self.sensor:
            raise DesignError(f"--scene {self.scene} must be in (0, --sensor {self.sensor}]")
        if not 0.0 < self.aperture <= 1.0:
            raise DesignError(f"--aperture must be in (0, 1], got {self.aperture}")
        if self.min_feature < 1:
            raise DesignError(f"--min-feature must be ≥ 1 cell, got {self.min_feature}")
        if self.fill_range is not None and not 0.0 <= self.fill_range[0] < self.fill_range[1] <= 1.0:
            raise DesignError(f"--fill-range must be 0 ≤ lo < hi ≤ 1, got {self.fill_range}")
        if not 0 <= self.lcd_dead < self.lcd_pitch:
            raise DesignError(f"--lcd-dead must be in [0, --lcd-pitch), got {self.lcd_dead}, {self.lcd_pitch}")
        for name in ("steps", "batch"):
            if getattr(self, name) < 1:
                raise DesignError(f"--{name} must be ≥ 1, got {getattr(self, name)}")
        if self.reference_throughput is not None and not 0.0 < self.reference_throughput <= 1.0:
            raise DesignError(f"--reference-throughput must be in (0, 1] (or 0: off), got {self.reference_throughput}")
        if self.encoder_loss not in ("gram", "mtf", "mask"):
            raise DesignError(f"--encoder-loss must be gram, mtf or mask, got {self.encoder_loss!r}")
        if self.optics.feature_um * self.cells != self.optics.sensor_pitch_um * self.sensor:
            raise DesignError("the mask grid must cover the sensor grid exactly: sensor × pitch = cells × feature")

    @property
    def cells(self) -> int:
        """Mask cells per side: the PSF window (sensor × pitch) in fabrication cells."""
        return round(self.sensor * self.optics.sensor_pitch_um / self.optics.feature_um)

    @property
    def aperture_cells(self) -> int:
        return max(round(self.aperture * self.cells), self.min_feature)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["optics"] = self.optics.to_dict()
        return d

    def signature(self, design: str) -> dict:
        """The settings that shape ``design`` (a finished design is reused when they match)."""
        d = self.to_dict()
        if design not in STUDENTS:
            for k in ("encoder_loss", "enc_weight", "dec_weight"):
                d.pop(k)
        if design not in ("teacher", "kd", "kd-enc", "kd-dec"):
            for k in ("teacher_steps", "teacher_beta"):
                d.pop(k)
        if design in ("contour", "radial"):
            for k in ("constraint", "min_feature", "filter_radius", "fill_range", "lcd_pitch", "lcd_dead",
                      "lr_mask", "beta"):
                d.pop(k)
        if design != "radial":
            d.pop("radial_psf")
        if self.profile is None:
            d.pop("profile")
        return json.loads(json.dumps({"design": design, **d}))  # as result.json records it (tuples → lists)


# ----------------------------------------------------------------------------------------------
# Building the designs
# ----------------------------------------------------------------------------------------------


def initial_logits(s: DesignSettings, shape: Sequence[int]) -> torch.Tensor:
    """The same seeded starting point for every trained mask (N(0, 1) logits)."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(s.seed + 1000))


def build_encoder(design: str, s: DesignSettings) -> Encoder:
    cells, side, m = s.cells, s.aperture_cells, s.min_feature
    support = aperture_support(cells, side)
    radius = s.filter_radius if s.filter_radius is not None else float(m)
    if design == "teacher":
        return RelaxedEncoder(support, initial_logits(s, (cells, cells)), radius, (s.beta[0], s.teacher_beta))
    if design in STUDENTS:
        if s.constraint == "lcd":
            n = side // s.lcd_pitch
            return LcdEncoder(cells, n, s.lcd_pitch, s.lcd_dead, initial_logits(s, (n, n)))
        return BinaryEncoder(support, initial_logits(s, (cells, cells)), m, radius, s.beta, s.fill_range)
    if design == "random":
        return FixedEncoder(mask=random_binary_mask((cells, cells), s.seed, cell=m, density=0.5,
                                                    fill=side / cells), aperture_area=side ** 2)
    if design == "mura":
        p, cell = largest_mura(side, m)
        return FixedEncoder(mask=place(mura(p), (cells, cells), cell), aperture_area=side ** 2)
    if design == "mls":
        n, cell = largest_mls(side, m)
        return FixedEncoder(mask=place(mls_mask(n), (cells, cells), cell), aperture_area=side ** 2)
    if design == "contour":
        return FixedEncoder(psf=np.repeat(contour_psf((s.sensor, s.sensor), s.seed), len(s.optics.wavelengths_nm), 0))
    if design == "radial":
        if not s.radial_psf:
            raise DesignError("the radial design needs --radial-psf FILE (e.g. ../shared/data/psf/radial_6per_256.npy)")
        raw = load_psf(s.radial_psf, normalization="none")
        if raw.shape[-1] % s.sensor or raw.shape[-2] % s.sensor:
            raise DesignError(f"--radial-psf {s.radial_psf}: its size {raw.shape[-2:]} is not a multiple of the "
                              f"sensor {s.sensor}")
        psf = load_psf(s.radial_psf, downsample=raw.shape[-1] // s.sensor)
        return FixedEncoder(psf=np.repeat(psf, len(s.optics.wavelengths_nm) // psf.shape[0], 0))
    raise DesignError(f"unknown design {design!r}; use {', '.join(DESIGNS)}")


def build_system(design: str, s: DesignSettings, to_psf: MaskToPsf) -> MaskSystem:
    torch.manual_seed(s.seed)  # the same decoder initialisation for every design
    decoder = WienerRefiner(len(s.optics.wavelengths_nm), s.scene, s.sensor, s.width, s.depth, s.lam)
    return MaskSystem(build_encoder(design, s), decoder, to_psf, sensor_noise(s), s.reference_throughput)


def sensor_noise(s: DesignSettings) -> SensorNoise:
    """Read noise ``--noise-std``, or the Poisson–Gaussian model and signal level of ``--profile``."""
    if s.profile is None:
        return SensorNoise(read_std=s.noise_std)
    from nsdd_edge.camera import ProfileError, load_profile

    try:
        profile = load_profile(s.profile)
    except ProfileError as exc:
        raise DesignError(f"--profile {exc}") from None
    return SensorNoise(read_std=float(profile.noise.read_std), shot_gain=float(profile.noise.shot_gain),
                       signal_p99=float(profile.signal.get("p99", 1.0)))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def noise_for(step: int, shape: Sequence[int], seed: int) -> torch.Tensor:
    """The measurement noise of training step ``step`` (the same for every design)."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed * 1_000_003 + step))


def train_system(system: MaskSystem, scenes: torch.Tensor, steps: int, s: DesignSettings, *,
                 teacher: MaskSystem | None = None, enc_weight: float = 0.0, dec_weight: float = 0.0,
                 desc: str = "", progress: bool = True) -> list[dict]:
    """Adam (cosine-decayed learning rates) on ``L_rec + w_enc L_enc + w_dec L_dec``; returns the loss history.
    Every design sees the same batches (seeded permutation) and the same noise draws."""
    from tqdm import tqdm

    from train.progress import TimeEstimate

    enc_params = list(system.encoder.parameters())
    groups = [{"params": list(system.decoder.net.parameters()), "lr": s.lr_decoder},
              {"params": [system.decoder.log_lam], "lr": 0.05}]
    if enc_params:
        groups.append({"params": enc_params, "lr": s.lr_mask})
    opt = torch.optim.Adam(groups)
    base = [g["lr"] for g in opt.param_groups]
    order = np.random.default_rng(s.seed).permutation(len(scenes))
    history, cursor = [], 0
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            teacher_psf, _ = teacher.encoder(teacher.to_psf, 1.0)
            teacher_mask, teacher_ratio = teacher.encoder.soft_mask, teacher.throughput_ratio()
    system.train()
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress, file=sys.stderr, mininterval=2.0)
    estimate = TimeEstimate(f"design-mask {desc}".strip(), steps, "step")
    for step in bar:
        if cursor + s.batch > len(order):
            order, cursor = np.random.default_rng(s.seed + step).permutation(len(scenes)), 0
        x = scenes[torch.from_numpy(order[cursor : cursor + s.batch])]
        cursor += s.batch
        noise = noise_for(step, (x.shape[0], x.shape[1], s.sensor, s.sensor), s.seed)
        progress_fraction = step / max(steps - 1, 1)
        spectral = teacher is not None and enc_weight > 0 and s.encoder_loss != "mask"
        x_hat, _psf, soft_psf = system(x, noise, progress_fraction, soft=spectral)
        loss_rec = ((x_hat - x) ** 2).mean()
        loss = loss_rec
        record = {"step": step, "rec": loss_rec.item()}
        if teacher is not None and enc_weight > 0:
            l_enc = encoder_loss(soft_psf, teacher_psf, s.encoder_loss) if spectral else \
                encoder_loss(system.encoder.soft_mask, teacher_mask, "mask")
            loss = loss + enc_weight * l_enc
            record["enc"] = l_enc.item()
        if teacher is not None and dec_weight > 0:
            student_features = list(system.decoder.features)
            with torch.no_grad():
                y_t = measure(x, teacher_psf, s.sensor, noise, teacher.noise, teacher_ratio)
                teacher.decoder(y_t, teacher_psf)
            l_dec = decoder_loss(student_features, teacher.decoder.features)
            loss = loss + dec_weight * l_dec
            record["dec"] = l_dec.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        scale = 0.5 * (1.0 + math.cos(math.pi * step / steps))
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * scale
        opt.step()
        history.append(record)
        estimate.update(step + 1)
        if step % 25 == 0:
            bar.set_postfix(psnr=f"{-10 * math.log10(max(record['rec'], 1e-12)):.2f}", lam=f"{system.decoder.lam:.1e}")
    bar.close()
    system.eval()
    return history


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def held_out_measurements(system: MaskSystem, scenes: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(psf, y)``: the fabricated PSF and the measurements of ``scenes`` with a fixed noise draw (seed)."""
    psf, _ = system.encoder(system.to_psf, 1.0)
    sensor = system.decoder.sensor
    noise = torch.randn((scenes.shape[0], scenes.shape[1], sensor, sensor), generator=torch.Generator().manual_seed(seed))
    return psf, measure(scenes, psf, sensor, noise, system.noise, float(system.throughput_ratio()))


@torch.no_grad()
def reconstruct(system: MaskSystem, scenes: torch.Tensor, seed: int, wiener_lam: float | None = None,
                batch: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """``(decoder output, Wiener output)`` of held-out ``scenes`` (:func:`held_out_measurements`), both
    clipped to [0, 1]. Wiener uses ``wiener_lam`` (default: the decoder's λ)."""
    psf, y = held_out_measurements(system, scenes, seed)
    dec = [system.decoder(y[k : k + batch], psf).clamp(0, 1) for k in range(0, len(y), batch)]
    return torch.cat(dec), system.decoder.wiener(y, psf, wiener_lam).clamp(0, 1)


@torch.no_grad()
def best_wiener_lambda(system: MaskSystem, scenes: torch.Tensor, seed: int) -> float:
    """The λ of :data:`WIENER_LAMBDAS` with the best mean PSNR of Wiener alone on ``scenes``."""
    psf, y = held_out_measurements(system, scenes, seed)
    return float(max(WIENER_LAMBDAS, key=lambda lam: float(
        psnr(system.decoder.wiener(y, psf, lam).clamp(0, 1), scenes).mean())))


def score(x_hat: torch.Tensor, x: torch.Tensor, lpips_weights: str | None) -> dict:
    """Mean and per-image PSNR, SSIM (and LPIPS when weights are given)."""
    p, q = psnr(x_hat, x), ssim(x_hat, x)
    out = {"psnr": float(p.mean()), "ssim": float(q.mean()), "psnr_per_image": [round(float(v), 4) for v in p]}
    if lpips_weights:
        from train.metrics import lpips

        out["lpips"] = float(lpips(x_hat, x, lpips_weights).mean())
    return out


def constraint_check(design: str, mask: np.ndarray | None, s: DesignSettings) -> dict | None:
    """Exact fabrication checks of a binary design's mask (None for relaxed or PSF-only designs)."""
    if mask is None or design == "teacher":
        return None
    support = aperture_support(s.cells, s.aperture_cells).numpy()
    out = {"fill_factor": fill_factor(mask, support), "open_outside_aperture": int((mask[support == 0] != 0).sum())}
    if design in STUDENTS and s.constraint == "lcd":
        n = s.aperture_cells // s.lcd_pitch
        o = (s.cells - n * s.lcd_pitch) // 2
        out.update(lcd_violations(mask[o : o + n * s.lcd_pitch, o : o + n * s.lcd_pitch], s.lcd_pitch, s.lcd_dead))
        out["rule"] = f"LCD: {n}x{n} pixels of {s.lcd_pitch} cells, {s.lcd_dead} dead"
    else:
        out.update({f"thin_{k}" if k != "non_binary" else k: v
                    for k, v in feature_violations(mask, s.min_feature).items()})
        out["rule"] = f"minimum feature {s.min_feature} cells = {s.min_feature * s.optics.feature_um:g} µm"
    out["satisfied"] = all(v == 0 for k, v in out.items() if isinstance(v, int))
    return out
