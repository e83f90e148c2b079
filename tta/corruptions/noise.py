"""Noise corruptions: gaussian, shot (Poisson), impulse (salt and pepper), speckle.

Parameter tables: hendrycks/robustness ``make_cifar_c.py``, ``make_tinyimagenet_c.py``
and ``make_imagenet_c.py`` (see ``docs/corruptions.md``). Every pixel and channel
gets independent noise, as in the reference (which draws ``size=x.shape``).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from tta.corruptions._registry import register_corruption, to_uint8
from tta.corruptions._rng import ImageRNG


@register_corruption(
    "gaussian_noise",
    cifar=[0.04, 0.06, 0.08, 0.09, 0.10],
    tiny=[0.04, 0.08, 0.12, 0.15, 0.18],
    imagenet=[0.08, 0.12, 0.18, 0.26, 0.38],
    chunk_values=1 << 18,
)
def gaussian_noise(x: torch.Tensor, sigma: float, rng: ImageRNG) -> torch.Tensor:
    return x.add_(rng.normal(*x.shape[1:]), alpha=sigma)  # in place on corrupt()'s fresh copy


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
    if x.dtype == torch.uint8:
        return _shot_noise_uint8(x, rate, rng)
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


def _shot_noise_uint8(x: torch.Tensor, rate: float, rng: ImageRNG) -> torch.Tensor:
    """uint8 in, uint8 out: the float path's result value for value, from one table.

    The float path draws u = (r >> 11) 2^-53 from each 64-bit output r of the
    image's numpy generator (numpy's ``random()``) and returns
    ``to_uint8(#{j : cdf_level(j) <= u} / rate)``. The top :data:`_TABLE_BITS` bits
    of r fix u's bin; where no CDF value of the level falls inside that bin, the
    result is known from (level, bin) alone and read from a table. Where some do
    (a few percent of the draws), the table holds ``-1 - lo`` with ``lo`` the count
    at the bin's start: one CDF value past ``lo`` at most is below u for nearly all
    of them (two comparisons), and the rest go through the float path's sampler."""
    n = x.shape[0]
    levels = x.reshape(-1).cpu().numpy()
    table, to_u8, cdf = _shot_uint8_table(float(rate))
    length = cdf.shape[1]
    cdf = cdf.reshape(-1)
    gens = rng.numpy_generators
    per_image = levels.size // max(n, 1)
    if n == 1:  # the stream of g.random(): one 64-bit output per value
        raw = gens[0].bit_generator.random_raw(per_image)
    else:
        raw = np.empty(levels.size, dtype=np.uint64)
        for i, g in enumerate(gens):
            raw[i * per_image : (i + 1) * per_image] = g.bit_generator.random_raw(per_image)
    index = raw >> np.uint64(64 - _TABLE_BITS)
    index |= levels.astype(np.uint64) << np.uint64(_TABLE_BITS)  # the table row of every value
    v = table.take(index.view(np.int64))  # below 2^19: the same numbers as int64
    inside = np.flatnonzero(v < 0)
    if inside.size:
        u = (raw[inside] >> np.uint64(11)).astype(np.float64) * 2.0**-53
        low = -1 - v[inside].astype(np.intp)
        start = levels[inside].astype(np.intp) * length  # the level's CDF row
        at = start + low  # lo + 1 < length: a CDF value lies inside the bin
        counts = low + (u >= cdf.take(at))
        more = np.flatnonzero(u >= cdf.take(at + 1))
        if more.size:  # several CDF values of the bin below u (tail bins): bisection
            counts[more] = _first_above(cdf, at[more] + 2, start[more] + length - 1, u[more]) - start[more]
        v[inside] = to_u8.take(counts)
    return torch.from_numpy(v.astype(np.uint8)).view(x.shape).to(x.device)


def _first_above(values: np.ndarray, low: np.ndarray, high: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Per element, the first index in [low, high] of the sorted runs of ``values`` whose
    value exceeds u (``values[high]`` must: the CDFs end in +inf), by bisection."""
    low, high = low.copy(), high.copy()
    while True:
        open_ = np.flatnonzero(low < high)
        if not open_.size:
            return low
        mid = (low[open_] + high[open_]) // 2
        below = values.take(mid) <= u[open_]
        low[open_] = np.where(below, mid + 1, low[open_])
        high[open_] = np.where(below, high[open_], mid)


_TABLE_BITS = 11  # bins of u per level in the uint8 table (256 x 2048 int16: 1 MiB, cache-sized)


@functools.lru_cache(maxsize=32)
def _shot_uint8_table(rate: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(table, to_u8, cdf)``: ``table[(k << _TABLE_BITS) | b]`` (int16) the uint8 result
    of level k for every u in bin b = [b, b + 1) / 2^_TABLE_BITS, or ``-1 - lo`` where a
    CDF value of level k falls inside the bin, ``lo = #{j : cdf_k(j) <= b / 2^_TABLE_BITS}``;
    ``to_u8[count]`` the uint8 value of ``count / rate`` as the float path converts it
    (:func:`to_uint8`); ``cdf`` the (256, L) float64 CDFs (:func:`_poisson_cdf`)."""
    cdf = _poisson_cdf(rate)  # (256, L), +inf last
    bins = 1 << _TABLE_BITS
    edges = torch.arange(bins + 1, dtype=torch.float64) / bins
    # #{j : cdf(j) <= u} is constant on [lo_edge, hi_edge) iff no cdf value lies in (lo_edge, hi_edge).
    at_low = torch.searchsorted(cdf, edges[:-1].expand(256, -1).contiguous(), right=True).numpy()
    below_high = torch.searchsorted(cdf, edges[1:].expand(256, -1).contiguous(), right=False).numpy()
    if cdf.shape[1] >= 1 << 15:
        raise ValueError(f"shot noise rate {rate} too large for the uint8 table")  # int16 entries
    counts = torch.arange(cdf.shape[1], dtype=torch.float32)
    to_u8 = to_uint8(counts.div_(rate)).numpy().astype(np.int16)
    table = np.where(at_low == below_high, to_u8[at_low], -1 - at_low).astype(np.int16)
    return table.reshape(-1), to_u8, cdf.numpy()


# uint8 input: the table path above (same values as the float path, about 4x faster).
shot_noise.uint8_native = True

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
    if x.dtype == torch.uint8:
        return _impulse_noise_uint8(x, amount, rng)
    u = rng.uniform32(*x.shape[1:])  # numpy's float32 uniforms: faster than torch.rand
    out = torch.where(u <= amount, (u <= amount / 2).to(x.dtype), x)
    return out


def _impulse_noise_uint8(x: torch.Tensor, amount: float, rng: ImageRNG) -> torch.Tensor:
    """uint8 in, uint8 out: the float path's result value for value, on the raw bits.

    numpy's float32 uniform is ``(r >> 8) 2^-24`` for the 32-bit halves r of its
    64-bit outputs (low half first), so ``u <= a`` is ``r < t(a)`` with the integer
    threshold of :func:`_uniform32_threshold`; salt is 255, pepper 0, and the
    untouched values keep their level (the float path's round trip is exact)."""
    n = x.shape[0]
    values = x.reshape(n, -1).cpu().numpy()
    out = np.empty_like(values)
    noisy, salt = _uniform32_threshold(amount), _uniform32_threshold(amount / 2)
    length = values.shape[1]
    for row, value, g in zip(out, values, rng.numpy_generators):
        r = g.bit_generator.random_raw((length + 1) // 2).view(np.uint32)[:length]  # the stream of g.random(float32)
        # Branch-free bit arithmetic: (value & keep) | salt, with 0/255 masks (masked
        # assignments slow down with the fraction of values they change).
        np.bitwise_and(value, (r >= noisy).view(np.uint8) * np.uint8(255), out=row)
        row |= (r < salt).view(np.uint8) * np.uint8(255)
    return torch.from_numpy(out).view(x.shape).to(x.device)


@functools.lru_cache(maxsize=64)
def _uniform32_threshold(a: float) -> np.uint32:
    """The t with ``(r >> 8) 2^-24 <= a`` (compared as torch compares a float32
    tensor with the number a) exactly when ``r < t``, for 32-bit r; ``a`` in
    [0, 1 - 2^-24) (beyond, every r would pass and t would not fit 32 bits).

    Raises:
        ValueError: ``a`` outside that range."""
    if not 0 <= a < 1 - 2.0**-24:
        raise ValueError(f"impulse amount {a!r} outside [0, 1 - 2^-24)")
    m = min(int(a * 2**24) + 2, 2**24 - 1)
    while m >= 0 and not bool(torch.tensor(m * 2.0**-24, dtype=torch.float32) <= a):
        m -= 1
    return np.uint32((m + 1) << 8)


# uint8 input: the raw-bits path above (same values as the float path).
impulse_noise.uint8_native = True


@register_corruption(
    "speckle_noise",
    cifar=[0.06, 0.10, 0.12, 0.16, 0.20],
    tiny=[0.15, 0.20, 0.25, 0.30, 0.35],
    imagenet=[0.15, 0.20, 0.35, 0.45, 0.60],
    chunk_values=1 << 18,
)
def speckle_noise(x: torch.Tensor, sigma: float, rng: ImageRNG) -> torch.Tensor:
    return x.addcmul_(x, rng.normal(*x.shape[1:]), value=sigma)  # x + sigma x n, in place
