"""scikit-learn's embedded 8x8 digits, made to look like MNIST: the dataset that needs no files."""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from tta.data.base import ImageTensorDataset, check_num_examples, check_split
from tta.data.registry import register_dataset

__all__ = ["DIGITS_TEST_FRACTION", "DIGITS_SEED", "digits"]

DIGITS_TEST_FRACTION = 0.2  # 1,437 train / 360 test of the 1,797 images
DIGITS_SEED = 0


def _to_28x28(images_8x8: torch.Tensor) -> torch.Tensor:
    """(N, 8, 8) floats in 0..16 -> (N, 1, 28, 28) uint8.

    Bilinear resize to 24x24 (antialias is a no-op when upsampling), then a 2-pixel zero
    border: MNIST centres its 20x20 digits in 28x28 frames, and sklearn's digits already fill
    their 8x8 frame with a thin margin, so 24 + 2 * 2 keeps a similar background border.
    Values are scaled by 255/16 and rounded.
    """
    x = images_8x8.to(torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False, antialias=True)
    x = F.pad(x, (2, 2, 2, 2))
    return (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


@register_dataset("digits")
def digits(
    split: str = "test",
    root: str | None = None,
    num_examples: int | None = None,
) -> ImageTensorDataset:
    """scikit-learn's 1,797 handwritten digits, 1 x 28 x 28, 10 classes.

    The images ship inside scikit-learn, so this dataset needs no download and no ``root``
    (it is ignored). The 8x8 images (values 0..16) are resized as described in
    :func:`_to_28x28`. The train/test split is stratified by class with a fixed seed
    (``DIGITS_SEED``), 20% test: 1,437 train and 360 test images, the same on every machine.

    Args:
        split: ``"train"`` or ``"test"``.
        root: ignored.
        num_examples: keep only the first ``num_examples`` images of the split.
    """
    check_split(split)
    images, targets, train_idx, test_idx = _resized_digits()
    idx = train_idx if split == "train" else test_idx
    idx = idx[: check_num_examples(num_examples, len(idx))]
    # clone: the cached tensors are shared between calls
    return ImageTensorDataset(images[idx].clone(), targets[idx].clone(), [str(i) for i in range(10)])


@lru_cache(maxsize=1)
def _resized_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All 1,797 images at 28x28, their labels, and the train and test indices."""
    from tta._extras import require_extra

    with require_extra("sklearn", "the digits dataset"):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

    bunch = load_digits()
    train_idx, test_idx = train_test_split(
        torch.arange(len(bunch.target)).numpy(), test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SEED, stratify=bunch.target,
    )
    images = _to_28x28(torch.from_numpy(bunch.images))
    return images, torch.from_numpy(bunch.target).long(), torch.from_numpy(train_idx), torch.from_numpy(test_idx)
