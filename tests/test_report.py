"""scripts/report.py and tta.evaluation.report over synthetic results.json files: grouping by
model/dataset/protocol, intervals, seeds, plots (inspected as matplotlib figures), failed,
unreadable and superseded jobs, warnings."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import re
from pathlib import Path

import pytest

from tta.evaluation.report import (group_runs, label_runs, load_runs, recovered_heatmap,
                                   severity_plot, wilson_interval, write_report)
from tta.evaluation.results import write_error, write_json

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
Z = 1.959963984540054  # standard normal 0.975 quantile


def results(method="source", *, source, correct=None, n=200, clean=180, model="resnet8",
            dataset="digits", seed=0, stream="reset", batch_size=8, params=None, **extra):
    """A results.json dict as scripts/evaluate.py writes it; ``source``/``correct``:
    {(corruption, severity): correct images of n} for the source and the adapted model."""
    correct = source if correct is None else correct
    cells = [{"corruption": c, "severity": s, "num_examples": n,
              "source_accuracy": source[c, s] / n, "accuracy": correct[c, s] / n,
              "recovered": correct[c, s] / n - source[c, s] / n, "gap_closed": None,
              "source_error": 1 - source[c, s] / n, "error": 1 - correct[c, s] / n,
              "source_ece": 0.1, "ece": 0.05} for c, s in source]
    mean = {k: sum(c[k] for c in cells) / len(cells)
            for k in ("source_accuracy", "accuracy", "recovered", "ece")}
    return {"status": "ok", "method": method, "params": params or {}, "stream": stream,
            "stream_params": {}, "batch_size": batch_size, "num_examples": n, "dataset": dataset,
            "model": model, "seed": seed, "clean_accuracy": clean / n, "cells": cells,
            "mean": mean, "config": None, "images_per_second": 100.0, **extra}


SOURCE = {("fog", 1): 150, ("contrast", 1): 120, ("fog", 5): 60, ("contrast", 5): 0}
BATCH = {("fog", 1): 160, ("contrast", 1): 150, ("fog", 5): 110, ("contrast", 5): 90}


def blend_correct(prior: int, batch_size: int) -> dict:
    return {k: v + prior // 16 + batch_size for k, v in BATCH.items()}


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    write_json(root / "source" / "results.json", results(source=SOURCE))
    for prior in (1, 64):
        for batch_size in (4, 16):
            write_json(root / f"blend_{prior}_{batch_size}" / "results.json", results(
                "blend", source=SOURCE, correct=blend_correct(prior, batch_size),
                params={"prior": prior, "alpha": None}, batch_size=batch_size))
    write_error(root / "broken", ValueError("adapt.prior must be >= 0, got -1"))
    return root


def write(path: Path, run: dict) -> dict:
    write_json(path / "results.json", run)
    return {**run, "path": str(path)}


def load_script():
    spec = importlib.util.spec_from_file_location("report_script", ROOT / "scripts" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wilson64(k: int, n: int) -> tuple[float, float]:
    p = k / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z / (1 + Z * Z / n) * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return centre - half, centre + half


def test_labels_name_what_varies(sweep):
    runs, errors = load_runs([sweep])
    labels = dict(zip((Path(r["path"]).name for r in runs), label_runs(runs)))
    assert labels["blend_1_4"] == "blend prior=1 bs=4"
    assert labels["source"] == "source bs=8"
    assert len(set(labels.values())) == len(runs) == 5
    assert [(e["kind"], e["error_type"]) for e in errors] == [("failed", "ValueError")]


def test_report_files(sweep, tmp_path):
    report = write_report([sweep], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    section = md.split("## Accuracy recovered (points), mean over severities")[1]
    row = next(line for line in section.splitlines() if line.startswith("| blend prior=64 bs=16 |"))
    fog = ((160 + 20 - 150) + (110 + 20 - 60)) / 2 / 200  # blend adds 64 // 16 + 16 = 20
    assert row.split("|")[2].strip() == f"{100 * fog:+.1f}" == "+25.0"
    assert "## Failed jobs" in md and "adapt.prior must be >= 0" in md
    for severity in (1, 5):
        assert f"## Accuracy (%) at severity {severity}" in md
    rows = list(csv.DictReader((tmp_path / "report" / "report.csv").open()))
    cell_rows = [r for r in rows if "mean" not in (r["corruption"], r["severity"])]
    assert len(cell_rows) == 5 * 4 and len(rows) == 5 * (4 + 2 + 2 + 1)
    fog5 = next(r for r in cell_rows if r["label"] == "blend prior=64 bs=16"
                and r["corruption"] == "fog" and r["severity"] == "5")
    assert float(fog5["accuracy"]) == pytest.approx(130 / 200, abs=1e-12)
    for name in ("recovered_heatmap.png", "accuracy_vs_severity.png", "prior_batch_grid.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == PNG
        assert f"({name})" in md
    assert len(report["groups"]) == 1


def test_no_grid_without_a_prior_batch_sweep(sweep, tmp_path):
    write_report([sweep / "source", sweep / "blend_1_4"], tmp_path)
    assert (tmp_path / "recovered_heatmap.png").exists()
    assert not (tmp_path / "prior_batch_grid.png").exists()


def test_repeated_protocols_are_reported_once(tmp_path):
    # a sweep over adapt.prior runs source once per prior; source ignores it
    for prior in (1, 4):
        write_json(tmp_path / "runs" / f"source_{prior}" / "results.json",
                   results(source=SOURCE, params={"prior": None}))
    report = write_report([tmp_path / "runs"], tmp_path / "report", plots=False)
    assert report["labels"] == ["source"]
    assert report["runs"][0]["params"] == {"prior": None}


# --- item 4: one baseline per (model, dataset, protocol), never averaged across -----------

def test_groups_never_average_models(tmp_path):
    a, b = {("fog", 5): 247}, {("fog", 5): 177}  # of 1000 images
    sweep = tmp_path / "sweep"
    for method, gain in (("source", 0), ("batch", 300), ("blend", 280)):
        write(sweep / f"a_{method}", results(method, source=a, correct={("fog", 5): 247 + gain},
                                             n=1000, clean=900, model="resnet8",
                                             params={"prior": 16} if method == "blend" else {}))
    for method, gain in (("source", 0), ("batch", 200)):
        write(sweep / f"b_{method}", results(method, source=b, correct={("fog", 5): 177 + gain},
                                             n=1000, clean=800, model="resnet20"))
    report = write_report([sweep], tmp_path / "report")
    md = report["markdown"]
    # the old report showed (3 x 24.7 + 2 x 17.7) / 5 = 21.9 as the source row
    assert "21.9" not in md
    assert md.count("## Group ") == 2
    groups = md.split("## Group ")[1:]
    source_rows = [next(line for line in g.splitlines() if line.startswith("| source (no adapt"))
                   for g in groups]
    assert [row.split("|")[2].split("[")[0].strip() for row in source_rows] == ["24.7", "17.7"]
    assert "model resnet8" in groups[0] and "model resnet20" in groups[1]
    names = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert names == ["accuracy_vs_severity_resnet20_digits_n1000.png",
                     "accuracy_vs_severity_resnet8_digits_n1000.png",
                     "recovered_heatmap_resnet20_digits_n1000.png",
                     "recovered_heatmap_resnet8_digits_n1000.png"]
    for group, source in zip(report["groups"], (24.7, 17.7)):
        fig = severity_plot(group)
        line = next(l for l in fig.axes[0].lines if l.get_label() == "source (no adaptation)")
        assert list(line.get_ydata()) == pytest.approx([source])
    rows = list(csv.DictReader((tmp_path / "report" / "report.csv").open()))
    assert {r["model"]: r["group"] for r in rows} == {"resnet8": "1", "resnet20": "2"}


def test_group_key_model_fingerprint_dataset_cells_not_stream_or_batch(tmp_path):
    src = {("fog", 5): 100}
    runs = [write(tmp_path / "1", results(source=src, fingerprints={"model": "aa" * 32, "data": "d"})),
            write(tmp_path / "2", results("batch", source=src, correct={("fog", 5): 150},
                                          fingerprints={"model": "bb" * 32, "data": "d"})),
            write(tmp_path / "3", results("batch", source=src, correct={("fog", 5): 150},
                                          dataset="fashion_mnist")),
            write(tmp_path / "4", results("batch", source=src, correct={("fog", 5): 150}, n=100)),
            write(tmp_path / "5", results("batch", source=src | {("fog", 1): 100})),
            write(tmp_path / "6", results("batch", source=src, correct={("fog", 5): 150},
                                          fingerprints={"model": "aa" * 32, "data": "d"},
                                          stream="continual", batch_size=64))]
    groups = group_runs(runs)
    members = [sorted(Path(r["path"]).name for r in g.runs) for g in groups]
    assert sorted(members) == [["1", "6"], ["2"], ["3"], ["4"], ["5"]]
    # without a fingerprint, runs of one model name that disagree on the source accuracies
    # (different weights) are not averaged either
    other = write(tmp_path / "7", results("source", source={("fog", 5): 20}))
    split = group_runs([write(tmp_path / "8", results(source=src)), other])
    assert len(split) == 2 and "disagree on the source accuracies" in split[0].warnings[0]


# --- item 7: the heatmap ----------------------------------------------------------------

def test_heatmap_draws_every_cell_centred_colour_blind_safe(sweep):
    from matplotlib.colors import TwoSlopeNorm

    runs, _ = load_runs([sweep / "source", sweep / "blend_1_4", sweep / "blend_64_16"])
    (group,) = group_runs(runs)
    fig = recovered_heatmap(group)
    ax = fig.axes[0]
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert len(texts) == 3 * 3 and all(re.fullmatch(r"[+-]\d+\.\d", t) for t in texts.values())
    labels = [t.get_text() for t in ax.get_yticklabels()]
    source, blend = labels.index("source bs=8"), labels.index("blend prior=64 bs=16")
    assert [texts[source, j] for j in range(3)] == ["+0.0"] * 3  # drawn, not blank
    fog = 100 * ((160 + 20 - 150) + (110 + 20 - 60)) / 2 / 200
    contrast = 100 * ((150 + 20 - 120) + (90 + 20 - 0)) / 2 / 200
    assert [texts[blend, j] for j in range(3)] == [f"{fog:+.1f}", f"{contrast:+.1f}",
                                                   f"{(fog + contrast) / 2:+.1f}"] \
        == ["+25.0", "+40.0", "+32.5"]
    image = ax.images[0]
    assert image.get_cmap().name == "RdBu"
    assert isinstance(image.norm, TwoSlopeNorm) and image.norm.vcenter == 0
    assert image.norm.vmin == -image.norm.vmax == -40.0
    title = ax.get_title()
    for part in ("resnet8", "digits", "200 images per cell", "stream reset"):
        assert part in title


# --- item 8: accuracy against severity -----------------------------------------------------

def test_severity_plot_one_line_per_method_clean_reference_legend_outside(sweep):
    runs, _ = load_runs([sweep / "source", sweep / "blend_1_4", sweep / "blend_64_16"])
    (group,) = group_runs(runs)
    fig = severity_plot(group)
    ax = fig.axes[0]
    lines = {l.get_label(): l for l in ax.lines}
    assert sorted(lines) == ["blend prior=1 bs=4", "blend prior=64 bs=16", "clean (no corruption)",
                             "source (no adaptation)"]  # no second source line
    assert list(lines["source (no adaptation)"].get_ydata()) == pytest.approx(
        [100 * (150 + 120) / 400, 100 * (60 + 0) / 400])
    assert list(lines["clean (no corruption)"].get_ydata()) == pytest.approx([90.0, 90.0])
    assert list(lines["blend prior=1 bs=4"].get_ydata()) == pytest.approx(
        [100 * (164 + 154) / 400, 100 * (114 + 94) / 400])
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1  # outside, right of the data
    assert "resnet8" in ax.get_title() and "digits" in ax.get_title()


# --- item 9: intervals and seeds ----------------------------------------------------------

@pytest.mark.parametrize("k, n", [(0, 200), (1, 200), (73, 200), (200, 200), (7, 9)])
def test_wilson_interval_matches_the_formula(k, n):
    assert wilson_interval(k, n) == pytest.approx(wilson64(k, n), abs=1e-12)


def test_intervals_in_csv_and_markdown(sweep, tmp_path):
    report = write_report([sweep / "source", sweep / "blend_1_4"], tmp_path, plots=False)
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    fog5 = next(r for r in rows if r["method"] == "blend" and (r["corruption"], r["severity"]) == ("fog", "5"))
    assert (float(fog5["accuracy_ci95_low"]), float(fog5["accuracy_ci95_high"])) == \
        pytest.approx(wilson64(114, 200), abs=1e-12)
    assert (float(fog5["source_accuracy_ci95_low"]), float(fog5["source_accuracy_ci95_high"])) == \
        pytest.approx(wilson64(60, 200), abs=1e-12)
    pooled = next(r for r in rows if r["method"] == "blend" and r["corruption"] == r["severity"] == "mean")
    correct = sum(blend_correct(1, 4).values())
    assert float(pooled["accuracy"]) == pytest.approx(correct / 800)
    assert (float(pooled["accuracy_ci95_low"]), float(pooled["accuracy_ci95_high"])) == \
        pytest.approx(wilson64(correct, 800), abs=1e-12)
    low, high = wilson64(correct, 800)
    summary = report["markdown"].split("## Summary")[1]
    row = next(line for line in summary.splitlines() if line.startswith("| blend"))
    assert f"{100 * correct / 800:.1f} [{100 * low:.1f}, {100 * high:.1f}]" in row
    assert "Wilson" in report["markdown"] and "understates" in report["markdown"]


def test_seeds_give_mean_and_std(tmp_path):
    src = {("fog", 1): 100, ("fog", 5): 50}
    gains = (20, 26, 35)
    for seed, gain in enumerate(gains):
        write(tmp_path / f"batch_{seed}", results("batch", source=src, seed=seed,
                                                  correct={k: v + gain for k, v in src.items()}))
        write(tmp_path / f"source_{seed}", results(source=src, seed=seed))
    report = write_report([tmp_path], tmp_path / "report")
    (group,) = report["groups"]
    assert [len(e.runs) for e in group.entries] == [3, 3]  # one row per method
    values = [100 * g / 200 for g in gains]
    mean = sum(values) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    row = next(line for line in report["recovered"].splitlines() if line.startswith("| batch"))
    assert row.split("|")[2].strip() == f"{mean:+.1f} ±{std:.1f}" == "+13.5 ±3.8"
    ax = severity_plot(group).axes[0]
    source_bars, bars = ax.containers  # the spread over seeds (none for the source model)
    assert [s[1][1] - s[0][1] for s in source_bars.lines[2][0].get_segments()] == [0, 0]
    segments = bars.lines[2][0].get_segments()
    assert [s[1][1] - s[0][1] for s in segments] == pytest.approx([2 * std, 2 * std])
    heat = recovered_heatmap(group).axes[0]
    assert f"{mean:+.1f}\n±{std:.1f}" in [t.get_text() for t in heat.texts]


# --- report sides of items 2, 5, 10, 14, 17 ----------------------------------------------

def test_failed_jobs_are_listed_and_fail_the_command(sweep, tmp_path, capsys):
    script = load_script()
    assert script.main([str(sweep), "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "| method | fog | contrast | mean |" in captured.out
    assert str(sweep / "broken") in captured.err and "ValueError" in captured.err
    assert "adapt.prior must be >= 0, got -1" in captured.err
    md = (tmp_path / "report.md").read_text()
    assert f"| {sweep / 'broken'} | ValueError | adapt.prior must be >= 0, got -1 |" in md
    assert "blend prior=64 bs=16" in md  # the successful runs are still reported


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
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(sweep / "broken"), "--out", str(tmp_path)])  # only a failed job
    assert exit_info.value.code == 2 and str(sweep / "broken") in capsys.readouterr().err


@pytest.mark.parametrize("content", ["{not json", "[]", "null", "42", '{"method": "batch"}',
                                     '{"method": "batch", "cells": [{"corruption": "fog"}]}'])
def test_an_unreadable_results_file_is_named_and_the_rest_reported(sweep, tmp_path, capsys, content):
    bad = sweep / "bad" / "results.json"
    bad.parent.mkdir()
    bad.write_text(content)
    script = load_script()
    assert script.main([str(sweep), "--out", str(tmp_path), "--no-plots"]) == 1
    assert str(bad) in capsys.readouterr().err
    md = (tmp_path / "report.md").read_text()
    assert "## Unreadable results" in md and str(bad) in md
    assert md.count("| blend prior=") >= 4  # the readable runs are reported


def test_run_warnings_are_shown(sweep, tmp_path, capsys):
    run = json.loads((sweep / "blend_1_4" / "results.json").read_text())
    write_json(sweep / "blend_1_4" / "results.json",
               {**run, "warnings": ["3 BatchNorm layers saw a batch of size 1"]})
    script = load_script()
    script.main([str(sweep / "blend_1_4"), str(sweep / "source"), "--out", str(tmp_path)])
    assert "3 BatchNorm layers saw a batch of size 1" in capsys.readouterr().err
    md = (tmp_path / "report.md").read_text()
    section = md.split("## Warnings")[1]
    assert "| blend bs=4 | " in section and "3 BatchNorm layers saw a batch of size 1" in section


@pytest.mark.parametrize("stamped", [True, False])
def test_a_job_shows_its_latest_outcome(tmp_path, stamped):
    # both files in one directory (an older layout, or a move that did not happen)
    old, new = "2026-01-01T10:00:00Z", "2026-01-02T10:00:00+00:00"
    src = {("fog", 5): 100}
    for name, results_time, error_time in (("failed_later", old, new), ("fixed_later", new, old)):
        job = tmp_path / "sweep" / name
        write_json(job / "results.json", results("batch", source=src, **(
            {"finished_at": results_time} if stamped else {})))
        write_json(job / "error.json", {"status": "error", "error_type": "RuntimeError",
                                        "error": "out of memory", **(
                                            {"finished_at": error_time} if stamped else {})})
        if not stamped:  # by file modification time
            os.utime(job / "results.json", (0, 1e9 if results_time == old else 2e9))
            os.utime(job / "error.json", (0, 1e9 if error_time == old else 2e9))
    runs, errors = load_runs([tmp_path / "sweep"])
    assert [Path(r["path"]).name for r in runs] == ["fixed_later"]
    assert [(Path(e["path"]).name, e["kind"], e["error"]) for e in errors] == [
        ("failed_later", "failed", "out of memory")]


def test_results_moved_aside_inside_a_job_are_not_another_run(tmp_path):
    src = {("fog", 5): 100}
    write(tmp_path / "job", results("batch", source=src, correct={("fog", 5): 150}))
    write(tmp_path / "job" / "previous", results("batch", source=src, correct={("fog", 5): 120}))
    report = write_report([tmp_path], tmp_path / "report", plots=False)
    assert [Path(r["path"]).name for r in report["runs"]] == ["job"]
    assert "inside the job directory" in report["markdown"].split("## Warnings")[1]


def test_worst_class_accuracy_from_confusion(tmp_path):
    run = results("batch", source={("fog", 5): 13}, correct={("fog", 5): 15}, n=20, clean=18)
    run["cells"][0]["confusion"] = [[10, 0], [5, 5]]  # rows: true class
    run["cells"][0]["source_confusion"] = [[9, 1], [6, 4]]
    write(tmp_path / "job", run)
    write_report([tmp_path / "job"], tmp_path / "report", plots=False)
    rows = list(csv.DictReader((tmp_path / "report" / "report.csv").open()))
    assert float(rows[0]["worst_class_accuracy"]) == 5 / 10
    assert float(rows[0]["source_worst_class_accuracy"]) == 4 / 10


# --- trust faults: intervals over distinct images, inconsistent numbers refused --------------

def gradual_run() -> dict:
    """A stream=gradual run of 64 images per cell: contrast at severity 1 is visited twice
    (1, 5, 1), so its cell counts 128 predictions (88 correct) of the same 64 images."""
    source = {("fog", 1): 9, ("fog", 5): 6, ("contrast", 1): 9, ("contrast", 5): 6}
    correct = {("fog", 1): 41, ("fog", 5): 10, ("contrast", 1): 44, ("contrast", 5): 23}
    run = results("batch", source=source, correct=correct, n=64, clean=47, stream="gradual")
    cell = next(c for c in run["cells"] if (c["corruption"], c["severity"]) == ("contrast", 1))
    cell["num_examples"], cell["accuracy"] = 128, 88 / 128  # == 44 / 64
    return run


def test_gradual_intervals_count_distinct_images_not_visits(tmp_path):
    write(tmp_path / "gradual", gradual_run())
    report = write_report([tmp_path / "gradual"], tmp_path / "report", plots=False)
    assert report["errors"] == []
    rows = list(csv.DictReader((tmp_path / "report" / "report.csv").open()))
    contrast1 = next(r for r in rows if (r["corruption"], r["severity"]) == ("contrast", "1"))
    # 64 distinct images; the old report used n = 128 visits (a narrower interval, and the
    # source model's 9 of 64 as 18 of 128)
    assert int(contrast1["num_examples"]) == 64
    assert (float(contrast1["accuracy_ci95_low"]), float(contrast1["accuracy_ci95_high"])) == \
        pytest.approx(wilson64(44, 64), abs=1e-12)
    assert (float(contrast1["source_accuracy_ci95_low"]), float(contrast1["source_accuracy_ci95_high"])) == \
        pytest.approx(wilson64(9, 64), abs=1e-12)
    # the pooled mean is the mean over the 4 cells (118 of 4 x 64), not weighted by visits
    # (the old pooled proportion was 162 / 320 = 50.6% beside a mean of 46.1%)
    pooled = next(r for r in rows if r["corruption"] == r["severity"] == "mean")
    assert float(pooled["accuracy"]) == pytest.approx((41 + 10 + 44 + 23) / 256, abs=1e-12)
    assert (float(pooled["accuracy_ci95_low"]), float(pooled["accuracy_ci95_high"])) == \
        pytest.approx(wilson64(118, 256), abs=1e-12)
    low, high = wilson64(118, 256)
    summary = report["markdown"].split("## Summary")[1]
    row = next(line for line in summary.splitlines() if line.startswith("| batch"))
    assert row.split("|")[5].strip() == f"{100 * 118 / 256:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
    low, high = wilson64(9 + 9, 128)  # source at severity 1, both corruptions
    table = report["markdown"].split("## Accuracy (%) at severity 1")[1]
    source_row = next(line for line in table.splitlines() if line.startswith("| source (no adaptation)"))
    assert source_row.split("|")[4].strip() == f"{100 * 18 / 128:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def _set(run: dict, path: str, value) -> dict:
    """``run`` with the value at ``path`` (keys and list indices separated by '/') replaced."""
    *parents, last = path.split("/")
    node = run
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[int(last) if isinstance(node, list) else last] = value
    return run


def _with_summaries(run: dict) -> dict:
    """Adds per_severity / per_corruption and the full mean as the pipeline writes them."""
    keys = ("source_accuracy", "accuracy", "recovered", "source_error", "error", "source_ece", "ece")

    def summary(cells):
        out = {k: sum(c[k] for c in cells) / len(cells) for k in keys}
        out["gap_closed"] = out["recovered"] / (run["clean_accuracy"] - out["source_accuracy"])
        return out

    run["mean"] = summary(run["cells"])
    run["per_severity"] = {str(s): summary([c for c in run["cells"] if c["severity"] == s]) for s in (1, 5)}
    run["per_corruption"] = {n: summary([c for c in run["cells"] if c["corruption"] == n])
                             for n in ("fog", "contrast")}
    for cell in run["cells"]:
        cell["gap_closed"] = cell["recovered"] / (run["clean_accuracy"] - cell["source_accuracy"])
    return run


@pytest.mark.parametrize("path, value, message", [
    ("cells/0/recovered", math.nan, "has recovered nan, not a finite number"),
    ("cells/0/recovered", math.inf, "has recovered inf, not a finite number"),
    ("cells/0/recovered", -5.0, "has recovered -5.0 but accuracy - source_accuracy is"),
    ("cells/0/accuracy", math.nan, "accuracy outside"),
    ("cells/0/ece", math.nan, "has ece nan, not a finite number"),
    ("cells/0/error", 0.5, "has error 0.5 but 1 - its accuracy is"),
    ("cells/0/gap_closed", 123, r"has gap_closed 123 but recovered / \(clean - source accuracy\)"),
    ("cells/0/num_examples", 100, "has num_examples 100: not a positive multiple of the run's 200"),
    ("cells/0/confusion", [[100, 0], [0, 100]], r"confusion \(trace 200 of 200\) does not give the accuracy"),
    ("mean/gap_closed", 123, r"mean.gap_closed is 123 but recovered / \(clean - source accuracy\) is"),
    ("mean/accuracy", 0.99, "mean.accuracy is 0.99 but the mean of its cells is"),
    ("mean/mce", math.inf, "mean.mce is inf, not a finite number >= 0"),
    ("per_severity/5/recovered", 0.0, r"per_severity\['5'\].recovered is 0.0 but the mean of its cells"),
    ("per_corruption/fog/ece", 0.5, r"per_corruption\['fog'\].ece is 0.5 but the mean of its cells"),
    ("num_examples", "200", "num_examples must be a positive int"),
    ("clean_error", 0.3, "clean_error 0.3 is not 1 - clean_accuracy"),
    ("images_per_second", math.nan, "images_per_second must be null or a finite number > 0"),
])
def test_non_finite_or_inconsistent_numbers_are_refused(tmp_path, capsys, path, value, message):
    good = _with_summaries(results(source=SOURCE))
    write(tmp_path / "source", good)
    bad = _with_summaries(results("batch", source=SOURCE, correct=BATCH))
    bad["clean_error"] = 1 - bad["clean_accuracy"]
    file = tmp_path / "batch" / "results.json"
    file.parent.mkdir()
    file.write_text(json.dumps(_set(bad, path, value)))  # json.dumps writes NaN / Infinity
    runs, problems = load_runs([tmp_path])
    assert [Path(r["path"]).name for r in runs] == ["source"]
    (problem,) = problems
    assert problem["kind"] == "unreadable" and problem["file"] == str(file)
    assert re.search(message, problem["error"]), problem["error"]
    assert load_script().main([str(tmp_path), "--out", str(tmp_path / "report"), "--no-plots"]) == 1
    assert str(file) in capsys.readouterr().err
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Unreadable results" in md and str(file) in md
    assert not any(line.startswith("| batch") for line in md.splitlines())  # none of its numbers


def test_consistent_runs_with_every_optional_field_are_accepted(tmp_path):
    run = _with_summaries(results("batch", source=SOURCE, correct=BATCH))
    run["clean_error"], run["mean"]["mce"] = 1 - run["clean_accuracy"], 0.8
    run["cells"][0]["confusion"] = [[80, 20], [20, 80]]  # fog 1: 160 of 200 correct
    write(tmp_path / "batch", run)
    assert load_runs([tmp_path])[1] == []


@pytest.mark.slow
def test_every_stream_is_reported_over_its_distinct_images(tmp_path):
    """Each registered stream through the pipeline (digits, a random ResNet-8): the report
    accepts its numbers as consistent, and every interval counts the run's distinct images,
    also where a stream shows an image twice (gradual: the cell's num_examples is 2 n)."""
    from tta.evaluation import list_streams
    from tta.evaluation.pipeline import run_benchmark

    visits = {}
    for stream in list_streams():
        results_ = run_benchmark(
            tmp_path / stream, dataset="digits", model="resnet8", corruptions=["fog", "contrast"],
            severities=[1, 3], method="batch", stream=stream, batch_size=32, num_examples=100, device="cpu",
            stream_params={"factor": 2.0} if stream == "imbalance" else None,
            progress=False, cache_dir=tmp_path / "cache",
            model_kwargs={"num_classes": 10, "in_channels": 1, "width": 4})
        visits[stream] = {(c["corruption"], c["severity"]): c["num_examples"] // results_["num_examples"]
                          for c in results_["cells"]}
    assert visits["gradual"] == {("fog", 1): 1, ("fog", 3): 1, ("contrast", 1): 2, ("contrast", 3): 1}
    assert all(set(v.values()) == {1} for s, v in visits.items() if s != "gradual")
    report = write_report([tmp_path], tmp_path / "report", plots=False)
    assert report["errors"] == [] and len(report["runs"]) == len(visits)
    sizes = {r["stream"]: r["num_examples"] for r in report["runs"]}
    for row in csv.DictReader((tmp_path / "report" / "report.csv").open()):
        images = sizes[row["stream"]]
        cells = 1 if "mean" not in (row["corruption"], row["severity"]) else \
            4 if row["corruption"] == row["severity"] == "mean" else 2
        assert int(row["num_examples"]) == images
        for key in ("source_accuracy", "accuracy"):
            correct = round(float(row[key]) * images * cells)
            assert (float(row[f"{key}_ci95_low"]), float(row[f"{key}_ci95_high"])) == \
                pytest.approx(wilson64(correct, images * cells), abs=1e-9), (row["stream"], key)


# --- run-level stream numbers: stream_clean (mixture), stream_subset (imbalance) -----------

def mixture_run(method="batch", *, clean_correct=300, source_clean_correct=400, visits=480, seed=0,
                **extra) -> dict:
    """A stream=mixture run whose stream_clean holds ``clean_correct`` / ``source_clean_correct``
    correct of ``visits`` clean visits."""
    run = results(method, source=SOURCE, correct=SOURCE if method == "source" else BATCH, seed=seed,
                  stream="mixture", **extra)
    run["stream_params"] = {"clean_fraction": 0.25}
    accuracy, source = clean_correct / visits, source_clean_correct / visits
    run["stream_clean"] = {"accuracy": accuracy, "num_examples": visits, "source_accuracy": source,
                           "forgetting": source - accuracy}
    return run


def test_stream_clean_forgetting_is_shown_with_intervals_over_visits(tmp_path):
    write(tmp_path / "mix0", mixture_run(clean_correct=300, source_clean_correct=400, seed=0))
    write(tmp_path / "mix1", mixture_run(clean_correct=330, source_clean_correct=410, seed=1))
    write(tmp_path / "src", mixture_run("source", clean_correct=400, source_clean_correct=400))
    report = write_report([tmp_path], tmp_path / "report", plots=False)
    assert report["errors"] == []
    md = report["markdown"]
    section = md.split("## Clean images in the stream (forgetting)")[1]
    assert "over the clean **visits**" in section  # no distinct count recorded: said
    row = next(l for l in section.splitlines() if l.startswith("| batch mixture(clean_fraction=0.25) |"))
    cols = [c.strip() for c in row.split("|")[1:-1]]
    accuracy = [300 / 480, 330 / 480]
    source = [400 / 480, 410 / 480]
    forgetting = [100 * (s - a) for s, a in zip(source, accuracy)]
    mean_f = sum(forgetting) / 2
    std_f = math.sqrt(sum((f - mean_f) ** 2 for f in forgetting))  # n - 1 = 1
    low, high = wilson64(630, 960)
    std_a = 100 * abs(accuracy[0] - accuracy[1]) / math.sqrt(2)
    assert cols[1:4] == ["2", "480", "not recorded"]
    assert cols[4] == f"{100 * 630 / 960:.1f} ±{std_a:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
    low, high = wilson64(810, 960)
    assert cols[5].split(" [")[1] == f"{100 * low:.1f}, {100 * high:.1f}]"
    assert cols[6] == f"{mean_f:+.1f} ±{std_f:.1f}" == "+18.8 ±2.9"
    src = next(l for l in section.splitlines() if l.startswith("| source mixture"))
    assert src.split("|")[7].strip() == "+0.0"
    rows = list(csv.DictReader((tmp_path / "report" / "report.csv").open()))
    mix0 = [r for r in rows if r["path"].endswith("mix0")]
    assert len(mix0) == 9 and all(float(r["forgetting"]) == pytest.approx(100 / 480, abs=1e-12) for r in mix0)
    assert int(mix0[0]["stream_clean_num_examples"]) == 480 and mix0[0]["stream_clean_num_images"] == ""
    assert (float(mix0[0]["stream_clean_accuracy_ci95_low"]), float(mix0[0]["stream_clean_accuracy_ci95_high"])) \
        == pytest.approx(wilson64(300, 480), abs=1e-12)
    assert float(mix0[0]["stream_clean_source_accuracy"]) == pytest.approx(400 / 480, abs=1e-12)
    assert json.loads(mix0[0]["stream_params"]) == {"clean_fraction": 0.25}


def test_stream_clean_interval_counts_distinct_clean_images_when_recorded(tmp_path):
    run = mixture_run(clean_correct=300, source_clean_correct=400, visits=480)
    run["stream_clean"]["num_images"] = 240  # every clean image visited twice
    write(tmp_path / "mix", run)
    report = write_report([tmp_path], tmp_path / "report", plots=False)
    section = report["markdown"].split("## Clean images in the stream (forgetting)")[1]
    assert "over the distinct clean images" in section and "**visits**" not in section
    row = next(l for l in section.splitlines() if l.startswith("| batch"))
    low, high = wilson64(150, 240)  # 300 / 480 of 240 distinct images, not 300 of 480 draws
    assert row.split("|")[4].strip() == "240"
    assert row.split("|")[5].strip() == f"{100 * 300 / 480:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


@pytest.mark.parametrize("path, value, message", [
    ("stream_clean/forgetting", -0.5, r"stream_clean.forgetting is -0.5 but source_accuracy - accuracy is"),
    ("stream_clean/forgetting", math.nan, r"stream_clean.forgetting is nan"),
    ("stream_clean/accuracy", 1.5, r"stream_clean.accuracy is 1.5, not a number in \[0, 1\]"),
    ("stream_clean/source_accuracy", math.inf, r"stream_clean.source_accuracy is inf"),
    ("stream_clean/accuracy", 0.5001, r"stream_clean.accuracy 0.5001 is not a count of its 480"),
    ("stream_clean/num_examples", 0, r"stream_clean.num_examples must be a positive int"),
    ("stream_clean/num_images", 481, r"stream_clean.num_images must be null or an int in \[1, 480\]"),
    ("stream_clean", {"accuracy": 0.5}, r"stream_clean must be an object with keys"),
    ("stream_subset/achieved_factor", 2.0, r"stream_subset.achieved_factor is 2.0 but largest / smallest class is 10.0"),
    ("stream_subset/achieved_factor", math.nan, r"stream_subset.achieved_factor is nan"),
    ("stream_subset/class_counts", {"0": 150, "1": 0}, r"stream_subset.class_counts must be"),
    ("stream_subset/class_counts", {"0": 100, "1": 10}, r"class_counts sum to 110 images but the run has num_examples 200"),
])
def test_inconsistent_stream_numbers_are_refused(tmp_path, path, value, message):
    bad = mixture_run(clean_correct=300, source_clean_correct=400, visits=480)
    bad["stream_subset"] = {"class_counts": {"0": 100, "1": 50, "2": 40, "3": 10}, "achieved_factor": 10.0}
    write(tmp_path / "good", json.loads(json.dumps(bad)))
    file = tmp_path / "bad" / "results.json"
    file.parent.mkdir()
    file.write_text(json.dumps(_set(bad, path, value)))
    runs, problems = load_runs([tmp_path])
    assert [Path(r["path"]).name for r in runs] == ["good"]
    (problem,) = problems
    assert problem["kind"] == "unreadable" and re.search(message, problem["error"]), problem["error"]


def test_source_model_forgets_nothing(tmp_path):
    run = mixture_run("source", clean_correct=300, source_clean_correct=400)  # consistent, but not 0
    write(tmp_path / "src", run)
    (problem,) = load_runs([tmp_path])[1]
    assert "the source model forgets nothing" in problem["error"]


def test_achieved_imbalance_is_on_the_protocol_line_and_in_the_csv(tmp_path):
    counts = {"0": 4, "1": 35, "2": 12, "3": 7, "4": 27, "5": 5, "6": 16, "7": 20, "8": 3, "9": 9}
    n = sum(counts.values())  # 138
    run = results("batch", source={("fog", 5): 60}, correct={("fog", 5): 90}, n=n, clean=120,
                  stream="imbalance")
    run["stream_params"] = {"factor": 10.0}
    run["stream_subset"] = {"class_counts": counts, "achieved_factor": 35 / 3}
    write(tmp_path / "imb", run)
    report = write_report([tmp_path], tmp_path / "report", plots=False)
    assert report["errors"] == []
    assert report["labels"] == ["batch imbalance(factor=10)"]  # the stream, though nothing varies
    protocol = next(l for l in report["markdown"].splitlines() if l.startswith("model resnet8"))
    assert "stream imbalance(factor=10)" in protocol
    assert f"achieved factor {35 / 3:.3g} (class sizes 3..35)" in protocol
    rows = list(csv.DictReader((tmp_path / "report" / "report.csv").open()))
    assert len(rows) == 4 and all(float(r["stream_achieved_factor"]) == pytest.approx(35 / 3, abs=1e-12)
                                  for r in rows)


def test_labels_name_label_free_auto_prior_and_stream_params(tmp_path):
    src = {("fog", 5): 100}
    gain = {("fog", 5): 150}
    runs = [write(tmp_path / "batch", results("batch", source=src, correct=gain)),
            write(tmp_path / "lf", results("batch", source=src, correct=gain, label_free={"regression": "batch"})),
            write(tmp_path / "auto", results("blend", source=src, correct=gain, params={"prior": "auto", "alpha": None})),
            write(tmp_path / "mix25", results("batch", source=src, correct=gain, stream="mixture",
                                              stream_params={"clean_fraction": 0.25})),
            write(tmp_path / "mix50", results("tent", source=src, correct=gain, stream="mixture",
                                              stream_params={"clean_fraction": 0.5}))]
    (group,) = group_runs(runs)
    assert [e.label for e in group.entries] == [
        "batch reset", "batch reset label_free", "blend prior=auto reset",
        "batch mixture(clean_fraction=0.25)", "tent mixture(clean_fraction=0.5)"]
    # the same protocol twice (e.g. one job in two sweeps): every copy numbered, in order
    assert label_runs([runs[0], runs[0], runs[1]]) == ["batch #1", "batch #2", "batch label_free"]
