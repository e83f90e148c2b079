"""Tests of the training code (tta/training.py), scripts/train_source.py through Hydra's
compose API and scripts/export_pretrained.py, all on the embedded digits dataset."""
from __future__ import annotations

import importlib.util
import json
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
    assert result.clean_test_accuracy == pytest.approx((predictions == targets).float().mean().item())
    # 90 SGD steps of a tiny ResNet-8: well above chance (0.1), a broken loop stays at chance
    assert result.clean_test_accuracy > 0.2
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
    assert {"state_dict", "config", "clean_test_accuracy", "model"} <= set(saved)
    assert saved["model"]["name"] == "resnet8"
    kwargs = saved["model"]["kwargs"]
    assert kwargs["num_classes"] == 10 and kwargs["in_channels"] == 1 and kwargs["width"] == 8
    # the normalisation recorded is the train split's own statistics
    mean, std = channel_stats(dataset_tensors(tta.data.get_dataset("digits", split="train"))[0])
    assert kwargs["mean"] == pytest.approx(mean, abs=1e-4) and kwargs["std"] == pytest.approx(std, abs=1e-4)
    assert saved["config"]["epochs"] == 1 and saved["config"]["dataset"]["name"] == "digits"

    # rebuild from the checkpoint alone and recompute the recorded accuracy
    model = tta.models.get_model(saved["model"]["name"], **kwargs)
    model.load_state_dict(saved["state_dict"], strict=True)
    images, targets = dataset_tensors(tta.data.get_dataset("digits", split="test"))
    assert evaluate(model, images, targets) == pytest.approx(saved["clean_test_accuracy"])

    # a re-run finds the finished checkpoint and does not retrain
    mtime = output.stat().st_mtime_ns
    script.run(cfg)
    assert output.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == ["digits.pt"]  # no temp files

    # export into a shipped-model directory and load it by name from there
    export = _load_script("export_pretrained")
    weights, meta = export.export(output, "fashion_mnist", tmp_path / "pretrained")
    info = json.loads(meta.read_text())
    assert info["sha256"] == tta.models.shipped.sha256_of(weights)
    assert info["clean_test_accuracy"] == checkpoint["clean_test_accuracy"]
    assert set(tta.models.load_checkpoint(weights)) == set(saved["state_dict"])  # state_dict only
    shipped = tta.models.load_pretrained("fashion_mnist", directory=tmp_path / "pretrained")
    assert not shipped.training
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(shipped(x), model.eval()(x))
