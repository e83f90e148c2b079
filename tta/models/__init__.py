"""Models: a small registry of classifier builders, checkpoints and the shipped source model.

Examples::

    >>> tta.models.list_models()[:3]
    >>> model = tta.models.get_model("resnet20", num_classes=10, in_channels=1)
    >>> model = tta.models.get_model("resnet50", num_classes=1000, weights="IMAGENET1K_V2")
    >>> model = tta.models.load_pretrained("fashion_mnist")   # eval mode, takes [0, 1] input
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

from torch import nn

from tta.models.checkpoint import CheckpointError, extract_state_dict, load_checkpoint, save_checkpoint
from tta.models.normalization import IMAGENET_MEAN, IMAGENET_STD, InputNormalization, Normalized

__all__ = [
    "register_model",
    "get_model",
    "list_models",
    "load_pretrained",
    "pretrained_info",
    "load_checkpoint",
    "save_checkpoint",
    "extract_state_dict",
    "CheckpointError",
    "InputNormalization",
    "Normalized",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

_MODELS: dict[str, Callable[..., nn.Module]] = {}
F = TypeVar("F", bound=Callable[..., nn.Module])


def register_model(name: str) -> Callable[[F], F]:
    """Decorator that registers a model builder under ``name``.

    The builder takes keyword arguments (``num_classes``, ``in_channels``, ``weights``, ...)
    and returns an ``nn.Module`` that takes [0, 1] images.

    Raises:
        ValueError: ``name`` is already registered.
    """

    def wrapper(builder: F) -> F:
        if name in _MODELS:
            raise ValueError(f"a model is already registered under the name {name!r}")
        _MODELS[name] = builder
        return builder

    return wrapper


def get_model(name: str, **kwargs) -> nn.Module:
    """Builds registered model ``name`` with ``kwargs`` (e.g. ``num_classes``, ``weights``).

    Raises:
        ValueError: unknown name; the message lists the valid names.
    """
    try:
        builder = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid: {list_models()}") from None
    return builder(**kwargs)


def list_models() -> list[str]:
    """Returns the registered model names, sorted."""
    return sorted(_MODELS)


def _register_builtin() -> None:
    from tta.models import resnet, torchvision as tv, wideresnet

    for builder in (resnet.resnet8, resnet.resnet14, resnet.resnet20, resnet.resnet32, resnet.resnet44, resnet.resnet56):
        register_model(builder.__name__)(builder)
    register_model("wide_resnet28_10")(wideresnet.wide_resnet28_10)
    for name in tv.TORCHVISION_CLASSIFIERS:
        register_model(name)(functools.partial(tv.build_torchvision_classifier, name))


_register_builtin()

from tta.models.shipped import load_pretrained, pretrained_info  # noqa: E402
