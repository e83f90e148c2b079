"""Export of corrupted datasets in the CIFAR-10-C layout: tta.data.corrupted and
scripts/make_corrupted.py, and the on-the-fly CorruptedDataset."""
from __future__ import annotations

import io
import os
import re
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


# ----------------------------------------------------------------------------- resume keys, full disk, stale files

def _mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir() if not p.name.startswith(".")}


def test_export_resume_keys_on_every_argument(tmp_path, small_set):
    import json

    images, labels = small_set
    export_corrupted(images, labels, tmp_path, ["contrast"], seed=0, progress=False)
    path = tmp_path / "contrast.npy"
    before, stamps = path.read_bytes(), _mtimes(tmp_path)
    record = json.loads((tmp_path / "contrast.json").read_text())
    assert record["arguments"]["seed"] == 0 and record["arguments"]["preset"] == "cifar"
    assert record["arguments"]["num_examples"] == 7 and record["file"] == "contrast.npy"
    # equivalent arguments (explicit default preset, another batch size) resume: nothing rewritten
    export_corrupted(images, labels, tmp_path, ["contrast"], preset="cifar", batch_size=2, progress=False)
    assert _mtimes(tmp_path) == stamps
    other = images.clone()
    other[3, 0, 0, 0] ^= 1
    for kwargs, message in [
        ({"seed": 1}, "seed=0 there, 1 now"),
        ({"preset": "tiny"}, "preset='cifar' there, 'tiny' now"),
        ({"images": other}, "images_sha256="),
        ({"images": images[:5], "labels": labels[:5]}, "num_examples=7 there, 5 now"),
        ({"labels": (labels + 1) % 10}, "labels.npy holds other labels"),
    ]:
        call = {"images": images, "labels": labels, "seed": 0, **kwargs}
        with pytest.raises(ValueError, match=f"{path} was made with other arguments.*{message}|{message}") as e:
            export_corrupted(call.pop("images"), call.pop("labels"), tmp_path, ["fog", "contrast"],
                             progress=False, **call)
        assert "overwrite=True" in str(e.value)
        assert path.read_bytes() == before and not (tmp_path / "fog.npy").exists()  # refused before writing
    # overwrite redoes the differing file with the new arguments
    export_corrupted(images, labels, tmp_path, ["contrast"], seed=1, overwrite=True, progress=False)
    expected = np.concatenate([corrupt(images, "contrast", s, seed=1).permute(0, 2, 3, 1).numpy() for s in range(1, 6)])
    assert np.array_equal(np.load(path), expected)
    assert json.loads((tmp_path / "contrast.json").read_text())["arguments"]["seed"] == 1
    # a finished file without a record (another tool, an older tta) is not taken as ours
    (tmp_path / "contrast.json").unlink()
    with pytest.raises(ValueError, match="no readable record"):
        export_corrupted(images, labels, tmp_path, ["contrast"], seed=1, progress=False)


def test_export_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path, small_set, monkeypatch):
    import errno

    images, labels = small_set
    calls = []

    def full(fd, offset, length):
        calls.append(length)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=f"no space left to write {tmp_path / 'fog.npy'} .*free on that file system") as e:
        export_corrupted(images, labels, tmp_path, ["fog"], progress=False)
    assert e.value.errno == errno.ENOSPC
    assert calls[0] >= 35 * 32 * 32 * 3  # the whole file is reserved before any corruption is computed
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["labels.npy"]
    monkeypatch.undo()  # space again: the retry writes the file
    export_corrupted(images, labels, tmp_path, ["fog"], progress=False)
    assert np.array_equal(np.load(tmp_path / "fog.npy")[:7], corrupt(images, "fog", 1).permute(0, 2, 3, 1).numpy())


def test_export_removes_stale_temporary_files_but_waits_for_a_live_writer(tmp_path, small_set):
    images, labels = small_set
    stale = tmp_path / ".contrast.npy.12345.tmp"  # left by a killed run
    stale.write_bytes(b"partial")
    live = tmp_path / ".fog.npy.live.tmp"
    # another process is writing fog.npy: it holds the file's lock and its temporary file
    writer = subprocess.Popen(
        [sys.executable, "-c", f"""
import sys, time
from filelock import FileLock
from pathlib import Path
out = Path({str(tmp_path)!r})
with FileLock(out / ".fog.npy.lock"):
    Path({str(live)!r}).write_bytes(b"in progress")
    print("locked", flush=True)
    for _ in range(1200):  # until the other run has finished contrast.npy (or 60 s)
        if (out / "contrast.npy").exists():
            break
        time.sleep(0.05)
    intact = Path({str(live)!r}).read_bytes() == b"in progress"
print("intact" if intact else "clobbered", flush=True)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "locked"
        export_corrupted(images, labels, tmp_path, ["fog", "contrast"], progress=False)
        assert writer.stdout.readline().strip() == "intact"
    finally:
        writer.kill()
        writer.wait()
    assert not stale.exists()
    assert not live.exists()  # the writer died without finishing: its file was stale once the lock was free
    assert np.array_equal(np.load(tmp_path / "fog.npy")[7:14], corrupt(images, "fog", 2).permute(0, 2, 3, 1).numpy())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_corrupted", ROOT / "scripts" / "make_corrupted.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _run_script(*overrides: str) -> None:
    """scripts/make_corrupted.py's app in this process, on the config Hydra composes."""
    from hydra import compose, initialize_config_dir

    from tta.apps import make_corrupted

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="make_corrupted", overrides=list(overrides))
    threads = torch.get_num_threads()
    try:
        make_corrupted.run(cfg)  # main (scripts/make_corrupted.py): the same, a failure as one line, status 1
    finally:
        torch.set_num_threads(threads)  # main sets num_threads


def test_export_and_script_refuse_bad_num_examples(tmp_path, small_set):
    images, labels = small_set
    with pytest.raises(ValueError, match="N >= 1"):
        export_corrupted(images[:0], labels[:0], tmp_path, ["fog"], progress=False)
    script = _script()
    base = TensorDataset(images, labels)
    for bad in (0, -1, 8, 2.5, True):
        with pytest.raises(ValueError, match=f"got {bad!r}|num_examples={bad}.*only 7 examples.*the test split"):
            script.load_uint8(base, bad, "the test split")
    assert torch.equal(script.load_uint8(base, 7)[0], images)
    out = tmp_path / "digits-c"
    for bad, message in ((361, "num_examples=361 but only 360 examples are available in the digits test split"),
                         (0, "got 0 (360 examples are available in the digits test split)")):
        with pytest.raises(ValueError, match=re.escape(message)):
            _run_script("dataset=digits", f"out_dir={out}", f"num_examples={bad}", "corruptions=[contrast]",
                        "progress=false")
        assert not out.exists()


def test_script_resume_keys_on_seed_and_preset(tmp_path):
    out = tmp_path / "digits-c"
    common = ["dataset=digits", f"out_dir={out}", "num_examples=6", "corruptions=[gaussian_noise]", "progress=false"]
    _run_script(*common)
    first = (out / "gaussian_noise.npy").read_bytes()
    for override, message in (("seed=1", "seed=0 there, 1 now"), ("preset=tiny", "preset='cifar' there, 'tiny' now")):
        with pytest.raises(ValueError, match=re.escape(message)):
            _run_script(*common, override)
        assert (out / "gaussian_noise.npy").read_bytes() == first
    _run_script(*common, "seed=1", "overwrite=true")
    rows = np.load(out / "gaussian_noise.npy")
    base = TensorDataset(*_script().load_uint8(__import__("tta").data.get_dataset("digits"), 6))
    expected = corrupt(base.tensors[0], "gaussian_noise", 3, seed=1).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(rows[12:18], expected) and rows.tobytes() != np.load(io.BytesIO(first)).tobytes()


@pytest.mark.parametrize("override, error, message", [
    ("corruptions=[fgo]", ValueError, "unknown corruption 'fgo'; valid names are: gaussian_noise"),
    ("corruptions=[fog,fog]", ValueError, "duplicate corruption"),
    ("corruptions=fog", ValueError, "corruptions must be a list of names"),
    ("preset=huge", ValueError, "unknown preset 'huge'"),
    ("seed=-1", ValueError, "seed must be an int >= 0, got -1"),
    ("rgb=maybe", TypeError, "rgb must be true or false, got 'maybe'"),
    ("batch_size=0", ValueError, "batch_size must be a positive int, got 0"),
])
def test_script_checks_its_settings_before_reading_data(tmp_path, monkeypatch, override, error, message):
    import tta.data

    def no_data(*args, **kwargs):
        raise AssertionError("data read before the settings were checked")

    monkeypatch.setattr(tta.data, "get_dataset", no_data)
    out = tmp_path / "digits-c"
    with pytest.raises(error, match=re.escape(message)):
        _run_script("dataset=digits", f"out_dir={out}", "num_examples=4", "corruptions=[fog]", override)
    assert not out.exists()


@pytest.mark.slow
def test_script_failure_is_one_line_and_exit_status_1(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TTA_DEBUG", None)
    env.pop("HYDRA_FULL_ERROR", None)
    out = tmp_path / "digits-c"

    def run(*overrides, **extra):
        return subprocess.run([sys.executable, str(ROOT / "scripts" / "make_corrupted.py"), "dataset=digits",
                               f"out_dir={out}", "progress=false", *overrides], cwd=tmp_path,
                              env={**env, **extra}, capture_output=True, text=True, timeout=120)

    assert run("num_examples=4", "corruptions=[fog]").returncode == 0
    first = (out / "fog.npy").read_bytes()
    for overrides, message in ((["num_examples=4", "corruptions=[fgo]"], "ValueError: unknown corruption 'fgo'"),
                               (["num_examples=5", "corruptions=[fog]"], "num_examples=4 there, 5 now")):
        done = run(*overrides)
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip() and "INFO" not in line]
        assert done.returncode == 1 and len(lines) == 1, lines
        assert "export failed: " in lines[0] and message in lines[0] and "TTA_DEBUG=1" in lines[0]
        assert "Traceback" not in done.stderr and "HYDRA_FULL_ERROR" not in done.stderr
    assert (out / "fog.npy").read_bytes() == first
    done = run("num_examples=4", "corruptions=[fgo]", TTA_DEBUG="1")
    assert done.returncode == 1 and "Traceback" in done.stderr and "unknown corruption 'fgo'" in done.stderr
