"""Corrupted datasets: on the fly (:class:`CorruptedDataset`) and exported in the
CIFAR-10-C layout (:func:`export_corrupted`)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from tta._atomic import atomic_file
from tta.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS, PRESETS, SEVERITIES, corrupt

__all__ = ["CorruptedDataset", "export_corrupted"]

logger = logging.getLogger(__name__)


class CorruptedDataset(Dataset):
    r"""Wrap a map-style dataset of ``(image, label)`` and corrupt every image.

    Item ``i`` is ``corrupt(base[i] image, corruption, severity, preset, seed,
    index_offset=i)``: the same as corrupting the whole set in one call, whatever
    the order of access, batch size or number of workers. Labels (and any further
    fields of the item) pass through unchanged.

    Args:
        base: map-style dataset whose items are ``(image, label, ...)`` with
            ``image`` a uint8 or float [0, 1] tensor ``(C, H, W)``.
        corruption: one of ``tta.CORRUPTIONS`` or ``tta.EXTRA_CORRUPTIONS``.
        severity: 1 to 5.
        seed: base seed of the corruption noise.
        preset: parameter table (``"cifar"``, ``"tiny"``, ``"imagenet"``); ``None``
            chooses by image size.

    Shape:
        - ``dataset[i]``: ``(image, label)``, ``image`` with the dtype and shape of
          the base image.

    Examples::

        >>> base = tta.data.get_dataset("digits")
        >>> ds = CorruptedDataset(base, "fog", severity=3)
        >>> image, label = ds[0]
    """

    def __init__(self, base: Dataset, corruption: str, severity: int, seed: int = 0, preset: str | None = None):
        valid = CORRUPTIONS + EXTRA_CORRUPTIONS
        if corruption not in valid:
            raise ValueError(f"unknown corruption {corruption!r}; valid choices: {', '.join(valid)}")
        if isinstance(severity, bool) or severity not in SEVERITIES:
            raise ValueError(f"invalid severity {severity!r}; valid choices: {', '.join(map(str, SEVERITIES))}")
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; valid choices: {', '.join(PRESETS)}")
        self.base = base
        self.corruption = corruption
        self.severity = severity
        self.seed = seed
        self.preset = preset

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} is out of range for a dataset of {n} items")
        item = self.base[index]
        if not isinstance(item, (tuple, list)) or not isinstance(item[0], Tensor):
            raise TypeError(f"base items must be (image tensor, label, ...) tuples, got {type(item).__name__}")
        image = corrupt(item[0], self.corruption, self.severity, preset=self.preset, seed=self.seed, index_offset=index)
        return (image, *item[1:])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(corruption={self.corruption!r}, severity={self.severity}, "
            f"seed={self.seed}, preset={self.preset!r}, num_examples={len(self)})"
        )


def _complete(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """Whether ``path`` is a finished export of this shape and dtype."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return array.shape == shape and array.dtype == dtype


def _save_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_file(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def export_corrupted(
    images: Tensor,
    labels: Tensor,
    out_dir: str | Path,
    corruptions: Sequence[str],
    *,
    preset: str | None = None,
    seed: int = 0,
    batch_size: int = 1000,
    rgb: bool = False,
    progress: bool = True,
) -> list[Path]:
    r"""Write a corrupted copy of a dataset in the CIFAR-10-C layout.

    For every corruption, ``<out_dir>/<corruption>.npy`` holds a uint8 array of shape
    ``(5 N, H, W, C)`` (NHWC), severity-major: rows ``(s-1) N .. s N - 1`` are
    severity ``s``; ``<out_dir>/labels.npy`` holds the ``5 N`` labels (uint8 when
    they fit, else int64). Row ``(s-1) N + i`` is ``corrupt(images[i], corruption, s,
    preset, seed, index_offset=i)``. Every file is written to a temporary name and
    renamed when complete, and files already complete are skipped, so an
    interrupted export resumes where it stopped.

    Args:
        images: uint8 tensor :math:`(N, C, H, W)`, ``C`` in {1, 3}.
        labels: integer tensor :math:`(N,)`.
        out_dir: output directory (created).
        corruptions: names from ``tta.CORRUPTIONS + tta.EXTRA_CORRUPTIONS``.
        preset: parameter table; ``None`` chooses by image size.
        seed: base seed of the corruption noise.
        batch_size: images per :func:`tta.corrupt` call (results do not depend on it).
        rgb: store one-channel images with 3 equal channels (for readers that
            expect CIFAR's ``(N, 32, 32, 3)``); the corruption itself runs in grey.
        progress: show tqdm progress bars.

    Returns:
        The paths of the corruption files, in the order of ``corruptions``.
    """
    valid = CORRUPTIONS + EXTRA_CORRUPTIONS
    for name in corruptions:
        if name not in valid:
            raise ValueError(f"unknown corruption {name!r}; valid choices: {', '.join(valid)}")
    if len(set(corruptions)) != len(corruptions):
        raise ValueError(f"corruptions contains duplicates: {list(corruptions)}")
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 (N, C, H, W) with C in (1, 3), got {images.dtype} {tuple(images.shape)}")
    if labels.shape != (images.shape[0],) or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be an integer tensor of shape ({images.shape[0]},), got {labels.dtype} {tuple(labels.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n, c, h, w = images.shape
    channels = 3 if rgb else c
    label_array = labels.cpu().numpy()
    fits = label_array.size == 0 or (label_array.min() >= 0 and label_array.max() < 256)
    label_array = np.tile(label_array.astype(np.uint8 if fits else np.int64), len(SEVERITIES))
    labels_path = out / "labels.npy"
    if not (_complete(labels_path, label_array.shape, label_array.dtype)
            and np.array_equal(np.load(labels_path, allow_pickle=False), label_array)):
        _save_atomic(labels_path, label_array)

    shape = (len(SEVERITIES) * n, h, w, channels)
    paths = []
    for name in corruptions:
        path = out / f"{name}.npy"
        paths.append(path)
        if _complete(path, shape, np.dtype(np.uint8)):
            logger.info("%s exists, skipped", path)
            continue
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            with tqdm(total=shape[0], desc=name, unit="img", disable=not progress) as bar:
                for s in SEVERITIES:
                    for start in range(0, n, batch_size):
                        batch = images[start : start + batch_size]
                        y = corrupt(batch, name, s, preset=preset, seed=seed, index_offset=start)
                        y = y.permute(0, 2, 3, 1)
                        if channels != c:
                            y = y.expand(-1, -1, -1, channels)
                        first = (s - 1) * n + start
                        rows[first : first + len(batch)] = y.cpu().numpy()
                        bar.update(len(batch))
            rows.flush()
            del rows
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        logger.info("wrote %s", path)
    return paths
