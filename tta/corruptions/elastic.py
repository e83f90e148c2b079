"""Elastic transform, as in the reference generators (with the affine step).

Follows hendrycks/robustness ``make_{cifar,tinyimagenet,imagenet}_c.py`` (our own
code): a random affine map that jitters three points by U(-a, a) pixels, applied
with reflect-101 borders, then a displacement field of uniform noise smoothed by
a Gaussian (sigma, reflecting borders, truncated at 3 sigma) and scaled by alpha,
sampled bilinearly with half-sample reflection. The size-generic pip ports
(imagecorruptions) use an older algorithm without the affine step; we follow the
reference scripts.

Sizes: the scripts give alpha, sigma and the jitter as multiples of the image
size (32, 64, and 244 -- sic -- for 224 px). We multiply the tabulated fractions
by ``min(H, W)`` times the preset's ``size_factor`` (244/224 for imagenet, so a
224 px image gets exactly the reference's pixel values; 1 otherwise).

Both resamplings are ``grid_sample`` calls; the Gaussian smoothing (sigma up to
171 px at 224 px, far beyond the image) is two products with cached (size x size)
matrices that fold scipy's truncated kernel at the borders ("reflect" mode), exact
for any sigma.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tta.corruptions._registry import register_corruption
from tta.corruptions._rng import ImageRNG
from tta.corruptions.blur import _BLOCK, band_blocks

__all__ = ["elastic_transform"]


def _symmetric_index(n: int, pad: int) -> torch.Tensor:
    """Indices of a half-sample symmetric extension (d c b a | a b c d | d c ...) by ``pad``."""
    i = torch.arange(-pad, n + pad) % (2 * n)
    return torch.where(i < n, i, 2 * n - 1 - i)


@functools.lru_cache(maxsize=32)
def _reflect_gaussian_matrix(n: int, sigma: float, truncate: float) -> torch.Tensor:
    """The (n, n) matrix of ``scipy.ndimage.gaussian_filter1d(mode="reflect")``:
    scipy's truncated, normalised kernel folded back at the borders (any sigma,
    even beyond the size)."""
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    source = _symmetric_index(n, radius)  # position p - radius of the extension reads source[p]
    rows = torch.arange(n).view(n, 1).expand(n, 2 * radius + 1)
    cols = source[rows + torch.arange(2 * radius + 1).view(1, -1)]
    m = torch.zeros(n * n, dtype=torch.float64)
    m.index_add_(0, (rows * n + cols).reshape(-1), k.repeat(n))
    return m.view(n, n)


def _gaussian_reflect(f: torch.Tensor, sigma: float, truncate: float = 3.0) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter(f, sigma, mode="reflect", truncate=truncate)``
    of every (H, W) slice of ``f`` (N, H, W), as two matrix products."""
    if sigma <= 0:
        return f
    n, h, w = f.shape
    f = _apply_banded(f, _reflect_gaussian_blocks(h, float(sigma), truncate), dim=1)
    return _apply_banded(f, _reflect_gaussian_blocks(w, float(sigma), truncate), dim=2)




@functools.lru_cache(maxsize=32)
def _reflect_gaussian_blocks(n: int, sigma: float, truncate: float) -> list[tuple[int, int, int, int, torch.Tensor]]:
    """:func:`_reflect_gaussian_matrix` cut into bands of ``_BLOCK`` output rows with
    the input columns they read, ``(out_lo, out_hi, in_lo, in_hi, block)``; one
    dense block when the kernel is wide (small sigmas skip the matrix's zeros)."""
    m = _reflect_gaussian_matrix(n, sigma, truncate)
    if 2 * int(truncate * sigma + 0.5) + _BLOCK >= n // 2:
        return [(0, n, 0, n, m)]
    return band_blocks(m)


def _apply_banded(f: torch.Tensor, blocks, dim: int) -> torch.Tensor:
    """The matrix of ``blocks`` applied along ``dim`` (1: rows, 2: columns) of (N, H, W)."""
    if len(blocks) == 1:
        m = blocks[0][4].to(f.device, f.dtype)
        return m @ f if dim == 1 else f @ m.t()
    out = torch.empty_like(f)
    for lo, hi, a, b, block in blocks:
        block = block.to(f.device, f.dtype)
        if dim == 1:
            out[:, lo:hi] = block @ f[:, a:b]
        else:
            out[:, :, lo:hi] = f[:, :, a:b] @ block.t()
    return out


def _affine_jitter(x: torch.Tensor, jitter: torch.Tensor) -> torch.Tensor:
    """The reference's random affine warp (``cv2.warpAffine`` with reflect-101 borders).

    Args:
        x: (N, C, H, W).
        jitter: (N, 3, 2) pixel offsets (x, y) of the three anchor points.
    """
    n, c, h, w = x.shape
    cx, cy, half = w // 2, h // 2, min(h, w) // 3
    src = torch.tensor([[cx + half, cy + half], [cx + half, cy - half], [cx - half, cy - half]],
                       dtype=torch.float64)
    dst = src.unsqueeze(0) + jitter.to(torch.float64).cpu()
    # The affine map M with M [p, 1] = q for the three point pairs (getAffineTransform).
    a = torch.cat([src, torch.ones(3, 1, dtype=torch.float64)], dim=1)
    m = torch.linalg.solve(a, dst).transpose(1, 2)  # (N, 2, 3)
    lin, shift = m[:, :, :2], m[:, :, 2:]
    inv_lin = torch.linalg.inv(lin)
    inv = torch.cat([inv_lin, -inv_lin @ shift], dim=2)  # output pixel -> source pixel
    # align_corners=True puts pixel centres 0 and size - 1 at -1 and 1, so the
    # reflection padding reflects about them: OpenCV's reflect-101.
    to_unit = torch.tensor([[2 / (w - 1), 0, -1], [0, 2 / (h - 1), -1], [0, 0, 1]], dtype=torch.float64)
    from_unit = torch.linalg.inv(to_unit)
    theta = (to_unit @ torch.cat([inv.cpu(), torch.tensor([[[0.0, 0, 1]]], dtype=torch.float64).expand(n, 1, 3)], 1)
             @ from_unit)[:, :2]
    # The grid of affine_grid(theta, align_corners=True), built as outer sums: an
    # affine map of (u, v) is (a u + c) + b v per output coordinate (affine_grid's
    # batched (H W, 3) x (3, 2) products are several times slower on the CPU).
    u = torch.linspace(-1, 1, w, dtype=torch.float64)
    v = torch.linspace(-1, 1, h, dtype=torch.float64)
    grid = torch.empty(n, h, w, 2, device=x.device, dtype=x.dtype)
    for k in range(2):
        along_w = (theta[:, k, 0:1] * u + theta[:, k, 2:3]).to(x.device, x.dtype)  # (N, W)
        along_h = (theta[:, k, 1:2] * v).to(x.device, x.dtype)  # (N, H)
        torch.add(along_w.view(n, 1, w), along_h.view(n, h, 1), out=grid[..., k])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)


def _displace(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Sample (N, C, H, W) at (row + dy, column + dx), bilinear, half-sample
    reflection (scipy ``map_coordinates(order=1, mode="reflect")``)."""
    n, c, h, w = x.shape
    # align_corners=False: reflection about the image borders (-0.5, size - 0.5);
    # pixel p + d sits at (2 (p + d) + 1) / size - 1.
    base_x = (torch.arange(w, dtype=torch.float64) * 2 + 1) / w - 1
    base_y = (torch.arange(h, dtype=torch.float64) * 2 + 1) / h - 1
    grid = torch.empty(n, h, w, 2, device=x.device, dtype=x.dtype)
    torch.add(base_x.to(x.device, x.dtype).view(1, 1, w), dx, alpha=2 / w, out=grid[..., 0])
    torch.add(base_y.to(x.device, x.dtype).view(1, h, 1), dy, alpha=2 / h, out=grid[..., 1])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


_KEYS = ("alpha", "sigma", "affine")


def _table(rows, size_factor=1.0):
    return [dict(zip(_KEYS, r), size_factor=size_factor) for r in rows]


@register_corruption(
    "elastic_transform",
    cifar=_table([(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)]),
    tiny=_table([(0, 0, 0.08), (0.05, 0.3, 0.06), (0.1, 0.08, 0.06), (0.1, 0.03, 0.03), (0.16, 0.03, 0.02)]),
    imagenet=_table([(2, 0.7, 0.1), (2, 0.08, 0.2), (0.05, 0.01, 0.02), (0.07, 0.01, 0.02), (0.12, 0.01, 0.02)],
                    size_factor=244 / 224),
    chunk_values=1 << 20,
)
def elastic_transform(x: torch.Tensor, params: dict, rng: ImageRNG) -> torch.Tensor:
    """Elastic transform: random affine jitter, then a smooth random displacement.

    Draws per image: the (3, 2) affine jitter from the image's torch generator,
    then the dx and dy noise fields (each (H, W), uniform in [-1, 1)) from its numpy
    generator (:meth:`ImageRNG.uniform32`, shape (2, H, W))."""
    n, c, h, w = x.shape
    size = min(h, w) * params["size_factor"]
    alpha, sigma, jitter = params["alpha"] * size, params["sigma"] * size, params["affine"] * size
    offsets = (rng.uniform(3, 2).to(torch.float64) * 2 - 1) * jitter
    x = _affine_jitter(x, offsets)
    if alpha == 0:
        return x
    # numpy's float32 uniforms (faster than torch's), dx then dy of each image.
    fields = rng.uniform32(2, h, w).to(x.dtype).mul_(2).sub_(1).view(2 * n, h, w)
    fields = _gaussian_reflect(fields, sigma).mul_(alpha).view(n, 2, h, w)
    return _displace(x, fields[:, 0], fields[:, 1])
