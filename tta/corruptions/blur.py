"""Blur corruptions: defocus, glass, motion, zoom and (held out) gaussian blur.

Parameter tables: hendrycks/robustness ``make_cifar_c.py``, ``make_tinyimagenet_c.py``
and ``make_imagenet_c.py``. Filters follow the libraries the reference calls:
scikit-image ``gaussian`` (scipy kernel, replicate border, truncate 4), OpenCV
``filter2D`` (reflect-101 border) for the defocus disk, scipy ``zoom(order=1)``
(bilinear, corners aligned) for zoom blur. Motion blur is the numpy
shift-and-add of ``imagecorruptions`` that replaces ImageMagick's.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from tta.corruptions._registry import register_corruption, to_uint8
from tta.corruptions._rng import ImageRNG

__all__ = ["gaussian_kernel1d", "filter_matrix", "correlate1d", "gaussian_filter", "disk_kernel", "motion_taps",
           "glass_schedule"]


# --------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=64)
def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage's Gaussian: radius ``int(truncate * sigma + 0.5)``, unit sum."""
    radius = int(truncate * float(sigma) + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 / (sigma * sigma) * t * t)
    return k / k.sum()


@functools.lru_cache(maxsize=128)
def filter_matrix(size: int, kernel: tuple[float, ...], mode: str) -> torch.Tensor:
    """Correlation with an odd 1-D ``kernel`` along an axis of ``size`` pixels, border
    included, as a dense ``(size, size)`` float64 matrix. ``mode``: ``"nearest"``
    (replicate, scipy/skimage) or ``"mirror"`` (reflect-101, OpenCV's default).

    A dense matmul does the filtering faster than shifted adds or a one-channel
    convolution at the sizes of the benchmarks (32 to 224 px)."""
    r = len(kernel) // 2
    m = np.zeros((size, size))
    src = np.arange(size)[:, None] + np.arange(-r, r + 1)[None, :]  # (out, tap) source positions
    if mode == "nearest":
        src = np.clip(src, 0, size - 1)
    elif mode == "mirror":
        period = 2 * (size - 1) if size > 1 else 1
        src = np.abs(src) % period
        src = np.where(src >= size, period - src, src)
    else:
        raise ValueError(f"unknown border mode {mode!r}; valid choices: nearest, mirror")
    np.add.at(m, (np.repeat(np.arange(size), len(kernel)), src.reshape(-1)), np.tile(np.asarray(kernel), size))
    return torch.from_numpy(m)


_BLOCK = 32


def band_blocks(m: torch.Tensor) -> list[tuple[int, int, int, int, torch.Tensor]]:
    """A local filter matrix ``m`` (n x n) cut into bands of ``_BLOCK`` output rows, each
    with the range of input rows it reads: ``(out_lo, out_hi, in_lo, in_hi, block)``.
    On large images this skips the matrix's zeros."""
    n = m.shape[0]
    blocks = []
    for lo in range(0, n, _BLOCK):
        hi = min(lo + _BLOCK, n)
        cols = torch.nonzero(m[lo:hi].abs().sum(0)).view(-1)
        a, b = int(cols.min()), int(cols.max()) + 1
        blocks.append((lo, hi, a, b, m[lo:hi, a:b].contiguous()))
    return blocks


@functools.lru_cache(maxsize=128)
def _matrix_blocks(size: int, kernel: tuple[float, ...], mode: str) -> list[tuple[int, int, int, int, torch.Tensor]]:
    """``filter_matrix`` cut into bands (see :func:`band_blocks`)."""
    return band_blocks(filter_matrix(size, kernel, mode))


def _filter_axis(x: torch.Tensor, kernel: tuple[float, ...], mode: str, dim: int) -> torch.Tensor:
    size = x.shape[dim]
    if size <= 2 * _BLOCK:
        m = filter_matrix(size, kernel, mode).to(x.device, x.dtype)
        return torch.matmul(m, x) if dim == 2 else torch.matmul(x, m.t())
    out = torch.empty_like(x)
    for lo, hi, a, b, block in _matrix_blocks(size, kernel, mode):
        block = block.to(x.device, x.dtype)
        if dim == 2:
            out[:, :, lo:hi] = torch.matmul(block, x[:, :, a:b])
        else:
            out[..., lo:hi] = torch.matmul(x[..., a:b], block.t())
    return out


def correlate1d(x: torch.Tensor, kernel, dim: int) -> torch.Tensor:
    """Valid 1-D correlation of ``x`` with a short ``kernel`` (a sequence or 1-D tensor)
    along ``dim``, as a sum of shifted slices (faster than a one-channel conv2d on
    the CPU, and exact for integers)."""
    k = [float(v) for v in kernel]
    size = x.shape[dim] - len(k) + 1
    out = x.narrow(dim, 0, size) * k[0]
    for t in range(1, len(k)):
        out.add_(x.narrow(dim, t, size), alpha=k[t])
    return out


_SHIFT_TAPS = 9  # up to this many taps, shifted adds beat the banded matmul (224 px, 1 thread)


def _filter_separable(x: torch.Tensor, kernel: np.ndarray, mode: str) -> torch.Tensor:
    """Correlate every channel of ``x`` (N, C, H, W) with ``kernel`` along H and along W."""
    if len(kernel) == 1:
        return x * float(kernel[0])
    k = tuple(float(v) for v in kernel)
    if mode == "nearest" and len(k) <= _SHIFT_TAPS:
        r = len(k) // 2  # replicate padding may exceed the image size (it only clamps indices)
        x = correlate1d(F.pad(x, (0, 0, r, r), mode="replicate"), k, 2)
        return correlate1d(F.pad(x, (r, r, 0, 0), mode="replicate"), k, 3)
    return _filter_axis(_filter_axis(x, k, mode, 2), k, mode, 3)


def gaussian_filter(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``skimage.filters.gaussian(x, sigma, channel_axis=-1)`` (scipy's kernel, truncate 4)
    of (N, C, H, W): per channel, replicate border; ``sigma <= 0`` is the identity."""
    if sigma <= 0:
        return x
    return _filter_separable(x, gaussian_kernel1d(sigma), "nearest")


def _reflect101(a: np.ndarray, r: int, axis: int) -> np.ndarray:
    width = [(0, 0)] * a.ndim
    width[axis] = (r, r)
    return np.pad(a, width, mode="reflect")  # numpy "reflect" == OpenCV BORDER_REFLECT_101


@functools.lru_cache(maxsize=64)
def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The reference's anti-aliased disk (float32).

    A binary disk on a 17 x 17 grid (or ``2 radius + 1`` when radius > 8),
    normalised, then smoothed by ``cv2.GaussianBlur`` with a 3 x 3 (5 x 5) kernel
    of sigma ``alias_blur`` and reflect-101 border; reimplemented in numpy.
    Exactly-zero outer rows and columns are cropped (they contribute nothing).
    """
    if radius <= 8:
        grid, ksize = np.arange(-8, 8 + 1), 3
    else:
        grid, ksize = np.arange(-radius, radius + 1), 5
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float32)
    disk /= disk.sum()
    t = np.arange(ksize) - (ksize - 1) / 2
    g = np.exp(-(t**2) / (2 * alias_blur**2))
    g /= g.sum()
    r = ksize // 2
    p = _reflect101(disk.astype(np.float64), r, 0)
    p = sum(g[i] * p[i : i + disk.shape[0]] for i in range(ksize))
    p = _reflect101(p, r, 1)
    p = sum(g[i] * p[:, i : i + disk.shape[1]] for i in range(ksize))
    k = p.astype(np.float32)
    nz = np.nonzero(k.any(axis=0))[0]
    m = min(nz[0], len(k) - 1 - nz[-1])  # keep the kernel centred
    return np.ascontiguousarray(k[m : len(k) - m, m : len(k) - m])


@functools.lru_cache(maxsize=16)
def glass_schedule(height: int, width: int, max_delta: int, iterations: int, device: str = "cpu"):
    """Wavefronts that replay the reference's sequential pixel swaps in parallel.

    The reference visits positions ``h = H-D .. D+1``, ``w = W-D .. D+1`` (both
    descending, ``D = max_delta``), ``iterations`` times, and "swaps" pixel (h, w)
    with (h + dy, w + dx), dx, dy in [-D, D-1]. Its tuple swap of numpy views
    ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` actually copies: (h, w) takes the
    value of (h', w') and (h', w') keeps its own; we reproduce that (as does
    ``imagecorruptions``). So visit (h, w) writes pixel (h, w) only and reads one
    pixel of the window rows [h-D, h+D-1] x cols [w-D, w+D-1]; two visits can
    interact only if one writes what the other reads, which needs their positions
    within D of each other in both coordinates. Visit (r, c) = (H-D-h, W-D-w) of
    iteration i gets time ``t = i*O + (D+1)*r + c`` with ``O = (D+2)*D + 1``:
    visits sharing a time never interact, and every pair that may interact keeps
    its order. So doing each time step as one batched gather/scatter gives exactly
    the sequential result, in about ``(D+1)*H + W`` steps instead of ``H*W``. With
    D = 1 every iteration is a single step (t = i): a visit reads (h or h-1, w or
    w-1), which no earlier visit of its iteration writes, and a batched step reads
    all its values before writing any.

    Returns:
        ``(order, flat, counts)``: ``order`` (M,) the visits ``(iteration, r, c)``
        flattened, sorted by time; ``flat`` (M,) the pixel index ``h*W + w`` of
        each; ``counts`` the number of visits per step.
    """
    d = max_delta
    rows, cols = height - 2 * d, width - 2 * d
    if rows <= 0 or cols <= 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, []
    k = d + 1
    offset = (k + 1) * d + 1
    i, r, c = torch.meshgrid(torch.arange(iterations), torch.arange(rows), torch.arange(cols), indexing="ij")
    # D = 1: offsets are -1 or 0, so a visit reads a pixel that no earlier visit of
    # its iteration wrote: each iteration is one step (10x fewer steps at 224 px).
    t = (i * offset + k * r + c if d > 1 else i).reshape(-1)
    t_sorted, order = torch.sort(t, stable=True)
    h = (height - d - r).reshape(-1)[order]
    w = (width - d - c).reshape(-1)[order]
    counts = torch.unique_consecutive(t_sorted, return_counts=True)[1].tolist()
    return order.to(device), (h * width + w).to(device), counts


def motion_taps(radius: int, sigma: float, angles_deg: torch.Tensor, height: int, width: int):
    """Shifts and weights of the shift-and-add motion blur, per image.

    Tap i (of ``2 radius + 1``) has weight ``exp(-i^2 / 2 sigma^2)`` (normalised
    over all taps) and shift ``dy = -ceil(i sin(a) - 0.5)``, ``dx = -ceil(i cos(a) - 0.5)``;
    like ``imagecorruptions``, the taps stop at the first shift that leaves the image.

    Returns:
        ``(weights (T,), dy (N, T), dx (N, T), valid (N, T) bool)``.
    """
    n_taps = 2 * radius + 1
    i = np.arange(n_taps, dtype=np.float64)
    wts = np.exp(-(i**2) / (2 * sigma**2)) / (math.sqrt(2 * math.pi) * sigma)
    wts = wts / wts.sum()
    a = np.deg2rad(angles_deg.double().cpu().numpy())[:, None]
    dy = -np.ceil(i[None] * np.sin(a) - 0.5)
    dx = -np.ceil(i[None] * np.cos(a) - 0.5)
    inside = (np.abs(dy) < height) & (np.abs(dx) < width)
    valid = np.cumprod(inside, axis=1).astype(bool)
    dy, dx = np.where(valid, dy, 0), np.where(valid, dx, 0)
    return (
        torch.from_numpy(wts),
        torch.from_numpy(dy.astype(np.int64)),
        torch.from_numpy(dx.astype(np.int64)),
        torch.from_numpy(valid),
    )


def motion_blur_batch(x: torch.Tensor, radius: int, sigma: float, angles_deg: torch.Tensor) -> torch.Tensor:
    """Per-image motion blur: ``out[y, x] = sum_i w_i img[clamp(y - dy_i), clamp(x - dx_i)]``."""
    n, c, h, w = x.shape
    wts, dy, dx, valid = motion_taps(radius, sigma, angles_deg, h, w)
    p = int(max(dy.abs().max(), dx.abs().max())) if n else 0
    # Replicate padding turns the clamped shifts into plain windows of the padded
    # image; adding one window per tap and image beats any batched gather here.
    xp = F.pad(x, (p, p, p, p), mode="replicate") if p else x
    weights = wts.tolist()
    # Tap 0 (no shift, every image) starts the sum: its product has the value of 0 + w x,
    # the first add to zeros, without a pass that writes the zeros (the only difference:
    # a -0.0 input pixel stays -0.0 where 0 + w x gave +0.0, an equal value).
    out = torch.mul(xp[:, :, p : p + h, p : p + w], weights[0])
    if n >= _MOTION_GROUP_IMAGES:
        # Many (small) images: those that share a tap's shift are added in one call.
        keys = np.where(valid.numpy(), ((p - dy) * (2 * p + 1) + (p - dx)).numpy(), -1)
        for i, wt in enumerate(weights[1:], 1):
            order = np.argsort(keys[:, i], kind="stable")
            values, starts = np.unique(keys[order, i], return_index=True)
            for key, group in zip(values.tolist(), np.split(order, starts[1:])):
                if key < 0:
                    continue
                sy, sx = divmod(key, 2 * p + 1)
                window = (slice(None), slice(None), slice(sy, sy + h), slice(sx, sx + w))
                if len(group) == n:
                    out.add_(xp[window], alpha=wt)
                else:
                    index = torch.from_numpy(group).to(x.device)
                    out.index_add_(0, index, xp[window].index_select(0, index), alpha=wt)
        return out
    for img, src, sy, sx, on in zip(out, xp, (p - dy).tolist(), (p - dx).tolist(), valid.tolist()):
        for i, wt in enumerate(weights[1:], 1):
            if not on[i]:
                break
            img.add_(src[:, sy[i] : sy[i] + h, sx[i] : sx[i] + w], alpha=wt)
    return out


_MOTION_GROUP_IMAGES = 32  # from this many images per call (small ones, by the chunk sizes) group by shift


# ------------------------------------------------------------------------ corruptions


@register_corruption(
    "gaussian_blur",
    cifar=[0.4, 0.6, 0.7, 0.8, 1.0],
    tiny=[0.5, 0.75, 1.0, 1.25, 1.5],
    imagenet=[1, 2, 3, 4, 6],
    chunk_values=1 << 20,
)
def gaussian_blur(x: torch.Tensor, sigma: float, rng: ImageRNG) -> torch.Tensor:
    return gaussian_filter(x, sigma)


@register_corruption(
    "defocus_blur",
    cifar=[(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
    tiny=[(0.5, 0.6), (1, 0.1), (1.5, 0.1), (2.5, 0.01), (3, 0.1)],
    imagenet=[(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],
    chunk_values=1 << 18,
)
def defocus_blur(x: torch.Tensor, params, rng: ImageRNG) -> torch.Tensor:
    radius, alias_blur = params
    k = torch.from_numpy(disk_kernel(radius, alias_blur)).to(x.device, x.dtype)
    r = k.shape[0] // 2
    n, c, h, w = x.shape
    y = F.pad(x.reshape(n * c, 1, h, w), (r, r, r, r), mode="reflect")  # reflect-101, like cv2.filter2D
    if k.shape[0] < 9:
        return F.conv2d(y, k.view(1, 1, *k.shape)).view(n, c, h, w)
    # Large disks: correlation through the FFT (cost independent of the radius).
    ph, pw = y.shape[-2:]
    fh, fw = _fft_size(ph), _fft_size(pw)
    kernel = _disk_spectrum(radius, alias_blur, fh, fw, x.dtype, x.device)
    full = torch.fft.irfft2(torch.fft.rfft2(y, s=(fh, fw)) * kernel, s=(fh, fw))
    return full[..., 2 * r : 2 * r + h, 2 * r : 2 * r + w].reshape(n, c, h, w)


@functools.lru_cache(maxsize=16)
def _disk_spectrum(radius: float, alias_blur: float, fh: int, fw: int, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """``rfft2`` of the flipped :func:`disk_kernel` zero-padded to ``(fh, fw)``, computed once
    instead of once per chunk (a quarter of defocus blur's FFTs on 224-px chunks)."""
    k = torch.from_numpy(disk_kernel(radius, alias_blur)).to(device, dtype)
    return torch.fft.rfft2(k.flip(0, 1), s=(fh, fw))


def _fft_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (fast FFT lengths)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


@functools.lru_cache(maxsize=16)
def _glass_steps(height: int, width: int, max_delta: int, iterations: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """:func:`glass_schedule` as numpy: ``flat`` (M,) intp pixel indices and the
    ``[start, end)`` visit range of every wavefront."""
    _, flat, counts = glass_schedule(height, width, max_delta, iterations)
    ends = np.cumsum(counts).tolist()
    return flat.numpy().astype(np.intp), list(zip([0] + ends[:-1], ends))


@functools.lru_cache(maxsize=12)
def _glass_entries(height: int, width: int, max_delta: int, iterations: int, n: int) -> np.ndarray:
    """(M, n) intp, read-only: entry ``flat[k] * n + j`` that visit k of image j writes
    (position-major layout). Cached: a quarter of glass blur's set-up at 224 px
    (about 5 MB per severity for the 7-image chunks there)."""
    flat, _ = _glass_steps(height, width, max_delta, iterations)
    entries = flat.reshape(-1, 1) * n + np.arange(n)
    entries.flags.writeable = False
    return entries


@register_corruption(
    "glass_blur",
    cifar=[(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
    tiny=[(0.1, 1, 1), (0.5, 1, 1), (0.6, 1, 2), (0.7, 2, 1), (0.9, 2, 2)],
    imagenet=[(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],
    chunk_values=1 << 20,
)
def glass_blur(x: torch.Tensor, params, rng: ImageRNG) -> torch.Tensor:
    # Deliberate generalisation: the reference's loop bounds are its fixed image
    # size (32, 64 or 224); here they are the actual H and W, so the whole image
    # is shuffled at any size.
    sigma, max_delta, iterations = params
    n, c, h, w = x.shape
    # The reference quantises to uint8 between the two blurs (np.uint8 truncates);
    # the pixels move as bytes.
    y = to_uint8(gaussian_filter(x, sigma))
    flat, steps = _glass_steps(h, w, max_delta, iterations)
    if steps:
        # One draw per visited position, uniform over the (2D)^2 offsets, i.e. dx
        # and dy independent and uniform in [-D, D-1] as in the reference. Draw k of
        # an image belongs to the k-th position in wavefront order.
        side = 2 * max_delta
        q = rng.small_randint(side * side, len(flat)).numpy()  # (N, M)
        # Position-major layout: entry p * N + j is pixel p of image j, so every
        # wavefront is one contiguous slice [a N, b N) of dst and src for all images.
        a = np.arange(side * side)
        offsets = ((a // side - max_delta) * w + (a % side - max_delta)) * n  # draw -> entry offset
        dst = _glass_entries(h, w, max_delta, iterations, n)  # (M, N) the entry each visit writes
        src = offsets.take(q.T)  # (M, N), the offset of the entry each visit copies
        src += dst
        src = src.reshape(-1)
        dst = dst.reshape(-1)
        # perm[p * N + j]: which source pixel location p of image j shows. numpy's
        # fancy indexing (intp indices) has the lowest per-step overhead here.
        perm = np.repeat(np.arange(h * w, dtype=np.int32), n)
        for first, last in steps:
            perm[dst[first * n : last * n]] = perm[src[first * n : last * n]]
        perm = perm.reshape(h * w, n).T  # (N, H W)
        if x.device.type == "cpu":
            # numpy's take per image and channel: faster than torch.gather here.
            yn = y.reshape(n, c, h * w).numpy()
            moved = np.empty_like(yn)
            for j in range(n):
                index = perm[j].astype(np.intp)
                for k in range(c):
                    yn[j, k].take(index, out=moved[j, k])
            y = torch.from_numpy(moved).view(n, c, h, w)
        else:
            index = torch.from_numpy(np.ascontiguousarray(perm)).to(device=x.device, dtype=torch.int64)
            y = torch.gather(y.reshape(n, c, h * w), 2, index.unsqueeze(1).expand(n, c, h * w)).view(n, c, h, w)
    y = y.to(x.dtype).div_(255.0)
    return gaussian_filter(y, sigma)


@register_corruption(
    "motion_blur",
    cifar=[(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
    tiny=[(10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)],
    imagenet=[(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],
    chunk_values=1 << 20,
)
def motion_blur(x: torch.Tensor, params, rng: ImageRNG) -> torch.Tensor:
    radius, sigma = params
    angles = rng.uniform(1).view(-1) * 90.0 - 45.0
    return motion_blur_batch(x, radius, sigma, angles)


def _zoom_factors(stop: float, step: float) -> tuple[float, ...]:
    # np.arange on purpose: its float round-off decides the reference's factor count.
    return tuple(float(z) for z in np.arange(1, stop, step))


@register_corruption(
    "zoom_blur",
    cifar=[_zoom_factors(m, 0.01) for m in (1.06, 1.11, 1.16, 1.21, 1.26)],
    tiny=[_zoom_factors(m, 0.01) for m in (1.06, 1.11, 1.16, 1.21, 1.26)],
    imagenet=[_zoom_factors(m, s) for m, s in ((1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03))],
    chunk_values=8 * 3 * 224 * 224,  # 8 RGB images at 224 px: the fastest chunk measured (1 thread)
)
def zoom_blur(x: torch.Tensor, factors, rng: ImageRNG) -> torch.Tensor:
    n, c, h, w = x.shape
    if x.dtype == torch.uint8:
        # uint8 in, uint8 out: the float path's values, with the NCHW <-> NHWC
        # transpositions done on bytes (4x cheaper than on floats at 224 px).
        if h * w <= _ZOOM_MATRIX_PIXELS:
            return to_uint8(zoom_blur(x.float().div_(255.0), factors, rng))
        return to_uint8(_zoom_sum(_channels_last(x), factors))[:, : n * c].view(n, c, h, w)  # the caller transposes
    if h * w <= _ZOOM_MATRIX_PIXELS:
        # Small images: the whole (linear) operation as one matrix, a single matmul.
        m = _zoom_matrix(h, w, tuple(factors)).to(x.device, x.dtype)
        return torch.matmul(x.reshape(n * c, h * w), m).view(n, c, h, w)
    return _zoom_blur(x, factors)


zoom_blur.uint8_native = True
_ZOOM_MATRIX_PIXELS = 32 * 32  # beyond, the matrix costs more than the interpolations
# torch's channels-last bilinear kernel is up to 2x faster per channel when the channel
# count is a multiple of 8 (measured with AVX-512): the batch is padded to it.
_ZOOM_CHANNELS = 8


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (1, K, H, W) channels-last float in [0, 1]: all images and channels as
    the channels of one NHWC image, zero-padded to K = N C rounded up to _ZOOM_CHANNELS."""
    n, c, h, w = x.shape
    k = -(-n * c // _ZOOM_CHANNELS) * _ZOOM_CHANNELS
    dtype = torch.float32 if x.dtype == torch.uint8 else x.dtype
    out = torch.empty(1, k, h, w, dtype=dtype, device=x.device, memory_format=torch.channels_last)
    out[:, : n * c].copy_(x.reshape(1, n * c, h, w))  # one transposing (and casting) copy
    out[:, n * c :].zero_()
    return out.div_(255.0) if x.dtype == torch.uint8 else out


def _zoom_blur(x: torch.Tensor, factors) -> torch.Tensor:
    n, c, h, w = x.shape
    # (N, C, H, W) view of the NHWC result: the caller's copy to its output transposes it
    return _zoom_sum(_channels_last(x), factors)[:, : n * c].view(n, c, h, w)


def _zoom_sum(x: torch.Tensor, factors) -> torch.Tensor:
    """The image and its centre zooms, averaged, of a (1, K, H, W) channels-last batch
    (see :func:`_channels_last`), over whose channels torch's bilinear kernel vectorises
    (4x faster than 3 channels per image at 224 px)."""
    # The reference's first factor is 1: its zoom (same size, corners aligned) is the
    # image itself, exactly, so image + zoom is 2 x (exact too) without an interpolation.
    identity = sum(1 for z in factors if z == 1)
    out = x * float(1 + identity)
    for z in factors:
        if z != 1:
            out += centre_zoom(x, z)
    return out.div_(len(factors) + 1)


@functools.lru_cache(maxsize=32)
def _zoom_matrix(h: int, w: int, factors: tuple[float, ...]) -> torch.Tensor:
    """``(H W, H W)`` matrix of zoom blur: row k is the response to pixel k."""
    basis = torch.eye(h * w, dtype=torch.float64).view(h * w, 1, h, w)
    return _zoom_blur(basis, factors).reshape(h * w, h * w)


def centre_zoom(x: torch.Tensor, z: float) -> torch.Tensor:
    """The reference's ``clipped_zoom``: crop the centre ``ceil(side / z)``, zoom by z
    (scipy ``zoom(order=1)``: output ``round(side * z)``, bilinear with aligned
    corners), trim the centre back to the input size. Per axis, so any H x W works
    (the reference assumes square images). Factor 1 returns ``x`` itself: the same
    crop and size with aligned corners is exactly the identity."""
    if z == 1:
        return x
    n, c, h, w = x.shape
    ch, cw = int(math.ceil(h / z)), int(math.ceil(w / z))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[:, :, top : top + ch, left : left + cw]
    if c > 1 and x.is_contiguous(memory_format=torch.channels_last):
        # A dense copy first: the channels-last kernel is 1.5x slower on a strided crop.
        crop = crop.contiguous(memory_format=torch.channels_last)
    oh, ow = int(round(ch * z)), int(round(cw * z))
    y = F.interpolate(crop, size=(oh, ow), mode="bilinear", align_corners=True)
    th, tw = (oh - h) // 2, (ow - w) // 2
    return y[:, :, th : th + h, tw : tw + w]
