"""A small registry of dataset builders, in the style of torchvision's model registry."""
from __future__ import annotations

from typing import Any, Callable, TypeVar

from torch.utils.data import Dataset

__all__ = ["register_dataset", "get_dataset", "list_datasets"]

_Builder = TypeVar("_Builder", bound=Callable[..., Dataset])
_DATASETS: dict[str, Callable[..., Dataset]] = {}


def register_dataset(name: str) -> Callable[[_Builder], _Builder]:
    """Decorator that registers a dataset builder under ``name``.

    The builder is called as ``builder(split=split, root=root, **kwargs)`` and returns a
    map-style dataset of ``(image, label)`` pairs.

    Raises:
        ValueError: if ``name`` is already registered.

    Examples::

        >>> @register_dataset("my_data")
        ... def my_data(split="test", root=None):
        ...     return MyDataset(root, train=split == "train")
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty string, got {name!r}")

    def wrapper(builder: _Builder) -> _Builder:
        if name in _DATASETS:
            raise ValueError(f"a dataset named {name!r} is already registered")
        _DATASETS[name] = builder
        return builder

    return wrapper


def list_datasets() -> list[str]:
    """Returns the sorted names of the registered datasets."""
    return sorted(_DATASETS)


def get_dataset(name: str, split: str = "test", root: str | None = None, **kwargs: Any) -> Dataset:
    """Builds the registered dataset ``name``.

    Args:
        name: a name from :func:`list_datasets`.
        split: ``"train"`` or ``"test"`` (the corrupted benchmarks only have ``"test"``).
        root: where the files are; each dataset documents its own default.
        **kwargs: passed to the builder (e.g. ``corruption``, ``severity``, ``num_examples``).

    Raises:
        ValueError: if ``name`` is not registered; the message lists the valid names.
    """
    try:
        builder = _DATASETS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown dataset {name!r}; valid names are: {', '.join(list_datasets())}"
        ) from None
    return builder(split=split, root=root, **kwargs)
