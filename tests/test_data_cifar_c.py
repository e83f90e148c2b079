"""CIFAR-10-C / CIFAR-100-C: the published .npy layout, its error paths, and the download
(resume, checksum, atomic extraction) against an archive served from 127.0.0.1."""
from __future__ import annotations

import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import tta.data
from tta.data.cifar import CIFAR_C_ARCHIVES, CIFAR_C_CORRUPTIONS
from tta.data.download import download_file, extract_tar

PER = 4  # examples per severity in the fixtures (the published files have 10,000)


def _images(n: int = 5 * PER, seed: int = 0) -> np.ndarray:
    images = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n)  # row number, to check the selection
    return images


def _write_cifar_c(directory: Path, corruptions=("fog",), num_classes: int = 10) -> dict[str, np.ndarray]:
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {"labels": np.random.default_rng(1).integers(0, num_classes, 5 * PER).astype(np.uint8)}
    np.save(directory / "labels.npy", arrays["labels"])
    for i, corruption in enumerate(corruptions):
        arrays[corruption] = _images(seed=10 + i)
        np.save(directory / f"{corruption}.npy", arrays[corruption])
    return arrays


def _get(root, **kwargs):
    kwargs.setdefault("corruption", "fog")
    kwargs.setdefault("severity", 1)
    return tta.data.get_dataset("cifar10_c", root=root, examples_per_severity=PER, **kwargs)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_selects_the_severity_block(tmp_path, severity):
    arrays = _write_cifar_c(tmp_path)
    ds = _get(tmp_path, severity=severity)
    rows = slice((severity - 1) * PER, severity * PER)
    assert len(ds) == PER
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (PER, 3, 32, 32)
    np.testing.assert_array_equal(ds.images.permute(0, 2, 3, 1).numpy(), arrays["fog"][rows])
    np.testing.assert_array_equal(ds.targets.numpy(), arrays["labels"][rows])
    assert ds.targets.dtype == torch.int64
    image, label = ds[2]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32) and isinstance(label, int)
    torch.testing.assert_close(image, torch.from_numpy(arrays["fog"][rows][2]).permute(2, 0, 1).float() / 255)
    assert label == arrays["labels"][rows][2]
    assert ds.classes[0] == "airplane"


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc/self/maps")
def test_images_are_memory_mapped(tmp_path):
    _write_cifar_c(tmp_path)
    path = tmp_path / "fog.npy"
    ds = _get(tmp_path)
    assert str(path) in Path("/proc/self/maps").read_text()  # the file is mapped, not read
    # copy-on-write: writing through the tensor never changes the file
    ds.images[0, 0, 0, 0] = 255
    assert ds.images[0, 0, 0, 0] == 255 and np.load(path)[0, 0, 0, 0] == 0


def test_num_examples_root_parent_and_cifar100(tmp_path):
    arrays = _write_cifar_c(tmp_path / "CIFAR-100-C", num_classes=100)
    ds = tta.data.get_dataset("cifar100_c", root=tmp_path, corruption="fog", severity=2,
                              num_examples=3, examples_per_severity=PER)
    assert len(ds) == 3 and len(ds.classes) == 100
    np.testing.assert_array_equal(ds.targets.numpy(), arrays["labels"][PER:PER + 3])
    with pytest.raises(ValueError, match="num_examples=5 but only 4"):
        _get(tmp_path / "CIFAR-100-C", num_examples=5)


def test_pickle_reopens_and_dataloader_batches(tmp_path):
    _write_cifar_c(tmp_path)
    ds = _get(tmp_path, severity=4)
    payload = pickle.dumps(ds)
    assert len(payload) < 5000  # the images are not copied into the pickle
    clone = pickle.loads(payload)
    assert torch.equal(clone.images, ds.images) and torch.equal(clone.targets, ds.targets)
    images, labels = next(iter(torch.utils.data.DataLoader(ds, batch_size=PER)))
    torch.testing.assert_close(images, ds.images.float() / 255)
    assert torch.equal(labels, ds.targets)


# ----------------------------------------------------------------------------- error paths

def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere' / 'labels.npy'}.*download=True"):
        _get(tmp_path / "nowhere")


def test_missing_corruption_file_names_it(tmp_path):
    _write_cifar_c(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "snow.npy")):
        _get(tmp_path, corruption="snow")


def test_unknown_corruption_and_severity(tmp_path):
    _write_cifar_c(tmp_path)
    with pytest.raises(ValueError) as e:
        _get(tmp_path, corruption="haze")
    assert "'haze'" in str(e.value) and all(c in str(e.value) for c in CIFAR_C_CORRUPTIONS)
    for severity in (0, 6, "5", True):
        with pytest.raises(ValueError, match="severity must be one of"):
            _get(tmp_path, severity=severity)
    with pytest.raises(ValueError, match="'train'.*valid splits are: test"):
        _get(tmp_path, split="train")


@pytest.mark.parametrize("bad, message", [
    (np.zeros((5 * PER, 32, 32), np.uint8), r"shape \(N, 32, 32, 3\)"),
    (np.zeros((5 * PER, 32, 32, 3), np.float32), "expected uint8"),
    (np.zeros((5 * PER + 1, 32, 32, 3), np.uint8), f"has {5 * PER + 1} images, expected {5 * PER}"),
])
def test_wrong_shape_dtype_length_name_the_file(tmp_path, bad, message):
    _write_cifar_c(tmp_path)
    np.save(tmp_path / "fog.npy", bad)
    with pytest.raises(ValueError, match=f"{tmp_path / 'fog.npy'}.*{message}"):
        _get(tmp_path)


def test_truncated_and_garbage_files_are_named(tmp_path):
    _write_cifar_c(tmp_path)
    path = tmp_path / "fog.npy"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=f"{path} is not a readable .npy file"):
        _get(tmp_path)
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(ValueError, match=f"{path} is not a readable .npy file"):
        _get(tmp_path)


def test_bad_labels(tmp_path):
    _write_cifar_c(tmp_path)
    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros(5 * PER - 1, np.int64))
    with pytest.raises(ValueError, match=f"{labels} has {5 * PER - 1} labels"):
        _get(tmp_path)
    np.save(labels, np.full(5 * PER, 10, np.int64))
    with pytest.raises(ValueError, match=f"{labels}: labels must lie in 0..9"):
        _get(tmp_path)
    np.save(labels, np.zeros(5 * PER, np.float32))
    with pytest.raises(ValueError, match=f"{labels}: expected a 1-d integer array"):
        _get(tmp_path)


# ----------------------------------------------------------------------------- download

class _Server:
    """Serves one file with HTTP Range support from 127.0.0.1; can cut the next response."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.requests: list[str | None] = []  # the Range header of each request
        self.cut_next_at: int | None = None
        self.honour_range = True
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                range_header = self.headers.get("Range")
                server.requests.append(range_header)
                start = 0
                if range_header and server.honour_range:
                    start = int(range_header.removeprefix("bytes=").split("-")[0])
                    if start >= len(server.payload):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(server.payload) - 1}/{len(server.payload)}")
                else:
                    self.send_response(200)
                body = server.payload[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_next_at is not None:
                    body, server.cut_next_at = body[: server.cut_next_at], None
                    self.close_connection = True
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/CIFAR-10-C.tar"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _tar_bytes(source: Path, arcname: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(source, arcname=arcname)
    return buffer.getvalue()


@pytest.fixture
def archive(tmp_path):
    arrays = _write_cifar_c(tmp_path / "source" / "CIFAR-10-C", corruptions=("fog", "snow"))
    payload = _tar_bytes(tmp_path / "source" / "CIFAR-10-C", "CIFAR-10-C")
    server = _Server(payload)
    yield server, hashlib.md5(payload).hexdigest(), arrays
    server.close()


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".part") or ".extract-" in p.name)


def test_download_verify_extract_and_skip_on_rerun(tmp_path, archive):
    server, md5, arrays = archive
    data = tmp_path / "data"
    ds = _get(data, corruption="snow", severity=3, download=True, url=server.url, md5=md5)
    np.testing.assert_array_equal(ds.images.permute(0, 2, 3, 1).numpy(), arrays["snow"][2 * PER:3 * PER])
    assert (data / "CIFAR-10-C" / "fog.npy").is_file() and (data / "CIFAR-10-C.tar").is_file()
    assert _leftovers(data) == []
    assert server.requests == [None]
    # finished work is skipped: neither downloaded nor extracted again
    again = _get(data / "CIFAR-10-C", corruption="fog", download=True, url=server.url, md5=md5)
    assert len(again) == PER and server.requests == [None]


def test_download_resumes_with_range(tmp_path, archive):
    server, md5, arrays = archive
    half = len(server.payload) // 2
    server.cut_next_at = half
    data = tmp_path / "data"
    with pytest.raises(ConnectionError, match="run again to resume"):
        _get(data, download=True, url=server.url, md5=md5)
    assert (data / "CIFAR-10-C.tar.part").stat().st_size == half
    assert not (data / "CIFAR-10-C").exists() and not (data / "CIFAR-10-C.tar").exists()
    ds = _get(data, download=True, url=server.url, md5=md5)
    assert server.requests == [None, f"bytes={half}-"]
    assert hashlib.md5((data / "CIFAR-10-C.tar").read_bytes()).hexdigest() == md5
    np.testing.assert_array_equal(ds.targets.numpy(), arrays["labels"][:PER])
    assert _leftovers(data) == []


def test_download_restarts_when_server_ignores_range(tmp_path, archive):
    server, md5, _ = archive
    part = tmp_path / "x.tar.part"
    part.write_bytes(b"garbage that is not a prefix")
    server.honour_range = False
    download_file(server.url, tmp_path / "x.tar", md5=md5)
    assert (tmp_path / "x.tar").read_bytes() == server.payload and not part.exists()


def test_download_complete_part_gets_416_and_is_verified(tmp_path, archive):
    server, md5, _ = archive
    (tmp_path / "x.tar.part").write_bytes(server.payload)
    download_file(server.url, tmp_path / "x.tar", md5=md5)
    assert server.requests == [f"bytes={len(server.payload)}-"]
    assert (tmp_path / "x.tar").read_bytes() == server.payload


def test_checksum_mismatch_deletes_download(tmp_path, archive):
    server, md5, _ = archive
    data = tmp_path / "data"
    wrong = "0" * 32
    with pytest.raises(ValueError) as e:
        _get(data, download=True, url=server.url, md5=wrong)
    assert f"md5 {md5}, expected {wrong}" in str(e.value) and "CIFAR-10-C.tar" in str(e.value)
    assert sorted(p.name for p in data.iterdir()) == []
    # an existing final file with the wrong checksum is reported, not silently used
    (tmp_path / "y.tar").write_bytes(b"abc")
    with pytest.raises(ValueError, match=f"{tmp_path / 'y.tar'} exists but its md5 is"):
        download_file(server.url, tmp_path / "y.tar", md5=md5)


def test_default_checksums_are_the_published_ones():
    assert CIFAR_C_ARCHIVES["cifar10_c"].md5 == "56bf5dcef84df0e2308c6dcbcbbd8499"
    assert CIFAR_C_ARCHIVES["cifar100_c"].md5 == "11f0ed0f1191edbf9fa23466ae6021d3"
    assert CIFAR_C_ARCHIVES["cifar10_c"].url.startswith("https://zenodo.org/records/2535967/")


def test_extract_truncated_archive_leaves_nothing(tmp_path, archive):
    server, _, _ = archive
    tar = tmp_path / "cut.tar"
    tar.write_bytes(server.payload[: len(server.payload) // 2])
    with pytest.raises(ValueError, match=f"cannot extract {tar}"):
        extract_tar(tar, tmp_path / "out", "CIFAR-10-C")
    assert list((tmp_path / "out").iterdir()) == []


def test_extract_rejects_unsafe_members_and_missing_top_dir(tmp_path):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(ValueError, match=str(evil)):
        extract_tar(evil, tmp_path / "out", "CIFAR-10-C")
    assert not (tmp_path / "escaped.txt").exists()
    other = tmp_path / "other.tar"
    (tmp_path / "Other").mkdir()
    (tmp_path / "Other" / "a.txt").write_text("a")
    other.write_bytes(_tar_bytes(tmp_path / "Other", "Other"))
    with pytest.raises(ValueError, match="has no top directory 'CIFAR-10-C'"):
        extract_tar(other, tmp_path / "out2", "CIFAR-10-C")
    assert list((tmp_path / "out2").iterdir()) == []


def test_bad_selection_fails_before_downloading(tmp_path, archive):
    server, md5, _ = archive
    with pytest.raises(ValueError, match="unknown corruption 'haze'"):
        _get(tmp_path, corruption="haze", download=True, url=server.url, md5=md5)
    with pytest.raises(ValueError, match="examples_per_severity must be a positive int"):
        tta.data.get_dataset("cifar10_c", root=tmp_path, corruption="fog", examples_per_severity=0,
                             download=True, url=server.url, md5=md5)
    assert server.requests == [] and list(tmp_path.iterdir()) == [tmp_path / "source"]


# ----------------------------------------------------------------------------- subsets, exports, fingerprints

@pytest.mark.parametrize("k", [1, 3, 7])
def test_rows_per_severity_are_read_from_the_file(tmp_path, k):
    images = _images(5 * k, seed=k)
    labels = np.random.default_rng(k).integers(0, 10, 5 * k).astype(np.int64)
    np.save(tmp_path / "fog.npy", images)
    np.save(tmp_path / "labels.npy", labels)
    for severity in (1, 4, 5):
        ds = tta.data.get_dataset("cifar10_c", root=tmp_path, corruption="fog", severity=severity)  # no k given
        rows = slice((severity - 1) * k, severity * k)
        assert len(ds) == k and ds.examples_per_severity == k
        np.testing.assert_array_equal(ds.images.permute(0, 2, 3, 1).numpy(), images[rows])
        np.testing.assert_array_equal(ds.targets.numpy(), labels[rows])
    with pytest.raises(ValueError, match=f"num_examples={k + 1} but only {k} examples are available"):
        tta.data.get_dataset("cifar10_c", root=tmp_path, corruption="fog", num_examples=k + 1)
    with pytest.raises(ValueError, match=f"has {5 * k} images, expected {5 * (k + 1)}"):  # an explicit k is checked
        tta.data.get_dataset("cifar10_c", root=tmp_path, corruption="fog", examples_per_severity=k + 1)


def test_inferred_rows_are_checked_against_labels(tmp_path):
    np.save(tmp_path / "fog.npy", _images(14))
    np.save(tmp_path / "labels.npy", np.zeros(14, np.int64))
    with pytest.raises(ValueError, match=f"{tmp_path / 'fog.npy'} has 14 images, expected a positive multiple of 5"):
        tta.data.get_dataset("cifar10_c", root=tmp_path, corruption="fog")
    np.save(tmp_path / "fog.npy", _images(0))
    with pytest.raises(ValueError, match="has 0 images, expected a positive multiple of 5"):
        tta.data.get_dataset("cifar10_c", root=tmp_path, corruption="fog")
    np.save(tmp_path / "fog.npy", _images(15))
    with pytest.raises(ValueError, match=f"{tmp_path / 'labels.npy'} has 14 labels, expected 15"):
        tta.data.get_dataset("cifar10_c", root=tmp_path, corruption="fog")


def test_loads_tta_export(tmp_path):
    from tta.corruptions import corrupt
    from tta.data.corrupted import export_corrupted

    g = torch.Generator().manual_seed(5)
    clean = torch.randint(0, 256, (3, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.tensor([7, 0, 9])
    export_corrupted(clean, labels, tmp_path, ["contrast"], seed=2, progress=False)
    ds = tta.data.get_dataset("cifar10_c", root=tmp_path, corruption="contrast", severity=4)
    assert len(ds) == 3 and ds.targets.tolist() == [7, 0, 9]
    assert torch.equal(ds.images, corrupt(clean, "contrast", 4, seed=2))


def test_fingerprint_reflects_root_and_content(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write_cifar_c(a)
    _write_cifar_c(b)
    images = np.load(b / "fog.npy")
    images[PER + 1, 5, 5, 0] ^= 1  # one value of severity 2
    np.save(b / "fog.npy", images)

    def key(root, **kwargs):
        return tta.data.fingerprint(_get(root, **{"severity": 2, **kwargs}))

    first = key(a)
    assert key(a) == first and _get(a, severity=2).fingerprint() == first
    assert key(b) != first  # same labels, other content
    assert key(a, severity=3) != first and key(a, num_examples=2) != first
    (tmp_path / "c").mkdir()
    for name in ("fog.npy", "labels.npy"):
        (tmp_path / "c" / name).write_bytes((a / name).read_bytes())
    assert key(tmp_path / "c") != first  # same bytes, another root
    stat = (a / "fog.npy").stat()
    os.utime(a / "fog.npy", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert key(a) != first  # the file's size and mtime are part of it
