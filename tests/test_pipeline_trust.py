"""Trust faults of the evaluation app, each a kind: arguments a model would ignore, stale
outcomes left current during a recompute, invented clean metrics, an imbalance factor not
reached, late or missing validation of adapt.* and plain arguments, baselines of another
protocol, and sweeps whose jobs a stray outcome hides (digits, a narrow ResNet-8: seconds)."""
from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
from hydra.types import RunMode
from omegaconf import OmegaConf

import tta.evaluation.pipeline as pipeline
import tta.evaluation.sweeps as sweeps
import tta.evaluation.results as results
from test_evaluation import N, _bench, bench, weights  # noqa: F401 (fixtures)
from test_evaluation_app import ROOT, SMALL, evaluate
from tta.evaluation.pipeline import build_model, load_images
from tta.evaluation.report import write_report
from tta.evaluation.results import CellCache
from tta.evaluation.sweeps import SWEEP_ID_ENV, SweepStatus, record_job


def untouched(tmp_path) -> bool:
    """Nothing was computed: no cache and no outcome in the run directory."""
    run = tmp_path / "run"
    return not (tmp_path / "cache").exists() and not any(
        (run / name).exists() for name in ("results.json", "results.csv", "error.json"))


# --- 1. a shipped model refuses what it would ignore ------------------------------------------

@pytest.mark.parametrize("args, named", [
    ({"num_classes": 5}, r"model.num_classes=5 \(it was built with num_classes=10\)"),
    ({"in_channels": 3}, r"model.in_channels=3"),
    ({"width": 8}, r"model.kwargs.width=8 \(it was built with no width\)"),
    ({"weights": "other.pt"}, r"model.weights='other.pt' \(its weights are shipped\)"),
    ({"name": "resnet8"}, r"model.name='resnet8' \(it is a resnet14\)"),
])
def test_a_shipped_model_refuses_arguments_it_would_ignore(args, named):
    args = dict(args)
    name = args.pop("name", "resnet14")
    weights = args.pop("weights", None)
    with pytest.raises(ValueError, match=f"model.pretrained='fashion_mnist'.*{named}.*refused"):
        build_model(name, pretrained="fashion_mnist", weights=weights, **args)


def test_a_shipped_model_takes_its_own_values_and_the_app_refuses_before_work(tmp_path):
    model = build_model("resnet14", pretrained="fashion_mnist", num_classes=10, in_channels=1)
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="model.num_classes=5"):
        _bench(tmp_path, model="resnet14", pretrained="fashion_mnist",
               model_kwargs={"num_classes": 5, "in_channels": 1})
    assert untouched(tmp_path)
    # the other model kinds pass every kwarg to their builder: an unknown one is refused too
    with pytest.raises(TypeError, match="width_factor"):
        build_model("resnet8", num_classes=10, in_channels=1, width_factor=2)


# --- 2. a recompute first moves the stale outcome aside --------------------------------------

def _killed(*args, **kwargs):
    raise KeyboardInterrupt("killed during the recompute")


@pytest.mark.parametrize("how", ["force", "stale inputs", "no config"])
def test_a_killed_recompute_leaves_no_stale_outcome(tmp_path, bench, monkeypatch, how):
    config = {"adapt": "batch"}
    first = bench(tmp_path, method="batch", config=config)
    monkeypatch.setattr(pipeline, "evaluate", _killed)
    monkeypatch.setattr(CellCache, "_memory", {})
    kwargs = {"force": {"force": True, "config": {"adapt": "batch", "other": 1}},
              "stale inputs": {"config": config},  # same config, other model (see below)
              "no config": {"config": None}}[how]
    if how == "stale inputs":  # as if the weights file had been overwritten since
        (tmp_path / "run" / "results.json").write_text(json.dumps(
            {**first, "fingerprints": {**first["fingerprints"], "model": "another model"}}))
    with pytest.raises(KeyboardInterrupt):
        bench(tmp_path, method="batch", **kwargs)
    run = tmp_path / "run"
    assert not (run / "results.json").exists() and not (run / "results.csv").exists()
    moved, = (run / "superseded").glob("*.results.json")
    stale = json.loads(moved.read_text())  # nothing lost
    assert stale["run_id"] == first["run_id"] and stale["cells"] == first["cells"]


def test_a_finished_job_is_still_skipped(tmp_path, bench, monkeypatch):
    config = {"adapt": "source"}
    bench(tmp_path, config=config)
    monkeypatch.setattr(pipeline, "evaluate", _killed)
    again = bench(tmp_path, config=config)  # skipped: nothing recomputed, nothing moved
    assert again["config"] == config and not (tmp_path / "run" / "superseded").exists()


def test_a_finished_job_is_recomputed_after_the_code_changed(tmp_path, bench, monkeypatch):
    # a change of tta's code (here: a method computing something else) must not be hidden by
    # the skip of finished jobs nor by the cached source metrics
    config = {"adapt": "batch"}
    first = bench(tmp_path, method="batch", config=config)
    assert first["fingerprints"]["code"] == results.code_hash()
    monkeypatch.setattr(pipeline, "code_hash", lambda: "0" * 64)  # other code
    calls = []
    real = pipeline.evaluate
    monkeypatch.setattr(pipeline, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = bench(tmp_path, method="batch", config=config)
    assert again["fingerprints"]["code"] == "0" * 64 and again["run_id"] != first["run_id"]
    assert len(calls) >= 2  # the source metrics and the adapted model, both recomputed
    assert len(list((tmp_path / "run" / "superseded").glob("*.results.json"))) == 1


@pytest.mark.parametrize("name, value", [("TTA_CACHE_MAX_GB", "abc"), ("TTA_CACHE_MAX_GB", "-1"),
                                         ("TTA_NUM_WORKERS", "abc"), ("TTA_NUM_WORKERS", "0")])
def test_bad_environment_settings_are_refused_before_work_and_keep_finished_results(
        tmp_path, bench, monkeypatch, name, value):
    config = {"adapt": "source"}
    bench(tmp_path, config=config)
    before = (tmp_path / "run" / "results.json").read_bytes()
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=rf"{name}\)? must be a positive .*{value.lstrip('-')}"):
        bench(tmp_path, config=config, force=True)
    assert (tmp_path / "run" / "results.json").read_bytes() == before  # nothing moved aside
    assert not (tmp_path / "run" / "superseded").exists()


# --- 3. no clean metrics without clean images ------------------------------------------------

@pytest.mark.parametrize("fraction, message", [
    (0.0, r"stream.clean_fraction must be in \(0, 1\).*got 0.0"),
    (0.001, r"clean_fraction=0.001 of 64 images per cell rounds to no clean image"),
])
def test_mixture_without_clean_images_is_refused(tmp_path, bench, fraction, message):
    with pytest.raises(ValueError, match=message):
        bench(tmp_path, method="batch", stream="mixture", stream_params={"clean_fraction": fraction})
    assert untouched(tmp_path)


# --- 4. the imbalance factor actually reached -----------------------------------------------

def test_an_unreachable_imbalance_factor_is_refused(tmp_path, bench):
    smallest = int(np.bincount(load_images("digits", num_examples=N)[1].numpy()).min())
    with pytest.raises(ValueError, match=rf"stream.factor=100.0 needs at least 100 images in every "
                                         rf"class.*smallest class of these 64 images has {smallest}"):
        bench(tmp_path, stream="imbalance", stream_params={"factor": 100.0})
    assert untouched(tmp_path)


def test_the_achieved_imbalance_is_recorded_and_warned(tmp_path, bench, monkeypatch):
    monkeypatch.setattr(CellCache, "_memory", {})  # the cells are made from all images, then subset
    _, targets = load_images("digits", num_examples=N)
    n_max = int(np.bincount(targets.numpy()).min())
    out = bench(tmp_path, method="batch", stream="imbalance", stream_params={"factor": 3.0})
    expected = sorted((max(int(n_max * 3.0 ** (-k / 9.0)), 1) for k in range(10)), reverse=True)
    info = out["stream_subset"]
    assert sorted(info["class_counts"].values(), reverse=True) == expected
    assert info["achieved_factor"] == pytest.approx(expected[0] / expected[-1], rel=1e-12)
    assert sum(info["class_counts"].values()) == out["num_examples"] == out["cells"][0]["num_examples"]
    assert expected[0] / expected[-1] != 3.0  # 64 images cannot make the profile exactly
    assert any("requested factor 3 is not reached" in w for w in out["warnings"])


# --- 5. adapt.* values checked before any work ----------------------------------------------

@pytest.mark.parametrize("value, error, message", [
    (-3, ValueError, r"adapt.fisher_images must be an int in \[1, 64\], got -3"),
    (0, ValueError, r"adapt.fisher_images must be an int in \[1, 64\], got 0"),
    (65, ValueError, r"adapt.fisher_images must be an int in \[1, 64\], got 65.*not truncated"),
    (True, TypeError, r"adapt.fisher_images must be an int .*got True \(bool\)"),
    (2.5, TypeError, r"adapt.fisher_images must be an int .*got 2.5 \(float\)"),
])
def test_eata_fisher_images_out_of_range_is_refused_before_work(tmp_path, bench, value, error, message):
    with pytest.raises(error, match=message):
        bench(tmp_path, method="eata", method_params={"fisher_images": value})
    assert untouched(tmp_path)


def test_fisher_images_beyond_an_imbalanced_subset_is_refused(tmp_path, bench):
    with pytest.raises(ValueError, match=r"adapt.fisher_images must be an int in \[1, \d+\], got 64"):
        bench(tmp_path, method="eata", method_params={"fisher_images": 64}, stream="imbalance",
              stream_params={"factor": 2.0})
    assert untouched(tmp_path)  # refused before work: nothing written, nothing moved aside


@pytest.mark.parametrize("method, params, message", [
    ("blend", {"prior": -1}, "adapt.prior must be >= 0"),
    ("tent", {"steps": 0}, "adapt.steps must be an int >= 1"),
    ("dua", {"num_copies": 0}, "adapt.num_copies must be an int >= 2"),
    ("batch", {"layers": ["nomatch*"]}, "matches no BatchNorm layer"),
])
def test_other_adapt_values_are_refused_before_any_evaluation(tmp_path, bench, method, params, message):
    with pytest.raises(ValueError, match=message):
        bench(tmp_path, method=method, method_params=params)
    assert untouched(tmp_path)


def test_recalibrate_num_images_beyond_a_segment_is_refused_before_work(tmp_path, bench):
    with pytest.raises(ValueError, match=r"adapt.num_images=65 but the shortest segment of stream=reset "
                                         r"has 64 images: it would be truncated"):
        bench(tmp_path, method="recalibrate", method_params={"num_images": 65})
    assert untouched(tmp_path)
    out = bench(tmp_path, method="recalibrate", method_params={"num_images": 65}, stream="mixed",
                corruptions=["fog", "contrast"])  # a mixed segment holds both cells: 128 images
    assert out["params"]["num_images"] == 65


# --- 6, 7. a baseline of this protocol, with errors that define every CE ----------------------

@pytest.fixture
def protocol(tmp_path, bench):
    """A finished source run of the default protocol, to be used as a baseline."""
    bench(tmp_path / "base", corruptions=["fog"], severities=[3])
    return json.loads((tmp_path / "base" / "run" / "results.json").read_text())


@pytest.mark.parametrize("change, field, theirs, ours", [
    ({"seed": 1}, "seed", "0", "1"),
    ({"preset": "tiny"}, "preset", "None", "'tiny'"),
    ({"num_examples": 32}, "num_examples", "64", "32"),
    ({"dataset_split": "train"}, "fingerprints.data", "'[0-9a-f]{64}'", "'[0-9a-f]{64}'"),
])
def test_a_baseline_of_another_protocol_is_refused(tmp_path, bench, protocol, change, field, theirs, ours):
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(protocol))
    assert bench(tmp_path / "same", baseline=path)["mean"]["mce"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=rf"baseline.*was measured with {field}={theirs}, this run has "
                                         rf"{field}={ours}: its errors are not comparable"):
        bench(tmp_path, baseline=path, **change)
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_baseline_that_does_not_record_its_protocol_is_refused(tmp_path, bench, protocol):
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps({k: v for k, v in protocol.items() if k != "seed"}))
    with pytest.raises(ValueError, match=r"does not record 'seed'.*this run: seed=0"):
        bench(tmp_path, baseline=path)
    assert untouched(tmp_path)


def test_relative_mce_is_the_formula_or_null_with_a_warning(tmp_path, bench, protocol):
    assert protocol["clean_error"] is not None
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(protocol))
    out = bench(tmp_path / "same", baseline=path)
    # relative CE = sum_s (E_s - E_clean) / sum_s (E^base_s - E^base_clean), one severity here
    mine, base = out["cells"][0], protocol["cells"][0]
    expected = (mine["error"] - out["clean_error"]) / (base["error"] - protocol["clean_error"])
    assert out["mean"]["relative_mce"] == pytest.approx(expected, rel=1e-12)
    # a baseline that does not degrade over its clean error: relative mCE undefined -> null and a
    # warning, the mCE and the run itself kept (not a failure after the whole run)
    path.write_text(json.dumps({**protocol, "clean_error": 1.0}))
    out = bench(tmp_path / "flat", baseline=path)
    assert out["mean"]["mce"] == pytest.approx(1.0) and out["mean"]["relative_mce"] is None
    assert any("relative mCE left null" in w for w in out["warnings"])


def test_a_zero_error_baseline_is_refused_before_any_work(tmp_path, bench, protocol):
    path = tmp_path / "baseline.json"
    cells = [{**c, "error": 0.0} for c in protocol["cells"]]
    path.write_text(json.dumps({**protocol, "cells": cells}))
    with pytest.raises(ValueError, match=r"error 0 at every severity of fog.*divide by 0"):
        bench(tmp_path, baseline=path)
    assert untouched(tmp_path)


# --- 8. every plain argument checked before any work ----------------------------------------

@pytest.mark.parametrize("args, error, message", [
    ({"seed": -1}, ValueError, r"seed must be an int >= 0.*got -1"),
    ({"seed": 1.5}, ValueError, r"seed must be an int >= 0.*got 1.5"),
    ({"seed": True}, ValueError, r"seed must be an int >= 0.*got True"),
    ({"num_threads": 0}, ValueError, r"num_threads must be a positive int or null, got 0"),
    ({"num_threads": 1.5}, ValueError, r"num_threads must be a positive int or null, got 1.5"),
    ({"num_examples": 0}, ValueError, r"num_examples must be a positive int or null, got 0"),
    ({"batch_size": 2.0}, ValueError, r"batch_size must be a positive int, got 2.0"),
    ({"progress": "yes"}, TypeError, r"progress must be true or false, got 'yes'"),
    ({"force": 1}, TypeError, r"force must be true or false, got 1"),
    ({"dataset_split": None}, TypeError, r"dataset_split must be a non-empty str, got None"),
    ({"model_kwargs": [1]}, TypeError, r"model_kwargs must be a mapping"),
    ({"device": "foo"}, ValueError, r"device='foo' is not a torch device"),
    ({"model": None}, ValueError, r"model is null and so is pretrained"),
])
def test_plain_arguments_are_checked_before_any_work(tmp_path, bench, args, error, message):
    threads = torch.get_num_threads()
    with pytest.raises(error, match=message):
        bench(tmp_path, **args)
    assert untouched(tmp_path) and torch.get_num_threads() == threads


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_without_cuda_is_refused_before_work(tmp_path, bench):
    with pytest.raises(ValueError, match=r"device='cuda' but this machine has 0 CUDA device\(s\)"):
        bench(tmp_path, device="cuda")
    assert untouched(tmp_path)


# --- 9. a stray outcome at the top of a sweep fails loudly ------------------------------------

def _results_file(tmp_path, bench) -> dict:
    bench(tmp_path / "one", corruptions=["fog"], severities=[3])
    return json.loads((tmp_path / "one" / "run" / "results.json").read_text())


def test_a_report_over_a_sweep_with_a_stray_top_outcome_fails(tmp_path, bench):
    results = _results_file(tmp_path, bench)
    sweep = tmp_path / "sweep"
    for job in ("adapt=batch", "adapt=source"):
        (sweep / job).mkdir(parents=True)
        (sweep / job / "results.json").write_text(json.dumps(results))
    shutil.copy(sweep / "adapt=batch" / "results.json", sweep / "results.json")
    report = write_report([sweep], tmp_path / "report", plots=False)
    ignored = [e for e in report["errors"] if e["kind"] == "ignored"]
    assert len(ignored) == 2 and all("inside the job directory" in e["error"] for e in ignored)
    spec = importlib.util.spec_from_file_location("report_app", ROOT / "scripts" / "report.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    assert app.main([str(sweep), "--out", str(tmp_path / "report"), "--no-plots"]) == 1
    with pytest.raises(ValueError, match="holds .*results.json at its top"):
        sweeps.check_sweep_dir(sweep)
    sweeps.check_sweep_dir(sweep / "adapt=batch" / "nothing")  # a directory without outcome is fine


def test_the_sweep_status_refuses_a_stray_outcome_and_counts_unreported_jobs(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(SWEEP_ID_ENV, raising=False)
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    (sweep / "error.json").write_text("{}")
    with pytest.raises(SystemExit):  # not an exception: Hydra would turn it into a warning
        SweepStatus().on_multirun_start(config)
    assert "error.json at its top" in capsys.readouterr().err
    (sweep / "error.json").unlink()
    status = SweepStatus()
    status.on_multirun_start(config)
    record_job(sweep, 0, sweep / "a")
    job = OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN, "sweep": {"dir": str(sweep)},
                                      "job": {"num": 1}, "runtime": {"output_dir": str(sweep / "b")}}})
    status.on_job_start(job)  # then killed before it reported
    with pytest.raises(SystemExit) as exit_:
        status.on_multirun_end(config)
    assert exit_.value.code == 1
    assert f"1 of 2 jobs failed in {sweep}: b (it started but reported no outcome" in capsys.readouterr().err
    status = SweepStatus()
    status.on_multirun_start(config)
    record_job(sweep, 0, sweep / "a")
    (sweep / "results.json").write_text("{}")  # appeared during the sweep
    with pytest.raises(SystemExit):
        status.on_multirun_end(config)
    assert "results.json at its top" in capsys.readouterr().err



@pytest.mark.slow
def test_a_multirun_into_a_directory_with_an_outcome_at_its_top_does_not_start(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "results.json").write_text("{}")
    done = evaluate(["-m", "adapt=source,batch", *SMALL, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert done.returncode == 1
    assert f"{sweep} holds {sweep / 'results.json'} at its top" in done.stderr
    assert [p.name for p in sweep.iterdir()] == ["results.json"]  # no job ran
