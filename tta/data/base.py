"""Shared pieces of the datasets: the in-memory uint8 dataset and argument checks."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["ImageTensorDataset", "ImageReader", "default_data_dir", "check_split", "check_num_examples",
           "subset_indices", "read_rgb", "fingerprint", "files_fingerprint"]

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


def check_num_examples(num_examples: int | None, available: int, what: str = "") -> int:
    """Returns how many examples to keep (the first ``num_examples``, or all).

    Raises:
        ValueError: unless ``num_examples`` is None or an int in ``1..available``; the message
            names the value, ``available`` and ``what`` (e.g. ``"the digits test split"``).
    """
    where = f" in {what}" if what else ""
    if num_examples is None:
        return available
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive int or None, got {num_examples!r} "
                         f"({available} examples are available{where})")
    if num_examples > available:
        raise ValueError(f"num_examples={num_examples} but only {available} examples are available{where}")
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


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """Decodes an image file (any format Pillow reads) to an RGB image.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if it cannot be decoded (corrupt, truncated, not an image); names ``path``.
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes every pixel: a truncated file fails here
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image {path} (corrupt or truncated file?): {e}") from e


class ImageReader:
    """Decodes the image files of one dataset to RGB (:func:`read_rgb`), all of one size.

    The size is that of ``reference`` (the dataset's first file, read once per process), so an
    image of another size fails when it is read, naming both files and sizes, instead of later
    in ``torch.stack`` or a ``DataLoader``'s collate without a file name.

    Raises (on call):
        ValueError: an undecodable file, or one whose (width x height) differs from ``reference``'s.
    """

    def __init__(self, reference: str | os.PathLike) -> None:
        self.reference = str(reference)
        self.size: tuple[int, int] | None = None

    def __call__(self, path: str | os.PathLike) -> Image.Image:
        image = read_rgb(path)
        if self.size is None:
            self.size = image.size if str(path) == self.reference else read_rgb(self.reference).size
        if image.size != self.size:
            raise ValueError(
                f"images of different sizes: {path} is {image.size[0]}x{image.size[1]} but "
                f"{self.reference} is {self.size[0]}x{self.size[1]} (width x height); all images of "
                f"a dataset must have one size"
            )
        return image


def files_fingerprint(root: str | os.PathLike, samples: Sequence[tuple[Any, int]], *extra: Any) -> str:
    """sha256 hex digest of the resolved ``root`` and, per ``(path, label)`` of ``samples`` in
    order, the path relative to ``root``, the label, the size and the ``st_mtime_ns`` of the
    file (no decoding), plus ``extra`` (JSON-able). Raises FileNotFoundError for a missing file."""
    from tta.evaluation.results import content_hash  # lazy: tta.evaluation imports tta.data

    entries = []
    for path, label in samples:
        stat = os.stat(path)
        entries.append([os.path.relpath(path, root), int(label), stat.st_size, stat.st_mtime_ns])
    return content_hash("files", str(Path(root).resolve()), entries, *extra)


def fingerprint(dataset: Dataset) -> str:
    """A cheap key (sha256 hex digest) of the data ``dataset`` yields, for caches of results.

    It changes when the root (resolved), the selection or the content changes:

    - datasets with a ``fingerprint()`` method (:class:`ImageTensorDataset` and its subclass
      :class:`~tta.data.CIFARC`, :class:`~tta.data.ImageNetC`) use it;
    - datasets with ``root`` and ``samples`` (``image_folder``'s ``ImageFolder``): see
      :func:`files_fingerprint`.

    Raises:
        TypeError: for any other dataset.
    """
    method = getattr(dataset, "fingerprint", None)
    if callable(method):
        return method()
    if getattr(dataset, "root", None) is not None and isinstance(getattr(dataset, "samples", None), list):
        return files_fingerprint(dataset.root, dataset.samples, getattr(dataset, "classes", None))
    raise TypeError(f"cannot fingerprint a {type(dataset).__name__}: it has no fingerprint() method and "
                    f"no root and samples")


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

    def fingerprint(self) -> str:
        """sha256 hex digest of ``images``, ``targets`` and ``classes`` (by content)."""
        from tta.evaluation.results import content_hash  # lazy: tta.evaluation imports tta.data

        return content_hash(type(self).__name__, self.images, self.targets, self.classes)

    def extra_repr(self) -> str:
        n, c, h, w = self.images.shape
        return f"num_examples={n}, image_shape=({c}, {h}, {w}), num_classes={len(self.classes)}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"
