"""Reports over finished jobs: tables (Markdown, CSV) and plots (PNG) behind scripts/report.py.

Runs are found by their ``results.json`` (failed jobs by ``error.json``) anywhere below the
given run or sweep directories. Each run gets a label: its method plus whatever differs
between the runs (method parameters, stream, batch size, ...), e.g. ``blend prior=16 bs=8``.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tta.evaluation.results import ERROR_JSON, RESULTS_JSON, atomic_write_bytes, read_json

__all__ = ["load_runs", "label_runs", "recovered_table", "accuracy_tables", "summary_table",
           "markdown_table", "write_report"]

logger = logging.getLogger(__name__)

# run-level settings that name a run when they differ between runs (key, short name)
_LABEL_KEYS = (("stream", None), ("batch_size", "bs"), ("num_examples", "n"),
               ("dataset", None), ("model", None), ("seed", "seed"))


def load_runs(paths: Iterable[str | Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Finished runs (results.json, with ``path`` added) and failed jobs (error.json) below
    ``paths`` (run directories, sweep directories or results.json files).

    Raises:
        FileNotFoundError: a path does not exist.
    """
    runs, errors = [], []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"no such run or sweep directory: {str(path)!r}")
        files = [path] if path.is_file() else sorted(path.rglob(RESULTS_JSON))
        for file in files:
            run = read_json(file)
            run["path"] = str(file.parent)
            runs.append(run)
        if path.is_dir():
            for file in sorted(path.rglob(ERROR_JSON)):
                if not (file.parent / RESULTS_JSON).exists():
                    error = read_json(file)
                    errors.append({"path": str(file.parent), "error_type": error.get("error_type"),
                                   "error": error.get("error")})
    return runs, errors


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def label_runs(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """A short, unique label per run: the method plus the settings that vary across runs."""
    labels = []
    for run in runs:
        same_method = [r for r in runs if r["method"] == run["method"]]
        parts = [run["method"]]
        for key, value in sorted(run.get("params", {}).items()):
            if len({json.dumps(r.get("params", {}).get(key)) for r in same_method}) > 1:
                parts.append(f"{key}={_short(value)}")
        for key, short in _LABEL_KEYS:
            if len({json.dumps(r.get(key)) for r in runs}) > 1:
                parts.append(f"{short}={_short(run.get(key))}" if short else _short(run.get(key)))
        labels.append(" ".join(parts))
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):  # still equal (e.g. the same job in two sweeps)
        seen[label] = seen.get(label, 0) + 1
        if labels.count(label) > 1:
            labels[i] = f"{label} #{seen[label]}"
    return labels


def _corruptions(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    names: list[str] = []
    for run in runs:
        for cell in run["cells"]:
            if cell["corruption"] not in names:
                names.append(cell["corruption"])
    return names


def _severities(runs: Sequence[Mapping[str, Any]]) -> list[int]:
    return sorted({int(c["severity"]) for run in runs for c in run["cells"]})


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _cell_mean(run: Mapping[str, Any], key: str, corruption: str | None = None,
               severity: int | None = None) -> float | None:
    return _mean([c[key] for c in run["cells"]
                  if (corruption is None or c["corruption"] == corruption)
                  and (severity is None or int(c["severity"]) == severity)])


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (first column left-aligned, the others right)."""
    lines = ["| " + " | ".join(map(str, header)) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def recovered_table(runs: Sequence[Mapping[str, Any]], labels: Sequence[str],
                    severity: int | None = None) -> tuple[list[str], list[list[str]]]:
    """Accuracy recovered (percentage points) per run x corruption, averaged over severities
    (or at one ``severity``), with the mean over corruptions in the last column."""
    names = _corruptions(runs)
    rows = [[label, *(_pct(_cell_mean(run, "recovered", c, severity), True) for c in names),
             _pct(_cell_mean(run, "recovered", None, severity), True)]
            for run, label in zip(runs, labels)]
    return ["method", *names, "mean"], rows


def accuracy_tables(runs: Sequence[Mapping[str, Any]], labels: Sequence[str]
                    ) -> dict[int, tuple[list[str], list[list[str]]]]:
    """Per severity: accuracy (%) per run x corruption with the mean; the first row is the
    source model (taken from the first run)."""
    names = _corruptions(runs)
    tables = {}
    for severity in _severities(runs):
        rows = [["source (no adaptation)",
                 *(_pct(_mean([_cell_mean(r, "source_accuracy", c, severity) for r in runs]))
                   for c in names),
                 _pct(_mean([_cell_mean(r, "source_accuracy", None, severity) for r in runs]))]]
        rows += [[label, *(_pct(_cell_mean(run, "accuracy", c, severity)) for c in names),
                  _pct(_cell_mean(run, "accuracy", None, severity))]
                 for run, label in zip(runs, labels)]
        tables[severity] = (["method", *names, "mean"], rows)
    return tables


def summary_table(runs: Sequence[Mapping[str, Any]], labels: Sequence[str]
                  ) -> tuple[list[str], list[list[str]]]:
    header = ["method", "clean acc", "source acc", "accuracy", "recovered", "gap closed",
              "ECE", "mCE", "images/s"]
    rows = []
    for run, label in zip(runs, labels):
        mean = run["mean"]
        ips = run.get("images_per_second")
        rows.append([label, _pct(run.get("clean_accuracy")), _pct(mean["source_accuracy"]),
                     _pct(mean["accuracy"]), _pct(mean["recovered"], True),
                     _pct(mean.get("gap_closed")), _pct(mean.get("ece")), _pct(mean.get("mce")),
                     "-" if ips is None else f"{ips:.0f}"])
    return header, rows


def _unique(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drops repeated runs of the same protocol (e.g. the jobs ``adapt=source adapt.prior=1``
    and ``adapt=source adapt.prior=4`` of a sweep, source ignoring the prior)."""
    seen, unique = set(), []
    for run in runs:
        key = json.dumps([run.get(k) for k in ("method", "params", "stream", "stream_params",
                                                "batch_size", "num_examples", "dataset", "model",
                                                "seed", "cells")], sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(run)
    return unique


def _report_csv(runs: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> str:
    columns = ["label", "method", "params", "stream", "batch_size", "num_examples", "dataset",
               "model", "corruption", "severity", "clean_accuracy", "source_accuracy",
               "accuracy", "recovered", "gap_closed", "source_error", "error", "source_ece",
               "ece", "path"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for run, label in zip(runs, labels):
        for cell in run["cells"]:
            row = {**run, **cell, "label": label,
                   "params": json.dumps(run.get("params", {}), sort_keys=True)}
            writer.writerow([row.get(c) for c in columns])
    return out.getvalue()


def _grid(runs: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[int], dict] | None:
    """Mean accuracy of the blend runs per (prior N, batch size), if a sweep varied both."""
    blend = [r for r in runs if r["method"] == "blend" and r.get("params", {}).get("alpha") is None]
    priors = sorted({r["params"]["prior"] for r in blend})
    sizes = sorted({r["batch_size"] for r in blend})
    if len(priors) < 2 or len(sizes) < 2:
        return None
    values: dict[tuple[float, int], list[float]] = {}
    for r in blend:
        values.setdefault((r["params"]["prior"], r["batch_size"]), []).append(r["mean"]["accuracy"])
    return priors, sizes, {k: sum(v) / len(v) for k, v in values.items()}


def _plots(runs: Sequence[Mapping[str, Any]], labels: Sequence[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []

    def save(fig, name: str) -> None:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(out / name, buffer.getvalue())
        written.append(out / name)

    # heatmap of the accuracy recovered, runs x corruptions (+ mean), averaged over severities
    names = _corruptions(runs)
    data = np.array([[100 * (_cell_mean(r, "recovered", c) or math.nan) for c in names]
                     + [100 * (_cell_mean(r, "recovered") or 0.0)] for r in runs])
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * (len(names) + 1), 1.2 + 0.45 * len(runs)))
    bound = max(1.0, float(np.nanmax(np.abs(data))))
    image = ax.imshow(data, cmap="RdYlGn", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(len(names) + 1), [*names, "mean"], rotation=60, ha="right")
    ax.set_yticks(range(len(runs)), labels)
    for (i, j), value in np.ndenumerate(data):
        if not math.isnan(value):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label="accuracy recovered (points)")
    ax.set_title("Accuracy recovered over the source model, mean over severities")
    save(fig, "recovered_heatmap.png")

    # accuracy against severity per method (source dashed)
    severities = _severities(runs)
    fig, ax = plt.subplots(figsize=(6, 4))
    source = [_mean([_cell_mean(r, "source_accuracy", None, s) for r in runs]) for s in severities]
    ax.plot(severities, [100 * v for v in source], "k--o", label="source (no adaptation)")
    for run, label in zip(runs, labels):
        ax.plot(severities, [100 * (_cell_mean(run, "accuracy", None, s) or math.nan)
                             for s in severities], "-o", label=label)
    ax.set_xlabel("severity")
    ax.set_ylabel("accuracy (%), mean over corruptions")
    ax.set_xticks(severities)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, "accuracy_vs_severity.png")

    grid = _grid(runs)
    if grid is not None:  # the prior N x batch size figure of Schneider et al. (2020)
        priors, sizes, values = grid
        data = np.array([[100 * values.get((p, b), math.nan) for b in sizes] for p in priors])
        fig, ax = plt.subplots(figsize=(1.5 + 0.8 * len(sizes), 1.5 + 0.5 * len(priors)))
        image = ax.imshow(data, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_yticks(range(len(priors)), [_short(p) for p in priors])
        for (i, j), value in np.ndenumerate(data):
            if not math.isnan(value):
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_xlabel("batch size")
        ax.set_ylabel("prior N")
        fig.colorbar(image, ax=ax, label="accuracy (%)")
        ax.set_title("blend: mean accuracy by prior N and batch size")
        save(fig, "prior_batch_grid.png")
    return written


def write_report(paths: Iterable[str | Path], out: str | Path, plots: bool = True) -> dict[str, Any]:
    """Writes ``out/report.md``, ``out/report.csv`` and the PNG plots for the runs below
    ``paths``; returns ``{"markdown", "recovered", "files", "runs", "errors"}``.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: no finished run was found.
    """
    out = Path(out)
    runs, errors = load_runs(paths)
    if not runs:
        raise ValueError(f"no results.json found below {[str(p) for p in paths]}"
                         + (f" ({len(errors)} failed job(s))" if errors else ""))
    # a stable order: by method registration order, then label
    from tta.evaluation.methods import list_methods

    order = {name: i for i, name in enumerate(list_methods())}
    runs.sort(key=lambda r: (order.get(r["method"], len(order)), json.dumps(r.get("params"), sort_keys=True),
                             r.get("stream", ""), r.get("batch_size", 0), r["path"]))
    runs = _unique(runs)
    labels = label_runs(runs)
    recovered = markdown_table(*recovered_table(runs, labels))
    sections = ["# tta evaluation report", "",
                f"{len(runs)} run(s) from: {', '.join(map(str, paths))}. Percentages; "
                "recovered = accuracy - source accuracy (points); gap closed = recovered / "
                "(clean - source accuracy); ECE with 15 bins.", "",
                "## Summary (means over all cells)", "", markdown_table(*summary_table(runs, labels)),
                "", "## Accuracy recovered (points), mean over severities", "", recovered]
    severities = _severities(runs)
    if len(severities) > 1:
        for severity in severities:
            sections += ["", f"### Accuracy recovered at severity {severity}", "",
                         markdown_table(*recovered_table(runs, labels, severity))]
    for severity, table in accuracy_tables(runs, labels).items():
        sections += ["", f"## Accuracy (%) at severity {severity}", "", markdown_table(*table)]
    if errors:
        sections += ["", "## Failed jobs", "", markdown_table(
            ["directory", "error"], [[e["path"], f"{e['error_type']}: {e['error']}"] for e in errors])]
    files = []
    if plots:
        files = _plots(runs, labels, out)
        sections += ["", "## Plots", ""] + [f"![{f.stem}]({f.name})" for f in files]
    markdown = "\n".join(sections) + "\n"
    atomic_write_bytes(out / "report.md", markdown.encode())
    atomic_write_bytes(out / "report.csv", _report_csv(runs, labels).encode())
    files = [out / "report.md", out / "report.csv", *files]
    return {"markdown": markdown, "recovered": recovered, "files": files, "runs": runs,
            "labels": labels, "errors": errors}
