"""ImageNet-C as published: ``<root>/<corruption>/<severity>/<wnid>/*.JPEG``, already 224x224."""
from __future__ import annotations

import gzip
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from tta.data.base import ImageReader, check_num_examples, check_split, files_fingerprint, subset_indices
from tta.data.cifar import CIFAR_C_CORRUPTIONS, SEVERITIES
from tta.data.registry import register_dataset

__all__ = ["IMAGE_EXTENSIONS", "BUILTIN_LISTS", "ImageNetC", "imagenet_c", "default_num_workers"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
# list_file names of the lists shipped in tta/data/lists/ (source, licence and sha256: its README.md)
BUILTIN_LISTS = {"robustbench5000": "robustbench_imagenet_5000.txt.gz"}  # RobustBench's 5,000 images


def default_num_workers() -> int:
    """Threads that decode images in :meth:`ImageNetC.load_images`: ``$TTA_NUM_WORKERS``, else
    ``min(8, usable CPUs)`` (the cap of 8 keeps parallel jobs on one node from oversubscribing it).

    Raises:
        ValueError: ``$TTA_NUM_WORKERS`` is not a positive int (names the value).
    """
    value = os.environ.get("TTA_NUM_WORKERS")
    if value is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return min(8, cpus)
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"TTA_NUM_WORKERS must be a positive int, got {value!r}")
    return int(value)


def _is_plain(name: object) -> bool:
    """Whether ``name`` is a single path component (no separator, not ``.``/``..``), so no path
    built from it leaves its directory."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _read_list_file(list_file: str | Path) -> list[str]:
    """Lines ``<wnid>/<file name>``, optionally followed by whitespace and anything (e.g. a
    label); blank lines and ``#`` comments are skipped. RobustBench's
    ``imagenet_test_image_ids.txt`` (5,000 validation images) has this format. ``list_file``
    is a path or the name of a built-in list (:data:`BUILTIN_LISTS`)."""
    if str(list_file) in BUILTIN_LISTS:
        path = resources.files("tta.data") / "lists" / BUILTIN_LISTS[str(list_file)]
        text = gzip.decompress(path.read_bytes()).decode()
    else:
        path = Path(list_file)
        if not path.is_file():
            raise FileNotFoundError(f"list file {path} does not exist (built-in lists: "
                                    f"{', '.join(BUILTIN_LISTS)})")
        text = path.read_text()
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        entry = line.split()[0]
        parts = entry.split("/")
        if len(parts) != 2 or not all(map(_is_plain, parts)):
            raise ValueError(f"{path}:{number}: expected '<wnid>/<file name>', got {line!r}")
        entries.append(entry)
    return entries


class ImageNetC(Dataset):
    r"""One corruption at one severity of ImageNet-C.

    No resize and no crop: the published images are already 224 x 224 (re-cropping them to
    a centre crop is a common mistake that changes the numbers).

    Every name that becomes part of a path (``corruption``, ``severity``, ``classes``, list-file
    entries) is validated before any path is built, so no argument reads outside ``root``.
    Images are decoded by :class:`tta.data.base.ImageReader`: a corrupt or truncated file, or
    an image whose size differs from the first one's, raises ``ValueError`` naming the files.
    :meth:`load_images` decodes a whole cell with ``num_workers`` threads.

    Args:
        root: the ImageNet-C directory (holding one directory per corruption).
        corruption: one of the 15 + 4 published corruptions
            (:data:`tta.data.cifar.CIFAR_C_CORRUPTIONS`), e.g. ``"gaussian_noise"``.
        severity: 1 to 5.
        list_file: optional text file of ``<wnid>/<file name>`` lines selecting a subset, in
            that order, or the name of a built-in list (:data:`BUILTIN_LISTS`):
            ``"robustbench5000"`` is RobustBench's 5,000-image ``imagenet_test_image_ids.txt``
            (shipped in ``tta/data/lists/``, MIT licence), kept in RobustBench's order as
            RobustBench does. A listed image's label is its wnid's index in ``classes``.
        num_examples: keep the first ``num_examples`` entries of the list file, or without a
            list file a fixed-seed random subset of the images (see :func:`tta.data.base.subset_indices`).
        classes: the class wnids in label order; default: the sorted wnid directories of
            ``<root>/<corruption>/<severity>``. Pass all 1,000 when the tree is partial.
        num_workers: threads of :meth:`load_images`; default :func:`default_num_workers`
            (``$TTA_NUM_WORKERS``, else ``min(8, usable CPUs)``).

    Attributes:
        samples: list of ``(path, label)``.
        targets: the labels, a list of ints.

    Shape:
        - ``dataset[i]``: ``(image, label)``, ``image`` float32 :math:`(3, H, W)` in [0, 1].
    """

    def __init__(self, root: str | Path, corruption: str, severity: int, list_file: str | Path | None = None,
                 num_examples: int | None = None, classes: Sequence[str] | None = None,
                 num_workers: int | None = None) -> None:
        if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                        or num_workers < 1):
            raise ValueError(f"num_workers must be a positive int or None, got {num_workers!r}")
        if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"ImageNet-C root {root} does not exist")
        if corruption not in CIFAR_C_CORRUPTIONS or not (root / corruption).is_dir():
            found = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise ValueError(
                f"unknown corruption {corruption!r}"
                + (f": no directory {root / corruption}" if corruption in CIFAR_C_CORRUPTIONS else "")
                + f"; valid names: {', '.join(CIFAR_C_CORRUPTIONS)}; found in {root}: {', '.join(found) or 'none'}"
            )
        for wnid in classes or ():
            if not _is_plain(wnid):
                raise ValueError(f"invalid class {wnid!r}: expected a plain directory name (a wnid)")
        directory = root / corruption / str(severity)
        if not directory.is_dir():
            raise FileNotFoundError(f"ImageNet-C directory {directory} does not exist")
        if classes is None:
            classes = sorted(p.name for p in directory.iterdir() if p.is_dir())
        if not classes:
            raise ValueError(f"{directory} holds no class directories (<wnid>/*.JPEG)")
        self.classes = list(classes)
        self.class_to_idx = {wnid: i for i, wnid in enumerate(self.classes)}
        self.root, self.corruption, self.severity = root, corruption, severity
        self.num_workers = default_num_workers() if num_workers is None else num_workers

        if list_file is not None:
            entries = _read_list_file(list_file)
            entries = entries[: check_num_examples(num_examples, len(entries))]
            unknown = sorted({e.split("/")[0] for e in entries} - set(self.class_to_idx))
            if unknown:
                raise ValueError(f"{list_file} names classes not in {directory}: {', '.join(unknown[:5])}")
            samples = [(directory / e, self.class_to_idx[e.split("/")[0]]) for e in entries]
            missing = [str(p) for p, _ in samples if not p.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} of the {len(samples)} images listed in {list_file} are missing, "
                    f"e.g. {missing[0]}"
                )
        else:
            samples = [
                (path, label)
                for label, wnid in enumerate(self.classes) if (directory / wnid).is_dir()
                for path in sorted((directory / wnid).iterdir())
                if path.suffix.lower() in IMAGE_EXTENSIONS
            ]
            if not samples:
                raise ValueError(f"{directory} holds no images with extensions {IMAGE_EXTENSIONS}")
            samples = [samples[i] for i in subset_indices(len(samples), num_examples)]
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.reader = ImageReader(samples[0][0]) if samples else None
        logger.info("ImageNet-C %s/%d: %d images", corruption, severity, len(samples))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = torch.from_numpy(self._decode(index)).permute(2, 0, 1)
        return image.to(torch.float32).div_(255.0), self.samples[index][1]

    def _decode(self, index: int) -> np.ndarray:
        return np.array(self.reader(self.samples[index][0]))  # (H, W, 3) uint8, a writable copy

    def load_images(self) -> tuple[Tensor, Tensor]:
        """All images and labels, decoded by ``num_workers`` threads (Pillow releases the GIL
        while it decodes), in dataset order.

        Returns:
            ``(images, targets)``: uint8 :math:`(N, 3, H, W)`, equal bit for bit to
            ``round(255 * dataset[i][0])`` stacked, and int64 :math:`(N,)`.

        Raises:
            ValueError: the dataset is empty, or a file is broken or of another size: the
                first such file in dataset order, named as by ``dataset[i]``.
        """
        if not self.samples:
            raise ValueError(f"{self!r} holds no images")
        first = self._decode(0)
        images = torch.empty((len(self), 3, *first.shape[:2]), dtype=torch.uint8)
        images[0] = torch.from_numpy(first).permute(2, 0, 1)

        def fill(index: int) -> None:
            images[index] = torch.from_numpy(self._decode(index)).permute(2, 0, 1)

        pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="imagenet_c")
        try:
            for _ in tqdm(pool.map(fill, range(1, len(self))), total=len(self) - 1, disable=None,
                          leave=False, desc=f"decoding {self.corruption}/{self.severity}"):
                pass
        finally:
            pool.shutdown(cancel_futures=True)  # after an error: decode no further files
        return images, torch.tensor(self.targets, dtype=torch.long)

    def fingerprint(self) -> str:
        """sha256 hex digest of the resolved root, the selection, the classes and each sample's
        relative path, label, size and ``st_mtime_ns``, in order (see
        :func:`tta.data.base.files_fingerprint`; the files are not decoded)."""
        return files_fingerprint(self.root, self.samples, self.classes, self.corruption, self.severity)

    def __repr__(self) -> str:
        return (f"ImageNetC(corruption={self.corruption!r}, severity={self.severity}, "
                f"num_examples={len(self)}, num_classes={len(self.classes)})")


@register_dataset("imagenet_c")
def imagenet_c(split: str = "test", root: str | Path | None = None, corruption: str = "gaussian_noise",
               severity: int = 5, list_file: str | Path | None = None, num_examples: int | None = None,
               classes: Sequence[str] | None = None, num_workers: int | None = None) -> ImageNetC:
    """ImageNet-C (see :class:`ImageNetC`); only a ``"test"`` split; ``root`` is required."""
    check_split(split, ("test",))
    if root is None:
        raise ValueError("imagenet_c needs root=<the ImageNet-C directory>; it is not downloadable (~60 GB)")
    return ImageNetC(root, corruption, severity, list_file, num_examples, classes, num_workers)
