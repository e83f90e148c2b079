"""CIFAR-10/100 (through torchvision) and CIFAR-10-C/100-C (memory-mapped .npy files)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tta.data.base import ImageTensorDataset, check_num_examples, check_split, default_data_dir
from tta.data.download import download_file, extract_tar
from tta.data.registry import register_dataset

__all__ = ["CIFAR_C_CORRUPTIONS", "CIFAR_C_ARCHIVES", "CIFARC", "cifar10", "cifar100", "cifar10_c", "cifar100_c"]

logger = logging.getLogger(__name__)

# The 15 benchmark corruptions and the 4 extra ones published with CIFAR-10-C / CIFAR-100-C
# (Hendrycks & Dietterich, ICLR 2019); one <name>.npy file each.
CIFAR_C_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
    "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
    "elastic_transform", "pixelate", "jpeg_compression",
    "speckle_noise", "gaussian_blur", "spatter", "saturate",
)
SEVERITIES = (1, 2, 3, 4, 5)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class _Archive:
    url: str
    md5: str
    size: int  # bytes, for the docs and the progress bar
    member_dir: str
    num_classes: int


# Zenodo records 2535967 (CIFAR-10-C) and 3555552 (CIFAR-100-C); the md5s are the ones Zenodo lists.
CIFAR_C_ARCHIVES = {
    "cifar10_c": _Archive(
        "https://zenodo.org/records/2535967/files/CIFAR-10-C.tar?download=1",
        "56bf5dcef84df0e2308c6dcbcbbd8499", 2_918_471_680, "CIFAR-10-C", 10,
    ),
    "cifar100_c": _Archive(
        "https://zenodo.org/records/3555552/files/CIFAR-100-C.tar?download=1",
        "11f0ed0f1191edbf9fa23466ae6021d3", 2_918_473_216, "CIFAR-100-C", 100,
    ),
}


def _cifar(name: str, split: str, root: str | Path | None, download: bool, num_examples: int | None) -> ImageTensorDataset:
    import torchvision

    check_split(split)
    cls, folder = {
        "cifar10": (torchvision.datasets.CIFAR10, "cifar-10-batches-py"),
        "cifar100": (torchvision.datasets.CIFAR100, "cifar-100-python"),
    }[name]
    root = Path(root).expanduser() if root is not None else default_data_dir()
    if root.name == folder:  # the user pointed at the extracted folder itself
        root = root.parent
    if not download and not (root / folder).is_dir():
        raise FileNotFoundError(
            f"{name}: {root / folder} does not exist; pass the directory that contains "
            f"{folder!r} as root, or download=True"
        )
    try:
        ds = cls(str(root), train=split == "train", download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise ValueError(f"{name}: cannot read {root / folder}: {e}") from e
    n = check_num_examples(num_examples, len(ds.data))
    images = torch.from_numpy(ds.data[:n]).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW
    targets = torch.as_tensor(ds.targets[:n], dtype=torch.long)
    return ImageTensorDataset(images, targets, ds.classes)


@register_dataset("cifar10")
def cifar10(split: str = "test", root: str | Path | None = None, download: bool = False,
            num_examples: int | None = None) -> ImageTensorDataset:
    """CIFAR-10 through ``torchvision.datasets.CIFAR10``: 3 x 32 x 32, 10 classes, 50,000
    train / 10,000 test. ``root`` holds ``cifar-10-batches-py`` (default ``~/.cache/tta``).
    ``images`` is uint8 (N, 3, 32, 32) in memory."""
    return _cifar("cifar10", split, root, download, num_examples)


@register_dataset("cifar100")
def cifar100(split: str = "test", root: str | Path | None = None, download: bool = False,
             num_examples: int | None = None) -> ImageTensorDataset:
    """CIFAR-100 through ``torchvision.datasets.CIFAR100``: 3 x 32 x 32, 100 fine classes.
    ``root`` holds ``cifar-100-python`` (default ``~/.cache/tta``)."""
    return _cifar("cifar100", split, root, download, num_examples)


def _open_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        # copy-on-write: pages are read lazily and torch may wrap the array without
        # warnings about read-only memory; nothing is ever written back to the file.
        return np.load(path, mmap_mode="c", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path} is not a readable .npy file (truncated or corrupt?): {e}") from e


def _check_selection(corruption: str, severity: int, examples_per_severity: int | None) -> None:
    if corruption not in CIFAR_C_CORRUPTIONS:
        raise ValueError(
            f"unknown corruption {corruption!r}; valid names are: {', '.join(CIFAR_C_CORRUPTIONS)}"
        )
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    if examples_per_severity is not None and (isinstance(examples_per_severity, bool)
                                              or not isinstance(examples_per_severity, int)
                                              or examples_per_severity < 1):
        raise ValueError(f"examples_per_severity must be a positive int or None, got {examples_per_severity!r}")


class CIFARC(ImageTensorDataset):
    r"""One corruption at one severity of CIFAR-10-C or CIFAR-100-C, memory-mapped.

    The published layout: ``<root>/<corruption>.npy`` of shape (5 * k, 32, 32, 3) uint8,
    severity-major (rows ``(severity - 1) * k`` to ``severity * k``), and ``<root>/labels.npy``
    of shape (5 * k,) with the labels of every row. The published files have k = 10,000; a
    subset or an export by :func:`tta.data.corrupted.export_corrupted` has fewer: k is read
    from the file.

    Args:
        root: the directory with the ``.npy`` files.
        corruption: one of :data:`CIFAR_C_CORRUPTIONS`.
        severity: 1 to 5.
        num_examples: keep the first ``num_examples`` of the severity's images (default all).
        num_classes: labels must be below this (10 or 100).
        examples_per_severity: rows per severity k; ``None`` (default) infers it from the
            file (its rows / 5), an int is checked against the file.

    Raises:
        FileNotFoundError: a missing ``.npy`` file.
        ValueError: a bad selection, an unreadable file, a wrong dtype or shape, a row count
            that is not 5 * k (or not 5 * ``examples_per_severity``), a ``labels.npy`` whose
            length differs from the images', labels outside ``0..num_classes - 1``; every
            message names the file.

    Attributes:
        images: uint8 tensor (N, 3, 32, 32), a non-contiguous view of the memory-mapped
            file: slicing it reads only those pages.
        targets: int64 tensor (N,), in memory.
    """

    def __init__(self, root: str | Path, corruption: str, severity: int, num_examples: int | None = None,
                 num_classes: int = 10, examples_per_severity: int | None = None) -> None:
        _check_selection(corruption, severity, examples_per_severity)
        self.root = Path(root)
        self.corruption, self.severity = corruption, severity
        self.num_examples, self.num_classes = num_examples, num_classes
        self.files = images_path, labels_path = self.root / f"{corruption}.npy", self.root / "labels.npy"

        images = _open_npy(images_path)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
            raise ValueError(
                f"{images_path}: expected uint8 images of shape (N, 32, 32, 3), got {images.dtype} "
                f"of shape {images.shape}"
            )
        rows = images.shape[0]
        if examples_per_severity is None and (rows == 0 or rows % len(SEVERITIES)):
            raise ValueError(f"{images_path} has {rows} images, expected a positive multiple of 5 "
                             f"(5 severities x k images, severity-major)")
        if examples_per_severity is not None and rows != len(SEVERITIES) * examples_per_severity:
            raise ValueError(
                f"{images_path} has {rows} images, expected {len(SEVERITIES) * examples_per_severity} "
                f"(5 severities x {examples_per_severity})"
            )
        self.examples_per_severity = examples_per_severity = rows // len(SEVERITIES)
        labels = _open_npy(labels_path)
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise ValueError(f"{labels_path}: expected a 1-d integer array, got {labels.dtype} of shape {labels.shape}")
        if labels.shape[0] != rows:
            raise ValueError(f"{labels_path} has {labels.shape[0]} labels, expected {rows} to match {images_path}")

        n = check_num_examples(num_examples, examples_per_severity, f"{images_path} (per severity)")
        start = (severity - 1) * examples_per_severity
        targets = torch.from_numpy(np.asarray(labels[start:start + n], dtype=np.int64))
        if n and (targets.min() < 0 or targets.max() >= num_classes):
            raise ValueError(f"{labels_path}: labels must lie in 0..{num_classes - 1}, found "
                             f"{targets.min().item()}..{targets.max().item()}")
        view = torch.from_numpy(images[start:start + n]).permute(0, 3, 1, 2)  # NHWC -> NCHW view
        classes = CIFAR10_CLASSES if num_classes == 10 else [str(i) for i in range(num_classes)]
        super().__init__(view, targets, classes)

    # A pickled dataset (DataLoader workers under spawn) re-opens the file instead of copying it.
    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in
                ("root", "corruption", "severity", "num_examples", "num_classes", "examples_per_severity")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def fingerprint(self) -> str:
        """sha256 hex digest of the images and labels this dataset yields (by content), the
        resolved paths, sizes and ``st_mtime_ns`` of the two files, and the selection."""
        from tta.evaluation.results import content_hash  # lazy: tta.evaluation imports tta.data

        files = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in self.files]
        return content_hash(super().fingerprint(), files, self.corruption, self.severity)

    def extra_repr(self) -> str:
        return f"corruption={self.corruption!r}, severity={self.severity}, " + super().extra_repr()


def _cifar_c(name: str, split: str, root: str | Path | None, corruption: str, severity: int,
             num_examples: int | None, download: bool, url: str | None, md5: str | None,
             examples_per_severity: int | None) -> CIFARC:
    check_split(split, ("test",))
    _check_selection(corruption, severity, examples_per_severity)  # before any download
    archive = CIFAR_C_ARCHIVES[name]
    root = Path(root).expanduser() if root is not None else default_data_dir() / archive.member_dir
    # root may be the .npy directory itself or its parent.
    if not (root / "labels.npy").exists() and (root / archive.member_dir / "labels.npy").exists():
        root = root / archive.member_dir
    if download and not (root / "labels.npy").exists():
        # The archive lands next to the extracted directory: <parent>/CIFAR-10-C.tar.
        parent = root.parent if root.name == archive.member_dir else root
        tar = download_file(url or archive.url, parent / f"{archive.member_dir}.tar",
                            md5=archive.md5 if md5 is None else md5)
        root = extract_tar(tar, parent, archive.member_dir)
    if not (root / "labels.npy").exists():
        raise FileNotFoundError(
            f"{name}: {root / 'labels.npy'} does not exist; root must hold the published files "
            f"(<corruption>.npy and labels.npy, e.g. extracted {archive.member_dir}.tar), "
            f"or pass download=True ({archive.size / 1e9:.1f} GB)"
        )
    return CIFARC(root, corruption, severity, num_examples, archive.num_classes, examples_per_severity)


@register_dataset("cifar10_c")
def cifar10_c(split: str = "test", root: str | Path | None = None, corruption: str = "gaussian_noise",
              severity: int = 5, num_examples: int | None = None, download: bool = False,
              url: str | None = None, md5: str | None = None, examples_per_severity: int | None = None) -> CIFARC:
    """CIFAR-10-C (see :class:`CIFARC`); only a ``"test"`` split.

    ``root`` is the directory with the ``.npy`` files or its parent (default
    ``~/.cache/tta/CIFAR-10-C``). With ``download=True`` and no files, ``CIFAR-10-C.tar`` is
    downloaded next to it (resumable, md5-checked) and extracted atomically. ``url`` and
    ``md5`` override the published ones (mirrors, tests).
    """
    return _cifar_c("cifar10_c", split, root, corruption, severity, num_examples, download, url, md5,
                    examples_per_severity)


@register_dataset("cifar100_c")
def cifar100_c(split: str = "test", root: str | Path | None = None, corruption: str = "gaussian_noise",
               severity: int = 5, num_examples: int | None = None, download: bool = False,
               url: str | None = None, md5: str | None = None, examples_per_severity: int | None = None) -> CIFARC:
    """CIFAR-100-C; as :func:`cifar10_c` with ``CIFAR-100-C.tar`` and 100 classes."""
    return _cifar_c("cifar100_c", split, root, corruption, severity, num_examples, download, url, md5,
                    examples_per_severity)
