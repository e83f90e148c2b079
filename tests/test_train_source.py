"""Tests of the training code (tta/training.py), scripts/train_source.py through Hydra's
compose API and scripts/export_pretrained.py, all on the embedded digits dataset."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import tta.data
import tta.models
from tta.training import augment_batch, channel_stats, dataset_tensors, evaluate, train

ROOT = Path(__file__).resolve().parents[1]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_augment_batch_is_a_padded_crop_or_its_mirror():
    images = torch.randint(0, 256, (16, 2, 7, 9), dtype=torch.uint8)
    assert torch.equal(augment_batch(images), images)
    p = 2
    out = augment_batch(images, crop_padding=p, hflip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == images.dtype
    padded = torch.nn.functional.pad(images, (p,) * 4)
    kinds = set()
    for i in range(len(images)):
        matches = [
            (dy, dx, flip)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            for flip in (False, True)
            if torch.equal(out[i], (lambda c: c.flip(-1) if flip else c)(padded[i, :, dy : dy + 7, dx : dx + 9]))
        ]
        assert matches, f"image {i} is not a crop of its padded input"
        kinds.add(matches[0])
    assert len(kinds) > 3  # offsets and flips vary per image
    again = augment_batch(images, crop_padding=p, hflip=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_channel_stats_match_numpy():
    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    mean, std = channel_stats(images)
    x = images.numpy().astype(np.float64) / 255
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(std, x.std(axis=(0, 2, 3), ddof=1), rtol=1e-9)


def test_dataset_tensors_from_items_matches_images_attribute():
    ds = tta.data.get_dataset("digits", split="test", num_examples=20)
    images, targets = dataset_tensors(ds)

    class ItemsOnly(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            return ds[i]

    images2, targets2 = dataset_tensors(ItemsOnly())
    assert torch.equal(images, images2) and torch.equal(targets, targets2)


def test_training_learns_digits():
    train_set = tta.data.get_dataset("digits", split="train")
    test_set = tta.data.get_dataset("digits", split="test")
    torch.manual_seed(0)
    model = tta.models.get_model("resnet8", num_classes=10, in_channels=1, width=8, mean=[0.22], std=[0.31])
    result = train(model, train_set, test_set, epochs=2, lr=0.05, batch_size=32, warmup_epochs=0,
                   crop_padding=0, hflip=False, progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    # an independent recount of the final accuracy
    images, targets = dataset_tensors(test_set)
    with torch.no_grad():
        predictions = model.eval()(images.float() / 255).argmax(1)
    assert result.test_accuracy == pytest.approx((predictions == targets).float().mean().item())
    # 90 SGD steps of a tiny ResNet-8: well above chance (0.1), a broken loop stays at chance
    assert result.test_accuracy > 0.2
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        train(model, train_set, test_set, epochs=1, lr=0.1, schedule="linear", progress=False)


def test_train_source_script_on_digits_and_export(tmp_path):
    script = _load_script("train_source")
    output = tmp_path / "digits.pt"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train_source", overrides=[
            "dataset=digits", "model=resnet8", "+model.kwargs.width=8", "epochs=1",
            f"output={output}", "progress=false",
        ])
    checkpoint = script.run(cfg)
    assert output.is_file()
    saved = tta.models.load_checkpoint(output)
    assert set(saved) == {"state_dict", "tta"}
    meta = saved["tta"]
    assert meta["architecture"] == "resnet8" and meta["dataset"] == "digits"
    assert meta["classes"] == [str(i) for i in range(10)] and meta["num_classes"] == 10
    assert meta["split"] == "test" and meta["num_examples"] == 360
    kwargs = meta["kwargs"]
    assert kwargs["num_classes"] == 10 and kwargs["in_channels"] == 1 and kwargs["width"] == 8
    # the normalisation recorded is the train split's own statistics (numpy, float64)
    train_images = tta.data.get_dataset("digits", split="train").images.numpy().astype(np.float64) / 255
    assert kwargs["mean"] == pytest.approx([train_images.mean()], abs=1e-4)
    assert kwargs["std"] == pytest.approx([train_images.std(ddof=1)], abs=1e-4)
    assert meta["config"]["epochs"] == 1 and meta["config"]["dataset"]["name"] == "digits"
    assert [r["epoch"] for r in meta["history"]] == [1] and meta["history"][0]["test_accuracy"] == meta["test_accuracy"]

    # rebuild by hand from the recorded facts and recompute the recorded accuracy
    model = tta.models.get_model(meta["architecture"], **kwargs)
    model.load_state_dict(saved["state_dict"], strict=True)
    images, targets = dataset_tensors(tta.data.get_dataset("digits", split="test"))
    assert evaluate(model, images, targets) == pytest.approx(meta["test_accuracy"])
    # get_model(weights=) restores the same model from the file alone
    restored = tta.models.get_model("resnet8", weights=output)
    assert tta.models.model_info(restored)["mean"] == kwargs["mean"]
    assert evaluate(restored, images, targets) == pytest.approx(meta["test_accuracy"])

    # a re-run finds the finished checkpoint and does not retrain
    mtime = output.stat().st_mtime_ns
    script.run(cfg)
    assert output.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == ["digits.pt"]  # no temp files

    # export into a shipped-model directory and load it by name from there
    export = _load_script("export_pretrained")
    weights, meta_path = export.export(output, "fashion_mnist", tmp_path / "pretrained")
    info = json.loads(meta_path.read_text())
    assert info["sha256"] == tta.models.shipped.sha256_of(weights)
    assert info["tta"] == checkpoint["tta"]  # the same metadata, unchanged
    assert set(tta.models.load_checkpoint(weights)) == set(saved["state_dict"])  # state_dict only
    assert sorted(p.name for p in (tmp_path / "pretrained").iterdir()) == ["fashion_mnist_resnet14.json",
                                                                           "fashion_mnist_resnet14.pt"]
    shipped = tta.models.load_pretrained("fashion_mnist", directory=tmp_path / "pretrained")
    assert not shipped.training
    shipped_info = tta.models.model_info(shipped)
    assert shipped_info["source"] == "fashion_mnist"
    assert {k: shipped_info[k] for k in meta} == meta
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(shipped(x), model.eval()(x))


def test_export_converts_an_older_checkpoint(tmp_path):
    torch.manual_seed(0)
    kwargs = {"num_classes": 10, "in_channels": 1, "width": 4, "mean": [0.25], "std": [0.5]}
    model = tta.models.get_model("resnet8", **kwargs)
    older = tmp_path / "older.pt"
    torch.save({"state_dict": model.state_dict(), "model": {"name": "resnet8", "kwargs": kwargs},
                "clean_test_accuracy": 0.5, "dataset": "digits", "config": {"epochs": 3},
                "history": [], "command": "python scripts/train_source.py"}, older)
    export = _load_script("export_pretrained")
    _, meta_path = export.export(older, "fashion_mnist_resnet8", tmp_path)
    block = json.loads(meta_path.read_text())["tta"]
    assert block["architecture"] == "resnet8" and block["kwargs"] == kwargs and block["test_accuracy"] == 0.5
    assert block["config"] == {"epochs": 3} and block["command"] == "python scripts/train_source.py"
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    with pytest.raises(ValueError, match=r"plain\.pt records no model metadata and test accuracy"):
        export.export(plain, "fashion_mnist", tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


def test_train_source_refuses_num_classes_that_do_not_fit(tmp_path):
    script = _load_script("train_source")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train_source", overrides=[
            "dataset=digits", "model=resnet8", "model.num_classes=5", "epochs=1",
            f"output={tmp_path / 'd.pt'}", "progress=false",
        ])
    with pytest.raises(ValueError, match=r"num_classes=5 does not fit dataset 'digits' \(labels up to 9, 10 classes\)"):
        script.run(cfg)
    assert not (tmp_path / "d.pt").exists()


@pytest.mark.slow
def test_evaluation_app_reproduces_the_recorded_accuracy(tmp_path):
    """Issue 9: a ResNet-8 trained on digits by train_source.py and evaluated by evaluate.py with
    model.weights=<checkpoint> must reach the accuracy recorded in its checkpoint (same split,
    same 360 images), not chance (which it did when its input normalisation was lost)."""
    script = _load_script("train_source")
    output = tmp_path / "digits_resnet8.pt"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train_source", overrides=[
            "dataset=digits", "model=resnet8", "+model.kwargs.width=8", "epochs=2", "batch_size=32", "lr=0.1",
            "warmup_epochs=0", "weight_decay=0", "augment.crop_padding=0", "augment.hflip=false",
            f"output={output}", "progress=false",
        ])
    meta = script.run(cfg)["tta"]
    recorded = meta["test_accuracy"]
    assert recorded > 0.3  # well above chance, so that losing the normalisation shows

    # independent recount: the same weights in a ResNet without normalisation, fed the test
    # images normalised by hand with the train split's statistics (numpy, float64)
    train_images = tta.data.get_dataset("digits", split="train").images.numpy().astype(np.float64) / 255
    mean, std = round(train_images.mean(), 4), round(train_images.std(ddof=1), 4)
    bare = tta.models.resnet.ResNet(depth=8, num_classes=10, in_channels=1, width=8).double().eval()
    bare.load_state_dict(tta.models.load_checkpoint(output)["state_dict"], strict=True)
    test = tta.data.get_dataset("digits", split="test")
    x = (torch.from_numpy(test.images.numpy().astype(np.float64) / 255) - mean) / std
    with torch.no_grad():
        correct = (bare(x).argmax(1) == test.targets).sum().item()
    assert recorded == pytest.approx(correct / 360, abs=1.5 / 360)  # float32 vs float64: at most one tie

    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TTA_CACHE_DIR": str(tmp_path / "cache"), "HYDRA_FULL_ERROR": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "dataset=digits", "model=resnet8",
         f"model.weights={output}", "num_examples=null", "corruption.names=[fog]",
         "corruption.severities=[1]", "adapt=source", "progress=false", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["cells"][0]["num_examples"] == meta["num_examples"] == 360
    assert results["clean_accuracy"] == pytest.approx(recorded, abs=1e-12)


# --- trust faults: re-runs, bad settings, divergence, one-line errors ------------------------

SMALL = ["dataset=digits", "model=resnet8", "+model.kwargs.width=4", "+dataset.kwargs.num_examples=64",
         "batch_size=16", "warmup_epochs=0", "progress=false"]


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train_source", overrides=[*SMALL, *overrides])


def test_rerun_retrains_when_the_config_changed_and_keeps_the_old_checkpoint(tmp_path):
    script = _load_script("train_source")
    output = tmp_path / "d.pt"
    script.run(_compose("epochs=1", f"output={output}"))
    first = output.read_bytes()
    # a run option (progress, num_threads, device, output) does not change what is trained
    script.run(_compose("epochs=1", f"output={output}", "progress=true", "num_threads=1"))
    assert output.read_bytes() == first
    # the old app skipped this run because the file existed, keeping the 1-epoch model
    script.run(_compose("epochs=2", "lr=0.05", f"output={output}"))
    meta = tta.models.load_checkpoint(output)["tta"]
    assert meta["config"]["epochs"] == 2 and meta["config"]["lr"] == 0.05 and len(meta["history"]) == 2
    (aside,) = (tmp_path / "superseded").iterdir()
    assert aside.name.endswith(".d.pt") and aside.read_bytes() == first  # moved, never overwritten
    # a file that is no checkpoint of this app is moved aside too, not overwritten
    output.write_bytes(b"not a checkpoint")
    script.run(_compose("epochs=2", "lr=0.05", f"output={output}"))
    assert tta.models.load_checkpoint(output)["tta"]["config"]["epochs"] == 2
    assert sorted(p.read_bytes()[:16] for p in (tmp_path / "superseded").iterdir()) == sorted(
        [first[:16], b"not a checkpoint"])


@pytest.mark.parametrize("override, error, message", [
    ("lr=nan", ValueError, r"lr must be a finite number > 0 \(default 0.1\), got nan"),
    ("lr=inf", ValueError, "lr must be a finite number > 0"),
    ("lr=0", ValueError, "lr must be a finite number > 0"),
    ("lr=fast", TypeError, r"lr must be a finite number > 0 \(default 0.1\), got 'fast' \(str\)"),
    ("momentum=1.5", ValueError, r"momentum must be a finite number in \[0, 1\)"),
    ("weight_decay=-1", ValueError, "weight_decay must be a finite number >= 0"),
    ("warmup_epochs=nan", ValueError, r"warmup_epochs must be a finite number in \[0, epochs=1\]"),
    ("label_smoothing=2", ValueError, r"label_smoothing must be a finite number in \[0, 1\]"),
    ("epochs=0", ValueError, "epochs must be an int >= 1, got 0"),
    ("epochs=1.5", TypeError, "epochs must be an int >= 1, got 1.5"),
    ("batch_size=0", ValueError, "batch_size must be an int >= 1, got 0"),
    ("augment.crop_padding=-2", ValueError, "crop_padding must be an int >= 0"),
    ("schedule=linear", ValueError, r"unknown schedule 'linear'; valid: \['cosine', 'constant'\]"),
    ("num_threads=0", ValueError, "num_threads must be null or an int >= 1, got 0"),
    ("+lr_decay=0.1", ValueError, r"unknown setting\(s\) \['lr_decay'\]"),
    ("device=gpu0", ValueError, r"device='gpu0' is not a torch device \(auto, cpu, cuda, cuda:N\)"),
])
def test_bad_settings_are_refused_before_anything(tmp_path, monkeypatch, override, error, message):
    script = _load_script("train_source")
    output = tmp_path / "d.pt"

    def no_data(*args, **kwargs):
        raise AssertionError("data loaded before the settings were checked")

    monkeypatch.setattr(tta.data, "get_dataset", no_data)
    with pytest.raises(error, match=message):
        script.run(_compose("epochs=1", override, f"output={output}"))
    assert list(tmp_path.iterdir()) == []


def test_diverging_training_writes_no_checkpoint_and_keeps_the_old_file(tmp_path):
    script = _load_script("train_source")
    output = tmp_path / "d.pt"
    output.write_bytes(b"an earlier result")
    # a finite but far too large lr: the loss and weights become nan in the first epoch
    with pytest.raises(FloatingPointError, match=r"training diverged in epoch 1: mean train loss nan"):
        script.run(_compose("epochs=2", "lr=1e10", f"output={output}"))
    assert [p.name for p in tmp_path.iterdir()] == ["d.pt"] and output.read_bytes() == b"an earlier result"
    # the library refuses the same way
    torch.manual_seed(0)
    model = tta.models.get_model("resnet8", num_classes=10, in_channels=1, width=4)
    data = tta.data.get_dataset("digits", split="test", num_examples=32)
    with pytest.raises(FloatingPointError, match="non-finite parameter"):
        train(model, data, data, epochs=1, lr=1e10, batch_size=16, warmup_epochs=0, progress=False)


@pytest.mark.parametrize("debug", [False, True])
def test_a_failure_is_one_line_and_exit_status_1(tmp_path, debug):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TTA_DEBUG", None)
    env.pop("HYDRA_FULL_ERROR", None)
    if debug:
        env["TTA_DEBUG"] = "1"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_source.py"), *SMALL, "model.num_classes=5",
         f"output={tmp_path / 'd.pt'}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 1
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    message = "num_classes=5 does not fit dataset 'digits'"
    if debug:
        assert "Traceback" in done.stderr and message in done.stderr
    else:
        assert lines == [next(line for line in lines if message in line)]
        assert "training failed: ValueError: num_classes=5" in lines[0] and "TTA_DEBUG=1" in lines[0]
    assert not (tmp_path / "d.pt").exists()


@pytest.mark.parametrize("overrides, message", [
    # the old app trained a ResNet-8 / a from-scratch ResNet-14, silently ignoring the shipped model
    (["model=resnet8", "model.pretrained=bogus_name"], r"model.pretrained='bogus_name': train-source trains "
                                                       r"model.name='resnet8' from scratch"),
    (["model=fashion_mnist"], r"model.pretrained='fashion_mnist'.*model=<architecture>"),
    (["model=resnet8", "+model.foo=1"], r"unknown setting\(s\) \['model.foo'\]: train-source would ignore them"),
    # the old app failed only after the whole training
    (["model=resnet8", "output=/proc/nope/x.pt"], r"output='/proc/nope/x.pt' cannot be written"),
    (["model=resnet8", "output=."], r"output='.' cannot be written: . is a directory"),
])
def test_ignored_model_settings_and_unwritable_output_are_refused_before_training(
        tmp_path, monkeypatch, overrides, message):
    script = _load_script("train_source")

    def no_data(*args, **kwargs):
        raise AssertionError("data loaded before the settings were checked")

    monkeypatch.setattr(tta.data, "get_dataset", no_data)
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train_source", overrides=["dataset=digits", "epochs=1", f"output={tmp_path / 'd.pt'}",
                                                 *overrides])
    with pytest.raises(ValueError, match=message):
        script.run(cfg)
    assert list(tmp_path.iterdir()) == []  # nothing created (the writability probe leaves nothing)


@pytest.mark.slow
def test_help_lists_only_the_groups_train_source_uses(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_source.py"), "--help"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    groups = done.stdout.split("== Config ==")[0]
    assert "dataset:" in groups and "model:" in groups
    assert "adapt:" not in groups and "corruption:" not in groups and "stream:" not in groups  # evaluate's
