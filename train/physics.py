"""Lensless forward models in torch (batched, differentiable, float32/float64).

A :class:`LenslessOperator` is the ``physics`` object every solver takes (deepinv style):
``A``, ``A_adjoint``, ``A_dagger`` (Wiener/Tikhonov), ``null_project`` (``I − A†A``), ``prox_l2`` and
``measure`` (``A x + n``). Spectra come from :mod:`nsdd_edge.optics`, the single source of truth.
``differentiable=True`` builds the same spectra in torch from a PSF tensor (and λ may be a tensor), so a
loss can be differentiated with respect to the PSF — mask design (:mod:`train.mask`) trains through it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nsdd_edge.optics import (
    CG_ITERATIONS,
    LenslessGeometry,
    Model,
    OpticsError,
    Projector,
    WienerSpectra,
    array_hash,
    check_projector,
    psf_centre_shift,
)


def _center_offsets(small: Sequence[int], big: Sequence[int]) -> tuple[int, int]:
    return (int(big[0]) - int(small[0])) // 2, (int(big[1]) - int(small[1])) // 2


def center_pad(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Zero-pad the last two axes centrally (same offsets as :func:`nsdd_edge.optics.center_pad`)."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(shape):
        return x
    r, c = _center_offsets((h, w), shape)
    return F.pad(x, (c, int(shape[1]) - w - c, r, int(shape[0]) - h - r))


def center_crop(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Centre crop of the last two axes (adjoint of :func:`center_pad`)."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(shape):
        return x
    r, c = _center_offsets(shape, (h, w))
    return x[..., r : r + int(shape[0]), c : c + int(shape[1])]


def fit_to_grid(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Centre-crop or zero-pad each of the last two axes independently to ``shape`` (as
    :func:`nsdd_edge.optics.fit_to`)."""
    h, w = x.shape[-2:]
    th, tw = int(shape[0]), int(shape[1])
    if th < h or tw < w:
        x = center_crop(x, (min(th, h), min(tw, w)))
    if th > x.shape[-2] or tw > x.shape[-1]:
        x = center_pad(x, (th, tw))
    return x


def psf_transfer_function(psf: torch.Tensor, grid_shape: Sequence[int]) -> torch.Tensor:
    """Torch twin of :func:`nsdd_edge.optics.psf_transfer_function` (same placement and shift, via
    :func:`nsdd_edge.optics.psf_centre_shift`): ``H = F(shift(fit(psf)))``, differentiable in ``psf``."""
    grid = (int(grid_shape[0]), int(grid_shape[1]))
    placed = torch.roll(fit_to_grid(psf, grid), psf_centre_shift(psf.shape, grid), dims=(-2, -1))
    return torch.fft.fft2(placed, dim=(-2, -1))


class LenslessOperator(torch.nn.Module):
    """``y = A x + n`` for a lensless camera.

    ``circular``: ``A x = F⁻¹[H · F(x)]`` on the sensor grid. ``projector="tikhonov"`` (default):
    ``A† = F⁻¹[conj(H)/(|H|²+λ)]`` and ``I − A†A`` is the multiplier ``λ/(|H|²+λ)`` (not a projector);
    ``"truncated"``: ``A† = F⁻¹[conj(H)/|H|²]`` on ``|H| > √λ`` and 0 below, ``I − A†A`` an exact projector.
    ``crop``: ``A x = C F⁻¹[H · F(P x)]`` (zero-pad ``P`` to the convolution grid, centre crop ``C`` to
    the sensor); ``Aᵀ y = Pᵀ F⁻¹[conj(H) · F(Cᵀ y)]``; ``A†`` is the Wiener filter on the convolution
    grid applied to ``Cᵀ y`` (an approximation: ``A†A`` is then not a projector); ``projector="cg"``: ``A†y`` is
    :data:`~nsdd_edge.optics.CG_ITERATIONS` conjugate-gradient steps on ``(AᵀA + λI) x = Aᵀy`` from 0
    (:func:`nsdd_edge.optics.cg_tikhonov`, the crop model itself; homogeneous, not linear in ``y``).

    The PSF is ``(C, H, W)`` with ``C`` = 1 (shared by all channels) or the image's channels.
    ``differentiable=True``: ``psf`` (and optionally ``lam``) are torch tensors and the spectra are built
    from them in torch (:func:`psf_transfer_function`, :meth:`WienerSpectra.from_transfer`), keeping the
    autograd graph; the operator is then meant for one training step (build a new one after an update).
    """

    def __init__(self, psf: np.ndarray | torch.Tensor, sensor_shape: Sequence[int] | None = None,
                 model: Model = "circular", lam: float | torch.Tensor = 1e-6,
                 scene_shape: Sequence[int] | None = None, conv_shape: Sequence[int] | None = None,
                 noise_std: float = 0.0, projector: Projector = "tikhonov", differentiable: bool = False):
        super().__init__()
        if differentiable and not isinstance(psf, torch.Tensor):
            raise TypeError("LenslessOperator(differentiable=True) needs the PSF as a torch tensor")
        psf_np = psf.detach().cpu().numpy() if isinstance(psf, torch.Tensor) else np.asarray(psf)
        if psf_np.ndim == 2:
            psf_np = psf_np[None]
        sensor = tuple(sensor_shape) if sensor_shape is not None else psf_np.shape[-2:]
        self.geometry = LenslessGeometry.make(model, sensor, psf_np.shape[-2:], scene_shape, conv_shape)
        try:
            check_projector(projector, model)
        except OpticsError as exc:
            raise ValueError(str(exc)) from None
        if differentiable:
            psf_t = psf if psf.ndim == 3 else psf[None]
            self.spectra = WienerSpectra.from_transfer(
                psf_transfer_function(psf_t.to(torch.float64), self.geometry.conv_shape), lam, projector)
        else:
            self.spectra = WienerSpectra.from_psf(psf_np, self.geometry.conv_shape, float(lam), projector)
        self.lam = self.spectra.lam
        self.projector = self.spectra.projector
        self.noise_std = float(noise_std)
        self.psf_hash = array_hash(psf_np)
        self.channels = psf_np.shape[0]
        self._psf_np = np.array(psf_np, copy=True)  # kept for with_lam

        def as_tensor(a) -> torch.Tensor:
            return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))

        for name in ("H", "G", "R"):
            self.register_buffer(f"_{name}", as_tensor(self.spectra.half(name)), persistent=False)
        self.register_buffer("_S", as_tensor(abs(self.spectra.half("H"))), persistent=False)

    def to(self, *args, **kwargs) -> LenslessOperator:
        """Move to a device. A dtype is ignored on purpose: spectra stay complex128/float64 and are cast
        to each input's precision on use (``Module.to(float64)`` would drop their imaginary part)."""
        device, _dtype, non_blocking, _fmt = torch._C._nn._parse_to(*args, **kwargs)
        return super().to(device=device, non_blocking=non_blocking) if device is not None else self

    # ---- geometry -------------------------------------------------------------------------
    @property
    def model(self) -> Model:
        return self.geometry.model

    @property
    def sensor_shape(self) -> tuple[int, int]:
        return self.geometry.sensor_shape

    @property
    def scene_shape(self) -> tuple[int, int]:
        return self.geometry.scene_shape

    @property
    def conv_shape(self) -> tuple[int, int]:
        return self.geometry.conv_shape

    def _spec(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A stored spectrum on ``like``'s device, complex64/128 (H, G) or real (R, S) to match its dtype."""
        s = getattr(self, f"_{name}")
        if s.is_complex():
            return s.to(device=like.device, dtype=torch.complex128 if like.dtype == torch.float64
                        else torch.complex64)
        return s.to(device=like.device, dtype=like.dtype)

    def _filter(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``F⁻¹[M · F(x)]`` on the convolution grid for a spectrum ``M`` in {H, conj H, G, R}."""
        conj = name == "Hc"
        m = self._spec("H" if conj else name, x)
        if conj:
            m = m.conj()
        X = torch.fft.rfft2(x, dim=(-2, -1))
        return torch.fft.irfft2(X * m, s=self.conv_shape, dim=(-2, -1))

    def _check(self, t: torch.Tensor, shape: tuple[int, int], what: str) -> None:
        if tuple(t.shape[-2:]) != shape:
            raise ValueError(f"{what} has spatial size {tuple(t.shape[-2:])}, expected {shape} "
                             f"({self.model} model)")

    def with_lam(self, lam: float, projector: Projector | None = None) -> LenslessOperator:
        """The same PSF, geometry and noise level with another λ (and pseudo-inverse kind), on the same device."""
        projector = projector or self.projector
        if float(lam) == self.lam and projector == self.projector:
            return self
        key = (float(lam), projector, str(self._H.device))
        cache = self.__dict__.setdefault("_variants", {})  # a student or Wiener with its own λ asks every call
        if key not in cache:
            g = self.geometry
            cache[key] = LenslessOperator(self._psf_np, g.sensor_shape, g.model, lam=lam, scene_shape=g.scene_shape,
                                          conv_shape=g.conv_shape, noise_std=self.noise_std,
                                          projector=projector).to(device=self._H.device)
        return cache[key]

    # ---- operators ------------------------------------------------------------------------
    def A(self, x: torch.Tensor) -> torch.Tensor:
        """Forward model ``y = C F⁻¹[H · F(P x)]`` (``C``, ``P`` identities for ``circular``)."""
        self._check(x, self.scene_shape, "scene x")
        y = self._filter(center_pad(x, self.conv_shape), "H")
        return center_crop(y, self.sensor_shape)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``Aᵀ y = Pᵀ F⁻¹[conj(H) · F(Cᵀ y)]``."""
        self._check(y, self.sensor_shape, "measurement y")
        x = self._filter(center_pad(y, self.conv_shape), "Hc")
        return center_crop(x, self.scene_shape)

    def A_dagger(self, y: torch.Tensor) -> torch.Tensor:
        """Pseudo-inverse ``A†y = Pᵀ F⁻¹[G F(Cᵀ y)]``: Tikhonov ``G = conj(H)/(|H|² + λ)`` or truncated
        ``G = conj(H)/|H|²`` on ``|H| > √λ`` (:class:`nsdd_edge.optics.WienerSpectra`); ``cg`` (crop model):
        conjugate gradient on ``(AᵀA + λI) x = Aᵀy`` (:func:`nsdd_edge.optics.cg_tikhonov`)."""
        self._check(y, self.sensor_shape, "measurement y")
        if self.projector == "cg":
            return self.normal_cg(self.A_adjoint(y), self.lam, CG_ITERATIONS)
        x = self._filter(center_pad(y, self.conv_shape), "G")
        return center_crop(x, self.scene_shape)

    def range_project(self, x: torch.Tensor) -> torch.Tensor:
        """``A†A x`` (for ``circular`` the multiplier ``R``: ``|H|²/(|H|²+λ)``, or ``1[|H| > √λ]`` truncated)."""
        if self.model == "circular":
            self._check(x, self.scene_shape, "scene x")
            X = torch.fft.rfft2(x, dim=(-2, -1))
            return torch.fft.irfft2(X * self._spec("R", x), s=self.conv_shape,
                                    dim=(-2, -1))
        return self.A_dagger(self.A(x))

    def null_project(self, x: torch.Tensor) -> torch.Tensor:
        """``(I − A†A) x``: an exact projector for the truncated pseudo-inverse (circular model); for Tikhonov the
        multiplier ``λ/(|H|²+λ)``, which is not idempotent."""
        return x - self.range_project(x)

    def range_null_combine(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``A†y + (I − A†A) x``: keeps ``x``'s null-space content and takes the range from ``y``."""
        return self.A_dagger(y) + self.null_project(x)

    def singular_values(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """``|H(f)|`` on the rfft half grid, shape ``(C_psf, Hc, Wc//2+1)``."""
        return self._S if like is None else self._spec("S", like)

    def prox_l2(self, z: torch.Tensor, y: torch.Tensor, rho: float | torch.Tensor,
                cg_iters: int = 20) -> torch.Tensor:
        """``argmin_x ‖A x − y‖² + ρ ‖x − z‖²``.

        ``circular``: closed form ``F⁻¹[(conj(H) Y + ρ Z) / (|H|² + ρ)]``; ``crop``: conjugate gradient on
        ``(AᵀA + ρ I) x = Aᵀ y + ρ z`` started at ``z``.
        """
        if self.model == "circular":
            H = self._spec("H", z)
            Y = torch.fft.rfft2(y, dim=(-2, -1))
            Z = torch.fft.rfft2(z, dim=(-2, -1))
            X = (H.conj() * Y + rho * Z) / (H.abs() ** 2 + rho)
            return torch.fft.irfft2(X, s=self.conv_shape, dim=(-2, -1))
        return self.normal_cg(self.A_adjoint(y) + rho * z, rho, cg_iters, start=z)

    def normal_cg(self, b: torch.Tensor, rho: float | torch.Tensor, iters: int,
                   start: torch.Tensor | None = None) -> torch.Tensor:
        """``iters`` conjugate-gradient steps on ``(AᵀA + ρ I) x = b``, one CG per sample (sums over C, H, W),
        from ``start`` or from 0 (then the first residual is ``b`` itself: no operator call is spent on it)."""

        def normal(v: torch.Tensor) -> torch.Tensor:
            return self.A_adjoint(self.A(v)) + rho * v

        if start is None:
            x, r = torch.zeros_like(b), b
        else:
            x = start.clone()
            r = b - normal(x)
        p = r.clone()
        rs = (r * r).sum(dim=(-3, -2, -1), keepdim=True)
        for _ in range(iters):
            Ap = normal(p)
            alpha = rs / (p * Ap).sum(dim=(-3, -2, -1), keepdim=True).clamp_min(1e-30)
            x = x + alpha * p
            r = r - alpha * Ap
            rs_new = (r * r).sum(dim=(-3, -2, -1), keepdim=True)
            p = r + (rs_new / rs.clamp_min(1e-30)) * p
            rs = rs_new
        return x

    def measure(self, x: torch.Tensor, noise_std: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """``y = A x + n``, ``n ~ N(0, σ²)`` with ``σ`` = ``noise_std`` (default: the operator's)."""
        y = self.A(x)
        sigma = self.noise_std if noise_std is None else float(noise_std)
        if sigma > 0:
            noise = torch.randn(y.shape, generator=generator, dtype=y.dtype, device="cpu").to(y.device)
            y = y + sigma * noise
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # physics(x) as in deepinv
        return self.measure(x)

    def consistency(self, x_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Relative measurement residual ``‖A x̂ − y‖ / ‖y‖`` per sample."""
        r = (self.A(x_hat) - y).flatten(1).norm(dim=1)
        return r / y.flatten(1).norm(dim=1).clamp_min(1e-12)

    def projector_defect(self, shape: Sequence[int] | None = None, trials: int = 4, seed: int = 0) -> float:
        """How far ``A†A`` is from a projector: ``max ‖(A†A)² x − A†A x‖ / ‖A†A x‖`` over random ``x``."""
        g = torch.Generator().manual_seed(seed)
        c = self.channels
        x = torch.rand((trials, c) + tuple(shape or self.scene_shape), generator=g, dtype=torch.float64)
        p1 = self.range_project(x)
        p2 = self.range_project(p1)
        return float(((p2 - p1).flatten(1).norm(dim=1) / p1.flatten(1).norm(dim=1)).max())
