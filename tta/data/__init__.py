"""Datasets: a small registry of builders that return map-style datasets of
``(float image (C, H, W) in [0, 1], int label)``.

The in-memory and memory-mapped datasets (fashion_mnist, digits, cifar10, cifar100,
cifar10_c, cifar100_c) are :class:`ImageTensorDataset` instances: ``dataset.images`` is the whole
split as a uint8 (N, C, H, W) tensor and ``dataset.targets`` an int64 (N,) tensor, so batch
pipelines need not call ``__getitem__`` per image.

Examples::

    >>> import tta
    >>> tta.data.list_datasets()
    ['cifar10', 'cifar100', 'cifar100_c', 'cifar10_c', 'digits', 'fashion_mnist', 'image_folder', 'imagenet_c']
    >>> ds = tta.data.get_dataset("digits", split="test")
    >>> image, label = ds[0]
"""
from __future__ import annotations

from tta.data.registry import get_dataset, list_datasets, register_dataset
from tta.data.base import ImageTensorDataset, fingerprint
# Importing the modules registers their datasets.
from tta.data import cifar as _cifar, digits as _digits, folder as _folder, imagenet_c as _imagenet_c  # noqa: F401
from tta.data import mnist as _mnist  # noqa: F401
from tta.data.cifar import CIFARC
from tta.data.imagenet_c import ImageNetC

__all__ = ["register_dataset", "get_dataset", "list_datasets", "ImageTensorDataset", "CIFARC", "ImageNetC",
           "CorruptedDataset", "fingerprint"]

# last: it needs tta.corruptions (issue 3)
from tta.data.corrupted import CorruptedDataset  # noqa: E402
