"""torchvision classifiers by name, with weights from a local file or the torch hub cache.

Nothing is downloaded unless ``download=True`` is passed: named weights (``"DEFAULT"``,
``"IMAGENET1K_V1"``, ...) are looked up in ``torch.hub.get_dir()/checkpoints/`` under the file
name of their published URL, which is where ``torchvision`` itself caches them.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from tta.models.checkpoint import load_weights
from tta.models.normalization import IMAGENET_MEAN, IMAGENET_STD, Normalized

__all__ = ["TORCHVISION_CLASSIFIERS", "build_torchvision_classifier", "resolve_weights_file"]

log = logging.getLogger(__name__)

# The image classifiers of torchvision (not detection, segmentation, video, optical flow).
TORCHVISION_CLASSIFIERS: tuple[str, ...] = tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def _looks_like_path(weights: str | os.PathLike) -> bool:
    text = os.fspath(weights)
    return isinstance(weights, os.PathLike) or os.sep in text or text.endswith((".pt", ".pth", ".ckpt", ".bin"))


def resolve_weights_file(name: str, weights: str | os.PathLike, *, download: bool = False) -> Path:
    """Returns the local file that holds ``weights`` for torchvision model ``name``.

    Args:
        name: a torchvision classifier name, e.g. ``"resnet50"``.
        weights: a local checkpoint path, or a weights name of that model: ``"DEFAULT"``,
            ``"IMAGENET1K_V1"`` or the full ``"ResNet50_Weights.IMAGENET1K_V1"``.
        download: fetch named weights into the hub cache when they are missing there.

    Raises:
        FileNotFoundError: the file is not there (and ``download`` is false).
        ValueError: ``weights`` is not a weights name of this model.
    """
    if _looks_like_path(weights) or Path(weights).is_file():
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        return path
    enum = torchvision.models.get_model_weights(name)
    key = str(weights).split(".")[-1]
    valid = ["DEFAULT", *enum.__members__]
    if key not in valid:
        raise ValueError(f"unknown weights {weights!r} for {name}; valid: {valid} or a local file path")
    entry = enum.DEFAULT if key == "DEFAULT" else enum[key]
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(entry.url)
    if not path.is_file():
        if not download:
            raise FileNotFoundError(
                f"weights {enum.__name__}.{entry.name} not found at {path}; download {entry.url} "
                f"to that path, pass a local file as weights, or pass download=True"
            )
        log.info("downloading %s to %s", entry.url, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(entry.url, os.fspath(path), progress=True)
    return path


def build_torchvision_classifier(
    name: str,
    num_classes: int = 1000,
    in_channels: int = 3,
    weights: str | os.PathLike | None = None,
    *,
    normalize: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    download: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Builds torchvision classifier ``name``; with ``normalize`` it takes [0, 1] images.

    Args:
        name: one of :data:`TORCHVISION_CLASSIFIERS`.
        num_classes: number of outputs.
        in_channels: must be 3 (torchvision classifiers are RGB).
        weights: ``None`` (random init), a local checkpoint path, or a weights name (see
            :func:`resolve_weights_file`). Loaded with ``strict=True``: torchvision's keys, or
            RobustBench's ``normalize_model`` keys (``model.*``, ``normalize.mean/std``),
            nested (``{"state_dict": ...}``) or ``module.``-prefixed.
        normalize: wrap the model in :class:`~tta.models.normalization.Normalized` with
            ``mean``/``std`` (ImageNet statistics by default).
        download: allow fetching named weights into the torch hub cache.
        **kwargs: passed to ``torchvision.models.get_model``.
    """
    if name not in TORCHVISION_CLASSIFIERS:
        raise ValueError(f"unknown torchvision classifier {name!r}; valid: {list(TORCHVISION_CLASSIFIERS)}")
    if in_channels != 3:
        raise ValueError(f"torchvision classifiers take 3 input channels, got in_channels={in_channels}")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if normalize:
        model = Normalized(model, mean, std)
    if weights is not None:  # bare torchvision keys, or RobustBench's normalize_model layout
        load_weights(model, resolve_weights_file(name, weights, download=download))
    return model
