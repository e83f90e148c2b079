"""Export of corrupted datasets in the CIFAR-10-C layout: tta.data.corrupted and
scripts/make_corrupted.py, and the on-the-fly CorruptedDataset."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tta.corruptions import corrupt
from tta.data.corrupted import CorruptedDataset, export_corrupted

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def small_set():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (7, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (7,), generator=g)
    return images, labels


def test_export_layout_is_severity_major_nhwc(tmp_path, small_set):
    images, labels = small_set
    paths = export_corrupted(images, labels, tmp_path, ["fog", "contrast"], seed=3, batch_size=3, progress=False)
    assert [p.name for p in paths] == ["fog.npy", "contrast.npy"]
    stored_labels = np.load(tmp_path / "labels.npy")
    assert stored_labels.dtype == np.uint8 and np.array_equal(stored_labels, np.tile(labels.numpy(), 5))
    for name in ("fog", "contrast"):
        rows = np.load(tmp_path / f"{name}.npy")
        assert rows.dtype == np.uint8 and rows.shape == (35, 32, 32, 3)
        for s in range(1, 6):
            expected = corrupt(images, name, s, seed=3).permute(0, 2, 3, 1).numpy()
            assert np.array_equal(rows[(s - 1) * 7 : s * 7], expected)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_export_resumes_and_redoes_bad_files(tmp_path, small_set):
    images, labels = small_set
    export_corrupted(images, labels, tmp_path, ["contrast"], progress=False)
    done = tmp_path / "contrast.npy"
    stamp = done.stat().st_mtime_ns
    np.save(tmp_path / "pixelate.npy", np.zeros((3, 32, 32, 3), np.uint8))  # wrong shape: redone
    (tmp_path / "brightness.npy").write_bytes(b"truncated")  # unreadable: redone
    export_corrupted(images, labels, tmp_path, ["contrast", "pixelate", "brightness"], progress=False)
    assert done.stat().st_mtime_ns == stamp  # finished work is skipped
    for name in ("pixelate", "brightness"):
        rows = np.load(tmp_path / f"{name}.npy")
        assert rows.shape == (35, 32, 32, 3)
        assert np.array_equal(rows[:7], corrupt(images, name, 1).permute(0, 2, 3, 1).numpy())


def test_export_grayscale_and_rgb_option(tmp_path):
    grey = torch.randint(0, 256, (4, 1, 28, 28), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    labels = torch.tensor([300, 1, 2, 3])  # does not fit uint8
    export_corrupted(grey, labels, tmp_path / "c1", ["gaussian_noise"], progress=False)
    export_corrupted(grey, labels, tmp_path / "c3", ["gaussian_noise"], rgb=True, progress=False)
    one = np.load(tmp_path / "c1" / "gaussian_noise.npy")
    three = np.load(tmp_path / "c3" / "gaussian_noise.npy")
    assert one.shape == (20, 28, 28, 1) and three.shape == (20, 28, 28, 3)
    assert np.array_equal(three, np.repeat(one, 3, axis=3))
    assert np.load(tmp_path / "c1" / "labels.npy").dtype == np.int64


def test_export_rejects_bad_arguments(tmp_path, small_set):
    images, labels = small_set
    with pytest.raises(ValueError, match="unknown corruption 'mist'.*valid choices"):
        export_corrupted(images, labels, tmp_path, ["mist"], progress=False)
    with pytest.raises(ValueError, match="duplicates"):
        export_corrupted(images, labels, tmp_path, ["fog", "fog"], progress=False)
    with pytest.raises(ValueError, match="uint8"):
        export_corrupted(images.float(), labels, tmp_path, ["fog"], progress=False)
    with pytest.raises(ValueError, match="labels"):
        export_corrupted(images, labels[:3], tmp_path, ["fog"], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        export_corrupted(images, labels, tmp_path, ["fog"], batch_size=0, progress=False)


def test_corrupted_dataset_equals_whole_set_corruption(small_set):
    images, labels = small_set
    base = TensorDataset(images, labels)
    ds = CorruptedDataset(base, "glass_blur", 3, seed=5)
    whole = corrupt(images, "glass_blur", 3, seed=5)
    assert len(ds) == 7
    for i in (6, 0, 3, -1):  # any order of access
        image, label = ds[i]
        assert torch.equal(image, whole[i]) and torch.equal(label, labels[i])
    batches = list(DataLoader(ds, batch_size=3, shuffle=False))
    assert torch.equal(torch.cat([b[0] for b in batches]), whole)
    # float base images give the float corruption
    fds = CorruptedDataset(TensorDataset(images.float() / 255, labels), "contrast", 2)
    assert torch.allclose(fds[4][0], corrupt(images.float() / 255, "contrast", 2)[4])
    with pytest.raises(IndexError):
        ds[7]


def test_corrupted_dataset_rejects_bad_arguments(small_set):
    base = TensorDataset(*small_set)
    with pytest.raises(ValueError, match="unknown corruption.*valid choices"):
        CorruptedDataset(base, "rain", 1)
    with pytest.raises(ValueError, match="severity.*1, 2, 3, 4, 5"):
        CorruptedDataset(base, "fog", 6)
    with pytest.raises(ValueError, match="preset.*cifar, tiny, imagenet"):
        CorruptedDataset(base, "fog", 1, preset="huge")


def test_make_corrupted_script(tmp_path):
    out = tmp_path / "digits-c"
    cmd = [sys.executable, str(ROOT / "scripts" / "make_corrupted.py"), "dataset=digits", f"out_dir={out}",
           "num_examples=12", "corruptions=[contrast,gaussian_noise]", "batch_size=5", "progress=false",
           "num_threads=1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = np.load(out / "gaussian_noise.npy")
    labels = np.load(out / "labels.npy")
    assert rows.shape == (60, 28, 28, 1) and rows.dtype == np.uint8 and labels.shape == (60,)
    import tta

    base = tta.data.get_dataset("digits", split="test")
    images = torch.stack([base[i][0] for i in range(12)])
    images = (images * 255).round().to(torch.uint8)
    assert np.array_equal(labels[:12], [base[i][1] for i in range(12)])
    expected = corrupt(images, "gaussian_noise", 4).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(rows[36:48], expected)
