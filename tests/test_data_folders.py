"""ImageNet-C trees, ImageFolder and CIFAR-10/100 through torchvision, on fixtures built here."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tta.data

WNIDS = ["n01440764", "n01443537", "n02102040"]  # deliberately written out of order below


def _make_tree(directory: Path, classes, per_class: int, size=(24, 20), ext=".JPEG", seed=0):
    """Writes ``directory/<class>/<i><ext>`` images of ``size`` (width, height)."""
    rng = np.random.default_rng(seed)
    for wnid in classes:
        (directory / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(array).save(directory / wnid / f"ILSVRC2012_val_{i:08d}{ext}")


@pytest.fixture
def imagenet_c_root(tmp_path):
    root = tmp_path / "ImageNet-C"
    _make_tree(root / "fog" / "3", reversed(WNIDS), per_class=3)
    _make_tree(root / "snow" / "3", WNIDS, per_class=1, seed=1)
    return root


def test_imagenet_c_classes_labels_and_no_resize(imagenet_c_root):
    ds = tta.data.get_dataset("imagenet_c", root=imagenet_c_root, corruption="fog", severity=3)
    assert ds.classes == sorted(WNIDS) and len(ds) == 9
    assert ds.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for index in (0, 4, 8):
        image, label = ds[index]
        path = ds.samples[index][0]
        assert path.parent.name == WNIDS[label] and path.parent.parent == imagenet_c_root / "fog" / "3"
        assert image.dtype == torch.float32 and image.shape == (3, 20, 24)  # (C, H, W) as stored
        reference = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
        torch.testing.assert_close(image, torch.from_numpy(reference).permute(2, 0, 1))


def test_imagenet_c_list_file(imagenet_c_root, tmp_path):
    listing = tmp_path / "ids.txt"
    listing.write_text(f"# a comment\n{WNIDS[2]}/ILSVRC2012_val_00000001.JPEG\n\n"
                       f"{WNIDS[0]}/ILSVRC2012_val_00000002.JPEG 0\n{WNIDS[1]}/ILSVRC2012_val_00000000.JPEG\n")
    ds = tta.data.get_dataset("imagenet_c", root=imagenet_c_root, corruption="fog", severity=3,
                              list_file=listing)
    assert [p.name for p, _ in ds.samples] == [
        "ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG", "ILSVRC2012_val_00000000.JPEG"]
    assert ds.targets == [2, 0, 1]
    first = tta.data.get_dataset("imagenet_c", root=imagenet_c_root, corruption="fog", severity=3,
                                 list_file=listing, num_examples=2)
    assert first.samples == ds.samples[:2]


def test_imagenet_c_num_examples_is_a_fixed_spread_subset(imagenet_c_root):
    full = tta.data.get_dataset("imagenet_c", root=imagenet_c_root, corruption="fog", severity=3)
    a = tta.data.get_dataset("imagenet_c", root=imagenet_c_root, corruption="fog", severity=3, num_examples=5)
    b = tta.data.get_dataset("imagenet_c", root=imagenet_c_root, corruption="fog", severity=3, num_examples=5)
    assert a.samples == b.samples and len(a) == 5
    assert set(a.samples) <= set(full.samples) and a.samples != full.samples[:5]


def test_imagenet_c_explicit_classes(imagenet_c_root):
    classes = ["n00000000"] + sorted(WNIDS)
    ds = tta.data.get_dataset("imagenet_c", root=imagenet_c_root, corruption="snow", severity=3, classes=classes)
    assert ds.targets == [1, 2, 3]


def test_imagenet_c_errors(imagenet_c_root, tmp_path):
    get = tta.data.get_dataset
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        get("imagenet_c", root=tmp_path / "missing", corruption="fog", severity=3)
    with pytest.raises(ValueError, match="needs root"):
        get("imagenet_c", corruption="fog", severity=3)
    with pytest.raises(ValueError, match="'haze'.*fog, snow"):
        get("imagenet_c", root=imagenet_c_root, corruption="haze", severity=3)
    with pytest.raises(ValueError, match="severity must be one of"):
        get("imagenet_c", root=imagenet_c_root, corruption="fog", severity=7)
    with pytest.raises(FileNotFoundError, match=str(imagenet_c_root / "fog" / "2")):
        get("imagenet_c", root=imagenet_c_root, corruption="fog", severity=2)
    with pytest.raises(ValueError, match="'train'"):
        get("imagenet_c", split="train", root=imagenet_c_root, corruption="fog", severity=3)
    listing = tmp_path / "ids.txt"
    listing.write_text(f"{WNIDS[0]}/ILSVRC2012_val_00000009.JPEG\n")
    with pytest.raises(FileNotFoundError, match="1 of the 1 images listed.*00000009"):
        get("imagenet_c", root=imagenet_c_root, corruption="fog", severity=3, list_file=listing)
    listing.write_text("ILSVRC2012_val_00000000.JPEG\n")
    with pytest.raises(ValueError, match=f"{listing}:1: expected '<wnid>/<file name>'"):
        get("imagenet_c", root=imagenet_c_root, corruption="fog", severity=3, list_file=listing)
    listing.write_text("n99999999/ILSVRC2012_val_00000000.JPEG\n")
    with pytest.raises(ValueError, match="names classes not in.*n99999999"):
        get("imagenet_c", root=imagenet_c_root, corruption="fog", severity=3, list_file=listing)
    with pytest.raises(FileNotFoundError, match="list file"):
        get("imagenet_c", root=imagenet_c_root, corruption="fog", severity=3, list_file=tmp_path / "no.txt")


def test_image_folder_exact_values_and_split_dir(tmp_path):
    _make_tree(tmp_path / "train", ["b", "a"], per_class=2, size=(5, 7), ext=".png")
    _make_tree(tmp_path / "test", ["b", "a"], per_class=1, size=(5, 7), ext=".png", seed=3)
    ds = tta.data.get_dataset("image_folder", split="train", root=tmp_path)
    assert ds.classes == ["a", "b"] and ds.targets == [0, 0, 1, 1] and len(ds) == 4
    image, label = ds[3]
    path = ds.samples[3][0]
    assert Path(path).parent.name == "b" and label == 1 and image.shape == (3, 7, 5)
    reference = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(image, reference)  # PNG: lossless
    assert len(tta.data.get_dataset("image_folder", split="test", root=tmp_path)) == 2
    # a root without split directories is used as it is
    assert len(tta.data.get_dataset("image_folder", root=tmp_path / "train")) == 4
    subset = tta.data.get_dataset("image_folder", root=tmp_path / "train", num_examples=2)
    assert len(subset) == 2 and len(subset.targets) == 2 and set(subset.samples) <= set(ds.samples)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="needs root"):
        tta.data.get_dataset("image_folder")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        tta.data.get_dataset("image_folder", root=tmp_path / "missing")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="image_folder"):
        tta.data.get_dataset("image_folder", root=tmp_path / "empty")


# ----------------------------------------------------------------------------- CIFAR-10/100

def _fake_cifar(root: Path, name: str, n: int = 6) -> tuple[np.ndarray, list[int]]:
    """Writes batches in the published python format (CHW rows of 3072 bytes)."""
    folder, batches, meta, label_key, names_key = {
        "cifar10": ("cifar-10-batches-py", ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)],
                    "batches.meta", "labels", "label_names"),
        "cifar100": ("cifar-100-python", ["test", "train"], "meta", "fine_labels", "fine_label_names"),
    }[name]
    (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    num_classes = 10 if name == "cifar10" else 100
    first = None
    for batch in batches:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, num_classes, n).tolist()
        with open(root / folder / batch, "wb") as f:
            pickle.dump({"data": data, label_key: labels}, f)
        first = first or (data, labels)
    with open(root / folder / meta, "wb") as f:
        pickle.dump({names_key: [f"class{i}" for i in range(num_classes)]}, f)
    return first


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_through_torchvision(tmp_path, monkeypatch, name):
    import torchvision.datasets.cifar

    # the fixture is not the published file, so torchvision's md5 check is bypassed
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    data, labels = _fake_cifar(tmp_path, name)
    ds = tta.data.get_dataset(name, split="test", root=tmp_path)
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (6, 3, 32, 32)
    assert ds.images.is_contiguous()
    np.testing.assert_array_equal(ds.images.reshape(6, 3072).numpy(), data)
    assert ds.targets.tolist() == labels and ds.classes[1] == "class1"
    image, label = ds[5]
    torch.testing.assert_close(image, torch.from_numpy(data[5]).reshape(3, 32, 32).float() / 255)
    assert label == labels[5]
    assert len(tta.data.get_dataset(name, split="train", root=tmp_path, num_examples=4)) == 4


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing_root(tmp_path, name):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*download=True"):
        tta.data.get_dataset(name, root=tmp_path)


# ----------------------------------------------------------------------------- broken files, unsafe names

def _break(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else b"not an image at all" * 10)


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_broken_image_names_the_file(imagenet_c_root, tmp_path, how):
    ds = tta.data.get_dataset("imagenet_c", root=imagenet_c_root, corruption="fog", severity=3)
    broken = ds.samples[4][0]
    _break(broken, how)
    ds[3]  # the others still load
    with pytest.raises(ValueError, match=f"cannot decode image {broken}"):
        ds[4]
    _make_tree(tmp_path / "folder", ["a", "b"], per_class=2, ext=".jpg")
    folder = tta.data.get_dataset("image_folder", root=tmp_path / "folder")
    broken = Path(folder.samples[2][0])
    _break(broken, how)
    with pytest.raises(ValueError, match=f"cannot decode image {broken}"):
        folder[2]


def test_mixed_sizes_name_both_files_and_sizes(imagenet_c_root, tmp_path):
    odd = imagenet_c_root / "fog" / "3" / WNIDS[1] / "ILSVRC2012_val_00000001.JPEG"
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(odd)  # 40 x 30 among 24 x 20
    ds = tta.data.get_dataset("imagenet_c", root=imagenet_c_root, corruption="fog", severity=3)
    first = ds.samples[0][0]
    index = [p for p, _ in ds.samples].index(odd)
    with pytest.raises(ValueError) as e:
        ds[index]  # before any other image was read: compared with the first file
    assert f"{odd} is 40x30 but {first} is 24x20" in str(e.value)
    with pytest.raises(ValueError, match="40x30"):  # also through a DataLoader (not a bare collate error)
        list(torch.utils.data.DataLoader(ds, batch_size=9))
    _make_tree(tmp_path / "folder", ["a"], per_class=2, size=(5, 7), ext=".png")
    _make_tree(tmp_path / "folder", ["b"], per_class=1, size=(6, 7), ext=".png")
    folder = tta.data.get_dataset("image_folder", root=tmp_path / "folder")
    with pytest.raises(ValueError, match=f"{folder.samples[2][0]} is 6x7 but {folder.samples[0][0]} is 5x7"):
        folder[2]


def test_imagenet_c_names_cannot_leave_root(tmp_path):
    root = tmp_path / "ImageNet-C"
    _make_tree(root / "fog" / "3", WNIDS, per_class=1)
    _make_tree(tmp_path / "outside" / "3", WNIDS, per_class=1)  # a readable tree next to root
    get = tta.data.get_dataset
    for corruption in ("../outside", "fog/../../outside", str(tmp_path / "outside"), "outside"):
        with pytest.raises(ValueError, match="unknown corruption.*valid names: gaussian_noise"):
            get("imagenet_c", root=root, corruption=corruption, severity=3)
    for classes in (["../../../outside/3/" + WNIDS[0]], [".."], [WNIDS[0], "a/b"]):
        with pytest.raises(ValueError, match="invalid class"):
            get("imagenet_c", root=root, corruption="fog", severity=3, classes=classes)
    listing = tmp_path / "ids.txt"
    for entry in (f"../{WNIDS[0]}", f"{WNIDS[0]}/..", f"./{WNIDS[0]}"):
        listing.write_text(entry + "\n")
        with pytest.raises(ValueError, match="expected '<wnid>/<file name>'"):
            get("imagenet_c", root=root, corruption="fog", severity=3, list_file=listing)
    for severity in ("3", 3.0, "../3"):
        with pytest.raises(ValueError, match="severity must be one of"):
            get("imagenet_c", root=root, corruption="fog", severity=severity)


def test_fingerprints_of_image_trees(imagenet_c_root, tmp_path):
    import os
    import shutil

    def key(root, **kwargs):
        kwargs = {"corruption": "fog", "severity": 3, **kwargs}
        return tta.data.fingerprint(tta.data.get_dataset("imagenet_c", root=root, **kwargs))

    first = key(imagenet_c_root)
    assert key(imagenet_c_root) == first  # stable
    copy = tmp_path / "copy"
    shutil.copytree(imagenet_c_root, copy)  # same relative paths and labels, another root
    assert key(copy) != first
    assert key(imagenet_c_root, num_examples=5) != first and key(imagenet_c_root, corruption="snow") != first
    path = imagenet_c_root / "fog" / "3" / WNIDS[0] / "ILSVRC2012_val_00000000.JPEG"
    stat = path.stat()
    Image.fromarray(np.full((20, 24, 3), 7, np.uint8)).save(path)  # rewritten in place
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert key(imagenet_c_root) != first
    _make_tree(tmp_path / "folder", ["a", "b"], per_class=2, ext=".png")
    folder = tta.data.get_dataset("image_folder", root=tmp_path / "folder")
    assert tta.data.fingerprint(folder) == tta.data.fingerprint(tta.data.get_dataset("image_folder", root=tmp_path / "folder"))
    assert tta.data.fingerprint(folder) != tta.data.fingerprint(tta.data.get_dataset("image_folder", root=copy / "fog" / "3"))
    with pytest.raises(TypeError, match="cannot fingerprint a list"):
        tta.data.fingerprint([1, 2])
