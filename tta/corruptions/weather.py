"""Weather-like corruptions: snow, frost, fog and spatter, batched in torch.

The algorithms and parameter tables follow the reference generators of
Hendrycks & Dietterich (2019) (hendrycks/robustness, ``ImageNet-C/create_c/
make_{cifar,tinyimagenet,imagenet}_c.py``); the code is our own. Every random
draw comes from the image's own generator (:class:`~tta.corruptions._rng.ImageRNG`),
so an image's result never depends on the rest of the batch.

Deliberate differences from the reference (also in ``docs/corruptions_weather.md``):

* snow: ImageMagick's motion blur is replaced by the shift-and-add blur of the
  size-generic ports (a one-sided Gaussian kernel along a random angle, edge
  replication), which matches it within about one grey level.
* frost: the textures ship re-encoded (``textures/README.md``); when the scaled
  texture is smaller than the image, it is scaled up just enough (the reference
  scripts crash there).
* fog: the plasma map has the next power of two of the larger image side
  (32 / 64 / 256 at the reference sizes, as in the scripts).
* spatter: OpenCV's Canny, 5x5 chamfer distance transform, box blurs,
  histogram equalisation and filter2D are re-implemented in torch and reproduce
  OpenCV's water shading exactly (tested); Canny's hysteresis labels connected
  components with scipy. The liquid layer's uint8 cast wraps above 255 as numpy's
  does on x86 (the reference behaviour at the small cifar/tiny blurs).
* grayscale (C = 1): the snow brightening uses the image itself as its grey
  version; frost uses grey textures (ITU-R 601 weights); spatter adds the grey
  value of its colour (water) or blends with the grey mud colour.
"""
from __future__ import annotations

import functools
import importlib.resources
import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from tta.corruptions._registry import register_corruption
from tta.corruptions._rng import ImageRNG
from tta.corruptions.blur import centre_zoom, correlate1d, gaussian_filter, motion_blur_batch

__all__ = ["snow", "frost", "fog", "spatter"]

# ITU-R 601 luma weights, as OpenCV's RGB2GRAY uses them.
_LUMA = (0.299, 0.587, 0.114)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, 1, H, W) luma; a one-channel image is its own grey."""
    if x.shape[1] == 1:
        return x
    grey = x[:, 0:1] * _LUMA[0]  # one-channel passes: 3x less traffic than a weighted channel sum
    return grey.add_(x[:, 1:2], alpha=_LUMA[1]).add_(x[:, 2:3], alpha=_LUMA[2])


# /////////////// snow ///////////////


_SNOW_KEYS = ("mu", "sigma", "zoom", "threshold", "blur_radius", "blur_sigma", "blend")


def _snow_table(rows):
    return [dict(zip(_SNOW_KEYS, r)) for r in rows]


_SNOW_CIFAR = [(0.1, 0.2, 1, 0.6, 8, 3), (0.1, 0.2, 1, 0.5, 10, 4), (0.15, 0.3, 1.75, 0.55, 10, 4),
               (0.25, 0.3, 2.25, 0.6, 12, 6), (0.3, 0.3, 1.25, 0.65, 14, 12)]


@register_corruption(
    "snow",
    cifar=_snow_table([r + (b,) for r, b in zip(_SNOW_CIFAR, (0.95, 0.9, 0.9, 0.85, 0.8))]),
    tiny=_snow_table([r + (b,) for r, b in zip(_SNOW_CIFAR, (0.8, 0.8, 0.7, 0.65, 0.6))]),
    imagenet=_snow_table([(0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
                          (0.55, 0.3, 4, 0.9, 12, 8, 0.7), (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
                          (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)]),
    chunk_values=1 << 20,
)
def snow(x: torch.Tensor, params: dict, rng: ImageRNG) -> torch.Tensor:
    """Snow: a zoomed, thresholded, motion-blurred noise layer (and its 180-degree
    rotation) added to a greyed, brightened copy of the image."""
    n, c, h, w = x.shape
    layer = rng.normal(h, w).to(x.dtype).unsqueeze(1) * params["sigma"] + params["mu"]
    layer = centre_zoom(layer, params["zoom"])
    layer = layer.masked_fill(layer < params["threshold"], 0.0)
    # The reference stores the layer as an 8-bit image before and after the blur.
    layer = layer.clamp_(0, 1).mul_(255).floor_().div_(255)
    angle = rng.uniform(1).view(n) * 90 - 135  # U(-135, -45) degrees
    layer = motion_blur_batch(layer, params["blur_radius"], params["blur_sigma"], angle)
    layer = layer.mul_(255).round_().div_(255)
    # blend x + (1 - blend) max(x, 1.5 grey + 0.5), as a lerp from the brightened image
    # towards x (three passes over the full-size tensor).
    out = torch.maximum(x, _gray(x).mul(1.5).add_(0.5)).lerp_(x, params["blend"])  # _gray may return x
    return out.add_(layer.add_(layer.flip(-2, -1)))


# /////////////// frost ///////////////

# The reference lists six textures; frost2.png and frost3.png are pixel-identical,
# so one file serves both. The scripts draw the index with randint(5): the sixth
# texture is never used, and neither here.
_FROST_FILES = ("frost1.jpg", "frost2.jpg", "frost2.jpg", "frost4.jpg", "frost5.jpg", "frost6.jpg")
_FROST_USED = 5


@functools.lru_cache(maxsize=None)
def _frost_texture_uint8(index: int) -> torch.Tensor:
    """Texture ``index`` as a uint8 (3, h, w) RGB tensor, decoded once."""
    ref = importlib.resources.files("tta.corruptions") / "textures" / _FROST_FILES[index]
    data = ref.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _frost_scale(index: int, scale: float, h: int, w: int) -> float:
    """The preset's texture scale, enlarged (keeping the aspect) until a crop of
    (h, w) has at least one possible offset in both axes (the scripts crash there)."""
    th0, tw0 = _frost_texture_uint8(index).shape[-2:]
    return max(scale, (h + 1) / th0, (w + 1) / tw0)


def _frost_size(index: int, scale: float, h: int, w: int) -> tuple[int, int]:
    """Size of texture ``index`` after scaling for (h, w) images (OpenCV rounds)."""
    th0, tw0 = _frost_texture_uint8(index).shape[-2:]
    s = _frost_scale(index, scale, h, w)
    return max(round(th0 * s), h + 1), max(round(tw0 * s), w + 1)


def _linear_resize_matrix(n_in: int, n_out: int, scale: float) -> torch.Tensor:
    """(n_out, n_in) matrix of OpenCV's INTER_LINEAR resize by ``scale`` (given as
    ``fx``: source x = (x + 1/2) / scale - 1/2, clamped at the borders, no antialias)."""
    src = (torch.arange(n_out, dtype=torch.float64) + 0.5) / scale - 0.5
    left = torch.floor(src)
    frac = src - left
    frac = torch.where(src < 0, 0.0, frac)
    left = left.clamp(min=0)
    frac = torch.where(left >= n_in - 1, 0.0, frac)
    left = left.clamp(max=n_in - 1).long()
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m[rows, left] += 1 - frac
    m[rows, (left + 1).clamp(max=n_in - 1)] += frac
    return m


@functools.lru_cache(maxsize=64)
def _frost_texture(index: int, scale: float, size: tuple[int, int], channels: int, device: str) -> torch.Tensor:
    """Texture ``index`` resized by ``scale`` to ``size`` as float (channels, h, w)
    in [0, 1], cached per (texture, scale, size, channels, device)."""
    tex = _frost_texture_uint8(index).double()
    if tuple(tex.shape[-2:]) != size:
        # cv2.resize(frost, (0, 0), fx=scale, fy=scale) of the reference scripts.
        rows = _linear_resize_matrix(tex.shape[1], size[0], scale)
        cols = _linear_resize_matrix(tex.shape[2], size[1], scale)
        tex = (rows @ tex @ cols.t()).round().clamp(0, 255)
    tex = (tex / 255).float()
    if channels == 1:
        tex = _gray(tex[None])[0]
    return tex.to(device)


_FROST_KEYS = ("image_weight", "frost_weight", "scale")


def _frost_table(rows, scale):
    return [dict(zip(_FROST_KEYS, r + (scale,))) for r in rows]


@register_corruption(
    "frost",
    cifar=_frost_table([(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)], 0.2),
    tiny=_frost_table([(1, 0.3), (0.9, 0.4), (0.8, 0.45), (0.75, 0.5), (0.7, 0.55)], 0.3),
    imagenet=_frost_table([(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)], 1.0),
    chunk_values=1 << 20,
)
def frost(x: torch.Tensor, params: dict, rng: ImageRNG) -> torch.Tensor:
    """Frost: a weighted sum of the image and a random crop of a frost texture.

    The texture is one of the first five (uniformly), scaled by the preset's
    factor (0.2 cifar, 0.3 tiny, 1 imagenet), cropped at a uniform offset."""
    n, c, h, w = x.shape
    index = rng.randint(0, _FROST_USED, 1).view(n).cpu()
    offset = rng.uniform(2).to("cpu", torch.float64)  # (N, 2): row, column fractions
    crops = torch.empty_like(x)
    dev = str(x.device)
    for t in index.unique().tolist():
        sel = (index == t).nonzero().view(-1)  # on the CPU, like the crop indices
        th, tw = _frost_size(t, params["scale"], h, w)
        tex = _frost_texture(t, _frost_scale(t, params["scale"], h, w), (th, tw), c, dev).to(x.dtype)
        # randint(0, th - h) per image, drawn as floor(u * (th - h)).
        tops = torch.floor(offset[sel, 0] * (th - h)).long().tolist()
        lefts = torch.floor(offset[sel, 1] * (tw - w)).long().tolist()
        for j, top, left in zip(sel.tolist(), tops, lefts):  # slice copies beat a gather
            crops[j] = tex[:, top:top + h, left:left + w]
    return crops.mul_(params["frost_weight"]).add_(x, alpha=params["image_weight"])


# /////////////// fog ///////////////


def _next_power_of_2(v: int) -> int:
    return 1 << (int(v) - 1).bit_length()


def _plasma_fractal(u: torch.Tensor, map_size: int, decay: float) -> torch.Tensor:
    """Diamond-square plasma maps, one per row of ``u``, normalised to [0, 1].

    Args:
        u: (N, map_size**2 - 1) uniform draws in [0, 1), consumed in the reference's
            order (per level: squares, then the two diamond sets, row-major).
        map_size: a power of two.
        decay: the factor by which the random amplitude shrinks per level.

    Returns:
        (N, map_size, map_size) float32 (the size-generic port computes in float32 too).
    """
    n = u.shape[0]
    noise = u.to(torch.float32).mul(2).sub_(1)  # U(-1, 1), without touching u
    used, wibble = 0, 100.0
    # The map at the current level: the corner grid, contiguous (N, k, k); each
    # level computes the centres and the edge midpoints and writes them, with the
    # corners, into the (N, 2k, 2k) grid of the next level. Neighbours across the
    # (wrapping) border are slices of a copy extended by one row and column, in
    # the reference's order of additions.
    corners = torch.zeros(n, 1, 1, dtype=torch.float32, device=u.device)
    for _ in range(int(math.log2(map_size))):
        k = corners.shape[1]

        def draw() -> torch.Tensor:
            nonlocal used
            out = noise[:, used:used + k * k].view(n, k, k) * (wibble * wibble)  # wibble * U(-wibble, wibble)
            used += k * k
            return out

        c = _wrap_extend(corners, after=True)  # c[i, j] = corners[(i, j) mod k]
        squares = c[:, :k, : k + 1] + c[:, 1:, : k + 1]  # corners[i, j] + corners[i + 1, j]
        centres = (squares[:, :, :k] + squares[:, :, 1:]).div_(4).add_(draw())
        e = _wrap_extend(centres, after=False)  # e[i + 1, j + 1] = centres[(i, j) mod k]
        tops = (centres + e[:, :k, 1:]).add_(corners).add_(c[:, :k, 1:]).div_(4).add_(draw())
        lefts = (centres + e[:, 1:, :k]).add_(corners).add_(c[:, 1:, :k]).div_(4).add_(draw())
        grid = torch.empty(n, 2 * k, 2 * k, dtype=torch.float32, device=u.device)
        grid[:, 0::2, 0::2] = corners
        grid[:, 0::2, 1::2] = tops
        grid[:, 1::2, 0::2] = lefts
        grid[:, 1::2, 1::2] = centres
        corners = grid
        wibble /= decay
    m = corners - corners.amin(dim=(1, 2), keepdim=True)
    return m / m.amax(dim=(1, 2), keepdim=True)


def _wrap_extend(a: torch.Tensor, after: bool) -> torch.Tensor:
    """(N, k, k) -> (N, k + 1, k + 1) with the first row and column repeated after
    the last (``after``) or the last ones before the first (periodic neighbours)."""
    if after:
        a = torch.cat([a, a[:, :1]], dim=1)
        return torch.cat([a, a[:, :, :1]], dim=2)
    a = torch.cat([a[:, -1:], a], dim=1)
    return torch.cat([a[:, :, -1:], a], dim=2)


_FOG_KEYS = ("strength", "decay")


@register_corruption(
    "fog",
    cifar=[dict(zip(_FOG_KEYS, r)) for r in [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)]],
    tiny=[dict(zip(_FOG_KEYS, r)) for r in [(0.4, 3), (0.7, 3), (1, 2.5), (1.5, 2), (2, 1.75)]],
    imagenet=[dict(zip(_FOG_KEYS, r)) for r in [(1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)]],
    chunk_values=1 << 20,
)
def fog(x: torch.Tensor, params: dict, rng: ImageRNG) -> torch.Tensor:
    """Fog: a plasma fractal (map side: next power of two of the larger image side,
    i.e. 32 / 64 / 256 at the reference sizes) added, then rescaled to the image's
    maximum."""
    n, c, h, w = x.shape
    size = _next_power_of_2(max(h, w))
    plasma = _plasma_fractal(rng.uniform32(size * size - 1), size, params["decay"])  # numpy's uniforms: faster
    strength = params["strength"]
    top = x.amax(dim=(1, 2, 3), keepdim=True)
    return x.add_(plasma[:, None, :h, :w], alpha=strength).mul_(top / (top + strength))  # in place on the copy


# /////////////// spatter ///////////////

_TG22 = int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)  # tan(22.5 deg) in Q15, as OpenCV


def _canny(img: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """OpenCV ``Canny(img, low, high)`` (3x3 Sobel with replicated borders, L1
    magnitude, OpenCV's fixed-point direction sectors, 8-connected hysteresis) of
    (N, H, W) integer-valued images; returns a bool edge map."""
    x = F.pad(img.to(torch.float32).unsqueeze(1), (1, 1, 1, 1), mode="replicate").squeeze(1)
    smooth = torch.tensor([1.0, 2.0, 1.0])
    diff = torch.tensor([-1.0, 0.0, 1.0])
    dx = correlate1d(correlate1d(x, smooth, 1), diff, 2).to(torch.int32)
    dy = correlate1d(correlate1d(x, diff, 1), smooth, 2).to(torch.int32)
    ax, ay = dx.abs(), dy.abs()
    mag = ax + ay
    p = F.pad(mag, (1, 1, 1, 1))  # zero outside the image, as OpenCV's buffer
    tg22x = ax * _TG22
    y = ay << 15
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg22x + (ax << 16))
    same_sign = (dx ^ dy) >= 0
    # Neighbours along the gradient: (before, after) with "mag > before, mag >= after"
    # across rows/columns and strict on diagonals, as OpenCV.
    keep = torch.where(
        horizontal, (mag > p[:, 1:-1, :-2]) & (mag >= p[:, 1:-1, 2:]),
        torch.where(vertical, (mag > p[:, :-2, 1:-1]) & (mag >= p[:, 2:, 1:-1]),
                    torch.where(same_sign, (mag > p[:, :-2, :-2]) & (mag > p[:, 2:, 2:]),
                                (mag > p[:, :-2, 2:]) & (mag > p[:, 2:, :-2]))))
    keep &= mag > int(math.floor(low))
    strong = keep & (mag > int(math.floor(high)))
    # Hysteresis: keep the 8-connected components of candidates that hold a strong
    # pixel (one labelling call; the structure never links different images).
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    labels, count = ndimage.label(keep.cpu().numpy(), structure=structure)
    if count == 0:
        return torch.zeros_like(keep)
    hit = np.zeros(count + 1, dtype=bool)
    hit[labels[strong.cpu().numpy()]] = True
    hit[0] = False
    return torch.from_numpy(hit[labels]).to(img.device)


# OpenCV's 5x5 chamfer mask for DIST_L2: steps (1, 0), (1, 1), (2, 1) cost 1, 1.4f, 2.1969f.
_CHAMFER_A, _CHAMFER_B, _CHAMFER_C = 1.0, float(np.float32(1.4)), float(np.float32(2.1969))
_CHAMFER_INF = 1e20


def _chamfer_distance(edges: torch.Tensor) -> torch.Tensor:
    """OpenCV ``distanceTransform(src, DIST_L2, 5)`` with ``src`` zero on ``edges``:
    the 5x5 chamfer distance to the nearest edge pixel, (N, H, W) float32.

    The two raster scans run row by row, vectorised over images and columns; the
    in-row recurrence t[j] = min(t0[j], t[j-1] + a) is a running minimum of
    t0[k] - a k. OpenCV (4.x/5.x) accumulates in float32; we add in float64 and
    round once, which agrees to a few float32 ulps (checked against OpenCV in the tests).
    """
    n, h, w = edges.shape
    dev = edges.device
    a, b, c, inf = _CHAMFER_A, _CHAMFER_B, _CHAMFER_C, _CHAMFER_INF
    # Step costs from the previous row (offsets -2..2) and the row before it.
    step = torch.tensor([c, b, a, b, c, inf, c, inf, c, inf], dtype=torch.float64, device=dev)
    ramp = torch.arange(w, device=dev, dtype=torch.float64) * a
    out = torch.empty(n, h, w, dtype=torch.float64, device=dev)
    blank = torch.full((n, w + 4), inf, dtype=torch.float64, device=dev)

    def scan(order, first: bool) -> None:
        near, far = blank, blank  # the last two finished rows, padded by 2 columns
        for i in order:
            windows = torch.cat([near.unfold(1, 5, 1), far.unfold(1, 5, 1)], dim=2)  # (N, W, 10)
            t = (windows + step).amin(dim=2)
            if first:
                t = torch.where(edges[:, i], 0.0, t)
                t = torch.cummin(t - ramp, dim=1).values + ramp
            else:
                t = torch.minimum(t, out[:, i])
                t = torch.cummin((t + ramp).flip(1), dim=1).values.flip(1) - ramp
            out[:, i] = t
            near, far = F.pad(t, (2, 2), value=inf), near

    scan(range(h), True)
    scan(range(h - 1, -1, -1), False)
    return out.to(torch.float32)


def _box3(x: torch.Tensor) -> torch.Tensor:
    """3x3 mean with reflect-101 borders (OpenCV ``blur``) of (N, H, W), computed
    as OpenCV does: the sum in float64, times 1/9."""
    p = F.pad(x.unsqueeze(1), (1, 1, 1, 1), mode="reflect").squeeze(1).double()
    ones = torch.ones(3)
    total = correlate1d(correlate1d(p, ones, 1), ones, 2)
    return (total * (1.0 / 9)).to(x.dtype)


def _equalize_hist(img: torch.Tensor) -> torch.Tensor:
    """OpenCV ``equalizeHist`` of (N, H, W) integer-valued images in [0, 255]."""
    n = img.shape[0]
    v = img.reshape(n, -1).long()
    total = v.shape[1]
    hist = torch.zeros(n, 256, dtype=torch.long, device=img.device).scatter_add_(1, v, torch.ones_like(v))
    first = (hist > 0).to(torch.uint8).argmax(1, keepdim=True)  # the lowest occupied level
    base = hist.gather(1, first)
    scale = 255.0 / (total - base).clamp(min=1).to(torch.float32)
    lut = torch.round((hist.cumsum(1) - base).to(torch.float32) * scale).clamp(0, 255)
    lut = torch.where(torch.arange(256, device=img.device) <= first, torch.zeros_like(lut), lut)
    # A constant image stays at its level.
    lut = torch.where(base == total, first.to(lut.dtype).expand_as(lut), lut)
    return lut.gather(1, v).view_as(img)


def _water_mask(layer: torch.Tensor) -> torch.Tensor:
    """The water drops' shading mask (before scaling) of a thresholded liquid layer (N, H, W)."""
    # The reference's astype(uint8): truncation, and values above 255 wrap around
    # (x86 behaviour of numpy's cast; the smoothed layer exceeds 1 at small blurs).
    liquid = torch.remainder(torch.floor(layer * 255), 256)
    edges = _canny(liquid, 50, 150)
    dist = _chamfer_distance(edges).clamp(max=20.0)
    dist = torch.floor(_box3(dist))  # blur, then astype(uint8)
    dist = _equalize_hist(dist)
    relief = torch.tensor([[-2.0, -1, 0], [-1, 1, 1], [0, 1, 2]], device=layer.device)
    padded = F.pad(dist.unsqueeze(1), (1, 1, 1, 1), mode="reflect").squeeze(1)
    h, w = dist.shape[-2:]
    dist = sum(float(relief[i, j]) * padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3) if relief[i, j])
    dist = dist.round().clamp(0, 255)  # filter2D to CV_8U saturates
    dist = torch.round(_box3(dist))  # blur of uint8 rounds
    return liquid * dist


_SPATTER_KEYS = ("mu", "sigma", "blur_sigma", "threshold", "intensity", "mode")
_WATER = torch.tensor([175.0, 238.0, 238.0]) / 255  # pale turquoise
_MUD = torch.tensor([63.0, 42.0, 20.0]) / 255  # brown


def _spatter_table(rows):
    return [dict(zip(_SPATTER_KEYS, r)) for r in rows]


@register_corruption(
    "spatter",
    cifar=_spatter_table([(0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0),
                          (0.65, 0.3, 1, 0.69, 0.5, 0), (0.65, 0.1, 0.7, 0.69, 0.6, 1),
                          (0.65, 0.1, 0.5, 0.68, 0.6, 1)]),
    tiny=_spatter_table([(0.62, 0.1, 0.7, 0.7, 0.6, 0), (0.65, 0.1, 0.8, 0.7, 0.6, 0),
                         (0.65, 0.3, 1, 0.69, 0.6, 0), (0.65, 0.1, 0.7, 0.68, 0.6, 1),
                         (0.65, 0.1, 0.5, 0.67, 0.6, 1)]),
    imagenet=_spatter_table([(0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0),
                             (0.65, 0.3, 2, 0.68, 0.5, 0), (0.65, 0.3, 1, 0.65, 1.5, 1),
                             (0.67, 0.4, 1, 0.65, 1.5, 1)]),
)
def spatter(x: torch.Tensor, params: dict, rng: ImageRNG) -> torch.Tensor:
    """Spatter: water drops (mode 0: shaded turquoise highlights) or mud (mode 1:
    brown patches) from a blurred, thresholded noise layer."""
    n, c, h, w = x.shape
    layer = rng.normal(h, w).to(x.dtype).unsqueeze(1) * params["sigma"] + params["mu"]
    layer = gaussian_filter(layer, params["blur_sigma"])
    threshold = params["threshold"]
    layer = torch.where(layer < threshold, torch.zeros_like(layer), layer).squeeze(1)
    if params["mode"] == 0:
        m = _water_mask(layer)
        peak = m.amax(dim=(1, 2), keepdim=True)
        m = torch.where(peak > 0, m / peak.clamp(min=1e-12), torch.zeros_like(m)) * params["intensity"]
        add = m.unsqueeze(1) * _WATER.to(x).view(1, 3, 1, 1)
        if c == 1:
            add = _gray(add.clamp(0, 1))
        return x + add
    m = gaussian_filter((layer > threshold).to(x.dtype).unsqueeze(1), params["intensity"])
    m = torch.where(m < 0.8, torch.zeros_like(m), m)
    mud = _MUD.to(x).view(1, 3, 1, 1)
    if c == 1:
        mud = _gray(mud)
    return x * (1 - m) + mud * m
