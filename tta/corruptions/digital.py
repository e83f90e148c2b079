"""Digital corruptions: brightness, contrast, pixelate, JPEG and (held out) saturate.

Parameter tables: hendrycks/robustness ``make_cifar_c.py``, ``make_tinyimagenet_c.py``
and ``make_imagenet_c.py``. Brightness and saturate use scikit-image's HSV
conversion (in closed form, in torch); pixelate and JPEG are Pillow's, per image.

One-channel images: a grey pixel is the RGB pixel (g, g, g), whose HSV value is
g and saturation 0. So ``brightness`` adds its constant to g (and clips), and
``saturate`` leaves grey images unchanged (the same as ``imagecorruptions``,
which returns the red channel of the converted image, and red equals the value
for a grey pixel of hue 0).
"""
from __future__ import annotations

import functools
import io
import logging
import warnings

import numpy as np
import torch
from PIL import Image

from tta.corruptions._registry import lookup_pairs, register_corruption, to_uint8
from tta.corruptions._rng import ImageRNG

logger = logging.getLogger(__name__)



# ------------------------------------------------------------------- HSV, in closed form
#
# skimage's hsv2rgb(rgb2hsv(x)) with V or S changed has a closed form. Every
# channel is ch = v (1 - s tau_ch) with tau_ch = (v - ch) / (v - m) a function of
# the hue only (v = max, m = min over channels), so with the new value v' or
# saturation s' the channel becomes v' (1 - s tau_ch) or v - s' v tau_ch. A grey
# pixel (v = m) has hue 0 and saturation 0, which hsv2rgb maps to
# (v, v (1 - s'), v (1 - s')). The tests check this against skimage.


def _value_shift(x: torch.Tensor, shift: float, value: torch.Tensor | None = None) -> torch.Tensor:
    """HSV value + ``shift`` of (N, C, H, W) RGB in [0, 1]; ``value``: the channel maximum
    (N, 1, H, W) when given (the tables of ``_brightness_tables``), else ``x.amax(1)``."""
    v = x.amax(1, keepdim=True) if value is None else value
    v_new = (v + shift).clamp(0.0, 1.0)
    ratio = v_new / torch.where(v > 0, v, torch.ones_like(v))
    return torch.where(v > 0, x * ratio, v_new)  # black (h = s = 0) becomes grey v'


def _saturation_map(x: torch.Tensor, scale: float, offset: float) -> torch.Tensor:
    v = x.amax(1, keepdim=True)
    m = x.amin(1, keepdim=True)
    delta = v - m
    grey = delta == 0
    s = torch.where(grey, torch.zeros_like(v), delta / torch.where(v > 0, v, torch.ones_like(v)))
    s_new = (s * scale + offset).clamp(0.0, 1.0)
    tau = (v - x) / torch.where(grey, torch.ones_like(delta), delta)
    out = v - s_new * v * tau
    red = torch.tensor([0.0, 1.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return torch.where(grey, v * (1.0 - s_new * red), out)


# --------------------------------------------------------------------------- corruptions


@register_corruption(
    "brightness",
    cifar=[0.05, 0.1, 0.15, 0.2, 0.3],
    tiny=[0.1, 0.2, 0.3, 0.4, 0.5],
    imagenet=[0.1, 0.2, 0.3, 0.4, 0.5],
    chunk_values=1 << 18,
)
def brightness(x: torch.Tensor, shift: float, rng: ImageRNG) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return _brightness_uint8(x, shift)
    if x.shape[1] == 1:
        return x + shift  # V of a grey pixel is the pixel
    return _value_shift(x, shift)


brightness.uint8_native = True


def _brightness_uint8(x: torch.Tensor, shift: float) -> torch.Tensor:
    """Brightness of uint8 images by table: an output byte depends only on the channel's
    byte and the pixel's largest byte (its HSV value), so the float path's results for
    all 256 x 256 pairs, computed once, are looked up (bit-identical, 2x faster)."""
    rgb, grey = _brightness_tables(float(shift))
    if x.shape[1] == 1:
        return grey.to(x.device)[x.long()]  # the value of a grey pixel is its byte
    value = torch.maximum(torch.maximum(x[:, 0:1], x[:, 1:2]), x[:, 2:3])
    return lookup_pairs(rgb, value, x)


@functools.lru_cache(maxsize=64)
def _brightness_tables(shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The float path's bytes, computed on every case: ``rgb`` (256, 256) uint8, entry
    [v, b] for channel byte b of a pixel whose largest byte is v (b > v never occurs);
    ``grey`` (256,) uint8 for one-channel images."""
    levels = torch.arange(256, dtype=torch.float32).div_(255.0)  # corrupt()'s uint8 -> float
    v = levels.view(1, 1, 256, 1).expand(1, 1, 256, 256)
    b = levels.view(1, 1, 1, 256).expand(1, 1, 256, 256)
    rgb = to_uint8(_value_shift(b, shift, value=v))[0, 0]
    return rgb, to_uint8(levels + shift)


@register_corruption(
    "saturate",
    cifar=[(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],
    tiny=[(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (30, 0.2)],
    imagenet=[(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)],
    chunk_values=1 << 18,
)
def saturate(x: torch.Tensor, params, rng: ImageRNG) -> torch.Tensor:
    if x.shape[1] == 1:
        return x  # no saturation to change (see the module docstring)
    scale, offset = params
    return _saturation_map(x, scale, offset)


@register_corruption(
    "contrast",
    cifar=[0.75, 0.5, 0.4, 0.3, 0.15],
    tiny=[0.4, 0.3, 0.2, 0.1, 0.05],
    imagenet=[0.4, 0.3, 0.2, 0.1, 0.05],
    chunk_values=1 << 18,
)
def contrast(x: torch.Tensor, factor: float, rng: ImageRNG) -> torch.Tensor:
    # The reference averages over height and width, per channel.
    mean = x.mean(dim=(2, 3), keepdim=True)
    return (x - mean) * factor + mean


@register_corruption(
    "pixelate",
    cifar=[0.95, 0.9, 0.85, 0.75, 0.65],
    tiny=[0.9, 0.8, 0.7, 0.6, 0.5],
    imagenet=[0.6, 0.5, 0.4, 0.3, 0.25],
    chunk_values=1 << 20,
)
def pixelate(x: torch.Tensor, scale: float, rng: ImageRNG) -> torch.Tensor:
    # Pillow per image, BOX down and BOX up like the reference (imagecorruptions
    # scales up with NEAREST, which differs only where a box centre falls exactly
    # on a pixel border); the result is 8-bit, as in the reference.
    n, c, h, w = x.shape
    small = (int(w * scale), int(h * scale))
    down = _per_image_pil(x, lambda img: img.resize(small, Image.BOX), size=small)
    rows, cols = _box_upscale_index(small[1], h), _box_upscale_index(small[0], w)
    if rows is None or cols is None:
        return _per_image_pil(down, lambda img: img.resize((w, h), Image.BOX), size=(w, h))
    # Pillow's BOX upscaling copies one source pixel per output pixel: a gather.
    return down.index_select(2, rows.to(x.device)).index_select(3, cols.to(x.device))


@functools.lru_cache(maxsize=64)
def _box_upscale_index(size_in: int, size_out: int) -> torch.Tensor | None:
    """The source pixel of every output pixel of Pillow's BOX resize from ``size_in`` to
    ``size_out`` pixels along an axis (``size_out > size_in``), read off Pillow itself: a
    float ("F") row whose values are the pixel indices, resized. None where an output
    blends several pixels (then pixelate upscales with Pillow)."""
    if size_out <= size_in:
        return None
    probe = Image.fromarray(np.arange(size_in, dtype=np.float32)[None, :], mode="F")
    index = np.asarray(probe.resize((size_out, 1), Image.BOX))[0].astype(np.float64)
    if not np.array_equal(index, np.round(index)) or index.min() < 0 or index.max() > size_in - 1:
        return None
    return torch.from_numpy(index.astype(np.int64))


def _per_image_pil(x: torch.Tensor, fn, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Apply ``fn`` (PIL image -> PIL image of the same mode and of ``size`` = (W, H),
    default the input's) to every image as 8 bits. ``uint8`` in, ``uint8`` out (see
    ``uint8_native`` in ``_registry``); float in [0, 1] in, float out."""
    dtype, x = x.dtype, _to_uint8(x)
    n, c, h, w = x.shape
    ow, oh = size or (w, h)
    if c == 3 and h * w > _PLANES_MIN_PIXELS:
        # Large images: Pillow interleaves the (H, W) planes into RGB and splits them back
        # itself, the same image without a strided NCHW <-> NHWC copy of the batch (which cost
        # as much as the JPEG round trip at 224 px).
        u8 = x.contiguous().cpu().numpy()
        out = np.empty((n, c, oh, ow), dtype=np.uint8)
        for i, planes in enumerate(u8):
            for j, band in enumerate(fn(Image.merge("RGB", [Image.fromarray(p) for p in planes])).split()):
                out[i, j] = np.asarray(band)
        y = torch.from_numpy(out)
    else:  # small images: fewer Python calls per image
        u8 = x.permute(0, 2, 3, 1).contiguous().cpu().numpy()
        out = np.empty((n, oh, ow, c), dtype=np.uint8)
        for i, img in enumerate(u8):
            out[i] = np.asarray(fn(Image.fromarray(img[..., 0] if c == 1 else img))).reshape(out.shape[1:])
        y = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    y = y.to(x.device)
    return y if dtype == torch.uint8 else y.to(dtype).div_(255.0)


_PLANES_MIN_PIXELS = 64 * 64  # measured crossover of the two paths (1 thread)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """``uint8`` as is; floats in [0, 1] (the input of a corruption) as every corruption
    converts them (:func:`~tta.corruptions._registry.to_uint8`, on a copy)."""
    return x if x.dtype == torch.uint8 else to_uint8(x.clone())


# Pillow works on 8-bit images: for uint8 input, corrupt() calls these functions on
# the uint8 batch directly (same result, without two float round trips).
pixelate.uint8_native = True


@register_corruption(
    "jpeg_compression",
    cifar=[80, 65, 58, 50, 40],
    tiny=[65, 58, 50, 40, 25],
    imagenet=[25, 18, 15, 10, 7],
)
def jpeg_compression(x: torch.Tensor, quality: int, rng: ImageRNG) -> torch.Tensor:
    # Pillow's encoder and decoder (the reference's; default 4:2:0 chroma subsampling);
    # one-channel images are stored as greyscale JPEGs. torchvision's libjpeg-turbo writes
    # the same bytes and decodes them to the same pixels (checked once per process, see
    # _torchvision_jpeg) with less per-image overhead: 4x faster than Pillow at 32 px, 3x
    # at 64 px, about equal from 192 px on; so it is used where it matches.
    codecs = _torchvision_jpeg()
    if codecs is not None:
        y = torch.stack(_torchvision_round_trip(codecs, list(_to_uint8(x).cpu()), int(quality))).to(x.device)
        return y if x.dtype == torch.uint8 else y.to(x.dtype).div_(255.0)
    return _per_image_pil(x, functools.partial(_pillow_jpeg, quality=int(quality)))


def _pillow_jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf)


def _torchvision_round_trip(codecs, images: list[torch.Tensor], quality: int) -> list[torch.Tensor]:
    encode, decode = codecs
    with warnings.catch_warnings():  # deprecated since torchvision 0.29 (for torchcodec)
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode(encode(images, quality=quality))


@functools.lru_cache(maxsize=1)
def _torchvision_jpeg():
    """torchvision's ``(encode_jpeg, decode_jpeg)`` if its JPEG round trip gives Pillow's pixels
    on a test set (random RGB and grey images of odd sizes, so with partial 16 x 16 blocks,
    and a smooth one, at qualities 7 to 95), else ``None``. Both use libjpeg(-turbo) with
    the same defaults, but each wheel bundles its own build, and torchvision's image codecs
    are deprecated (since 0.29): where they are missing or differ, Pillow (the reference's
    library) is used."""
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, shape, generator=g, dtype=torch.uint8) for shape in ((3, 37, 45), (1, 29, 33))]
    images.append(torch.nn.functional.interpolate(images[0][None].float(), size=(40, 56), mode="bilinear")[0]
                  .round().to(torch.uint8))
    try:
        from torchvision.io import decode_jpeg, encode_jpeg

        for quality in (7, 25, 50, 80, 95):
            ours = _torchvision_round_trip((encode_jpeg, decode_jpeg), images, quality)
            for img, out in zip(images, ours):
                ref = _per_image_pil(img[None], functools.partial(_pillow_jpeg, quality=quality))[0]
                if not torch.equal(out, ref):
                    logger.warning("torchvision's JPEG round trip differs from Pillow's (quality %d, image %s): "
                                   "jpeg_compression uses Pillow", quality, tuple(img.shape))
                    return None
    except (ImportError, RuntimeError) as e:  # no torchvision image codecs
        logger.info("torchvision JPEG codecs unavailable (%s): jpeg_compression uses Pillow", e)
        return None
    return encode_jpeg, decode_jpeg


jpeg_compression.uint8_native = True
