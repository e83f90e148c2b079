"""scripts/report.py over real (small) runs: tables, CSV, plots, labels, failed jobs."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from tta.evaluation import run_benchmark
from tta.evaluation.report import label_runs, load_runs, write_report
from tta.evaluation.results import write_error

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def job(directory: Path, cache: Path, **kwargs) -> dict:
    args = dict(dataset="digits", model="resnet8",
                model_kwargs={"num_classes": 10, "in_channels": 1, "width": 4},
                corruptions=["fog", "contrast"], severities=[1, 5], num_examples=32, device="cpu",
                cache_dir=cache, progress=False, batch_size=8)
    args.update(kwargs)
    return run_benchmark(directory, **args)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    cache = root / ".cache"
    job(root / "source", cache, method="source")
    for prior in (1, 64):
        for batch_size in (4, 16):
            job(root / f"blend_{prior}_{batch_size}", cache, method="blend",
                method_params={"prior": prior}, batch_size=batch_size)
    write_error(root / "broken", ValueError("adapt.prior must be >= 0, got -1"))
    return root


def test_labels_name_what_varies(sweep):
    runs, errors = load_runs([sweep])
    labels = dict(zip((Path(r["path"]).name for r in runs), label_runs(runs)))
    assert labels["blend_1_4"] == "blend prior=1 bs=4"
    assert labels["source"] == "source bs=8"
    assert len(set(labels.values())) == len(runs) == 5
    assert [e["error_type"] for e in errors] == ["ValueError"]


def test_report_files(sweep, tmp_path):
    report = write_report([sweep], tmp_path / "report")
    runs = {Path(r["path"]).name: r for r in report["runs"]}
    md = (tmp_path / "report" / "report.md").read_text()
    blend = runs["blend_64_16"]
    # the recovered table shows percentage points of the run's own numbers
    section = md.split("## Accuracy recovered (points), mean over severities")[1]
    row = next(line for line in section.splitlines() if line.startswith("| blend prior=64 bs=16 |"))
    fog = sum(c["recovered"] for c in blend["cells"] if c["corruption"] == "fog") / 2
    assert f"{100 * fog:+.1f}" in row.split("|")[2]
    assert f"{100 * blend['mean']['recovered']:+.1f}" in row
    assert "## Failed jobs" in md and "adapt.prior must be >= 0" in md
    for severity in (1, 5):
        assert f"## Accuracy (%) at severity {severity}" in md
    rows = list(csv.DictReader((tmp_path / "report" / "report.csv").open()))
    assert len(rows) == 5 * 4
    fog5 = next(r for r in rows if r["label"] == "blend prior=64 bs=16"
                and r["corruption"] == "fog" and r["severity"] == "5")
    cell = next(c for c in blend["cells"] if (c["corruption"], c["severity"]) == ("fog", 5))
    assert float(fog5["accuracy"]) == pytest.approx(cell["accuracy"])
    for name in ("recovered_heatmap.png", "accuracy_vs_severity.png", "prior_batch_grid.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == PNG
        assert f"({name})" in md


def test_no_grid_without_a_prior_batch_sweep(sweep, tmp_path):
    write_report([sweep / "source", sweep / "blend_1_4"], tmp_path)
    assert (tmp_path / "recovered_heatmap.png").exists()
    assert not (tmp_path / "prior_batch_grid.png").exists()


def load_script():
    spec = importlib.util.spec_from_file_location("report_script", ROOT / "scripts" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_prints_the_table_and_rejects_missing_dirs(sweep, tmp_path, capsys):
    script = load_script()
    assert script.main([str(sweep / "source"), str(sweep / "blend_1_4"), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| method | fog | contrast | mean |" in printed
    assert str(tmp_path / "recovered_heatmap.png") in printed
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(tmp_path / "nope"), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no such run or sweep directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main([str(sweep / "broken"), "--out", str(tmp_path)])  # only a failed job


def test_repeated_protocols_are_reported_once(sweep, tmp_path):
    # a sweep over adapt.prior runs source once per prior; source ignores it
    cache = tmp_path / "cache"
    for prior in (1, 4):
        job(tmp_path / "runs" / f"source_{prior}", cache, method="source", method_params={"prior": prior})
    report = write_report([tmp_path / "runs"], tmp_path / "report", plots=False)
    assert report["labels"] == ["source"]
    assert report["runs"][0]["params"] == {"prior": None}
