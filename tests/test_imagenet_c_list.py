"""ImageNet-C: RobustBench's 5,000-image list built in (``list_file="robustbench5000"``), and a
cell decoded by parallel threads equal bit for bit to the sequential decode, broken files named."""
from __future__ import annotations

import gzip
import hashlib
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tta.data
from tta.data.imagenet_c import BUILTIN_LISTS, default_num_workers
from tta.evaluation.pipeline import load_images

# sha256 of RobustBench's robustbench/data/imagenet_test_image_ids.txt (as published, uncompressed)
ROBUSTBENCH_SHA256 = "41859fb6c645b32e24c698de00fd5867d7a25c886ddc41e78eaa087cb75e41a2"


def _robustbench_lines() -> list[str]:
    data = gzip.decompress((resources.files("tta.data") / "lists" / BUILTIN_LISTS["robustbench5000"]).read_bytes())
    assert hashlib.sha256(data).hexdigest() == ROBUSTBENCH_SHA256
    assert data.count(b"\r\n") == data.count(b"\n") == 4999 and not data.endswith(b"\n")  # as published
    return data.decode().splitlines()


def _write(path: Path, seed: int, size=(20, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).save(path)


def _decode(path: Path) -> np.ndarray:
    """Independent oracle: Pillow's RGB decode of one file, (H, W, 3) uint8."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_robustbench_list_is_the_published_file():
    lines = _robustbench_lines()
    assert len(lines) == 5000 and len(set(lines)) == 5000  # 4,999 newlines, no newline at the end
    assert lines[0] == "n09468604/ILSVRC2012_val_00015253.JPEG"
    assert lines[-1] == "n13133613/ILSVRC2012_val_00025432.JPEG"
    assert all(len(line.split("/")) == 2 and line.startswith("n") and line.endswith(".JPEG") for line in lines)
    assert len({line.split("/")[0] for line in lines}) == 997
    readme = (resources.files("tta.data") / "lists" / "README.md").read_text()
    assert ROBUSTBENCH_SHA256 in readme and "MIT License" in readme


def test_builtin_list_selects_in_robustbench_order_with_sorted_wnid_labels(tmp_path):
    lines = _robustbench_lines()[:7]
    cell = tmp_path / "ImageNet-C" / "fog" / "5"
    for i, line in enumerate(lines):
        _write(cell / line, seed=i)
    _write(cell / lines[0].split("/")[0] / "ILSVRC2012_val_99999999.JPEG", seed=99)  # not listed
    ds = tta.data.get_dataset("imagenet_c", root=tmp_path / "ImageNet-C", corruption="fog", severity=5,
                              list_file="robustbench5000", num_examples=7)
    wnids = sorted({line.split("/")[0] for line in lines})
    assert [p.relative_to(cell).as_posix() for p, _ in ds.samples] == lines
    assert ds.targets == [wnids.index(line.split("/")[0]) for line in lines]
    with pytest.raises(FileNotFoundError, match="4993 of the 5000 images listed in robustbench5000 are missing"):
        tta.data.get_dataset("imagenet_c", root=tmp_path / "ImageNet-C", corruption="fog", severity=5,
                             list_file="robustbench5000", classes=sorted({x.split("/")[0] for x in _robustbench_lines()}))
    with pytest.raises(FileNotFoundError, match="robustbench500 does not exist.*built-in lists: robustbench5000"):
        tta.data.get_dataset("imagenet_c", root=tmp_path / "ImageNet-C", corruption="fog", severity=5,
                             list_file="robustbench500")


@pytest.fixture
def cell_root(tmp_path):
    root = tmp_path / "ImageNet-C"
    for c, wnid in enumerate(["n02", "n01", "n03"]):
        for i in range(5):
            _write(root / "snow" / "2" / wnid / f"ILSVRC2012_val_{c}{i:07d}.JPEG", seed=10 * c + i)
    return root


@pytest.mark.parametrize("num_workers", [1, 3])
def test_parallel_load_equals_the_sequential_decode(cell_root, num_workers):
    ds = tta.data.get_dataset("imagenet_c", root=cell_root, corruption="snow", severity=2, num_workers=num_workers)
    images, targets = ds.load_images()
    expected = np.stack([_decode(path).transpose(2, 0, 1) for path, _ in ds.samples])
    assert images.dtype == torch.uint8 and images.shape == (15, 3, 16, 20)
    assert np.array_equal(images.numpy(), expected)
    assert targets.tolist() == [label for _, label in ds.samples] == [0] * 5 + [1] * 5 + [2] * 5
    sequential = torch.stack([ds[i][0] for i in range(len(ds))]).mul(255).round().to(torch.uint8)
    assert torch.equal(images, sequential)
    # the benchmark reads a precorrupted cell through load_images
    via_pipeline, labels = load_images("imagenet_c", root=str(cell_root), corruption="snow", severity=2)
    assert np.array_equal(via_pipeline.numpy(), expected) and torch.equal(labels, targets)


def test_a_broken_file_is_named_in_order(cell_root):
    ds = tta.data.get_dataset("imagenet_c", root=cell_root, corruption="snow", severity=2, num_workers=4)
    truncated, garbage = ds.samples[6][0], ds.samples[11][0]
    truncated.write_bytes(truncated.read_bytes()[:60])
    garbage.write_bytes(b"not an image" * 20)
    with pytest.raises(ValueError, match=f"cannot decode image {truncated}"):
        ds.load_images()  # the first broken file in dataset order, whichever thread failed first
    _write(truncated, seed=0, size=(8, 8))
    with pytest.raises(ValueError, match=f"{truncated} is 8x8 but {ds.samples[0][0]} is 20x16"):
        ds.load_images()


def test_num_workers_is_checked(cell_root, monkeypatch):
    get = tta.data.get_dataset
    for bad in (0, -1, True, 2.0, "2"):
        with pytest.raises(ValueError, match=f"num_workers must be a positive int or None, got {bad!r}"):
            get("imagenet_c", root=cell_root, corruption="snow", severity=2, num_workers=bad)
    monkeypatch.setenv("TTA_NUM_WORKERS", "3")
    assert default_num_workers() == 3
    assert get("imagenet_c", root=cell_root, corruption="snow", severity=2).num_workers == 3
    monkeypatch.setenv("TTA_NUM_WORKERS", "three")
    with pytest.raises(ValueError, match="TTA_NUM_WORKERS must be a positive int, got 'three'"):
        get("imagenet_c", root=cell_root, corruption="snow", severity=2)
    monkeypatch.delenv("TTA_NUM_WORKERS")
    assert 1 <= default_num_workers() <= 8
