"""Noise corruptions: gaussian, shot (Poisson), impulse (salt and pepper), speckle.

Parameter tables: hendrycks/robustness ``make_cifar_c.py``, ``make_tinyimagenet_c.py``
and ``make_imagenet_c.py`` (see ``docs/corruptions.md``). Every pixel and channel
gets independent noise, as in the reference (which draws ``size=x.shape``).
"""
from __future__ import annotations

import functools
import math

import torch

from tta.corruptions._registry import register_corruption
from tta.corruptions._rng import ImageRNG


@register_corruption(
    "gaussian_noise",
    cifar=[0.04, 0.06, 0.08, 0.09, 0.10],
    tiny=[0.04, 0.08, 0.12, 0.15, 0.18],
    imagenet=[0.08, 0.12, 0.18, 0.26, 0.38],
    chunk_values=1 << 18,
)
def gaussian_noise(x: torch.Tensor, sigma: float, rng: ImageRNG) -> torch.Tensor:
    return x + sigma * rng.normal(*x.shape[1:])


@register_corruption(
    "shot_noise",
    cifar=[500, 250, 100, 75, 50],
    tiny=[250, 100, 50, 30, 15],
    imagenet=[60, 25, 12, 5, 3],
    chunk_values=1 << 18,
)
def shot_noise(x: torch.Tensor, rate: float, rng: ImageRNG) -> torch.Tensor:
    # Photon counting: a pixel of intensity x collects Poisson(rate * x) photons.
    # Images on the 8-bit grid (every uint8 input) have only 256 distinct rates:
    # they are sampled exactly by inversion of tabulated CDFs, 5x faster than
    # Poisson samplers. Other images (float input between grid values) use
    # torch.poisson. The choice is per image, so chunking cannot change it.
    n = x.shape[0]
    flat = x.reshape(n, -1).cpu()
    out = torch.empty(flat.shape)
    # Groups of about _GROUP_VALUES values: the temporaries stay in the cache.
    group = max(1, _GROUP_VALUES // flat.shape[1])
    for start in range(0, n, group):
        scaled = flat[start : start + group] * 255.0
        levels = scaled.round()
        on_grid = scaled.sub_(levels).abs_().amax(dim=1).le(1e-3).tolist()
        grid = [start + i for i, ok in enumerate(on_grid) if ok]
        if len(grid) == len(on_grid):
            u = rng.uniform64(flat.shape[1], indices=grid).view(-1)
            counts = _poisson_by_inversion(levels.view(-1).to(torch.int32), rate, u)
            out[start : start + group] = counts.view(len(grid), -1)
            continue
        for i, ok in enumerate(on_grid, start):
            if ok:
                u = rng.uniform64(flat.shape[1], indices=[i]).view(-1)
                out[i] = _poisson_by_inversion(levels[i - start].to(torch.int32), rate, u)
            else:
                out[i] = torch.poisson(flat[i] * rate, generator=rng.generators[i])
    out = out.view_as(x).to(x.device, x.dtype)
    return out.div_(rate)


_GROUP_VALUES = 1 << 16  # values sampled per group of images (cache-sized temporaries)
_WALK = 16  # CDF values compared per step of the tail walk
_BINS = 512  # quantile-table resolution (per level): most draws need one CDF comparison


@functools.lru_cache(maxsize=32)
def _poisson_tables(rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantile guide of Poisson(rate * k / 255), k = 0..255, for sampling by inversion.

    With ``cdf_k`` the CDF of level k, bin m of u = [m / _BINS, (m + 1) / _BINS) and
    ``lo = #{j : cdf_k(j) <= m / _BINS}``, a draw u of bin m is ``lo`` or ``lo + 1``
    when at most one CDF value falls inside the bin: ``lo + (u >= cdf_k(lo))``.

    Returns ``(low, threshold)``, flat ``(256 * _BINS,)``, index ``k * _BINS + m``:
    ``low`` int32 ``lo``; ``threshold`` float64 ``cdf_k(lo)`` (2 when no CDF value
    falls inside the bin), or -1 for the rare bins that hold several CDF values
    (tail bins), which :func:`_poisson_by_inversion` resolves with the whole CDF
    (``_poisson_cdf``)."""
    cdf = _poisson_cdf(rate)
    steps = torch.arange(_BINS + 1, dtype=torch.float64) / _BINS
    bounds = torch.searchsorted(cdf, steps.expand(256, -1).contiguous(), right=True)
    lo, hi = bounds[:, :-1], bounds[:, 1:]
    threshold = torch.gather(cdf, 1, lo)
    threshold = torch.where(hi == lo, 2.0, threshold)
    threshold = torch.where(hi - lo > 1, -1.0, threshold)
    return lo.to(torch.int32).reshape(-1), threshold.reshape(-1).contiguous()


@functools.lru_cache(maxsize=32)
def _poisson_cdf(rate: float) -> torch.Tensor:
    """(256, L) float64: row k the CDF of Poisson(rate * k / 255) at 0..L-2, +inf last
    (the tail beyond L-2 lies below float64 resolution)."""
    lam = (torch.arange(256, dtype=torch.float32) / 255.0 * rate).double()  # the rates x * rate of float32 x
    length = int(rate + 12 * math.sqrt(rate) + 30)
    j = torch.arange(length - 1, dtype=torch.float64)
    logp = j * torch.log(lam.clamp_min(1e-300)).view(-1, 1) - lam.view(-1, 1) - torch.lgamma(j + 1)
    pmf = torch.exp(logp)
    pmf[0] = 0.0
    pmf[0, 0] = 1.0  # rate 0: always 0 photons
    return torch.cat([pmf.cumsum(1), torch.full((256, 1), math.inf, dtype=torch.float64)], dim=1)


def _poisson_by_inversion(levels: torch.Tensor, rate: float, u: torch.Tensor) -> torch.Tensor:
    """Poisson(rate * level / 255) draws by inversion, X = #{j : cdf_level(j) <= u},
    for int32 ``levels`` in 0..255 and uniform float64 ``u`` in [0, 1). Exact up to
    float64 round-off; int32 result."""
    low, threshold = _poisson_tables(float(rate))
    index = (u * _BINS).to(torch.int32).add_(levels * _BINS)
    t = threshold.index_select(0, index)
    x = low.index_select(0, index).add_(u >= t)
    wide = torch.nonzero(t < 0).view(-1)
    if wide.numel():
        # Rare draws: walk up the level's CDF from the bin's lower bound, _WALK
        # values at a time, until it passes u (the +inf at the end stops every walk).
        cdf = _poisson_cdf(float(rate))
        length = cdf.shape[1]
        cdf = cdf.view(-1)
        count = low.index_select(0, index.index_select(0, wide)).long()
        last = levels.index_select(0, wide).long() * length + (length - 1)
        start, u = last - (length - 1), u.index_select(0, wide).view(-1, 1)
        steps = torch.arange(_WALK)
        while wide.numel():
            at = torch.minimum((start + count).view(-1, 1) + steps, last.view(-1, 1))
            below = (cdf[at] <= u).sum(1)
            count += below
            done = torch.nonzero(below < _WALK).view(-1)
            x.index_copy_(0, wide.index_select(0, done), count.index_select(0, done).to(x.dtype))
            keep = torch.nonzero(below == _WALK).view(-1)
            wide, count, start, last, u = (t.index_select(0, keep) for t in (wide, count, start, last, u))
    return x


@register_corruption(
    "impulse_noise",
    cifar=[0.01, 0.02, 0.03, 0.05, 0.07],
    tiny=[0.01, 0.02, 0.05, 0.08, 0.14],
    imagenet=[0.03, 0.06, 0.09, 0.17, 0.27],
    chunk_values=1 << 18,
)
def impulse_noise(x: torch.Tensor, amount: float, rng: ImageRNG) -> torch.Tensor:
    # skimage.util.random_noise(mode="s&p", salt_vs_pepper=0.5): each value is
    # replaced with probability `amount`, by 1 or 0 with equal odds. One uniform
    # per value gives the same distribution as skimage's two: u <= amount/2 is
    # salt, amount/2 < u <= amount is pepper.
    u = rng.uniform32(*x.shape[1:])  # numpy's float32 uniforms: faster than torch.rand
    out = torch.where(u <= amount, (u <= amount / 2).to(x.dtype), x)
    return out


@register_corruption(
    "speckle_noise",
    cifar=[0.06, 0.10, 0.12, 0.16, 0.20],
    tiny=[0.15, 0.20, 0.25, 0.30, 0.35],
    imagenet=[0.15, 0.20, 0.35, 0.45, 0.60],
    chunk_values=1 << 18,
)
def speckle_noise(x: torch.Tensor, sigma: float, rng: ImageRNG) -> torch.Tensor:
    return x + x * sigma * rng.normal(*x.shape[1:])
