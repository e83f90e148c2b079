"""Shared pieces of the datasets: the in-memory uint8 dataset and argument checks."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["ImageTensorDataset", "default_data_dir", "check_split", "check_num_examples", "subset_indices"]

SUBSET_SEED = 0


def default_data_dir() -> Path:
    """Where datasets are downloaded when no root is given: ``$TTA_DATA_DIR``, else
    ``$XDG_CACHE_HOME/tta`` (``~/.cache/tta``)."""
    if os.environ.get("TTA_DATA_DIR"):
        return Path(os.environ["TTA_DATA_DIR"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(cache).expanduser() / "tta"


def check_split(split: str, valid: Sequence[str] = ("train", "test")) -> str:
    if split not in valid:
        raise ValueError(f"unknown split {split!r}; valid splits are: {', '.join(valid)}")
    return split


def check_num_examples(num_examples: int | None, available: int) -> int:
    """Returns how many examples to keep (the first ``num_examples``, or all)."""
    if num_examples is None:
        return available
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive int or None, got {num_examples!r}")
    if num_examples > available:
        raise ValueError(f"num_examples={num_examples} but only {available} examples are available")
    return num_examples


def subset_indices(total: int, num_examples: int | None, seed: int = SUBSET_SEED) -> list[int]:
    """The indices kept by ``num_examples`` for folder datasets: all, or a fixed-seed random
    subset in ascending order (the files are sorted by class, so the first ``n`` would be the
    first classes only)."""
    n = check_num_examples(num_examples, total)
    if n == total:
        return list(range(total))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(total, generator=generator)[:n].tolist())


class ImageTensorDataset(Dataset):
    r"""A dataset of images held as one uint8 tensor, returned as float images in [0, 1].

    The whole split is available without calling ``__getitem__`` per image: ``images`` is the
    uint8 tensor (possibly a view of a memory-mapped file) and ``targets`` the labels; batch
    pipelines (the corruption suite) work on those directly.

    Args:
        images: uint8 tensor of shape :math:`(N, C, H, W)`.
        targets: integer tensor of shape :math:`(N,)`.
        classes: the class names, ``classes[label]``.

    Shape:
        - ``dataset[i]``: ``(image, label)`` with ``image`` float32 :math:`(C, H, W)` in [0, 1]
          and ``label`` an ``int``.
    """

    def __init__(self, images: Tensor, targets: Tensor, classes: Sequence[str]) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be a uint8 tensor of shape (N, C, H, W), got {images.dtype} "
                f"of shape {tuple(images.shape)}"
            )
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
        if targets.shape != (images.shape[0],):
            raise ValueError(
                f"targets must have shape ({images.shape[0]},), got {tuple(targets.shape)}"
            )
        self.images = images
        self.targets = targets.long()
        self.classes = list(classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index].to(torch.float32).div_(255.0)
        return image, int(self.targets[index])

    def extra_repr(self) -> str:
        n, c, h, w = self.images.shape
        return f"num_examples={n}, image_shape=({c}, {h}, {w}), num_classes={len(self.classes)}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"
