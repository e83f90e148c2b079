"""Tests of the metadata that travels with tta checkpoints and shipped models
(tta.models.checkpoint: make_metadata, read_metadata, model_info; get_model(weights=...),
load_pretrained) and of the errors for files that are not checkpoints."""
from __future__ import annotations

import copy
import json
import os
import pickle
import re
import shutil

import numpy as np
import pytest
import torch

import tta.models
from tta.models import CheckpointError, model_info, save_checkpoint
from tta.models.checkpoint import make_metadata
from tta.models.resnet import ResNet
from tta.models.shipped import PRETRAINED, PRETRAINED_DIR

MEAN, STD = [0.3], [0.2]


def _tta_checkpoint(path, *, mean=MEAN, std=STD, seed=0):
    """A ResNet-8 (width 4) trained on nothing, saved as scripts/train_source.py does."""
    torch.manual_seed(seed)
    kwargs = {"num_classes": 10, "in_channels": 1, "width": 4, "mean": mean, "std": std}
    model = ResNet(depth=8, **kwargs)
    with torch.no_grad():  # non-trivial running statistics
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    metadata = make_metadata("resnet8", kwargs, dataset="digits", classes=[str(i) for i in range(10)],
                             test_accuracy=0.4325, num_examples=360, config={"epochs": 1})
    save_checkpoint({"state_dict": model.state_dict(), "tta": metadata}, path)
    return model.state_dict()


# ---------------------------------------------------------------- get_model(weights=tta checkpoint)


def test_tta_checkpoint_restores_its_input_normalisation(tmp_path):
    path = tmp_path / "digits_resnet8.pt"
    state = _tta_checkpoint(path)
    # the caller gives only what the evaluation app gives: nothing about mean/std
    model = tta.models.get_model("resnet8", weights=path, num_classes=10, in_channels=1).eval()
    # independent reference: the same weights in a network without normalisation, fed
    # (x - 0.3) / 0.2 computed by hand in float64
    plain = ResNet(depth=8, num_classes=10, in_channels=1, width=4).double().eval()
    plain.load_state_dict(state, strict=True)
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        expected = plain((x - 0.3) / 0.2)
        torch.testing.assert_close(model(x.float()).double(), expected, rtol=1e-4, atol=1e-4)
        # without the recorded normalisation the outputs differ (the fault of issue 9)
        assert not torch.allclose(plain(x), expected, atol=1e-2)


def test_model_info_keys_values_and_lifetime(tmp_path):
    path = tmp_path / "c.pt"
    _tta_checkpoint(path)
    model = tta.models.get_model("resnet8", weights=path)
    info = model_info(model)
    assert info["architecture"] == "resnet8" and info["dataset"] == "digits"
    assert info["num_classes"] == 10 and info["classes"] == [str(i) for i in range(10)]
    assert info["mean"] == MEAN and info["std"] == STD
    assert info["test_accuracy"] == 0.4325 and info["num_examples"] == 360 and info["split"] == "test"
    assert info["source"] == os.fspath(path) and info["config"] == {"epochs": 1}
    info["dataset"] = "changed"  # a copy: the model's record is unchanged
    assert model_info(model)["dataset"] == "digits"
    # survives deepcopy and .to(); never in the state_dict
    assert model_info(copy.deepcopy(model))["dataset"] == "digits"
    assert model_info(model.to(torch.float64))["mean"] == MEAN
    assert not any("tta" in key or "metadata" in key for key in model.state_dict())
    # a model without recorded metadata
    assert model_info(tta.models.get_model("resnet8")) is None


def test_checkpoint_loads_weights_only_and_holds_plain_data(tmp_path):
    path = tmp_path / "c.pt"
    _tta_checkpoint(path)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"state_dict", "tta"}
    assert json.loads(json.dumps(raw["tta"])) == raw["tta"]  # JSON-safe: plain containers only
    with pytest.raises(TypeError, match=r"metadata value tensor.* at metadata\.bad .*valid: dict, list"):
        make_metadata("resnet8", {"num_classes": 10}, bad=torch.ones(1))
    with pytest.raises(CheckpointError, match="'classes' must be a list of num_classes=10"):
        make_metadata("resnet8", {"num_classes": 10}, classes=["a", "b"])
    with pytest.raises(CheckpointError, match=r"'test_accuracy' must be a fraction in \[0, 1\].*43"):
        make_metadata("resnet8", {"num_classes": 10}, test_accuracy=43)


@pytest.mark.parametrize("kwargs,pattern", [
    ({"num_classes": 5}, r"num_classes=5 contradicts num_classes=10 recorded in .*c\.pt"),
    ({"in_channels": 3}, r"in_channels=3 contradicts in_channels=1 recorded in .*c\.pt"),
    ({"mean": [0.5]}, r"mean=\[0\.5\] contradicts mean=\[0\.3\] recorded in .*c\.pt"),
    ({"width": 16}, r"width=16 contradicts width=4 recorded"),
])
def test_contradicting_kwargs_are_refused(tmp_path, kwargs, pattern):
    path = tmp_path / "c.pt"
    _tta_checkpoint(path)
    with pytest.raises(ValueError, match=pattern):
        tta.models.get_model("resnet8", weights=path, **kwargs)


def test_other_architecture_and_unrecorded_contract_kwargs_are_refused(tmp_path):
    path = tmp_path / "c.pt"
    _tta_checkpoint(path)
    with pytest.raises(ValueError, match=r"c\.pt holds a 'resnet8' model .* asked for 'resnet14'"):
        tta.models.get_model("resnet14", weights=path, num_classes=10)
    # restating the recorded values is fine (also as a tuple)
    model = tta.models.get_model("resnet8", weights=path, num_classes=10, in_channels=1, mean=(0.3,), std=STD)
    assert model_info(model)["mean"] == MEAN
    # a record without mean/std (no normalisation): giving one would silently change the model
    unnormalised = tmp_path / "plain_input.pt"
    model = ResNet(depth=8, num_classes=10, in_channels=1, width=4)
    save_checkpoint({"state_dict": model.state_dict(), "tta": make_metadata(
        "resnet8", {"num_classes": 10, "in_channels": 1, "width": 4})}, unnormalised)
    with pytest.raises(ValueError, match=r"mean=\[0\.3\] was given but .*plain_input\.pt records no mean"):
        tta.models.get_model("resnet8", weights=unnormalised, mean=[0.3], std=[0.2])
    assert model_info(tta.models.get_model("resnet8", weights=unnormalised))["mean"] is None
    # unrecorded kwargs that restate the builder's default are fine, others are refused
    net = tta.models.get_model("squeezenet1_1", num_classes=10)
    torchvision_path = tmp_path / "squeezenet.pt"
    save_checkpoint({"state_dict": net.state_dict(), "tta": make_metadata("squeezenet1_1", {"num_classes": 10})},
                    torchvision_path)
    info = model_info(tta.models.get_model("squeezenet1_1", weights=torchvision_path, num_classes=10, in_channels=3))
    assert info["mean"] == pytest.approx([0.485, 0.456, 0.406])  # torchvision's ImageNet statistics
    with pytest.raises(ValueError, match=r"mean=\[0\.5\] was given but .*records no mean .*default mean=\(0\.485"):
        tta.models.get_model("squeezenet1_1", weights=torchvision_path, mean=[0.5])


def test_plain_and_older_checkpoints_still_load(tmp_path):
    torch.manual_seed(0)
    model = ResNet(depth=8, num_classes=10, in_channels=1, width=4, mean=[0.25], std=[0.5])
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    loaded = tta.models.get_model("resnet8", weights=plain, num_classes=10, in_channels=1, width=4)
    assert model_info(loaded) is None
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    # the layout scripts/train_source.py wrote before the "tta" block
    older = tmp_path / "older.pt"
    kwargs = {"num_classes": 10, "in_channels": 1, "width": 4, "mean": [0.25], "std": [0.5]}
    torch.save({"state_dict": model.state_dict(), "model": {"name": "resnet8", "kwargs": kwargs},
                "clean_test_accuracy": 0.5, "dataset": "digits", "config": {}}, older)
    restored = tta.models.get_model("resnet8", weights=older, num_classes=10)
    info = model_info(restored)
    assert info["mean"] == [0.25] and info["test_accuracy"] == 0.5 and info["dataset"] == "digits"
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(x), model.eval()(x))


# ---------------------------------------------------------------- bad input


def test_model_name_of_the_wrong_type():
    with pytest.raises(TypeError, match=r"model name must be a str, got \['resnet8'\] \(list\); valid: .*'resnet20'"):
        tta.models.get_model(["resnet8"])
    with pytest.raises(TypeError, match=r"model name must be a str, got 3 \(int\)"):
        tta.models.register_model(3)


def _no_weights_only_advice(error: BaseException) -> None:
    seen = error
    while seen is not None:  # the chain printed with the traceback says it neither
        assert "weights_only" not in str(seen)
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)


def test_random_bytes_lfs_pointer_and_code_are_named_and_never_advise_unsafe_loading(tmp_path):
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match=r"noise\.pt \(4096 bytes\) is not a checkpoint written by torch\.save") as info:
        tta.models.load_checkpoint(noise)
    _no_weights_only_advice(info.value)

    pointer = tmp_path / "Standard.pt"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\n"
                       "oid sha256:" + "ab" * 32 + "\nsize 146564000\n")
    with pytest.raises(CheckpointError, match=r"Standard\.pt is a git-LFS pointer .*run `git lfs pull`") as info:
        tta.models.get_model("wide_resnet28_10", weights=pointer)
    _no_weights_only_advice(info.value)

    evil = tmp_path / "evil.pt"
    torch.save({"f": shutil.rmtree}, evil)
    with pytest.raises(pickle.UnpicklingError, match=r"evil\.pt holds the Python object shutil\.rmtree") as info:
        tta.models.load_checkpoint(evil)
    assert isinstance(info.value, CheckpointError)
    _no_weights_only_advice(info.value)


# ---------------------------------------------------------------- shipped models


def _shipped_files(tmp_path, name="fashion_mnist"):
    stem = PRETRAINED[name]
    pt, meta = PRETRAINED_DIR / f"{stem}.pt", PRETRAINED_DIR / f"{stem}.json"
    if not pt.is_file():
        pytest.skip(f"shipped model not there: {pt}")
    shutil.copy(pt, tmp_path)
    return tmp_path / pt.name, tmp_path / meta.name, json.loads(meta.read_text())


@pytest.mark.parametrize("name", sorted(PRETRAINED))
def test_load_pretrained_carries_the_json_metadata(name):
    meta = json.loads((PRETRAINED_DIR / f"{PRETRAINED[name]}.json").read_text())["tta"]
    info = model_info(tta.models.load_pretrained(name))
    assert info["source"] == name and info["dataset"] == "fashion_mnist"
    for key in ("architecture", "num_classes", "classes", "test_accuracy", "num_examples"):
        assert info[key] == meta[key], key
    assert info["mean"] == [0.286] and info["std"] == [0.353] and info["num_examples"] == 10000
    assert info["classes"][0] == "T-shirt/top" and len(info["classes"]) == 10


def test_load_pretrained_reads_the_older_json_layout(tmp_path):
    _, meta_path, meta = _shipped_files(tmp_path)
    block = meta["tta"]
    older = {"name": meta["name"], "file": meta["file"], "sha256": meta["sha256"],
             "model": {"name": block["architecture"], "kwargs": block["kwargs"]},
             "clean_test_accuracy": block["test_accuracy"], "dataset": block["dataset"]}
    meta_path.write_text(json.dumps(older))
    info = model_info(tta.models.load_pretrained("fashion_mnist", directory=tmp_path))
    assert info["architecture"] == "resnet14" and info["test_accuracy"] == 0.943
    assert info["mean"] == [0.286] and info["classes"] is None


@pytest.mark.parametrize("text,pattern", [
    ('{"name": "fashion_mnist", "sha2', r"fashion_mnist_resnet14\.json is not valid JSON \(truncated or corrupt\?\)"),
    ("\x00\x01 binary", r"fashion_mnist_resnet14\.json is not valid JSON"),
    ('{"name": "fashion_mnist"}', r"fashion_mnist_resnet14\.json is not the metadata of a shipped model: it needs 'sha256'.*found \['name'\]"),
    ('[1, 2]', r"fashion_mnist_resnet14\.json is not the metadata of a shipped model.*found list"),
    ('{"sha256": "x", "tta": {"format": 1, "kwargs": {}}}', r"fashion_mnist_resnet14\.json: metadata 'architecture' must be a model name"),
])
def test_corrupt_shipped_json_is_named(tmp_path, text, pattern):
    _, meta_path, _ = _shipped_files(tmp_path)
    meta_path.write_text(text)
    with pytest.raises(CheckpointError, match=pattern):
        tta.models.load_pretrained("fashion_mnist", directory=tmp_path)


def test_load_pretrained_docstring_states_the_json_facts():
    doc = " ".join(tta.models.load_pretrained.__doc__.split())
    for name, stem in PRETRAINED.items():
        block = json.loads((PRETRAINED_DIR / f"{stem}.json").read_text())["tta"]
        depth = int(re.fullmatch(r"resnet(\d+)", block["architecture"]).group(1))
        assert re.search(rf'``"{name}"``( \(default\))?: ResNet-{depth}, {100 * block["test_accuracy"]:.2f} %', doc), name
