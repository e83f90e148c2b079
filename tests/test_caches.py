"""Caches, fingerprints and resume of the benchmark job: every key covers what changes the
output (normalisation, architecture, data root and content), finished jobs are redone when an
input changed at the same path, broken cache and results files are recomputed, not fatal."""
from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
from torch import nn

import tta
from tta.evaluation import run_benchmark
from tta.evaluation.pipeline import load_images
from tta.evaluation.results import CellCache, finished, model_hash

from test_evaluation import MODEL_KWARGS, N, _fitted_state, small_model


def _accuracy(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> float:
    """Independent oracle: eval-mode accuracy of ``model`` on uint8 images, in float64."""
    with torch.no_grad():
        predictions = model.eval()(images.float() / 255).argmax(1)
    return float((predictions == targets).double().mean())


def _digits_run(tmp_path, out: str, **kwargs):
    args = dict(dataset="digits", model="resnet8", model_kwargs=MODEL_KWARGS,
                corruptions=["fog"], severities=[3], num_examples=N, batch_size=16,
                device="cpu", cache_dir=tmp_path / "cache", progress=False)
    args.update(kwargs)
    return run_benchmark(tmp_path / out, **args)


# --- item 11: the model key covers normalisation, architecture arguments, every buffer ------

def test_model_hash_covers_everything_that_changes_outputs():
    def net(**kwargs):
        model = tta.models.get_model("resnet8", **MODEL_KWARGS, **kwargs)
        model.load_state_dict(_fitted_state(0))
        return model

    a, b = net(mean=[0.286], std=[0.353]), net(mean=[0.9], std=[0.05])
    assert a.state_dict().keys() == b.state_dict().keys()  # mean/std are not in the state_dict
    assert model_hash(a) != model_hash(b)
    assert model_hash(a) == model_hash(copy.deepcopy(a))
    # same weights, another constructor argument (padding) that changes the outputs
    c1, c2 = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(1, 2, 3, padding=0)
    c2.load_state_dict(c1.state_dict())
    assert model_hash(c1) != model_hash(c2)
    # a non-persistent buffer
    m1, m2 = nn.Module(), nn.Module()
    m1.register_buffer("scale", torch.ones(1), persistent=False)
    m2.register_buffer("scale", torch.full((1,), 2.0), persistent=False)
    assert model_hash(m1) != model_hash(m2)


def test_cached_source_metrics_follow_the_input_normalisation(tmp_path, weights_file):
    images, targets = load_images("digits", num_examples=N)
    fog = tta.corrupt(images, "fog", 3, seed=0)
    truths = []
    for i, (mean, std) in enumerate((([0.0], [1.0]), ([0.9], [0.05]))):  # identity first
        kwargs = {**MODEL_KWARGS, "mean": mean, "std": std}
        results = _digits_run(tmp_path, f"run{i}", weights=weights_file, model_kwargs=kwargs)
        model = tta.models.get_model("resnet8", **kwargs)
        model.load_state_dict(_fitted_state(0))
        truth = (_accuracy(model, images, targets), _accuracy(model, fog, targets))
        assert results["clean_accuracy"] == pytest.approx(truth[0])
        assert results["cells"][0]["source_accuracy"] == pytest.approx(truth[1])
        truths.append(truth)
    assert truths[0] != truths[1]  # the second run could not have been served by the first


# --- item 12 and 13 (data): precorrupted data keyed by root and content ----------------------

E = 8  # images per severity of the fake CIFAR-10-C files


@pytest.fixture(scope="module")
def cifar_c(tmp_path_factory):
    """Two CIFAR-10-C folders with the same labels: a random 3-channel ResNet-8 (its weights
    file) gets every fog/1 image of folder ``a`` right and every one of folder ``b`` wrong."""
    base = tmp_path_factory.mktemp("cifar_c")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = tta.models.get_model("resnet8", num_classes=10, in_channels=3, width=8).eval()
    torch.save(model.state_dict(), base / "net.pt")
    colours = np.random.default_rng(0).integers(0, 256, (200, 1, 1, 3))
    pool = np.broadcast_to(colours, (200, 32, 32, 3)).astype(np.uint8)
    with torch.no_grad():
        predicted = model(torch.from_numpy(pool).permute(0, 3, 1, 2).float() / 255).argmax(1)
    label = int(torch.bincount(predicted).argmax())
    right, wrong = pool[(predicted == label).numpy()], pool[(predicted != label).numpy()]
    assert len(right) >= E and len(wrong) >= E
    labels = np.full(5 * E, label, dtype=np.int64)
    for name, chosen in (("a", right[:E]), ("b", wrong[:E])):
        (base / name).mkdir()
        images = np.zeros((5 * E, 32, 32, 3), np.uint8)
        images[:E] = chosen  # severity 1
        np.save(base / name / "fog.npy", images)
        np.save(base / name / "labels.npy", labels)
    return base


def _cifar_c_run(cifar_c, tmp_path, root: str, out: str = "run", **kwargs):
    return run_benchmark(
        tmp_path / out, dataset="cifar10_c", precorrupted=True, dataset_root=str(cifar_c / root),
        model="resnet8", weights=str(cifar_c / "net.pt"),
        model_kwargs={"num_classes": 10, "in_channels": 3, "width": 8},
        corruptions=["fog"], severities=[1], batch_size=4, device="cpu",
        cache_dir=tmp_path / "cache", progress=False, **kwargs)


def _cifar_c_truth(cifar_c, root: str) -> float:
    model = tta.models.get_model("resnet8", num_classes=10, in_channels=3, width=8)
    model.load_state_dict(torch.load(cifar_c / "net.pt", weights_only=True))
    images = torch.from_numpy(np.load(cifar_c / root / "fog.npy")[:E]).permute(0, 3, 1, 2)
    labels = torch.from_numpy(np.load(cifar_c / root / "labels.npy")[:E])
    return _accuracy(model, images, labels)


def test_precorrupted_key_covers_the_root_and_its_content(cifar_c, tmp_path):
    truth = {root: _cifar_c_truth(cifar_c, root) for root in "ab"}
    assert truth == {"a": 1.0, "b": 0.0}  # independent of the pipeline
    for root in "ab":  # one cache: the second folder must not reuse the first one's results
        results = _cifar_c_run(cifar_c, tmp_path, root, out=f"run_{root}")
        assert results["cells"][0]["source_accuracy"] == truth[root]
        assert results["clean_accuracy"] is None


def test_changed_data_at_the_same_root_redoes_the_job(cifar_c, tmp_path, caplog):
    root = tmp_path / "data"
    root.mkdir()
    for name in ("fog.npy", "labels.npy"):
        (root / name).write_bytes((cifar_c / "a" / name).read_bytes())
    config = {"job": "cifar_c"}
    run = lambda: run_benchmark(
        tmp_path / "run", dataset="cifar10_c", precorrupted=True, dataset_root=str(root),
        model="resnet8", weights=str(cifar_c / "net.pt"),
        model_kwargs={"num_classes": 10, "in_channels": 3, "width": 8}, corruptions=["fog"],
        severities=[1], batch_size=4, device="cpu", cache_dir=tmp_path / "cache",
        progress=False, config=config)
    first = run()
    assert first["cells"][0]["source_accuracy"] == 1.0
    (root / "fog.npy").write_bytes((cifar_c / "b" / "fog.npy").read_bytes())  # same path
    with caplog.at_level(logging.WARNING):
        second = run()
    assert second["cells"][0]["source_accuracy"] == _cifar_c_truth(cifar_c, "b") == 0.0
    assert second["fingerprints"]["data"] != first["fingerprints"]["data"]
    assert "stale" in caplog.text and "data" in caplog.text


# --- item 13 (model): an overwritten weights file is not "already done" ----------------------

def test_overwritten_weights_redo_the_job(tmp_path, caplog):
    path = tmp_path / "net.pt"
    config = {"job": "weights"}
    images, targets = load_images("digits", num_examples=N)
    torch.save(small_model(0).state_dict(), path)
    first = _digits_run(tmp_path, "run", weights=str(path), method="source", config=config)
    assert first["clean_accuracy"] == pytest.approx(_accuracy(small_model(0), images, targets))
    torch.save(small_model(1).state_dict(), path)  # same path, same config, other weights
    with caplog.at_level(logging.WARNING):
        second = _digits_run(tmp_path, "run", weights=str(path), method="source", config=config)
    expected = _accuracy(small_model(1), images, targets)
    assert expected != first["clean_accuracy"]
    assert second["clean_accuracy"] == pytest.approx(expected)
    assert second["fingerprints"]["model"] != first["fingerprints"]["model"]
    assert "stale" in caplog.text and "model" in caplog.text
    stored = json.loads((tmp_path / "run" / "results.json").read_text())
    assert stored["clean_accuracy"] == pytest.approx(expected)
    # unchanged inputs: skipped
    third = _digits_run(tmp_path, "run", weights=str(path), method="source", config=config)
    assert third["seconds"] == second["seconds"]


# --- item 17: broken results and cache files are redone, never fatal, never skipped ----------

@pytest.mark.parametrize("content", ["[]", "null", "42", '"text"', "{}", '{"config": ', ""])
def test_finished_treats_a_non_results_file_as_unfinished(tmp_path, caplog, content):
    path = tmp_path / "results.json"
    path.write_text(content)
    with caplog.at_level(logging.WARNING):
        assert finished(tmp_path, {"a": 1}, {"model": "x"}) is False
    assert str(path) in caplog.text


def test_a_broken_cache_is_recomputed(tmp_path, weights_file, caplog):
    images, targets = load_images("digits", num_examples=N)
    expected = _accuracy(small_model(0), tta.corrupt(images, "fog", 3, seed=0), targets)
    _digits_run(tmp_path, "run1", weights=weights_file)
    cell, = (tmp_path / "cache" / "cells").glob("*.npy")
    np.save(cell, np.zeros((3, 1, 28, 28), np.uint8))  # a cell of the wrong shape
    for record in (tmp_path / "cache" / "source").glob("*.json"):
        record.write_text("[]")  # records that are no records
    CellCache._memory.clear()
    with caplog.at_level(logging.WARNING):
        results = _digits_run(tmp_path, "run2", weights=weights_file)
    assert results["cells"][0]["source_accuracy"] == pytest.approx(expected)
    assert results["clean_accuracy"] == pytest.approx(_accuracy(small_model(0), images, targets))
    assert str(cell) in caplog.text
    assert tuple(np.load(cell).shape) == tuple(images.shape)  # overwritten with the right cell


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "resnet8.pt"
    torch.save(small_model(0).state_dict(), path)
    return str(path)
