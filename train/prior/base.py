"""The diffusion-prior interface every diffusion solver uses (models are separate from schedules).

A :class:`DiffusionPrior` wraps an ε-prediction network ``net(x_t, t) -> ε`` that works on images in
``[−1, 1]`` and the training schedule's ``ᾱ_t`` (linear β from ``beta_start`` to ``beta_end`` over
``num_train_timesteps`` unless the model's config says otherwise).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def linear_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                          beta_end: float = 0.02) -> torch.Tensor:
    """``ᾱ_t = ∏_{s≤t} (1 − β_s)`` for a linear β schedule, float64."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


class DiffusionPrior(torch.nn.Module):
    """ε-prediction prior: ``eps(x_t, t)`` with ``x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε``, ``x0 ∈ [−1, 1]``."""

    def __init__(self, net: torch.nn.Module | Callable, alphas_cumprod: torch.Tensor, image_size: int,
                 channels: int = 3, config: dict | None = None):
        super().__init__()
        self.net = net
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64), persistent=False)
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.config = dict(config or {})

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def eps(self, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Predicted noise ε_θ(x_t, t); ``t`` an int or a ``(N,)`` integer tensor."""
        if not torch.is_tensor(t):
            t = torch.full((x_t.shape[0],), int(t), device=x_t.device, dtype=torch.long)
        elif t.ndim == 0:
            t = t.expand(x_t.shape[0])
        out = self.net(x_t, t)
        return out.sample if hasattr(out, "sample") else out

    @property
    def learns_variance(self) -> bool:
        """Whether the network also predicts its variance (guided-diffusion ``learn_sigma``, ADM priors)."""
        return hasattr(self.net, "full_output")

    def eps_and_variance(self, x_t: torch.Tensor, t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``ε_θ(x_t, t)`` and, for a network that learns its variance, the interpolation fraction
        ``f = (v + 1) / 2`` of guided-diffusion's ``learned_range``: ``log σ_t² = f log β_t + (1 − f) log β̃_t``
        (``None`` for an ε-only network)."""
        if not self.learns_variance:
            return self.eps(x_t, t), None
        if not torch.is_tensor(t):
            t = torch.full((x_t.shape[0],), int(t), device=x_t.device, dtype=torch.long)
        elif t.ndim == 0:
            t = t.expand(x_t.shape[0])
        out = self.net.full_output(x_t, t)
        c = self.channels
        return out[:, :c], (out[:, c:2 * c] + 1.0) / 2.0

    def x0_from_eps(self, x_t: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:
        """``x0|t = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t``."""
        a = self.alphas_cumprod[t].to(x_t.dtype)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters()) if isinstance(self.net, torch.nn.Module) else 0


def _centre_slices(shape: tuple[int, int], inner: tuple[int, int]) -> tuple[slice, slice]:
    """Slices of the centred ``inner`` window in ``shape`` (the offsets of ``center_crop``)."""
    top, left = (shape[0] - inner[0]) // 2, (shape[1] - inner[1]) // 2
    return slice(top, top + inner[0]), slice(left, left + inner[1])


class SupportPrior(DiffusionPrior):
    """A prior of ``s×s`` scenes used on a larger canvas whose outside is known: ``x0 = fill`` outside the
    centred ``s×s`` support (the simulated scenes are zero-padded: ``fill = −1`` in model space).

    The prior on the canvas is the product of the inner prior and a point mass outside, so the posterior
    factorises: inside, ``ε = ε_θ(crop(x_t), t)``; outside, ``x0`` is known and
    ``ε = (x_t − √ᾱ_t · fill) / √(1−ᾱ_t)`` exactly. The network runs only on the support.
    """

    def __init__(self, inner: DiffusionPrior, canvas_shape: tuple[int, int], fill: float = -1.0):
        super().__init__(inner.net, inner.alphas_cumprod, inner.image_size, inner.channels, inner.config)
        canvas = (int(canvas_shape[0]), int(canvas_shape[1]))
        s = inner.image_size
        if canvas[0] < s or canvas[1] < s:
            raise ValueError(f"canvas {canvas} is smaller than the prior's {s}x{s} support")
        self.inner = inner
        self.canvas_shape = canvas
        self.support_shape = (s, s)
        self.fill = float(fill)
        self._window = _centre_slices(canvas, self.support_shape)

    def _canvas_eps(self, x_t: torch.Tensor, t: torch.Tensor | int, inner_eps) -> torch.Tensor:
        """ε on the canvas: the exact ε of the known surround, ``inner_eps(window)`` on the support."""
        if tuple(x_t.shape[-2:]) != self.canvas_shape:
            raise ValueError(f"SupportPrior: x_t has size {tuple(x_t.shape[-2:])}, expected {self.canvas_shape}")
        n = x_t.shape[0]
        steps = t.expand(n) if torch.is_tensor(t) and t.ndim == 0 else (
            t if torch.is_tensor(t) else torch.full((n,), int(t), dtype=torch.long))
        a = self.alphas_cumprod.to(x_t.device)[steps.to(x_t.device)].to(x_t.dtype).view(n, 1, 1, 1)
        eps = (x_t - a.sqrt() * self.fill) / (1 - a).sqrt()  # a fresh tensor: writing its window is safe
        rows, cols = self._window
        eps[..., rows, cols] = inner_eps(x_t[..., rows, cols]).to(x_t.dtype)
        return eps

    def eps(self, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        return self._canvas_eps(x_t, t, lambda window: self.inner.eps(window, t))

    def eps_and_variance(self, x_t: torch.Tensor, t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As :meth:`eps`; the variance fraction is the network's on the support and 0 (the posterior
        variance β̃_t) on the known surround."""
        if not self.learns_variance:
            return self.eps(x_t, t), None
        inner: dict = {}

        def run(window: torch.Tensor) -> torch.Tensor:
            inner["eps"], inner["frac"] = self.inner.eps_and_variance(window, t)
            return inner["eps"]

        eps = self._canvas_eps(x_t, t, run)
        frac = torch.zeros_like(x_t)
        rows, cols = self._window
        frac[..., rows, cols] = inner["frac"].to(x_t.dtype)
        return eps, frac


def prior_for_scene(prior: DiffusionPrior, scene_shape: tuple[int, int]) -> DiffusionPrior:
    """The prior to use on a ``scene_shape`` canvas: itself, or a :class:`SupportPrior` when the prior's
    images are smaller than the canvas (scenes on a known black surround, as the simulation pads them)."""
    s = prior.image_size
    if isinstance(prior, SupportPrior) or (scene_shape[0] <= s and scene_shape[1] <= s):
        return prior
    return SupportPrior(prior, scene_shape)
