"""Fidelity against ``imagecorruptions-imaug`` (the runnable port of the ImageNet-C
code) at 224 px with the ``"imagenet"`` preset, on centre crops of scikit-image's
bundled photographs.

* corruptions without randomness: within 2 grey levels (mean absolute difference
  <= 1.0, 99th percentile <= 2);
* corruptions with randomness: per severity, the mean absolute deviation from the
  clean image within 10% of the reference's.

elastic_transform and frost follow the reference scripts, not
``imagecorruptions-imaug`` (see docs/corruptions.md); they are covered by the
weather tests and the benchmark's fidelity table.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from tta.corruptions import corrupt

imagecorruptions = pytest.importorskip("imagecorruptions", reason="needs the optional imagecorruptions-imaug package")
skimage_data = pytest.importorskip("skimage.data")

pytestmark = pytest.mark.reference

DETERMINISTIC = ("defocus_blur", "zoom_blur", "gaussian_blur", "brightness", "contrast", "saturate", "pixelate",
                 "jpeg_compression")
RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur", "motion_blur")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """Four 224 x 224 centre crops (bundled with scikit-image: no download), NHWC uint8."""
    crops = []
    for name in PHOTOS:
        a = getattr(skimage_data, name)()
        h, w = a.shape[:2]
        top, left = (h - 224) // 2, (w - 224) // 2
        crops.append(a[top : top + 224, left : left + 224])
    return np.stack(crops)


def reference(photos: np.ndarray, name: str, severity: int, rng_seed: int = 0) -> np.ndarray:
    np.random.seed(rng_seed)  # the package draws from numpy's global generator
    kwargs = {"seed": rng_seed} if name in ("glass_blur", "impulse_noise") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.stack([imagecorruptions.corrupt(a, corruption_name=name, severity=severity, **kwargs) for a in photos])


def ours(photos: np.ndarray, name: str, severity: int) -> np.ndarray:
    x = torch.from_numpy(photos).permute(0, 3, 1, 2).contiguous()
    return corrupt(x, name, severity, preset="imagenet").permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_corruptions_match_within_two_grey_levels(photos, name):
    for severity in range(1, 6):
        diff = np.abs(ours(photos, name, severity).astype(np.float64) - reference(photos, name, severity))
        assert diff.mean() <= 1.0, f"{name} s{severity}: mean |diff| {diff.mean():.3f}"
        assert np.percentile(diff, 99) <= 2, f"{name} s{severity}: p99 |diff| {np.percentile(diff, 99)}"


@pytest.mark.parametrize("name", RANDOM)
def test_random_corruptions_match_in_distribution(photos, name):
    clean = photos.astype(np.float64)
    for severity in range(1, 6):
        dev_ours = np.abs(ours(photos, name, severity) - clean).mean()
        dev_ref = np.abs(reference(photos, name, severity) - clean).mean()
        assert abs(dev_ours / dev_ref - 1) <= 0.10, f"{name} s{severity}: {dev_ours:.2f} vs {dev_ref:.2f}"
