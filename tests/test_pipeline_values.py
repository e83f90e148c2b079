"""Numbers of the benchmark pipeline against independent float64 computations written out
here: the two parts of a ``mixture`` stream, batch size 1 with ``adapt.window`` (and the
report's row for it), the cached source metrics keyed by the corruption code and the clean
images' content, and ``dataset.clean_root`` of ``conf/dataset/cifar10_c.yaml``.

On digits with the small fitted ResNet-8 of tests/test_evaluation.py. The oracles are the
model in float64: eval mode for the source model, train mode (torch's own batch statistics)
for ``adapt=batch``.
"""
from __future__ import annotations

import copy
import csv
import pickle
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import tta
import tta.corruptions
import tta.data.digits
from tta.evaluation import run_benchmark
from tta.evaluation.report import write_report
from tta.evaluation.streams import get_stream

# fixtures: weights (the small model's state_dict file), digits (the first N test images);
# cifar_c (CIFAR-10-C folders a and b, E images per severity, and their model net.pt)
from test_caches import E, cifar_c  # noqa: F401
from test_evaluation import MODEL_KWARGS, N, digits, small_model, weights  # noqa: F401
from test_methods_values import one_thread  # noqa: F401

SEVERITY = 3


def bench(tmp_path, weights, out="run", **kwargs):
    args = dict(dataset="digits", model="resnet8", model_kwargs=MODEL_KWARGS, weights=weights,
                corruptions=["fog"], severities=[SEVERITY], num_examples=N, batch_size=16,
                device="cpu", cache_dir=tmp_path / "cache", progress=False)
    args.update(kwargs)
    return run_benchmark(tmp_path / out, **args)


def source64(model: nn.Module) -> nn.Module:
    """The source model in float64, eval mode: running statistics."""
    return copy.deepcopy(model).double().eval()


def batch64(model: nn.Module) -> nn.Module:
    """The model in float64, train mode: every BatchNorm normalises with the statistics of its
    input (torch's train-mode output, biased variance); its running buffers are never read."""
    return copy.deepcopy(model).double().train()


@torch.no_grad()
def predict(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return net(images.double() / 255).argmax(1)


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predictions == labels).double().mean())


# --- (a) mixture: clean part and corrupted part -----------------------------------------------

CORRUPTIONS = ["fog", "contrast"]
FRACTION = 0.25  # 21 clean images beside each cell of 64: the clean set is not used up evenly


def _mixture_truth(images, targets, net_for_batch):
    """Re-runs the stream by hand: its segments in order, batches of 16, ``net_for_batch(x)``
    the predictions of one batch. Returns per-part correctness lists keyed by cell."""
    keys = [(c, SEVERITY) for c in CORRUPTIONS] + [("clean", 0)]
    data = {k: tta.corrupt(images, k[0], SEVERITY, seed=0) for k in keys[:-1]}
    data["clean", 0] = images
    correct: dict[tuple[str, int], list[bool]] = {k: [] for k in keys}
    for segment in get_stream("mixture").segments(keys, targets, 0, clean_fraction=FRACTION):
        for begin in range(0, len(segment.order), 16):
            part = segment.order[begin:begin + 16]
            cell_keys = [keys[segment.cells[p]] for p in part[:, 0].tolist()]
            x = torch.stack([data[k][i] for k, i in zip(cell_keys, part[:, 1].tolist())])
            hits = (net_for_batch(x) == targets[part[:, 1]]).tolist()
            for k, hit in zip(cell_keys, hits):
                correct[k].append(hit)
    return correct


@pytest.fixture(scope="module")
def mixture_batch(tmp_path_factory, weights, digits):
    """adapt=batch on the mixture stream, and the hand re-run of its batches (float64)."""
    images, targets = digits
    tmp_path = tmp_path_factory.mktemp("mixture")
    out = bench(tmp_path, weights, method="batch", stream="mixture",
                stream_params={"clean_fraction": FRACTION}, corruptions=CORRUPTIONS)
    oracle = batch64(small_model(0))
    return out, _mixture_truth(images, targets, lambda x: predict(oracle, x))


def test_mixture_parts_with_batch_statistics_equal_a_hand_rerun(mixture_batch, digits):
    images, targets = digits
    out, correct = mixture_batch
    k = round(N * FRACTION / (1 - FRACTION))
    assert len(correct["clean", 0]) == len(CORRUPTIONS) * k  # independent of the pipeline
    for cell, name in zip(out["cells"], CORRUPTIONS):
        hits = correct[name, SEVERITY]
        assert cell["num_examples"] == len(hits) == N
        assert cell["accuracy"] == pytest.approx(np.mean(hits), abs=1e-12), name
    clean_part = correct["clean", 0]
    assert out["stream_clean"]["num_examples"] == len(clean_part)
    assert out["stream_clean"]["accuracy"] == pytest.approx(np.mean(clean_part), abs=1e-12)
    # the clean accuracy is the source model's, on all N clean images
    assert out["clean_accuracy"] == pytest.approx(accuracy(predict(source64(small_model(0)), images), targets))


def test_mixture_parts_of_the_source_model_are_those_of_the_stream(tmp_path, weights, digits):
    images, targets = digits
    out = bench(tmp_path, weights, method="source", stream="mixture",
                stream_params={"clean_fraction": FRACTION}, corruptions=CORRUPTIONS)
    oracle = source64(small_model(0))
    for cell, name in zip(out["cells"], CORRUPTIONS):  # every corrupted image once
        truth = accuracy(predict(oracle, tta.corrupt(images, name, SEVERITY, seed=0)), targets)
        assert cell["num_examples"] == N and cell["accuracy"] == pytest.approx(truth, abs=1e-12), name
    clean_part = _mixture_truth(images, targets, lambda x: predict(oracle, x))["clean", 0]
    assert out["clean_accuracy"] == pytest.approx(accuracy(predict(oracle, images), targets), abs=1e-12)
    # the clean part of the stream: its own images (2 x 21 visits), as for every other method
    assert (out["stream_clean"]["num_examples"], out["stream_clean"]["accuracy"]) == (
        len(clean_part), pytest.approx(np.mean(clean_part), abs=1e-12))


def test_mixture_forgetting_compares_the_same_clean_images(mixture_batch, digits):
    images, targets = digits
    out, correct = mixture_batch
    # the source model on exactly the clean images the stream interleaved (with their repeats)
    source = _mixture_truth(images, targets, lambda x: predict(source64(small_model(0)), x))["clean", 0]
    assert source != correct["clean", 0]  # the method changed some clean predictions
    expected = np.mean(source) - np.mean(correct["clean", 0])
    assert out["stream_clean"]["forgetting"] == pytest.approx(expected, abs=1e-12)


# --- (b) batch size 1 with adapt.window, and the report -------------------------------------

WINDOW = 4
ONE = 24  # images of the batch-size-1 runs


def test_batch_size_one_with_a_window_equals_the_last_samples_statistics(tmp_path, weights, digits):
    images, targets = digits
    sweep = tmp_path / "sweep"
    images, targets = images[:ONE], targets[:ONE]
    out = bench(tmp_path, weights, out="sweep/bs1", method="batch", method_params={"window": WINDOW},
                batch_size=1, num_examples=ONE)
    fog = tta.corrupt(images, "fog", SEVERITY, seed=0)
    oracle = batch64(small_model(0))
    with torch.no_grad():  # the reset stream in image order; each image with the last 4 images' statistics
        predictions = torch.stack([oracle(fog[max(0, i - WINDOW + 1):i + 1].double() / 255)[-1].argmax()
                                   for i in range(ONE)])
    truth = accuracy(predictions, targets)
    alone = torch.stack([predict(oracle, fog[i:i + 1])[0] for i in range(ONE)])
    assert (predictions != alone).sum() >= 3  # the window matters on these images
    assert out["batch_size"] == 1 and out["params"]["window"] == WINDOW
    assert out["cells"][0]["accuracy"] == pytest.approx(truth, abs=1e-12)

    bench(tmp_path, weights, out="sweep/bs8", method="batch", batch_size=8, num_examples=ONE)
    report = write_report([sweep], tmp_path / "report", plots=False)
    labels = dict(zip((r["batch_size"] for r in report["runs"]), report["labels"]))
    assert set(labels) == {1, 8} and "bs=1" in labels[1] and "window=4" in labels[1], labels
    assert "bs=1" in report["markdown"]
    rows = list(csv.DictReader((tmp_path / "report" / "report.csv").open()))
    ours = [r for r in rows if (r["batch_size"], r["corruption"], r["severity"]) == ("1", "fog", str(SEVERITY))]
    assert len(ours) == 1 and ours[0]["label"] == labels[1]
    assert float(ours[0]["accuracy"]) == pytest.approx(truth, abs=1e-9)


# --- (c) the cached source metrics: corruption code version and clean image content ----------

def _poison(cache) -> None:
    """Marks every cached source record (ECE 0.123, still a valid record) so that a reused
    record shows in the results."""
    import json

    for path in (cache / "source").glob("*.json"):
        record = json.loads(path.read_text())
        record["ece"] = 0.123
        path.write_text(json.dumps(record))


def test_a_new_corruption_code_version_recomputes_the_source_metrics(tmp_path, weights, digits, monkeypatch):
    images, targets = digits
    bench(tmp_path, weights, out="first", method="source")
    _poison(tmp_path / "cache")
    reused = bench(tmp_path, weights, out="same_code", method="source")
    assert reused["cells"][0]["source_ece"] == 0.123  # the same code reuses the cache (control)
    # another version of the corruption code: a copy of tta/corruptions with one more line
    package = tmp_path / "corruptions"
    shutil.copytree(tta.corruptions.__path__[0], package, ignore=shutil.ignore_patterns("__pycache__"))
    with open(package / "__init__.py", "a") as f:
        f.write("\n# another version\n")
    monkeypatch.setattr(tta.corruptions, "__file__", str(package / "__init__.py"))
    out = bench(tmp_path, weights, out="new_code", method="source")
    assert out["fingerprints"]["corruption_code"] != reused["fingerprints"]["corruption_code"]
    cell = out["cells"][0]
    assert cell["source_ece"] != 0.123
    fog = tta.corrupt(images, "fog", SEVERITY, seed=0)
    assert cell["source_accuracy"] == pytest.approx(accuracy(predict(source64(small_model(0)), fog), targets),
                                                    abs=1e-12)


def test_other_clean_images_with_the_same_labels_recompute_the_source_metrics(tmp_path, weights, digits,
                                                                               monkeypatch):
    images, targets = digits
    first = bench(tmp_path, weights, out="first", method="source")
    _poison(tmp_path / "cache")
    original = tta.data.digits._resized_digits

    def transposed():  # the same images transposed: other pixels, the same labels
        all_images, all_targets, train_idx, test_idx = original()
        return all_images.transpose(-1, -2).contiguous(), all_targets, train_idx, test_idx

    monkeypatch.setattr(tta.data.digits, "_resized_digits", transposed)
    other = images.transpose(-1, -2)
    oracle = source64(small_model(0))
    truth_clean = accuracy(predict(oracle, other), targets)
    truth_fog = accuracy(predict(oracle, tta.corrupt(other, "fog", SEVERITY, seed=0)), targets)
    assert (truth_clean, truth_fog) != (first["clean_accuracy"], first["cells"][0]["source_accuracy"])
    out = bench(tmp_path, weights, out="second", method="source")
    assert out["fingerprints"]["data"] != first["fingerprints"]["data"]
    assert out["clean_accuracy"] == pytest.approx(truth_clean, abs=1e-12)
    assert out["clean_ece"] != 0.123 and out["cells"][0]["source_ece"] != 0.123
    assert out["cells"][0]["source_accuracy"] == pytest.approx(truth_fog, abs=1e-12)


# --- (d) conf/dataset/cifar10_c.yaml: clean_root --------------------------------------------

def _write_clean_cifar10(root, images: np.ndarray, labels: np.ndarray) -> None:
    """``root/cifar-10-batches-py`` with a test batch in the published python format."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    data = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)  # HWC -> CHW rows
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": data, "labels": labels.tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


@pytest.fixture(scope="module")
def clean_roots(cifar_c, tmp_path_factory):
    """Two clean CIFAR-10 roots with the labels of the CIFAR-10-C folder ``cifar_c/a``: the
    severity-1 fog images of folders ``a`` (every one right for the fixture's model) and ``b``
    (every one wrong)."""
    base = tmp_path_factory.mktemp("clean_cifar10")
    labels = np.load(cifar_c / "a" / "labels.npy")[:E]
    for name in "ab":
        _write_clean_cifar10(base / name, np.load(cifar_c / name / "fog.npy")[:E], labels)
    return base


def test_clean_root_of_the_cifar10_c_config_is_where_the_clean_images_come_from(tmp_path, cifar_c, clean_roots,
                                                                                monkeypatch):
    import torchvision.datasets.cifar
    from hydra import compose, initialize_config_dir

    from tta.apps import config_dir
    from tta.apps.evaluate import protocol_config, run

    # the fixture is not the published file, so torchvision's md5 check is bypassed
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    model = tta.models.get_model("resnet8", num_classes=10, in_channels=3, width=8)
    model.load_state_dict(torch.load(cifar_c / "net.pt", weights_only=True))
    oracle = source64(model)
    results = {}
    for root in "ab":
        clean = torchvision.datasets.CIFAR10(str(clean_roots / root), train=False)  # read independently
        truth = accuracy(predict(oracle, torch.from_numpy(clean.data).permute(0, 3, 1, 2)),
                         torch.as_tensor(clean.targets))
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="test"):
            cfg = compose(config_name="evaluate", overrides=[
                "dataset=cifar10_c", f"dataset.root={cifar_c / 'a'}", f"dataset.clean_root={clean_roots / root}",
                "model=resnet8", f"model.weights={cifar_c / 'net.pt'}", "+model.kwargs.width=8",
                "corruption.names=[fog]", "corruption.severities=[1]", "batch_size=4", "device=cpu",
                f"cache_dir={tmp_path / 'cache'}", "progress=false"])
        out = run(cfg, tmp_path / root, protocol_config(cfg))
        assert out["config"]["dataset"]["clean_root"] == str(clean_roots / root)
        assert out["clean_accuracy"] == pytest.approx(truth, abs=1e-12)
        results[root] = out["clean_accuracy"]
    assert results == {"a": 1.0, "b": 0.0}  # each run read its own clean root
