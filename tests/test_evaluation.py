"""The evaluation pipeline on digits with a small randomly initialised ResNet (seconds)."""
from __future__ import annotations

import copy
import functools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import tta
from tta.evaluation import (Cell, dirichlet_order, evaluate, get_method, get_stream, list_methods,
                            list_streams, run_benchmark)
from tta.evaluation.metrics import corruption_errors, expected_calibration_error, mean_corruption_error
from tta.evaluation.pipeline import check_cells, load_images
from tta.evaluation.results import model_hash

N = 64  # digits test images per cell


MODEL_KWARGS = {"num_classes": 10, "in_channels": 1, "width": 8}


@functools.lru_cache(maxsize=None)
def _fitted_state(seed: int) -> dict:
    """A narrow ResNet-8 made into a usable digits classifier in two forward passes: random
    convolutions, BatchNorm statistics of the train split (cumulative average) and a
    least-squares linear read-out, so that its predictions (and their shift under
    corruptions) mean something."""
    images, targets = load_images("digits", split="train")
    x = images.float() / 255
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = tta.models.get_model("resnet8", **MODEL_KWARGS)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    features = []
    hook = model.fc.register_forward_pre_hook(lambda module, args: features.append(args[0]))
    with torch.no_grad():
        model.train()
        for batch in x.split(512):
            model(batch)
        model.eval()
        features.clear()
        model(x)
    hook.remove()
    f = torch.cat([features[0], torch.ones(len(x), 1)], dim=1).double()
    y = nn.functional.one_hot(targets, 10).double()
    w = torch.linalg.solve(f.T @ f + 1e-3 * torch.eye(f.shape[1], dtype=torch.double), f.T @ y)
    with torch.no_grad():
        model.fc.weight.copy_(w[:-1].T)
        model.fc.bias.copy_(w[-1])
    for bn in norms:
        bn.momentum = 0.1
    return copy.deepcopy(model.state_dict())


def small_model(seed: int = 0) -> nn.Module:
    model = tta.models.get_model("resnet8", **MODEL_KWARGS)
    model.load_state_dict(_fitted_state(seed))
    return model.eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "resnet8.pt"
    torch.save(small_model(0).state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def digits():
    images, targets = load_images("digits", num_examples=N)
    return images, targets


@pytest.fixture(scope="module")
def cells(digits):
    images, _ = digits
    return [Cell(c, s, tta.corrupt(images, c, s, seed=0)) for s in (1, 5) for c in ("fog", "contrast")]


@pytest.fixture
def bench(tmp_path, weights):
    def run(tmp_path=tmp_path, **kwargs):
        return _bench(tmp_path, weights=weights, **kwargs)
    return run


def _bench(tmp_path, **kwargs):
    args = dict(dataset="digits", model="resnet8", model_kwargs=MODEL_KWARGS,
                corruptions=["fog"], severities=[3], num_examples=N, batch_size=16, device="cpu",
                cache_dir=tmp_path / "cache", progress=False)
    args.update(kwargs)
    return run_benchmark(tmp_path / "run", **args)


# --- an independent oracle: torch's own batch statistics through forward hooks ------------

def blend_oracle(model: nn.Module, prior: float) -> nn.Module:
    """A copy of ``model`` whose BatchNorm2d layers normalise with (1 - w) source + w batch
    moments, w = B / (prior + B), computed here with torch.var_mean (not tta.convert)."""
    oracle = copy.deepcopy(model)

    def forward(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        w = x.shape[0] / (prior + x.shape[0])
        mean = (1 - w) * bn.running_mean + w * mean
        var = (1 - w) * bn.running_var + w * var
        shape = (1, -1, 1, 1)
        return ((x - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps)
                * bn.weight.view(shape) + bn.bias.view(shape))

    for module in oracle.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.forward = forward.__get__(module)  # type: ignore[method-assign]
    return oracle


def manual_ece(probs: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        if members.any():
            total += members.sum() / len(conf) * abs((pred[members] == targets[members]).mean()
                                                     - conf[members].mean())
    return float(total)


def test_results_cell_matches_independent_computation(tmp_path, digits, bench):
    results = bench(tmp_path, method="blend", method_params={"prior": 16}, batch_size=24)
    images, targets = digits
    corrupted = tta.corrupt(images, "fog", 3, seed=0).float() / 255
    model = small_model(0)  # the weights the pipeline loads
    oracle = blend_oracle(model, prior=16)
    with torch.no_grad():
        source_logits = model(corrupted)
        adapted_logits = torch.cat([oracle(corrupted[i:i + 24]) for i in range(0, N, 24)])
        clean_logits = model(images.float() / 255)
    assert adapted_logits.argmax(1).unique().numel() > 2  # a model that discriminates
    cell = results["cells"][0]
    source_acc = (source_logits.argmax(1) == targets).double().mean().item()
    acc = (adapted_logits.argmax(1) == targets).double().mean().item()
    clean = (clean_logits.argmax(1) == targets).double().mean().item()
    assert cell["corruption"] == "fog" and cell["severity"] == 3 and cell["num_examples"] == N
    assert cell["source_accuracy"] == pytest.approx(source_acc)
    assert cell["accuracy"] == pytest.approx(acc)
    assert results["clean_accuracy"] == pytest.approx(clean)
    assert cell["recovered"] == pytest.approx(acc - source_acc)
    if clean - source_acc > 0:
        assert cell["gap_closed"] == pytest.approx((acc - source_acc) / (clean - source_acc))
    assert cell["error"] == pytest.approx(1 - acc)
    expected_ece = manual_ece(adapted_logits.double().softmax(1).numpy(), targets.numpy())
    assert cell["ece"] == pytest.approx(expected_ece, abs=1e-6)
    assert results["mean"]["accuracy"] == pytest.approx(acc)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["cells"][0]["accuracy"] == pytest.approx(acc)
    csv = (tmp_path / "run" / "results.csv").read_text().splitlines()
    assert len(csv) == 2 and "method,stream,batch_size" in csv[0]
    assert "confusion" not in csv[0]  # the matrices stay in results.json
    # confusion matrices (row: true class, column: predicted), counted here with numpy
    assert results["num_classes"] == 10 and results["classes"] == [str(i) for i in range(10)]
    for key, logits in (("confusion", adapted_logits), ("source_confusion", source_logits)):
        expected = np.zeros((10, 10), dtype=np.int64)
        np.add.at(expected, (targets.numpy(), logits.argmax(1).numpy()), 1)
        assert saved["cells"][0][key] == expected.tolist(), key
    expected = np.zeros((10, 10), dtype=np.int64)
    np.add.at(expected, (targets.numpy(), clean_logits.argmax(1).numpy()), 1)
    assert saved["clean_confusion"] == expected.tolist()
    assert saved["warnings"] == []  # a model that solves its data


def test_ece_and_mce_against_hand_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 7, generator=g) * 3
    targets = torch.randint(0, 7, (500,), generator=g)
    assert expected_calibration_error(logits, targets) == pytest.approx(
        manual_ece(logits.double().softmax(1).numpy(), targets.numpy()), abs=1e-12)
    cells = [{"corruption": "fog", "severity": s, "error": e} for s, e in ((1, 0.2), (2, 0.4))]
    cells.append({"corruption": "snow", "severity": 1, "error": 0.3})
    base = [{"corruption": "fog", "severity": 1, "error": 0.5}, {"corruption": "fog", "severity": 2, "error": 0.7},
            {"corruption": "snow", "severity": 1, "error": 0.6}]
    assert corruption_errors(cells, base) == pytest.approx({"fog": 0.6 / 1.2, "snow": 0.5})
    assert mean_corruption_error(cells, base) == pytest.approx((0.5 + 0.5) / 2)


def _baseline(path, cells, protocol=None, dataset="digits"):
    """A baseline results file with these errors; ``protocol``: a results dict whose other
    fields (dataset, seed, preset, fingerprints, ...) it copies."""
    path.write_text(json.dumps({**(protocol or {}), "dataset": dataset, "cells": [
        {"corruption": c, "severity": s, "error": e} for c, s, e in cells]}))
    return path


def test_mce_refuses_a_partial_baseline(tmp_path, bench):
    base = _baseline(tmp_path / "base.json", [("fog", 1, 0.5), ("fog", 3, 0.6)])
    with pytest.raises(ValueError, match=r"base.json.*no error for 4 of the 6 cells.*"
                                         r"contrast/1, contrast/3, fog/5, contrast/5"):
        bench(tmp_path, corruptions=["fog", "contrast"], severities=[1, 3, 5], baseline=base)
    assert not (tmp_path / "cache").exists()  # refused before any work
    run = [{"corruption": "fog", "severity": s, "error": 0.3} for s in (1, 3, 5)]
    with pytest.raises(ValueError, match="fog/5"):
        mean_corruption_error(run, json.loads(base.read_text())["cells"])


@pytest.mark.parametrize("content, message", [
    ("not json", "not readable JSON"), ("[]", "not a results.json"),
    ('{"dataset": "digits", "cells": []}', "not a results.json"),
    ('{"dataset": "digits", "cells": [{"corruption": "fog", "severity": 3}]}', "not a results.json"),
    ('{"dataset": "digits", "cells": [{"corruption": "fog", "severity": 3, "error": 7}]}',
     "not a results.json"),
    ('{"dataset": "fashion_mnist", "cells": [{"corruption": "fog", "severity": 3, "error": 0.5}]}',
     "dataset 'fashion_mnist', this run is on 'digits'"),
])
def test_baseline_must_be_a_results_file_of_the_same_data(tmp_path, bench, content, message):
    (tmp_path / "base.json").write_text(content)
    with pytest.raises(ValueError, match=f"base.json.*{message}"):
        bench(tmp_path, baseline=tmp_path / "base.json")
    assert not (tmp_path / "cache").exists()  # before any work
    with pytest.raises(FileNotFoundError, match="missing.json"):
        bench(tmp_path, baseline=tmp_path / "missing.json")


def test_mce_over_a_complete_baseline(tmp_path, bench):
    base = [(c, s, e) for (c, s), e in zip([(c, s) for s in (1, 3) for c in ("fog", "contrast")],
                                           (0.5, 0.4, 0.8, 0.9))]
    # a baseline run of the same protocol (data, seed, preset), with its errors replaced
    protocol = bench(tmp_path / "b", corruptions=["fog", "contrast", "snow"], severities=[1, 3])
    path = _baseline(tmp_path / "base.json", base + [("snow", 1, 0.7)], protocol)  # extra cells are fine
    results = bench(tmp_path, corruptions=["fog", "contrast"], severities=[1, 3], baseline=path)
    error = {(c["corruption"], c["severity"]): c["error"] for c in results["cells"]}
    ce = {name: sum(error[name, s] for s in (1, 3)) / sum(e for c, s, e in base if c == name)
          for name in ("fog", "contrast")}
    assert results["per_corruption"]["fog"]["ce"] == pytest.approx(ce["fog"])
    assert results["mean"]["mce"] == pytest.approx((ce["fog"] + ce["contrast"]) / 2)
    assert results["mce_cells"] == [["fog", 1], ["contrast", 1], ["fog", 3], ["contrast", 3]]


def test_a_model_of_other_data_is_flagged(tmp_path, digits):
    images, targets = digits
    results = _bench(tmp_path, model=None, model_kwargs=None, pretrained="fashion_mnist",
                     corruptions=["fog"], severities=[1])
    model = tta.models.load_pretrained("fashion_mnist")
    with torch.no_grad():
        clean = (model(images.float() / 255).argmax(1) == targets).double().mean().item()
    chance = np.bincount(targets.numpy()).max() / len(targets)  # majority-class rate
    assert results["clean_accuracy"] == pytest.approx(clean)
    assert clean < chance + 0.05  # within 5 points of chance: must be flagged
    trained, near_chance = results["warnings"]
    assert "trained on 'fashion_mnist'" in trained and "'digits'" in trained
    assert f"{100 * clean:.1f}%" in near_chance and f"{100 * chance:.1f}%" in near_chance
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["warnings"] == results["warnings"]


@pytest.mark.slow
def test_the_app_says_so_on_stderr(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(root / "scripts" / "evaluate.py"), "dataset=digits",
         "corruption.names=[fog]", "corruption.severities=[1]", "num_examples=64",
         "progress=false", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env={**os.environ, "TTA_CACHE_DIR": str(tmp_path / "cache")},
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained on 'fashion_mnist'" in done.stderr and "of chance" in done.stderr
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(saved["warnings"]) == 2


def test_source_is_order_and_batch_size_independent(digits, cells):
    _, targets = digits
    reference = evaluate(small_model(), cells, targets, method="source", batch_size=64)["cells"]
    for stream, params in (("mixed", {}), ("dirichlet", {"delta": 0.1}), ("continual", {})):
        other = evaluate(small_model(), cells, targets, method="source", stream=stream,
                         stream_params=params, batch_size=7)["cells"]
        for a, b in zip(reference, other):
            assert (a["corruption"], a["severity"]) == (b["corruption"], b["severity"])
            assert a["accuracy"] == pytest.approx(b["accuracy"])
            assert a["num_examples"] == b["num_examples"] == len(targets)


def test_adaptation_changes_predictions_and_reset_matters(digits, cells):
    _, targets = digits
    run = lambda method, stream, **p: [c["accuracy"] for c in evaluate(
        small_model(), cells, targets, method=method, method_params=p, stream=stream,
        batch_size=16)["cells"]]
    source = run("source", "reset")
    batch = run("batch", "reset")
    assert batch != source
    # batch statistics have no state: the stream's resets change nothing
    assert run("batch", "continual") == pytest.approx(batch)
    # EMA carries state: the first cell agrees, later cells differ between reset and continual
    ema_reset, ema_continual = run("ema", "reset", momentum=0.5), run("ema", "continual", momentum=0.5)
    assert ema_reset[0] == pytest.approx(ema_continual[0])
    assert ema_reset[1:] != pytest.approx(ema_continual[1:])
    # alpha = 0: no weight on the batch statistics, exactly the source model
    assert run("blend", "reset", alpha=0.0) == pytest.approx(source)


@pytest.mark.parametrize("method", ["blend", "ema"])
def test_batch_size_one(digits, cells, method):
    _, targets = digits
    out = evaluate(small_model(), cells[:1], targets, method=method, batch_size=1)
    assert out["num_images"] == len(targets)
    assert 0.0 <= out["cells"][0]["accuracy"] <= 1.0


@pytest.mark.parametrize("exact", [True, False])
def test_recalibrate_uses_the_cells_own_images(digits, cells, exact):
    _, targets = digits
    model = small_model()
    # one recalibration batch holds the whole cell, so both modes give its exact statistics
    out = evaluate(copy.deepcopy(model), cells[:2], targets, method="recalibrate",
                   method_params={"exact": exact, "batch_size": N})["cells"]
    # oracle: AdaBN = BatchNorm statistics of the whole cell, i.e. batch statistics over one
    # batch holding all of the cell's images (torch's train-mode BatchNorm)
    for cell, result in zip(cells[:2], out):
        oracle = copy.deepcopy(model).train()
        with torch.no_grad():
            logits = oracle(cell.images.float() / 255)
        assert result["accuracy"] == pytest.approx((logits.argmax(1) == targets).double().mean().item())


def test_streams_cover_every_image_once(digits):
    _, targets = digits
    keys = [("fog", 1), ("snow", 1), ("fog", 2)]
    for name in list_streams():
        if name in ("gradual", "mixture"):  # revisits cells / adds the clean cell: tests below
            continue
        stream = get_stream(name)
        segments = list(stream.segments(keys, targets, 0, **stream.params()))
        seen = sorted((seg.cells[p], i) for seg in segments for p, i in seg.order.tolist())
        assert seen == sorted((c, i) for c in range(3) for i in range(len(targets))), name
        assert segments[0].reset
    mixed = list(get_stream("mixed").segments(keys, targets, 0))
    assert [seg.cells for seg in mixed] == [[0, 1], [2]]  # one stream per severity
    first = mixed[0].order[:, 0]
    assert 0 < first[: len(targets)].float().mean() < 1  # shuffled across corruptions
    continual = list(get_stream("continual").segments(keys, targets, 0))
    assert [seg.reset for seg in continual] == [True, False, False]


def test_dirichlet_order_is_label_correlated():
    targets = np.repeat(np.arange(10), 100)
    np.random.default_rng(1).shuffle(targets)
    switches = {}
    for delta in (0.01, 100.0):
        order = dirichlet_order(targets, delta, np.random.default_rng(0))
        assert sorted(order.tolist()) == list(range(len(targets)))
        labels = targets[order]
        switches[delta] = int((labels[1:] != labels[:-1]).sum())
    assert switches[0.01] < 40 < 80 < switches[100.0]


def test_source_cache_is_reused_and_keyed_by_model(tmp_path, monkeypatch, bench):
    bench(tmp_path, method="source")
    records = list((tmp_path / "cache" / "source").glob("*.json"))
    assert len(records) == 2  # clean + one cell
    # poison the cached cell record: a job with another method must reuse it as is
    for path in records:
        record = json.loads(path.read_text())
        if record["corruption"] == "fog":
            record["ece"] = 0.123
            path.write_text(json.dumps(record))
    results = bench(tmp_path, method="batch", force=True)
    assert results["cells"][0]["source_ece"] == 0.123
    # a model with other weights gets other keys
    assert model_hash(small_model(0)) != model_hash(small_model(1))
    cells = list((tmp_path / "cache" / "cells").glob("*.npy"))
    assert len(cells) == 1


def test_resume_skips_and_refuses_other_configs(tmp_path, bench):
    config = {"adapt": "source", "n": 1}
    first = bench(tmp_path, method="source", config=config)
    path = tmp_path / "run" / "results.json"
    stamp = path.stat().st_mtime_ns
    again = bench(tmp_path, method="source", config=config)
    assert path.stat().st_mtime_ns == stamp and again["cells"] == first["cells"]
    with pytest.raises(ValueError, match="different config"):
        bench(tmp_path, method="batch", config={"adapt": "batch"})
    bench(tmp_path, method="batch", config={"adapt": "batch"}, force=True)
    assert json.loads(path.read_text())["method"] == "batch"


# --- error paths ----------------------------------------------------------------------------

def test_unknown_names_list_the_valid_ones(tmp_path, bench):
    with pytest.raises(ValueError, match="valid names are: .*source.*tent"):
        get_method("tnet")
    with pytest.raises(ValueError, match="valid names are: reset, continual, mixed, dirichlet, gradual"):
        get_stream("random")
    with pytest.raises(ValueError, match="unknown corruption 'fogg'.*gaussian_noise"):
        check_cells(["fogg"], [1])
    with pytest.raises(ValueError, match="unknown dataset 'mnistt'.*fashion_mnist"):
        bench(tmp_path, dataset="mnistt")
    with pytest.raises(ValueError, match="unknown model 'resnet7'"):
        bench(tmp_path, model="resnet7")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['priors'\].*prior"):
        bench(tmp_path, method="blend", method_params={"priors": 3})


@pytest.mark.parametrize("severity", [0, 6])
def test_bad_severity(tmp_path, severity, bench):
    with pytest.raises(ValueError, match=f"invalid severity {severity}.*1, 2, 3, 4, 5"):
        bench(tmp_path, severities=[severity])


def test_bad_method_and_stream_parameters(tmp_path, bench):
    with pytest.raises(ValueError, match=r"adapt.prior must be >= 0, got -1 \(adapt=blend\)"):
        bench(tmp_path, method="blend", method_params={"prior": -1})
    with pytest.raises(ValueError, match="adapt.momentum must be > 0"):
        bench(tmp_path, method="ema", method_params={"momentum": 0})
    with pytest.raises(ValueError, match="adapt.num_images must be an int >= 1"):
        bench(tmp_path, method="recalibrate", method_params={"num_images": 0})
    with pytest.raises(ValueError, match="stream.delta must be a finite number > 0"):
        get_stream("dirichlet").params({"delta": -0.5})
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        bench(tmp_path, batch_size=0)
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("delta", [float("nan"), float("inf"), -1.0])
def test_non_finite_or_negative_float_parameters(tmp_path, bench, delta):
    with pytest.raises(ValueError, match=rf"stream.delta must be a finite number.*got {delta}"):
        bench(tmp_path, stream="dirichlet", stream_params={"delta": delta})
    with pytest.raises(ValueError, match=r"adapt.prior must be (a finite number|>= 0)"):
        bench(tmp_path, method="blend", method_params={"prior": delta})
    assert not (tmp_path / "cache").exists()


def test_float_parameters_check_the_kind():
    with pytest.raises(TypeError, match="stream.delta must be a number, got '0.1'"):
        get_stream("dirichlet").params({"delta": "0.1"})
    with pytest.raises(TypeError, match="stream.delta must be a number, got True"):
        get_stream("dirichlet").params({"delta": True})
    with pytest.raises(ValueError, match="stream.delta must be a finite number > 0"):
        get_stream("dirichlet").params({"delta": 0})


def test_model_output_width_must_match_the_classes(tmp_path, digits):
    with pytest.raises(ValueError, match="outputs 5 class scores but dataset 'digits' has 10 "
                                         "classes: set model.num_classes=10"):
        _bench(tmp_path, model_kwargs={**MODEL_KWARGS, "num_classes": 5})
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "results.json").exists()
    images, targets = digits  # the evaluation loop refuses labels beyond the outputs as well
    with pytest.raises(ValueError, match=r"labels 0..9 do not fit the model's 5 class scores"):
        evaluate(tta.models.get_model("resnet8", **{**MODEL_KWARGS, "num_classes": 5}).eval(),
                 [Cell("clean", 0, images)], targets)


def test_missing_data_root(tmp_path, bench):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        bench(tmp_path, dataset="fashion_mnist", dataset_root=str(missing))


def test_too_many_examples(tmp_path, bench):
    with pytest.raises(ValueError, match="num_examples"):
        bench(tmp_path, num_examples=100000)


def test_registries_are_complete():
    assert list_methods() == ["batch", "blend", "cotta", "dua", "eata", "ema", "eta", "recalibrate",
                              "sar", "source", "tent"]
    assert list_streams() == ["reset", "continual", "mixed", "dirichlet", "gradual", "imbalance", "mixture"]


# --- the streams of issue 10 --------------------------------------------------------------

def test_gradual_stream_goes_up_and_down_one_severity_at_a_time(digits):
    _, targets = digits
    keys = [(c, s) for s in (1, 2, 3) for c in ("fog", "snow")]
    segments = list(get_stream("gradual").segments(keys, targets, 0))
    visits = [keys[seg.cells[0]] for seg in segments]
    assert visits == [("fog", 3), ("fog", 2), ("fog", 1),
                      ("snow", 1), ("snow", 2), ("snow", 3), ("snow", 2), ("snow", 1)]
    assert [seg.reset for seg in segments] == [True] + [False] * 7
    assert all(seg.order[:, 1].tolist() == list(range(len(targets))) for seg in segments)


def test_imbalance_subset_follows_the_exponential_profile():
    targets = torch.as_tensor(np.repeat(np.arange(10), [120, 100, 130, 110, 100, 140, 100, 105, 100, 150]))
    for factor in (10.0, 100.0):
        subset = tta.evaluation.imbalance_subset(targets, 0, factor)
        counts = np.bincount(targets[subset].numpy(), minlength=10)
        expected = sorted((int(100 * factor ** (-k / 9)) for k in range(10)), reverse=True)
        assert sorted(counts.tolist(), reverse=True) == expected  # n_max = smallest class (100)
        assert len(set(subset.tolist())) == len(subset)
    a, b = (tta.evaluation.imbalance_subset(targets, seed, 10.0) for seed in (0, 1))
    assert torch.equal(a, tta.evaluation.imbalance_subset(targets, 0, 10.0)) and not torch.equal(a, b)
    with pytest.raises(ValueError, match="stream.factor must be a finite number >= 1"):
        get_stream("imbalance").params({"factor": 0.5})


def test_mixture_stream_interleaves_the_clean_fraction(digits):
    _, targets = digits
    keys = [("fog", 1), ("snow", 1), ("clean", 0)]
    segments = list(get_stream("mixture").segments(keys, targets, 0, clean_fraction=0.2))
    assert [seg.cells for seg in segments] == [[0, 2], [1, 2]] and [s.reset for s in segments] == [True, False]
    k = round(len(targets) * 0.2 / 0.8)
    for seg in segments:
        position = seg.order[:, 0]
        assert int((position == 1).sum()) == k and int((position == 0).sum()) == len(targets)
        assert sorted(seg.order[position == 0, 1].tolist()) == list(range(len(targets)))
        assert 0 < position[: len(seg.order) // 2].float().mean() < 1  # interleaved
    with pytest.raises(ValueError, match=r"stream.clean_fraction must be in \(0, 1\)"):
        get_stream("mixture").params({"clean_fraction": 1.0})


@torch.no_grad()
def test_imbalance_measures_source_and_adapted_on_the_same_subset(tmp_path, bench, digits):
    images, targets = digits
    subset = tta.evaluation.imbalance_subset(targets, 0, 4.0)
    out = bench(tmp_path, method="batch", stream="imbalance", stream_params={"factor": 4.0})
    cell = out["cells"][0]
    assert out["num_examples"] == cell["num_examples"] == len(subset) < len(targets)
    model = small_model(0)
    x = tta.corrupt(images, "fog", 3, seed=0)[subset].float() / 255
    source = (model(x).argmax(1) == targets[subset]).double().mean().item()
    clean = (model(images[subset].float() / 255).argmax(1) == targets[subset]).double().mean().item()
    assert cell["source_accuracy"] == pytest.approx(source)
    assert out["clean_accuracy"] == pytest.approx(clean)


def test_mixture_reports_the_clean_part_separately(tmp_path, bench):
    out = bench(tmp_path, method="batch", stream="mixture", stream_params={"clean_fraction": 0.5},
                corruptions=["fog", "contrast"])
    part = out["stream_clean"]
    assert part["num_examples"] == 2 * N  # N clean images beside each of the two cells
    assert part["num_images"] == N  # drawn without replacement until all N are used, then again
    assert part["forgetting"] == pytest.approx(part["source_accuracy"] - part["accuracy"])
    assert [c["num_examples"] for c in out["cells"]] == [N, N]
    source = bench(tmp_path / "s", method="source", stream="mixture")
    assert source["stream_clean"]["forgetting"] == 0.0


def test_gradual_counts_every_visit(tmp_path, bench):
    out = bench(tmp_path, method="ema", stream="gradual", corruptions=["fog", "contrast"], severities=[1, 2])
    visits = {("fog", 1): 1, ("fog", 2): 1, ("contrast", 1): 2, ("contrast", 2): 1}
    assert {(c["corruption"], c["severity"]): c["num_examples"] // N for c in out["cells"]} == visits


def test_tent_through_the_pipeline_equals_the_library(tmp_path, bench, digits):
    images, targets = digits
    out = bench(tmp_path, method="tent", method_params={"lr": 0.01}, corruptions=["fog", "contrast"],
                severities=[3])
    assert out["params"]["lr"] == 0.01 and out["params"]["optimizer"] == "adam"
    adapter = tta.adapt(small_model(0), "tent", lr=0.01)
    for cell in out["cells"]:  # reset stream: from the source weights at every cell, batches of 16
        adapter.reset()
        x = tta.corrupt(images, cell["corruption"], 3, seed=0).float() / 255
        predictions = torch.cat([adapter(batch).argmax(1) for batch in x.split(16)])
        assert cell["accuracy"] == pytest.approx((predictions == targets).double().mean().item())


def test_eata_gets_clean_images_for_its_fisher_information(tmp_path, bench):
    out = bench(tmp_path, method="eata", method_params={"fisher_images": 32, "fisher_batch_size": 16})
    assert out["params"]["fisher_images"] == 32


def test_a_sweep_key_is_dropped_by_methods_without_it(tmp_path, bench):
    out = bench(tmp_path, method="batch", method_params={"prior": 16})
    assert "prior" not in out["params"]
