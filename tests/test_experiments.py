"""Reproduction configs (conf/experiment) run end to end on fixtures in the published file
layouts, their published numbers, the "ours vs published" view, and the AlexNet-normalised
(relative) mCE checked against a hand computation from the published table."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue
from PIL import Image

import tta
from tta.evaluation.metrics import (ALEXNET_CLEAN_ERROR, ALEXNET_ERRORS, alexnet_baseline_cells,
                                    corruption_errors, mean_corruption_error,
                                    relative_corruption_errors, relative_mean_corruption_error)
from tta.evaluation.published import compare_published, load_published, published_sections

from test_robustbench import one_thread  # noqa: F401  (autouse: one intra-op thread, restored after)

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ["tent_cifar10c", "online_tta_imagenet_c", "schneider_imagenet_c"]
FEW = ["gaussian_noise", "fog", "contrast"]  # the fixtures' corruptions (the configs name all 15)

# Hendrycks & Dietterich (ICLR 2019): AlexNet's error per corruption, averaged over the five
# severities (the CE denominators as usually quoted), and its clean error (torchvision 56.522%).
PAPER_ALEXNET = {"gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
                 "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948,
                 "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572, "fog": 0.819324,
                 "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
                 "pixelate": 0.717840, "jpeg_compression": 0.606500}



# ----------------------------------------------------------------------------- metrics

def test_alexnet_table_matches_the_papers_per_corruption_errors():
    assert list(ALEXNET_ERRORS) == list(tta.CORRUPTIONS)
    for name, errors in ALEXNET_ERRORS.items():
        assert len(errors) == 5 and math.isclose(sum(errors) / 5, PAPER_ALEXNET[name], abs_tol=5e-7), name
    assert math.isclose(ALEXNET_CLEAN_ERROR, 0.43478, abs_tol=1e-12)


def _cells(severities=(1, 2, 3, 4, 5)):
    rng = np.random.default_rng(0)
    return [{"corruption": c, "severity": s, "error": float(rng.uniform(0.2, 0.9))}
            for s in severities for c in tta.CORRUPTIONS]


def test_alexnet_mce_and_relative_mce_by_hand():
    cells = _cells()
    base = alexnet_baseline_cells("imagenet_c", [(c["corruption"], c["severity"]) for c in cells])
    clean = 0.25
    ce, rel = {}, {}
    for name in tta.CORRUPTIONS:  # float64 sums over the 5 severities, denominators from the paper
        total = sum(np.float64(c["error"]) for c in cells if c["corruption"] == name)
        ce[name] = total / (5 * np.float64(PAPER_ALEXNET[name]))
        rel[name] = (total - 5 * clean) / (5 * np.float64(PAPER_ALEXNET[name]) - 5 * 0.43478)
    got = corruption_errors(cells, base)
    for name in tta.CORRUPTIONS:
        assert math.isclose(got[name], ce[name], rel_tol=1e-6)
    assert math.isclose(mean_corruption_error(cells, base), np.mean(list(ce.values())), rel_tol=1e-6)
    got_rel = relative_corruption_errors(cells, clean, base, ALEXNET_CLEAN_ERROR)
    for name in tta.CORRUPTIONS:
        assert math.isclose(got_rel[name], rel[name], rel_tol=1e-5)
    assert math.isclose(relative_mean_corruption_error(cells, clean, base, ALEXNET_CLEAN_ERROR),
                        np.mean(list(rel.values())), rel_tol=1e-5)


def test_alexnet_mce_at_one_severity_uses_that_severity():
    cells = [{"corruption": "gaussian_noise", "severity": 5, "error": 0.5},
             {"corruption": "fog", "severity": 1, "error": 0.5}]
    ce = corruption_errors(cells, alexnet_baseline_cells("imagenet_c", [("gaussian_noise", 5), ("fog", 1)]))
    assert math.isclose(ce["gaussian_noise"], 0.5 / 0.99452) and math.isclose(ce["fog"], 0.5 / 0.67474)


def test_alexnet_baseline_refuses_other_data_and_cells():
    with pytest.raises(ValueError, match=r"'cifar10_c' \(valid: imagenet_c\)"):
        alexnet_baseline_cells("cifar10_c", [("fog", 5)])
    with pytest.raises(ValueError, match=r"speckle_noise/5, fog/6; valid: severities 1-5"):
        alexnet_baseline_cells("imagenet_c", [("speckle_noise", 5), ("fog", 6), ("fog", 5)])
    with pytest.raises(ValueError, match="not above 0.9"):  # relative CE undefined
        relative_corruption_errors([{"corruption": "fog", "severity": 1, "error": 0.95}], 0.1,
                                   [{"corruption": "fog", "severity": 1, "error": 0.8}], 0.9)


# ----------------------------------------------------------------------------- configs

@pytest.fixture(scope="module")
def evaluate_app():
    """The module behind scripts/evaluate.py (its run() and protocol_config())."""
    try:
        return importlib.import_module("tta.apps.evaluate")
    except ImportError:
        spec = importlib.util.spec_from_file_location("evaluate_app", ROOT / "scripts" / "evaluate.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


def _compose(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3", job_name="test"):
        return compose(config_name="evaluate", overrides=overrides)


def _run(app, overrides, out: Path) -> dict:
    cfg = _compose(overrides)
    return app.run(cfg, out, app.protocol_config(cfg))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_published_numbers_are_recorded_and_consistent(name):
    published = load_published(name)
    assert published == _compose([f"+experiment={name}", "model.weights=x", "dataset.root=x",
                                   "++dataset.kwargs.list_file=x"]).published  # the composed run records it
    for method, entry in published["results"].items():
        assert entry["overrides"][0] == f"adapt={method}" and method in tta.methods.list_methods()
        values = entry.get("per_corruption")
        if values:  # the published mean is the mean of the published per-corruption numbers
            assert list(values) == list(tta.CORRUPTIONS)
            assert abs(sum(values.values()) / 15 - entry["mean"]) <= 0.05 + 1e-9
    expected = {"tent_cifar10c": {"source": 43.5, "batch": 20.4, "tent": 18.6},
                "online_tta_imagenet_c": {"source": 82.0, "batch": 68.6, "tent": 62.6},
                "schneider_imagenet_c": {"source": 76.7, "batch": 62.2}}[name]
    assert {m: e["mean"] for m, e in published["results"].items()} == expected


def test_configs_refuse_to_run_without_their_files(monkeypatch):
    monkeypatch.delenv("TTA_ROBUSTBENCH_STANDARD", raising=False)
    for name, missing, error in [("tent_cifar10c", "TTA_ROBUSTBENCH_STANDARD", InterpolationResolutionError),
                                 ("online_tta_imagenet_c", "root", MissingMandatoryValue),
                                 ("schneider_imagenet_c", "root", MissingMandatoryValue)]:
        cfg = _compose([f"+experiment={name}"])
        with pytest.raises(error, match=missing):
            OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # as scripts/evaluate.py does
    cfg = _compose(["+experiment=online_tta_imagenet_c", "dataset.root=x"])  # RobustBench's list is built in
    assert OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)["dataset"]["kwargs"] == {
        "list_file": "robustbench5000"}
    with pytest.raises(FileNotFoundError, match="available: \\['online_tta_imagenet_c'"):
        load_published("tent_imagenet")


def _write_cifar10c(root: Path, clean_root: Path, per: int) -> np.ndarray:
    """CIFAR-10-C as published (<corruption>.npy of 5 severity blocks, labels.npy) and CIFAR-10's
    python test batch, whose labels equal one severity block (as in the real files)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, per).astype(np.uint8)
    root.mkdir(parents=True)
    np.save(root / "labels.npy", np.tile(labels, 5))
    for name in tta.CORRUPTIONS:
        np.save(root / f"{name}.npy", rng.integers(0, 256, (5 * per, 32, 32, 3), dtype=np.uint8))
    folder = clean_root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (per, 3072), dtype=np.uint8), "labels": labels.tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return labels


def test_tent_cifar10c_runs_on_a_fixture_and_compares_with_tent(tmp_path, monkeypatch, evaluate_app):
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    _write_cifar10c(tmp_path / "CIFAR-10-C", tmp_path / "cifar", per=4)
    torch.save(tta.models.get_model("resnet8", num_classes=10).state_dict(), tmp_path / "tiny.pt")
    common = ["+experiment=tent_cifar10c", "model=resnet8", f"model.weights={tmp_path / 'tiny.pt'}",
              f"dataset.root={tmp_path / 'CIFAR-10-C'}", "+dataset.kwargs.examples_per_severity=4",
              f"dataset.clean_root={tmp_path / 'cifar'}", f"cache_dir={tmp_path / 'cache'}", "progress=false",
              f"corruption.names=[{','.join(FEW)}]"]  # 3 of the 15 corruptions: a few seconds per run
    runs = {m: _run(evaluate_app, common + [f"adapt={m}"], tmp_path / m) for m in ("source", "batch", "tent")}
    for method, run in runs.items():
        assert run["batch_size"] == 200 and run["stream"] == "reset" and run["dataset"] == "cifar10_c"
        assert [(c["corruption"], c["severity"]) for c in run["cells"]] == [(c, 5) for c in FEW]
        assert all(c["num_examples"] == 4 for c in run["cells"])
        assert run["config"]["published"]["results"]["tent"]["mean"] == 18.6
        with pytest.raises(ValueError, match=r"model='resnet8' \(published: 'wide_resnet28_10'\)"):
            compare_published(run)  # a tiny model is not the published protocol
        view = compare_published(run, strict=False)
        assert view["method"] == method and len(view["rows"]) == len(FEW)
        for row in view["rows"]:
            cell = next(c for c in run["cells"] if c["corruption"] == row["corruption"])
            assert math.isclose(row["ours"], 100 * cell["error"], abs_tol=1e-9)
        ours = np.mean([100 * c["error"] for c in run["cells"]])
        assert math.isclose(view["mean"]["ours"], ours, abs_tol=1e-9)
        assert view["mean"]["published"] == {"source": 43.5, "batch": 20.4, "tent": 18.6}[method]
        assert math.isclose(view["mean"]["difference"], ours - view["mean"]["published"], abs_tol=1e-9)
    fog = next(r for r in compare_published(runs["tent"], strict=False)["rows"] if r["corruption"] == "fog")
    assert fog["published"] == 13.7
    # with the published protocol restated for the tiny model the comparison table is rendered
    run = runs["batch"]
    run["config"]["published"]["protocol"] |= {"model": "resnet8", "corruptions": FEW}
    lines = published_sections([run], {id(run): "batch"})
    assert "## Ours vs published: batch, error (%)" in lines
    table = "\n".join(lines)
    ours = compare_published(run)["mean"]["ours"]
    assert f"| mean | {ours:.1f} | 20.4 | {ours - 20.4:+.1f} |" in table
    assert "| gaussian_noise |" in table and "| 28.1 |" in table


def _write_imagenet_c(root: Path, corruptions, severities, wnids=("n01440764", "n01443537"), per_class=2):
    rng = np.random.default_rng(0)
    for c in corruptions:
        for s in severities:
            for wnid in wnids:
                folder = root / c / str(s) / wnid
                folder.mkdir(parents=True)
                for i in range(per_class):
                    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                        folder / f"ILSVRC2012_val_{i:08d}.JPEG")


def test_online_tta_imagenet_c_runs_through_the_command_line(tmp_path):
    root = tmp_path / "ImageNet-C"
    _write_imagenet_c(root, FEW, [5])
    listing = tmp_path / "imagenet_test_image_ids.txt"
    listing.write_text("n01440764/ILSVRC2012_val_00000001.JPEG 0\nn01443537/ILSVRC2012_val_00000000.JPEG 1\n"
                       "n01443537/ILSVRC2012_val_00000001.JPEG 1\n")
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "+experiment=online_tta_imagenet_c", "adapt=batch",
         "model=resnet8", "model.weights=null", "dataset.num_classes=2", f"dataset.root={root}",
         f"dataset.kwargs.list_file={listing}", f"cache_dir={tmp_path / 'cache'}", "progress=false",
         f"corruption.names=[{','.join(FEW)}]", "num_threads=1",
         f"hydra.run.dir={out}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((out / "results.json").read_text())
    assert run["stream"] == "continual" and run["batch_size"] == 64 and run["method"] == "batch"
    assert [c["num_examples"] for c in run["cells"]] == [3] * len(FEW)  # the list file's images
    view = compare_published(run, strict=False)
    assert view["mean"]["published"] == 68.6 and all(r["published"] is None for r in view["rows"])
    assert view["mismatches"][0] == "model='resnet8' (published: 'resnet50')"
    assert view["mismatches"][1].startswith("corruptions=['gaussian_noise', 'fog', 'contrast'] (published: ['gaussian_noise'")


def test_schneider_mce_runs_on_a_fixture_and_gives_the_alexnet_normalised_mce(tmp_path, evaluate_app):
    root = tmp_path / "ImageNet-C"
    _write_imagenet_c(root, FEW, [1, 2, 3, 4, 5], per_class=1)
    run = _run(evaluate_app, ["+experiment=schneider_imagenet_c", "adapt=source", "model=resnet8",
                              "model.weights=null", "dataset.num_classes=2", f"dataset.root={root}",
                              f"cache_dir={tmp_path / 'cache'}", "progress=false",
                              f"corruption.names=[{','.join(FEW)}]", "baseline=alexnet"], tmp_path / "run")
    assert run["batch_size"] == 256 and len(run["cells"]) == 5 * len(FEW)
    view = compare_published(run, strict=False)
    assert view["metric"] == "mce" and view["mean"]["published"] == 76.7
    for row in view["rows"]:  # CE_c = sum_s E / sum_s E_AlexNet, the sums from the paper's means
        total = sum(np.float64(c["error"]) for c in run["cells"] if c["corruption"] == row["corruption"])
        assert math.isclose(row["ours"], 100 * total / (5 * PAPER_ALEXNET[row["corruption"]]), rel_tol=1e-6)
    assert math.isclose(view["mean"]["ours"], np.mean([r["ours"] for r in view["rows"]]), rel_tol=1e-12)
    # baseline=alexnet: the run's own mCE is the AlexNet-normalised one, computed by hand here
    by_hand = np.mean([sum(np.float64(c["error"]) for c in run["cells"] if c["corruption"] == name)
                       / (5 * PAPER_ALEXNET[name]) for name in FEW])
    assert run["baseline"] == "alexnet" and math.isclose(run["mean"]["mce"], by_hand, rel_tol=1e-6)


def test_missing_files_are_one_line_naming_the_setting(monkeypatch):
    from tta.apps import error_line

    monkeypatch.delenv("TTA_ROBUSTBENCH_STANDARD", raising=False)
    expected = {"tent_cifar10c": "model.weights could not be resolved (Environment variable "
                                 "'TTA_ROBUSTBENCH_STANDARD' not found): pass model.weights=<value>",
                "online_tta_imagenet_c": "dataset.root is not set: pass dataset.root=<value>",
                "schneider_imagenet_c": "dataset.root is not set: pass dataset.root=<value>"}
    for name, line in expected.items():
        with pytest.raises((InterpolationResolutionError, MissingMandatoryValue)) as caught:
            OmegaConf.to_container(_compose([f"+experiment={name}"]), resolve=True, throw_on_missing=True)
        assert "\n" in str(caught.value)  # OmegaConf's own text: 3 lines (message, full_key, object_type)
        assert error_line(caught.value) == line


@pytest.mark.slow
def test_tent_cifar10c_without_weights_fails_in_one_line(tmp_path, monkeypatch):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("TTA_ROBUSTBENCH_STANDARD", "TTA_DEBUG", "HYDRA_FULL_ERROR"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "+experiment=tent_cifar10c",
                           "adapt=source", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip() and "INFO" not in line]
    assert proc.returncode == 1 and len(lines) == 1, lines
    assert "pass model.weights=<value>" in lines[0] and "TTA_ROBUSTBENCH_STANDARD" in lines[0]
    assert not (tmp_path / "run" / "results.json").exists()
