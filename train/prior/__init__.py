"""Pixel-space diffusion priors: the interface (:mod:`.base`), networks, loaders and training."""

from train.prior.base import DiffusionPrior, linear_alphas_cumprod

__all__ = ["DiffusionPrior", "linear_alphas_cumprod"]
