"""Registry, Fashion-MNIST and digits."""
from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import tta.data
from tta.data import mnist
from tta.data.mnist import DEBIAN_FASHION_MNIST_DIR, read_idx

ALL_NAMES = ["cifar10", "cifar100", "cifar100_c", "cifar10_c", "digits", "fashion_mnist",
             "image_folder", "imagenet_c"]
REAL_FASHION_MNIST = (DEBIAN_FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file()


@pytest.fixture(autouse=True)
def isolated_default_dir(monkeypatch, tmp_path):
    """The default data directory (root=None) is an empty directory of the test's own."""
    monkeypatch.setenv("TTA_DATA_DIR", str(tmp_path / "default-data"))
    return tmp_path / "default-data"


# ----------------------------------------------------------------------------- registry

def test_list_datasets_is_sorted_and_complete():
    assert tta.data.list_datasets() == ALL_NAMES


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e:
        tta.data.get_dataset("fashion-mnist")
    assert "'fashion-mnist'" in str(e.value)
    for name in ALL_NAMES:
        assert name in str(e.value)


def test_register_dataset_rejects_duplicates_and_passes_arguments():
    calls = []

    @tta.data.register_dataset("_test_only_dataset")
    def builder(split="test", root=None, size=1):
        calls.append((split, root, size))
        return list(range(size))

    try:
        assert tta.data.get_dataset("_test_only_dataset", split="train", root="r", size=3) == [0, 1, 2]
        assert calls == [("train", "r", 3)]
        with pytest.raises(ValueError, match="already registered"):
            tta.data.register_dataset("_test_only_dataset")(builder)
        with pytest.raises(ValueError, match="already registered"):
            tta.data.register_dataset("digits")(builder)
    finally:
        tta.data.registry._DATASETS.pop("_test_only_dataset")


@pytest.mark.parametrize("name", ["digits", "fashion_mnist"])
def test_unknown_split(name):
    with pytest.raises(ValueError, match="'val'.*train, test"):
        tta.data.get_dataset(name, split="val")


# ----------------------------------------------------------------------------- idx files

def _write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _fake_fashion_mnist(directory: Path, n: int = 7, seed: int = 0, compress: bool = True) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, (images_name, labels_name) in mnist._FILES.items():
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        suffix = ".gz" if compress else ""
        _write_idx(directory / (images_name + suffix), images, compress)
        _write_idx(directory / (labels_name + suffix), labels, compress)
        arrays[split] = (images, labels)
    return arrays


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    """Pretends the Debian package is not installed."""
    monkeypatch.setattr(mnist, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "not-installed")


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, compress):
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    path = tmp_path / ("a.gz" if compress else "a")
    _write_idx(path, array, compress)
    np.testing.assert_array_equal(read_idx(path), array)


def test_read_idx_errors_name_the_file(tmp_path):
    good = tmp_path / "good"
    _write_idx(good, np.zeros((4, 28, 28), np.uint8), compress=False)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(ValueError, match=f"{truncated}.*truncated"):
        read_idx(truncated)
    bad_magic = tmp_path / "bad_magic"
    bad_magic.write_bytes(b"\x01\x02\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match=f"{bad_magic} is not an idx file"):
        read_idx(bad_magic)
    not_gzip = tmp_path / "not_gzip.gz"
    not_gzip.write_bytes(good.read_bytes())
    with pytest.raises(ValueError, match=f"cannot read idx file {not_gzip}"):
        read_idx(not_gzip)
    cut_gzip = tmp_path / "cut.gz"
    cut_gzip.write_bytes(gzip.compress(good.read_bytes())[:-20])
    with pytest.raises(ValueError, match=str(cut_gzip)):
        read_idx(cut_gzip)
    wrong_type = tmp_path / "int32"
    wrong_type.write_bytes(bytes([0, 0, 0x0C, 1]) + struct.pack(">i", 1) + bytes(4))
    with pytest.raises(ValueError, match="only uint8"):
        read_idx(wrong_type)


@pytest.mark.parametrize("layout", ["flat", "torchvision", "flat-uncompressed"])
def test_fashion_mnist_configured_root(tmp_path, layout):
    directory = tmp_path / "FashionMNIST" / "raw" if layout == "torchvision" else tmp_path
    arrays = _fake_fashion_mnist(directory, compress=layout != "flat-uncompressed")
    for split in ("train", "test"):
        ds = tta.data.get_dataset("fashion_mnist", split=split, root=tmp_path)
        images, labels = arrays[split]
        assert len(ds) == len(labels)
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(labels), 1, 28, 28)
        np.testing.assert_array_equal(ds.images[:, 0].numpy(), images)
        np.testing.assert_array_equal(ds.targets.numpy(), labels)
        image, label = ds[3]
        assert image.dtype == torch.float32 and image.shape == (1, 28, 28)
        assert isinstance(label, int) and label == labels[3]
        torch.testing.assert_close(image[0], torch.from_numpy(images[3]).float() / 255)


def test_fashion_mnist_num_examples(tmp_path):
    arrays = _fake_fashion_mnist(tmp_path)
    ds = tta.data.get_dataset("fashion_mnist", root=tmp_path, num_examples=4)
    assert len(ds) == 4
    np.testing.assert_array_equal(ds.targets.numpy(), arrays["test"][1][:4])
    with pytest.raises(ValueError, match="num_examples=8 but only 7"):
        tta.data.get_dataset("fashion_mnist", root=tmp_path, num_examples=8)
    with pytest.raises(ValueError, match="positive int"):
        tta.data.get_dataset("fashion_mnist", root=tmp_path, num_examples=0)


def test_fashion_mnist_root_takes_precedence_over_debian(tmp_path, monkeypatch):
    debian, configured = tmp_path / "debian", tmp_path / "configured"
    _fake_fashion_mnist(debian, n=5, seed=1)
    mine = _fake_fashion_mnist(configured, n=6, seed=2)
    monkeypatch.setattr(mnist, "DEBIAN_FASHION_MNIST_DIR", debian)
    ds = tta.data.get_dataset("fashion_mnist", root=configured)
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), mine["test"][0])
    # a root without the files falls back to the Debian directory
    assert len(tta.data.get_dataset("fashion_mnist", root=tmp_path / "empty")) == 5
    assert len(tta.data.get_dataset("fashion_mnist")) == 5


def test_fashion_mnist_missing_everywhere_names_all_three(tmp_path, no_debian):
    with pytest.raises(FileNotFoundError) as e:
        tta.data.get_dataset("fashion_mnist", root=tmp_path / "nothing")
    message = str(e.value)
    assert str(tmp_path / "nothing") in message
    assert "not-installed" in message and "dataset-fashion-mnist" in message
    assert "download=True" in message


def test_fashion_mnist_truncated_file_names_it(tmp_path):
    _fake_fashion_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(ValueError, match=f"{path}.*truncated"):
        tta.data.get_dataset("fashion_mnist", root=tmp_path)


def test_fashion_mnist_label_count_mismatch(tmp_path):
    _fake_fashion_mnist(tmp_path, n=7)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(6, np.uint8))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz: expected 7 labels"):
        tta.data.get_dataset("fashion_mnist", root=tmp_path)


class _FakeTorchvisionFashionMNIST:
    """Stands in for torchvision's downloader: writes the files where torchvision would."""
    calls: list = []

    def __init__(self, root, train, download):
        type(self).calls.append((root, train, download))
        _fake_fashion_mnist(Path(root) / "FashionMNIST" / "raw", n=3)


def test_fashion_mnist_download_is_third(tmp_path, no_debian, monkeypatch):
    import torchvision

    _FakeTorchvisionFashionMNIST.calls = []
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", _FakeTorchvisionFashionMNIST)
    ds = tta.data.get_dataset("fashion_mnist", split="train", root=tmp_path, download=True)
    assert len(ds) == 3
    assert _FakeTorchvisionFashionMNIST.calls == [(str(tmp_path), True, True)]
    # once downloaded the configured root has the files: no second download
    tta.data.get_dataset("fashion_mnist", split="train", root=tmp_path, download=True)
    assert len(_FakeTorchvisionFashionMNIST.calls) == 1


def test_fashion_mnist_default_dir_is_searched_and_downloaded_into(no_debian, isolated_default_dir,
                                                                   monkeypatch):
    import torchvision

    with pytest.raises(FileNotFoundError, match=f"root=None, so the default {isolated_default_dir}"):
        tta.data.get_dataset("fashion_mnist")
    _FakeTorchvisionFashionMNIST.calls = []
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", _FakeTorchvisionFashionMNIST)
    assert len(tta.data.get_dataset("fashion_mnist", download=True)) == 3
    assert _FakeTorchvisionFashionMNIST.calls == [(str(isolated_default_dir), False, True)]
    # later runs find the download without download=True
    assert len(tta.data.get_dataset("fashion_mnist")) == 3


def test_fashion_mnist_failed_download_names_all_three(tmp_path, no_debian, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(RuntimeError) as e:
        tta.data.get_dataset("fashion_mnist", root=tmp_path, download=True)
    message = str(e.value)
    assert str(tmp_path) in message and "dataset-fashion-mnist" in message
    assert "download" in message and "network is unreachable" in message


@pytest.mark.skipif(not REAL_FASHION_MNIST, reason=f"Fashion-MNIST files not installed in "
                    f"{DEBIAN_FASHION_MNIST_DIR} (apt install dataset-fashion-mnist)")
def test_real_fashion_mnist_matches_torchvision(tmp_path):
    import torchvision

    ds = tta.data.get_dataset("fashion_mnist", split="test")
    assert len(ds) == 10000 and ds.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.targets).tolist() == [1000] * 10
    assert ds.classes[ds[0][1]] == "Ankle boot"  # the first test image is an ankle boot
    # torchvision reads the same files independently (it wants them uncompressed)
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in mnist._FILES["test"]:
        with gzip.open(DEBIAN_FASHION_MNIST_DIR / f"{stem}.gz") as src, open(raw / stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    for stem in mnist._FILES["train"]:  # torchvision checks that they exist; it reads only the test split
        (raw / stem).touch()
    reference = torchvision.datasets.FashionMNIST(str(tmp_path), train=False, download=False)
    assert torch.equal(ds.images[:, 0], reference.data)
    assert torch.equal(ds.targets, reference.targets)
    assert len(tta.data.get_dataset("fashion_mnist", split="train")) == 60000


# ----------------------------------------------------------------------------- digits

def _bilinear_reference(image: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centre bilinear upsampling with edge clamping, written out by hand."""
    n = image.shape[0]
    coords = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    low = np.floor(coords).astype(int)
    high = np.minimum(low + 1, n - 1)
    frac = coords - low
    rows = image[low] * (1 - frac)[:, None] + image[high] * frac[:, None]
    return rows[:, low] * (1 - frac)[None, :] + rows[:, high] * frac[None, :]


def test_digits_split_is_fixed_stratified_and_complete():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    train = tta.data.get_dataset("digits", split="train")
    test = tta.data.get_dataset("digits", split="test")
    assert (len(train), len(test)) == (1437, 360)
    counts = torch.bincount(train.targets, minlength=10) + torch.bincount(test.targets, minlength=10)
    assert counts.tolist() == np.bincount(bunch.target).tolist()
    # stratified: every class has 19 to 21% of its images in the test split
    fraction = torch.bincount(test.targets, minlength=10) / counts
    assert fraction.min() > 0.18 and fraction.max() < 0.22
    again = tta.data.get_dataset("digits", split="test")
    assert torch.equal(again.images, test.images) and torch.equal(again.targets, test.targets)


def test_digits_images_are_resized_and_padded_sklearn_digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    ds = tta.data.get_dataset("digits", split="test")
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (360, 1, 28, 28)
    image, label = ds[0]
    assert image.dtype == torch.float32 and image.shape == (1, 28, 28) and isinstance(label, int)
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.max() > 0.9
    # the 2-pixel border is empty
    inner = torch.zeros(28, 28, dtype=torch.bool)
    inner[2:26, 2:26] = True
    assert ds.images[:, 0, ~inner].max() == 0
    # each test image is the hand-computed bilinear 24x24 enlargement of one sklearn image
    flat = bunch.images.reshape(len(bunch.images), -1)
    for i in range(0, 360, 45):
        inside = ds.images[i, 0, 2:26, 2:26].numpy().astype(np.float64)
        candidates = [j for j in range(len(flat)) if bunch.target[j] == ds.targets[i]]
        errors = [np.abs(_bilinear_reference(bunch.images[j] / 16.0, 24) * 255 - inside).max()
                  for j in candidates]
        assert min(errors) <= 0.5 + 1e-6


def test_digits_num_examples():
    ds = tta.data.get_dataset("digits", split="train", num_examples=10)
    full = tta.data.get_dataset("digits", split="train")
    assert torch.equal(ds.images, full.images[:10])


# ----------------------------------------------------------------------------- ImageTensorDataset

def test_image_tensor_dataset_checks_its_inputs():
    images = torch.randint(0, 256, (3, 2, 4, 5), dtype=torch.uint8)
    ds = tta.data.ImageTensorDataset(images, torch.tensor([2, 0, 1], dtype=torch.int32), ["a", "b", "c"])
    image, label = ds[1]
    torch.testing.assert_close(image, images[1].float() / 255)
    assert label == 0 and ds.targets.dtype == torch.int64 and len(ds) == 3
    with pytest.raises(ValueError, match="uint8 tensor of shape"):
        tta.data.ImageTensorDataset(images.float(), torch.zeros(3, dtype=torch.long), ["a"])
    with pytest.raises(ValueError, match="uint8 tensor of shape"):
        tta.data.ImageTensorDataset(images[0], torch.zeros(2, dtype=torch.long), ["a"])
    with pytest.raises(ValueError, match=r"targets must have shape \(3,\)"):
        tta.data.ImageTensorDataset(images, torch.zeros(4, dtype=torch.long), ["a"])
    with pytest.raises(ValueError, match="integer tensor"):
        tta.data.ImageTensorDataset(images, torch.zeros(3), ["a"])


def test_subset_indices_are_fixed_sorted_and_spread():
    from tta.data.base import subset_indices

    a = subset_indices(1000, 100)
    assert a == subset_indices(1000, 100) and a == sorted(a) and len(set(a)) == 100
    assert max(a) > 500 and min(a) < 500
    assert subset_indices(5, None) == [0, 1, 2, 3, 4] == subset_indices(5, 5)


def test_whole_split_images_match_per_item_corruption():
    """The batch path (``ds.images``) and the per-item path (``CorruptedDataset``) agree."""
    ds = tta.data.get_dataset("digits", num_examples=6)
    corrupted = tta.data.CorruptedDataset(ds, "gaussian_noise", 3)
    per_item = torch.stack([corrupted[i][0] for i in range(len(ds))])
    batch = tta.corrupt(ds.images.float() / 255, "gaussian_noise", 3)
    torch.testing.assert_close(per_item, batch, rtol=0, atol=0)
    assert not torch.equal(per_item, ds.images.float() / 255)
    assert [corrupted[i][1] for i in range(len(ds))] == ds.targets.tolist()
