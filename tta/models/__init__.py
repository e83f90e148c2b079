"""Models: a small registry of classifier builders, checkpoints and the shipped source model.

Examples::

    >>> tta.models.list_models()[:3]
    >>> model = tta.models.get_model("resnet20", num_classes=10, in_channels=1)
    >>> model = tta.models.get_model("resnet50", num_classes=1000, weights="IMAGENET1K_V2")
    >>> model = tta.models.load_pretrained("fashion_mnist")   # eval mode, takes [0, 1] input
    >>> tta.models.model_info(model)["test_accuracy"]
    0.943
"""
from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from tta.models.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    attach_metadata,
    extract_state_dict,
    load_checkpoint,
    load_weights,
    model_info,
    read_metadata,
    save_checkpoint,
)
from tta.models.normalization import IMAGENET_MEAN, IMAGENET_STD, InputNormalization, Normalized

__all__ = [
    "register_model",
    "get_model",
    "list_models",
    "load_pretrained",
    "pretrained_info",
    "model_info",
    "load_checkpoint",
    "save_checkpoint",
    "extract_state_dict",
    "load_weights",
    "CheckpointError",
    "UnsafeCheckpointError",
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
        TypeError: ``name`` is not a str.
        ValueError: ``name`` is empty or already registered.
    """

    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {name!r} ({type(name).__name__})")
    if not name:
        raise ValueError("model name must be non-empty, got ''")

    def wrapper(builder: F) -> F:
        if name in _MODELS:
            raise ValueError(f"a model is already registered under the name {name!r}")
        _MODELS[name] = builder
        return builder

    return wrapper


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds registered model ``name`` with ``kwargs`` (e.g. ``num_classes``, ``weights``).

    When ``weights`` is a tta checkpoint (``{"state_dict", "tta"}``, written by
    ``scripts/train_source.py``; also the older ``{"state_dict", "model": {"name", "kwargs"}}``
    layout) the model is rebuilt with the recorded builder kwargs (input ``mean``/``std``,
    ``num_classes``, ``in_channels``, ...), loaded strictly, and carries the recorded metadata
    (:func:`model_info`). Any other ``weights`` (a plain state_dict file, a torchvision weights
    name) goes to the builder as before, and the model has no metadata.

    Raises:
        TypeError: ``name`` is not a str; the message lists the valid names.
        ValueError: unknown name (the message lists the valid ones); or a tta checkpoint
            records another architecture, or a kwarg the caller gives contradicts the recorded
            one (both values are named); ``num_classes``, ``in_channels``, ``mean`` or ``std``
            that the checkpoint does not record may only restate the builder's default.
        CheckpointError: the weights file is not a loadable checkpoint.
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {name!r} ({type(name).__name__}); valid: {list_models()}")
    try:
        builder = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid: {list_models()}") from None
    weights = kwargs.get("weights")
    if isinstance(weights, (str, os.PathLike)) and Path(weights).is_file():
        checkpoint = load_checkpoint(weights)
        metadata = read_metadata(checkpoint, weights)
        if metadata is not None:
            model = builder(**_recorded_kwargs(name, builder, kwargs, metadata, weights))
            model.load_state_dict(extract_state_dict(checkpoint), strict=True)
            return attach_metadata(model, metadata, weights)
    return builder(**kwargs)


# the kwargs that fix a model's input and output: a caller may only restate what it was built with
_CONTRACT_KWARGS = ("num_classes", "in_channels", "mean", "std")
_NO_DEFAULT = object()


def _default(builder: Callable[..., nn.Module], key: str) -> Any:
    try:
        parameter = inspect.signature(builder).parameters.get(key)
    except (TypeError, ValueError):
        return _NO_DEFAULT
    return _NO_DEFAULT if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Sequence) and not isinstance(a, str) and isinstance(b, Sequence) and not isinstance(b, str):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _recorded_kwargs(name: str, builder: Callable[..., nn.Module], given: Mapping[str, Any],
                     metadata: Mapping[str, Any], path: Any) -> dict[str, Any]:
    """The recorded builder kwargs, after checking that ``given`` does not contradict them."""
    if metadata["architecture"] != name:
        raise ValueError(
            f"{os.fspath(path)} holds a {metadata['architecture']!r} model (recorded architecture), "
            f"but get_model was asked for {name!r}: use model {metadata['architecture']!r}"
        )
    recorded = dict(metadata["kwargs"])
    for key, value in given.items():
        if key == "weights":
            continue
        if key in recorded and not _same(value, recorded[key]):
            raise ValueError(
                f"{key}={value!r} contradicts {key}={recorded[key]!r} recorded in {os.fspath(path)}: "
                f"drop the argument or pass the recorded value"
            )
        if key not in recorded and key in _CONTRACT_KWARGS:
            default = _default(builder, key)
            if default is _NO_DEFAULT or not _same(value, default):
                shown = "" if default is _NO_DEFAULT else f" {key}={default!r}"
                raise ValueError(
                    f"{key}={value!r} was given but {os.fspath(path)} records no {key} (the model "
                    f"was built with the builder's default{shown}): drop the argument"
                )
        recorded[key] = value
    return recorded


def list_models() -> list[str]:
    """Returns the registered model names, sorted."""
    return sorted(_MODELS)


def _register_builtin() -> None:
    from tta.models import augmix, resnet, torchvision as tv, wideresnet

    for builder in (resnet.resnet8, resnet.resnet14, resnet.resnet20, resnet.resnet32, resnet.resnet44, resnet.resnet56):
        register_model(builder.__name__)(builder)
    register_model("wide_resnet28_10")(wideresnet.wide_resnet28_10)
    register_model("wide_resnet40_2")(augmix.wide_resnet40_2)
    register_model("resnext29_32x4d")(augmix.resnext29_32x4d)
    for name in tv.TORCHVISION_CLASSIFIERS:
        register_model(name)(functools.partial(tv.build_torchvision_classifier, name))


_register_builtin()

from tta.models.shipped import load_pretrained, pretrained_info  # noqa: E402
