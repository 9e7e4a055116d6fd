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

    def x0_from_eps(self, x_t: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:
        """``x0|t = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t``."""
        a = self.alphas_cumprod[t].to(x_t.dtype)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters()) if isinstance(self.net, torch.nn.Module) else 0
