"""The ImageNet-C / CIFAR-10-C corruption suite, batched in torch.

:func:`corrupt` applies one of the 15 benchmark corruptions (:data:`CORRUPTIONS`)
or the 4 held-out ones (:data:`EXTRA_CORRUPTIONS`) at severity 1 to 5 to a batch
of images, with the parameter tables of the reference generators of
Hendrycks & Dietterich (2019): ``"cifar"`` (``make_cifar_c.py``, 32 px),
``"tiny"`` (``make_tinyimagenet_c.py``, 64 px) and ``"imagenet"``
(``make_imagenet_c.py``, 224 px). See ``docs/corruptions.md``.
"""
from __future__ import annotations

import logging

import torch

from tta.corruptions._registry import PRESETS, get_corruption, to_uint8
from tta.corruptions._rng import ImageRNG, image_seeds

# Importing the modules registers their corruptions.
from tta.corruptions import noise, blur, digital  # noqa: F401,E402
from tta.corruptions import weather, elastic  # noqa: F401,E402

__all__ = ["CORRUPTIONS", "EXTRA_CORRUPTIONS", "PRESETS", "corrupt", "default_preset"]

logger = logging.getLogger(__name__)

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
"""The 15 benchmark corruptions, in the order of the ImageNet-C paper."""

EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
"""The 4 held-out corruptions, for choosing hyperparameters without the 15."""

SEVERITIES = (1, 2, 3, 4, 5)
MIN_SIZE = 28
# Floating images may exceed [0, 1] by round-off (clipped); beyond half a grey level they are refused.
FLOAT_TOLERANCE = 0.5 / 255

# Work on bounded chunks: large batches are no faster and cost memory. Chunking
# does not change results (every image has its own random stream).
_CHUNK_VALUES = 1 << 22


def default_preset(height: int, width: int) -> str:
    """The preset ``preset=None`` chooses for ``height x width`` images.

    ``min(height, width) <= 48`` -> ``"cifar"`` (CIFAR's 32 px, Fashion-MNIST's 28 px),
    ``<= 128`` -> ``"tiny"`` (Tiny-ImageNet's 64 px), else ``"imagenet"`` (224 px).
    """
    side = min(height, width)
    if side <= 48:
        return "cifar"
    if side <= 128:
        return "tiny"
    return "imagenet"


def _check_name(name: str) -> None:
    valid = CORRUPTIONS + EXTRA_CORRUPTIONS
    if name not in valid:
        raise ValueError(f"unknown corruption {name!r}; valid choices: {', '.join(valid)}")


def corrupt(
    images: torch.Tensor,
    name: str,
    severity: int,
    preset: str | None = None,
    seed: int = 0,
    index_offset: int = 0,
) -> torch.Tensor:
    r"""Apply corruption ``name`` at ``severity`` to a batch of images.

    Image ``i`` of the call (global index ``index_offset + i``) draws its random
    numbers from its own generator, seeded from
    ``(seed, name, severity, index_offset + i)`` through ``numpy.random.SeedSequence``;
    so the result for an image depends only on the image, the corruption, the
    severity, ``seed`` and its index, and corrupting a set in chunks (passing each
    chunk's ``index_offset``) gives exactly the result of one call.

    Args:
        images: ``uint8`` tensor in [0, 255] or floating tensor in [0, 1], of shape
            ``(N, C, H, W)`` or ``(C, H, W)``, ``C`` in {1, 3}, ``H, W >= 28``. Floating
            values up to half a grey level (``0.5 / 255``) outside [0, 1] are round-off and
            clipped; values further out (0..255 floats, normalised images) or NaN raise
            ``ValueError``.
        name: one of :data:`CORRUPTIONS` or :data:`EXTRA_CORRUPTIONS`.
        severity: 1 (mildest) to 5.
        preset: parameter table, one of :data:`PRESETS`; ``None`` chooses by image
            size (see :func:`default_preset`).
        seed: base seed of the random draws.
        index_offset: global index of the first image of the call.

    Returns:
        The corrupted images, with the input's shape, dtype and device. ``uint8``
        results truncate like the reference's ``np.uint8(...)``; floating results
        are clipped to [0, 1] and not quantised (except by JPEG and by glass
        blur's intermediate 8-bit step, which are part of those corruptions).

    Shape:
        - images: :math:`(N, C, H, W)` or :math:`(C, H, W)`
        - output: same as input

    Examples::

        >>> x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
        >>> y = tta.corrupt(x, "fog", severity=3)
        >>> y.shape, y.dtype
        (torch.Size([8, 3, 32, 32]), torch.uint8)
    """
    _check_name(name)
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise ValueError(f"invalid severity {severity!r}; valid choices: {', '.join(map(str, SEVERITIES))}")
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"invalid dtype {images.dtype}; valid choices: torch.uint8 or a floating dtype in [0, 1]")
    if images.dim() not in (3, 4):
        raise ValueError(f"invalid shape {tuple(images.shape)}; valid choices: (N, C, H, W) or (C, H, W)")
    if images.is_floating_point() and images.numel():
        low, high = (v.item() for v in torch.aminmax(images.detach()))
        if not (low >= -FLOAT_TOLERANCE and high <= 1 + FLOAT_TOLERANCE):  # also refuses NaN
            raise ValueError(
                f"floating images must lie in [0, 1], got values in [{low:g}, {high:g}]; pass uint8 "
                f"images in 0..255, or divide 0..255 floats by 255 (undo any mean/std normalisation)"
            )
    single = images.dim() == 3
    x = images.unsqueeze(0) if single else images
    n, c, h, w = x.shape
    if c not in (1, 3):
        raise ValueError(f"invalid number of channels {c} in shape {tuple(images.shape)}; valid choices: 1, 3")
    if h < MIN_SIZE or w < MIN_SIZE:
        raise ValueError(f"image size {h}x{w} is too small; height and width must be at least {MIN_SIZE}")
    if preset is None:
        preset = default_preset(h, w)
    elif preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid choices: {', '.join(PRESETS)}")
    if isinstance(index_offset, bool) or not isinstance(index_offset, int) or index_offset < 0:
        raise ValueError(f"invalid index_offset {index_offset!r}; it must be a non-negative int")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"invalid seed {seed!r}; it must be a non-negative int")

    entry = get_corruption(name)
    params = entry.params[preset][severity - 1]
    out = torch.empty_like(x)
    # Per-value corruptions run faster on chunks that fit in the cache; those with
    # per-chunk sequential work (glass blur's wavefronts) on large ones.
    chunk = max(1, (entry.chunk_values or _CHUNK_VALUES) // (c * h * w))
    for start in range(0, n, chunk):
        xs = x[start : start + chunk]
        first = index_offset + start
        indices = range(first, first + xs.shape[0])
        rng = ImageRNG(lambda ix=indices: image_seeds(seed, name, severity, ix), device=xs.device)
        if xs.dtype == torch.uint8 and getattr(entry.fn, "uint8_native", False):
            out[start : start + chunk] = entry.fn(xs, params, rng)  # 8-bit corruptions (Pillow)
            continue
        # A fresh float32 copy: corruption functions may work in place, and float
        # inputs a hair outside [0, 1] (round-off of a normalisation) are clipped.
        xf = xs.float().div_(255.0) if xs.dtype == torch.uint8 else xs.float().clamp(0.0, 1.0)
        y = entry.fn(xf, params, rng)
        if x.dtype == torch.uint8:
            to_uint8(y, out[start : start + chunk])  # in place on the fresh y
        else:
            out[start : start + chunk] = y.clamp_(0.0, 1.0)
    return out[0] if single else out
