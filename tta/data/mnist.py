"""Fashion-MNIST read straight from its idx files (no torchvision needed to read them)."""
from __future__ import annotations

import gzip
import logging
import math
from pathlib import Path

import numpy as np
import torch

from tta.data.base import ImageTensorDataset, check_num_examples, check_split, default_data_dir
from tta.data.registry import register_dataset

__all__ = ["FASHION_MNIST_CLASSES", "DEBIAN_FASHION_MNIST_DIR", "read_idx", "fashion_mnist"]

logger = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Where the Debian/Ubuntu package ``dataset-fashion-mnist`` installs the original files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Reads an idx file (the MNIST format; gzip-compressed if the name ends in ``.gz``).

    The format: two zero bytes, a type byte (0x08 = uint8), the number of dimensions, each
    dimension as a big-endian int32, then the values in C order.

    Raises:
        ValueError: naming the file, if it is truncated, not gzip, or not uint8 idx.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"cannot read idx file {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an idx file (bad magic number {raw[:4].hex()!r})")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: only uint8 idx files (type 0x08) are supported, got 0x{raw[2]:02x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated: its header needs {header} bytes, it has {len(raw)}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = header + math.prod(shape)
    if len(raw) != expected:
        raise ValueError(
            f"{path} has {len(raw)} bytes but its header (shape {shape}) implies {expected}: "
            "the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_files(directory: Path, split: str) -> tuple[Path, Path] | None:
    """Looks for the split's two files in ``directory`` and in the layouts torchvision and
    the Debian package use; ``.gz`` or uncompressed."""
    for d in (directory, directory / "FashionMNIST" / "raw", directory / "fashion-mnist"):
        found = []
        for stem in _FILES[split]:
            candidates = [d / (stem + ".gz"), d / stem]
            hit = next((c for c in candidates if c.is_file()), None)
            if hit is None:
                break
            found.append(hit)
        else:
            return found[0], found[1]
    return None


def _load(images_path: Path, labels_path: Path, num_examples: int | None) -> ImageTensorDataset:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: expected images of shape (N, 28, 28), got {images.shape}")
    if labels.shape != images.shape[:1]:
        raise ValueError(
            f"{labels_path}: expected {images.shape[0]} labels to match {images_path}, "
            f"got shape {labels.shape}"
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{labels_path}: label {labels.max()} is out of range 0..9")
    n = check_num_examples(num_examples, images.shape[0])
    # np.frombuffer gives read-only arrays; copy the part we keep into torch memory.
    image_tensor = torch.from_numpy(images[:n].copy()).unsqueeze(1)
    label_tensor = torch.from_numpy(labels[:n].astype(np.int64))
    return ImageTensorDataset(image_tensor, label_tensor, FASHION_MNIST_CLASSES)


@register_dataset("fashion_mnist")
def fashion_mnist(
    split: str = "test",
    root: str | Path | None = None,
    download: bool = False,
    num_examples: int | None = None,
) -> ImageTensorDataset:
    """Fashion-MNIST: 28x28 grey images of 10 clothing classes; 60,000 train, 10,000 test.

    The files are looked up in this order:

    1. ``root`` (its own directory, ``root/FashionMNIST/raw`` as torchvision lays it out,
       or ``root/fashion-mnist``); if ``root`` is None, the default data directory
       (``$TTA_DATA_DIR``, else ``~/.cache/tta``, see :func:`tta.data.base.default_data_dir`);
    2. ``/usr/share/datasets/fashion-mnist``, installed by the Debian package
       ``dataset-fashion-mnist`` (``apt install dataset-fashion-mnist``);
    3. if ``download=True``, a torchvision download into the directory of step 1.

    Args:
        split: ``"train"`` or ``"test"``.
        root: a directory holding ``t10k-images-idx3-ubyte.gz`` etc.
        download: allow the torchvision download (step 3).
        num_examples: keep only the first ``num_examples`` images.

    Returns:
        an :class:`~tta.data.base.ImageTensorDataset` with ``images`` uint8 (N, 1, 28, 28).
    """
    check_split(split)
    # 1. the configured root; without one, the default data directory (where step 3 puts it)
    configured = Path(root).expanduser() if root is not None else default_data_dir()
    for directory in (configured, DEBIAN_FASHION_MNIST_DIR):
        files = _find_files(directory, split)
        if files is not None:
            logger.info("reading Fashion-MNIST %s split from %s", split, files[0].parent)
            return _load(*files, num_examples)

    where = f"root={root}" if root is not None else f"root=None, so the default {configured}"
    if download:
        import torchvision

        logger.info("downloading Fashion-MNIST to %s", configured)
        try:
            torchvision.datasets.FashionMNIST(str(configured), train=split == "train", download=True)
        except Exception as e:  # network errors come in many types
            raise RuntimeError(
                f"Fashion-MNIST not found: 1) {where}; 2) the Debian package directory "
                f"{DEBIAN_FASHION_MNIST_DIR} (apt install dataset-fashion-mnist); "
                f"3) the torchvision download into {configured} failed: {e}"
            ) from e
        files = _find_files(configured, split)
        if files is None:  # pragma: no cover - torchvision changed its layout
            raise RuntimeError(f"torchvision downloaded Fashion-MNIST but no idx files are under {configured}")
        return _load(*files, num_examples)
    raise FileNotFoundError(
        f"Fashion-MNIST {split} files (e.g. {_FILES[split][0]}.gz) not found: "
        f"1) {where}; 2) the Debian package directory {DEBIAN_FASHION_MNIST_DIR} "
        f"(apt install dataset-fashion-mnist); 3) a torchvision download: pass download=True"
    )
