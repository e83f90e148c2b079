"""The label-free tools in the adaptation API and the evaluation app (docs/label_free.md):
``tta.adapt(model, "blend", prior="auto")``, the prior chosen per cell, and per-cell
label-free accuracy estimates and shift scores in results.json and the report.

On digits with the small fitted ResNet-8 of tests/test_evaluation.py; numbers are checked
against float64 computations written out here (BatchNorm through torch.var_mean hooks, the
estimator's features and logistic regression, the symmetric KL of the last layer).
"""
from __future__ import annotations

import copy
import json
import math
import statistics
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

import tta
from tta.evaluation import Cell, evaluate, run_benchmark
from tta.evaluation.pipeline import load_images
from tta.evaluation.report import write_report
from tta.evaluation.runner import LabelFree
from tta.label_free import AccuracyEstimator
from tta.surgery import adaptive_layers

# fixtures: weights (the small model's state_dict file), digits (the first N test images)
from test_evaluation import MODEL_KWARGS, N, blend_oracle, digits, small_model, weights  # noqa: F401

BATCH = 16
# a small, quick estimator fit: 64 labelled digits train images, clean and one shift
FIT = {"enabled": True, "fit_examples": 64, "corruptions": ["gaussian_noise"], "severities": [3]}


def bench(tmp_path, weights, name="run", **kwargs):
    args = dict(dataset="digits", model="resnet8", model_kwargs=MODEL_KWARGS, weights=weights,
                corruptions=["gaussian_noise", "fog"], severities=[1], num_examples=N,
                batch_size=BATCH, device="cpu", cache_dir=tmp_path / "cache", progress=False)
    args.update(kwargs)
    return run_benchmark(tmp_path / name, **args)


def cell_batches(images: torch.Tensor, corruption: str, severity: int) -> list[torch.Tensor]:
    """The pipeline's cell, made here: tta.corrupt with seed 0, then [0, 1] floats in batches."""
    return list((tta.corrupt(images, corruption, severity, seed=0).float() / 255).split(BATCH))


# --- tta.adapt(model, "blend", prior="auto") ------------------------------------------------

def test_blend_auto_chooses_n_online_predicts_with_it_and_restarts_at_reset(digits):
    images, _ = digits
    clean = list((images.float() / 255).split(BATCH))
    noisy = cell_batches(images, "gaussian_noise", 1)
    model = small_model(0)
    adapter = tta.adapt(copy.deepcopy(model), "blend", prior="auto")
    assert adapter.hparams["prior"] == "auto" and adapter.chosen_priors == []

    def run(batches):
        with torch.no_grad():
            return [adapter(x) for x in batches]

    segment = clean + noisy
    logits = run(segment)
    chosen = adapter.chosen_priors
    # the online choice: batch t from batches 1..t of the segment
    assert chosen == tta.select_prior(model, segment, online=True)
    assert math.inf in chosen and len(set(chosen)) >= 3  # clean -> source statistics, noise -> small N
    for x, n, out in zip(segment, chosen, logits):  # each batch normalised with its own N
        with torch.no_grad():
            expected = blend_oracle(model, n)(x)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    adapter.reset()  # a new segment: the choice restarts
    assert adapter.chosen_priors == []
    again = run(segment)
    assert adapter.chosen_priors == chosen
    for a, b in zip(logits, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    adapter.reset()
    run(noisy)  # alone, the noisy batches get the choices of a fresh segment
    assert adapter.chosen_priors == tta.select_prior(model, noisy, online=True) != chosen[len(clean):]


def test_bad_prior_values_list_the_valid_choices_before_anything_changes(tmp_path, weights):
    model = small_model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for bad in ("aut", "AUTO", ""):
        with pytest.raises(ValueError, match=r"prior must be a number >= 0 or 'auto'.*got '"):
            tta.adapt(model, "blend", prior=bad)
    with pytest.raises(ValueError, match=r"alpha must be None with prior='auto'"):
        tta.adapt(model, "blend", prior="auto", alpha=0.5)
    with pytest.raises(ValueError, match=r"prior must be >= 0"):
        tta.adapt(model, "blend", prior=-1)
    assert adaptive_layers(model) == []  # not converted
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the app, in the config's words
    with pytest.raises(ValueError, match=r"adapt\.prior must be a number >= 0 or 'auto' \(chosen per batch without "
                                         r"labels\); got 'aut' \(adapt=blend\)"):
        bench(tmp_path, weights, method="blend", method_params={"prior": "aut"})
    with pytest.raises(ValueError, match=r"unknown label_free key\(s\) \['enable'\]; valid keys are: enabled"):
        bench(tmp_path, weights, label_free={"enable": True})
    with pytest.raises(ValueError, match=r"label_free.enabled must be true or false, got 'yes'"):
        bench(tmp_path, weights, label_free={"enabled": "yes"})
    with pytest.raises(ValueError, match=r"label_free: unknown corruption 'fgo'; valid names are"):
        bench(tmp_path, weights, label_free={"enabled": True, "corruptions": ["fgo"]})
    assert not (tmp_path / "run" / "results.json").exists()


# --- the app: the prior chosen per cell ------------------------------------------------------

def test_the_app_records_the_prior_chosen_for_every_cell(tmp_path, weights, digits):
    images, _ = digits
    results = bench(tmp_path, weights, method="blend", method_params={"prior": "auto"})
    assert results["params"]["prior"] == "auto"
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    for cell, stored in zip(results["cells"], saved["cells"]):
        # reset stream: each cell is a fresh segment, its choices those of its own batches
        chosen = tta.select_prior(small_model(0), cell_batches(images, cell["corruption"], 1), online=True)
        median = sorted(chosen)[(len(chosen) - 1) // 2]  # lower median: always a candidate
        histogram = {("inf" if math.isinf(n) else f"{n:g}"): k for n, k in sorted(Counter(chosen).items())}
        assert stored["chosen_prior"] == (median if math.isfinite(median) else "inf"), cell["corruption"]
        assert stored["chosen_prior_histogram"] == histogram
        assert sum(histogram.values()) == N // BATCH
    assert [c["chosen_prior_histogram"] for c in saved["cells"]] == [{"4": 1, "16": 3}, {"1": 4}]
    report = write_report([tmp_path / "run"], tmp_path / "report")
    assert "## Prior N chosen without labels: blend" in report["markdown"]
    assert "| gaussian_noise | 16 |" in report["markdown"] and "| fog | 1 |" in report["markdown"]
    assert "0 (0)" not in report["markdown"] and "1 (4) 4 (1) 16 (3)" in report["markdown"]
    assert "chosen_prior" in (tmp_path / "report" / "report.csv").read_text().splitlines()[0]


# --- the app: label-free accuracy estimates ------------------------------------------------

def _features(adapted: torch.Tensor, source: torch.Tensor, batch: torch.Tensor) -> np.ndarray:
    """The 7 features of docs/label_free.md, written out in float64 numpy."""
    def softmax(z):
        z = z.double().numpy()
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p, ps, pb = softmax(adapted), softmax(source), softmax(batch)
    pred, rows = p.argmax(1), np.arange(len(p))
    entropy = -(p * np.log(np.clip(p, 1e-12, None))).sum(1)
    return np.stack([p.max(1), ps.max(1), pb.max(1), (ps.argmax(1) == pb.argmax(1)).astype(float),
                     pb[rows, pred], ps[rows, pred], entropy], 1)


def _probability(features: np.ndarray, model: dict) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(features @ np.asarray(model["coef"]) + model["intercept"])))


def _last_layer_kl(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Symmetric KL (nats), mean over channels, of the last BatchNorm layer's input (float64
    moments over all batches, biased variance + eps) against its running statistics."""
    last = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][-1]
    inputs = []
    hook = last.register_forward_pre_hook(lambda module, args: inputs.append(args[0].double()))
    with torch.no_grad():
        for x in batches:
            model(x)
    hook.remove()
    values = torch.cat(inputs).transpose(0, 1).reshape(last.num_features, -1)
    mt, vt = values.mean(1), values.var(1, correction=0) + last.eps
    ms, vs = last.running_mean.double(), last.running_var.double() + last.eps
    return float((0.5 * (vt / vs + vs / vt) - 1 + 0.5 * (mt - ms) ** 2 * (1 / vt + 1 / vs)).mean())


def test_label_free_estimates_match_an_independent_computation_and_reach_the_report(tmp_path, weights, digits):
    images, targets = digits
    results = bench(tmp_path, weights, method="blend", method_params={"prior": 16}, label_free=FIT)
    info = results["label_free"]
    assert info["estimator"]["fit_dataset"] == "digits" and info["estimator"]["fit_split"] == "train"
    assert info["estimator"]["num_samples"] == 64 and info["estimator"]["shifts"] == 2
    assert info["regression"] == "batch" and info["fit_seconds"] > 0 and info["seconds"] > 0
    stored = json.loads((tmp_path / "cache" / "label_free" / f"{results['fingerprints']['label_free']}.json").read_text())
    estimator = AccuracyEstimator.from_dict(stored)
    model = small_model(0)
    for cell in results["cells"]:
        batches = cell_batches(images, cell["corruption"], cell["severity"])
        with torch.no_grad():
            source = [model(x) for x in batches]
            batch = [blend_oracle(model, 0)(x) for x in batches]      # batch statistics
            adapted = [blend_oracle(model, 16)(x) for x in batches]   # what blend N=16 predicted
        expected = np.concatenate([_probability(_features(a, s, b), estimator.models["batch"])
                                   for a, s, b in zip(adapted, source, batch)]).mean()
        expected_source = np.concatenate([_probability(_features(s, s, b), estimator.models["source"])
                                          for s, b in zip(source, batch)]).mean()
        assert cell["estimated_accuracy"] == pytest.approx(expected, abs=1e-5)
        assert cell["source_estimated_accuracy"] == pytest.approx(expected_source, abs=1e-5)
        assert cell["shift_score"] == pytest.approx(_last_layer_kl(model, batches), rel=1e-6)
        assert cell["accuracy"] == pytest.approx(float((torch.cat(adapted).argmax(1) == targets).double().mean()))
    assert info["clean_shift_score"] == pytest.approx(_last_layer_kl(model, list((images.float() / 255).split(BATCH))),
                                                      rel=1e-6)
    assert info["clean_shift_score"] < min(c["shift_score"] for c in results["cells"])
    assert results["mean"]["estimated_accuracy"] == pytest.approx(
        np.mean([c["estimated_accuracy"] for c in results["cells"]]))
    # the report: the estimates beside the measured accuracy, and the plot
    report = write_report([tmp_path / "run"], tmp_path / "report")
    markdown = report["markdown"]
    assert "## Label-free accuracy estimates: blend" in markdown
    fog = results["cells"][1]
    assert (f"| fog | 1 | {fog['shift_score']:.3g} | {100 * fog['source_accuracy']:.1f} | "
            f"{100 * fog['source_estimated_accuracy']:.1f} | {100 * fog['accuracy']:.1f} | "
            f"{100 * fog['estimated_accuracy']:.1f} |") in markdown
    error = np.mean([abs(c["estimated_accuracy"] - c["accuracy"]) for c in results["cells"]])
    errors, = [line for line in markdown.splitlines() if line.startswith("| mean abs. error (points) |")]
    assert errors.endswith(f"| {100 * error:.1f} |")
    plot = tmp_path / "report" / "estimated_vs_measured.png"
    assert plot in report["files"] and plot.stat().st_size > 0
    assert "![estimated_vs_measured](estimated_vs_measured.png)" in markdown
    header, *rows = (tmp_path / "report" / "report.csv").read_text().splitlines()
    assert "shift_score,source_estimated_accuracy,estimated_accuracy" in header
    assert str(fog["estimated_accuracy"]) in rows[1]


def test_the_estimator_never_reads_the_evaluated_labels(tmp_path, weights, digits, monkeypatch):
    images, targets = digits
    seen = []
    fit = tta.fit_accuracy_estimator

    def spy(model, batches, **kwargs):
        seen.extend(batches)
        return fit(model, batches, **kwargs)

    monkeypatch.setattr(tta, "fit_accuracy_estimator", spy)
    results = bench(tmp_path, weights, method="batch", label_free=FIT)
    # it was fitted on the first 64 labelled images of the train split, nothing of the test split
    train_images, train_targets = load_images("digits", split="train", num_examples=64)
    assert torch.equal(torch.cat([x for x, _ in seen]), train_images.float() / 255)
    assert torch.equal(torch.cat([y for _, y in seen]), train_targets)
    with pytest.raises(ValueError, match=r"label_free.fit_split='test' is the evaluated split"):
        bench(tmp_path, weights, name="other", label_free={**FIT, "fit_split": "test"})
    # in the evaluation loop the estimates do not depend on the test labels at all
    estimator = AccuracyEstimator.load(tmp_path / "cache" / "label_free" / f"{results['fingerprints']['label_free']}.json")
    cells = [Cell("gaussian_noise", 1, tta.corrupt(images, "gaussian_noise", 1, seed=0))]
    runs = [evaluate(small_model(0), cells, labels, method="batch", batch_size=BATCH,
                     label_free=LabelFree(estimator, small_model(0)))["cells"][0]
            for labels in (targets, targets.roll(1), torch.zeros_like(targets))]
    assert len({run["accuracy"] for run in runs}) == 3  # the labels changed ...
    assert len({(run["estimated_accuracy"], run["source_estimated_accuracy"]) for run in runs}) == 1  # not these


def test_the_estimator_is_fitted_once_per_model_data_and_batch_size(tmp_path, weights, monkeypatch):
    fits = []
    fit = tta.fit_accuracy_estimator
    monkeypatch.setattr(tta, "fit_accuracy_estimator", lambda *a, **k: fits.append(1) or fit(*a, **k))
    first = bench(tmp_path, weights, name="a", method="batch", label_free=FIT)
    assert len(fits) == 1
    second = bench(tmp_path, weights, name="b", method="source", label_free=FIT)  # cached
    assert len(fits) == 1
    assert second["fingerprints"]["label_free"] == first["fingerprints"]["label_free"]
    assert second["label_free"]["fit_seconds"] is None and second["label_free"]["regression"] == "source"
    for cell, other in zip(first["cells"], second["cells"]):  # same batches, same source estimate
        assert other["source_estimated_accuracy"] == pytest.approx(cell["source_estimated_accuracy"])
        assert other["estimated_accuracy"] == pytest.approx(cell["source_estimated_accuracy"])
        assert other["shift_score"] == cell["shift_score"]
    bench(tmp_path, weights, name="c", method="batch", batch_size=32, label_free=FIT)  # batch pass changes
    assert len(fits) == 2
    other_model = tmp_path / "other.pt"
    torch.save(small_model(1).state_dict(), other_model)
    bench(tmp_path, str(other_model), name="d", method="batch", label_free=FIT)
    assert len(fits) == 3
    # off by default: no estimate, no estimator, the cells as before
    plain = bench(tmp_path, weights, name="e", method="batch")
    assert "label_free" not in plain and "label_free" not in plain["fingerprints"]
    assert not any(k in plain["cells"][0] for k in ("estimated_accuracy", "shift_score", "chosen_prior"))
    assert [c["accuracy"] for c in plain["cells"]] == [c["accuracy"] for c in first["cells"]]


@pytest.mark.slow
def test_the_evaluate_app_with_prior_auto_and_label_free(tmp_path):
    from test_evaluation_app import SMALL, evaluate as app, results

    sweep = tmp_path / "sweep"
    done = app(["-m", "adapt=blend", "adapt.prior=auto,aut", "label_free.enabled=true",
                "label_free.fit_examples=32", "label_free.corruptions=[fog]", "label_free.severities=[3]",
                *SMALL, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    summary = done.stderr.strip().splitlines()[-1]
    assert "adapt.prior must be a number >= 0 or 'auto'" in summary and "got 'aut'" in summary
    (name, out), = results(sweep).items()
    assert name.startswith("adapt.prior=auto")
    cell, = out["cells"]
    assert out["config"]["label_free"]["enabled"] is True
    assert sum(cell["chosen_prior_histogram"].values()) == 2  # 32 images, batches of 16
    assert 0 <= cell["estimated_accuracy"] <= 1 and cell["shift_score"] > 0
