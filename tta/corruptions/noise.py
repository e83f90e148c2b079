"""Noise corruptions: gaussian, shot (Poisson), impulse (salt and pepper), speckle.

Parameter tables: hendrycks/robustness ``make_cifar_c.py``, ``make_tinyimagenet_c.py``
and ``make_imagenet_c.py`` (see ``docs/corruptions.md``). Every pixel and channel
gets independent noise, as in the reference (which draws ``size=x.shape``).
"""
from __future__ import annotations

import torch

from tta.corruptions._registry import register_corruption
from tta.corruptions._rng import ImageRNG


@register_corruption(
    "gaussian_noise",
    cifar=[0.04, 0.06, 0.08, 0.09, 0.10],
    tiny=[0.04, 0.08, 0.12, 0.15, 0.18],
    imagenet=[0.08, 0.12, 0.18, 0.26, 0.38],
)
def gaussian_noise(x: torch.Tensor, sigma: float, rng: ImageRNG) -> torch.Tensor:
    return x + sigma * rng.normal(*x.shape[1:])


@register_corruption(
    "shot_noise",
    cifar=[500, 250, 100, 75, 50],
    tiny=[250, 100, 50, 30, 15],
    imagenet=[60, 25, 12, 5, 3],
)
def shot_noise(x: torch.Tensor, rate: float, rng: ImageRNG) -> torch.Tensor:
    # Photon counting: a pixel of intensity x collects Poisson(rate * x) photons.
    return rng.poisson(x * rate) / rate


@register_corruption(
    "impulse_noise",
    cifar=[0.01, 0.02, 0.03, 0.05, 0.07],
    tiny=[0.01, 0.02, 0.05, 0.08, 0.14],
    imagenet=[0.03, 0.06, 0.09, 0.17, 0.27],
)
def impulse_noise(x: torch.Tensor, amount: float, rng: ImageRNG) -> torch.Tensor:
    # skimage.util.random_noise(mode="s&p", salt_vs_pepper=0.5): each value is
    # replaced with probability `amount`, by 1 or 0 with equal odds. One uniform
    # per value gives the same distribution as skimage's two: u <= amount/2 is
    # salt, amount/2 < u <= amount is pepper.
    u = rng.uniform(*x.shape[1:])
    out = torch.where(u <= amount, (u <= amount / 2).to(x.dtype), x)
    return out


@register_corruption(
    "speckle_noise",
    cifar=[0.06, 0.10, 0.12, 0.16, 0.20],
    tiny=[0.15, 0.20, 0.25, 0.30, 0.35],
    imagenet=[0.15, 0.20, 0.35, 0.45, 0.60],
)
def speckle_noise(x: torch.Tensor, sigma: float, rng: ImageRNG) -> torch.Tensor:
    return x + x * sigma * rng.normal(*x.shape[1:])
