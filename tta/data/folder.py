"""Any directory of ``<class>/<image>`` files, through ``torchvision.datasets.ImageFolder``."""
from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from tta.data.base import ImageReader, check_split, subset_indices
from tta.data.registry import register_dataset

__all__ = ["image_folder"]


@register_dataset("image_folder")
def image_folder(split: str = "test", root: str | Path | None = None, num_examples: int | None = None) -> Dataset:
    """A ``torchvision.datasets.ImageFolder`` returning float images in [0, 1] (``ToTensor``),
    unresized.

    If ``root/<split>`` is a directory it is used, else ``root`` itself. ``num_examples``
    keeps a fixed-seed random subset (see :func:`tta.data.base.subset_indices`). Images are
    decoded by :class:`tta.data.base.ImageReader`: a corrupt or truncated file, or an image
    whose size differs from the first one's, raises ``ValueError`` naming the files.
    """
    import torchvision
    from torchvision.transforms import ToTensor

    check_split(split)
    if root is None:
        raise ValueError("image_folder needs root=<a directory of <class>/<image> files>")
    root = Path(root).expanduser()
    if (root / split).is_dir():
        root = root / split
    if not root.is_dir():
        raise FileNotFoundError(f"image_folder: {root} does not exist")
    try:
        ds = torchvision.datasets.ImageFolder(str(root), transform=ToTensor())
    except FileNotFoundError as e:  # no class folders or no images
        raise FileNotFoundError(f"image_folder: {e}") from e
    keep = subset_indices(len(ds.samples), num_examples)
    ds.samples = ds.imgs = [ds.samples[i] for i in keep]
    ds.targets = [label for _, label in ds.samples]
    ds.loader = ImageReader(ds.samples[0][0])
    return ds
