"""Reports over finished jobs: tables (Markdown, CSV) and plots (PNG) behind scripts/report.py.

Runs are found by their ``results.json`` (failed jobs by ``error.json``) anywhere below the
given run or sweep directories; a job directory holding both counts by its newer outcome.
Runs are grouped by what defines their source baseline (:func:`group_key`: model, dataset,
images per cell, corruption preset, set of cells); every group gets its own tables and plots,
nothing is averaged across groups. Within a group, a row (an *entry*) is one protocol
(method, parameters, stream, batch size); runs of that protocol with different ``seed`` are
its replicates, shown as mean +- sample standard deviation over seeds. Each entry gets a label:
its method plus whatever differs between the entries, e.g. ``blend prior=16 bs=8``
(:func:`label_runs`).

Intervals are 95% Wilson score intervals (Wilson 1927) of a binomial proportion, from
``round(accuracy * n)`` correct of ``n`` images, ``n`` the run's ``num_examples``: the distinct
images of every cell. A stream that shows an image several times (``gradual`` visits most
severities twice) records the visits in the cell's ``num_examples`` and its accuracy over all
of them; the visits of one image are not independent draws, so they do not narrow the interval.
The interval of a mean over cells (or seeds) is Wilson on the counts pooled over its cells, each
cell counting ``n`` images, so the pooled proportion is the (unweighted) mean shown; it treats
the pooled predictions as independent, but every cell holds the same ``n`` images corrupted
differently, so it understates the uncertainty about the image sample (a lower bound on it).

A results.json whose numbers are not finite or do not agree with each other (recovered =
accuracy - source accuracy, error = 1 - accuracy, gap closed = recovered / (clean - source
accuracy), accuracies that are not a count of ``num_examples``, a confusion matrix that does not
give the accuracy, ``mean``/``per_severity``/``per_corruption`` that are not the means of their
cells, a ``stream_clean`` whose forgetting is not source_accuracy - accuracy or whose
accuracies are not counts of its visits in [0, 1], a ``stream_subset`` whose achieved_factor is
not largest / smallest of its class_counts) is refused as unreadable (:func:`load_runs`), never
reported. The forgetting table (``stream=mixture``) gives Wilson intervals over the distinct
clean images when ``stream_clean.num_images`` is recorded, else over the clean visits (said
beside it: too narrow when images repeat).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tta.evaluation.results import ERROR_JSON, RESULTS_JSON, atomic_write_bytes, read_json
from tta.evaluation.published import published_sections

__all__ = ["load_runs", "group_key", "group_runs", "label_runs", "wilson_interval",
           "recovered_table", "accuracy_tables", "summary_table", "markdown_table",
           "label_free_tables", "chosen_prior_tables", "stream_clean_table", "recovered_heatmap", "severity_plot",
           "estimate_plot", "write_report", "Entry", "Group"]

logger = logging.getLogger(__name__)

CONFIDENCE = 0.95
HEATMAP_CMAP = "RdBu"  # diverging, colour-blind safe (ColorBrewer); red = lost, blue = won

# run-level settings that name an entry when they differ between entries (key, short name)
_LABEL_KEYS = (("batch_size", "bs"), ("num_examples", "n"), ("dataset", None), ("model", None),
               ("baseline", "baseline"))
DEFAULT_STREAM = "reset"  # conf/evaluate.yaml; any other stream is named in every label
_CELL_KEYS = ("corruption", "severity", "source_accuracy", "accuracy", "recovered")
# optional cell keys of label-free runs (docs/label_free.md): fractions, and the shift score >= 0
_ESTIMATE_KEYS = ("source_estimated_accuracy", "estimated_accuracy")


# --- loading --------------------------------------------------------------------------------

def _problem(run: Any) -> str | None:
    """Why ``run`` (parsed results.json) cannot be reported, or None."""
    if not isinstance(run, dict):
        return f"expected a JSON object, got {json.dumps(run)[:40]}"
    missing = [k for k in ("method", "cells") if k not in run]
    if missing:
        return f"missing key(s) {missing}"
    if not isinstance(run["cells"], list) or not run["cells"]:
        return "'cells' must be a non-empty list"
    for i, cell in enumerate(run["cells"]):
        if not isinstance(cell, dict) or any(k not in cell for k in _CELL_KEYS):
            return f"cells[{i}] must be an object with keys {list(_CELL_KEYS)}"
        bad = [k for k in _CELL_KEYS[2:] if isinstance(cell[k], bool)
               or not isinstance(cell[k], (int, float))]
        if bad or isinstance(cell["severity"], bool) or not isinstance(cell["severity"], int):
            return f"cells[{i}] has non-numeric {bad or ['severity']}"
        if not 0 <= cell["source_accuracy"] <= 1 or not 0 <= cell["accuracy"] <= 1:
            return f"cells[{i}] has an accuracy outside [0, 1]"
        for key, high in [(k, 1.0) for k in _ESTIMATE_KEYS] + [("shift_score", math.inf)]:
            value = cell.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 <= value <= high):
                return f"cells[{i}] has {key} {value!r}, not a number in [0, {high:g}]"
        prior = cell.get("chosen_prior")
        if prior is not None and prior != "inf" and (isinstance(prior, bool) or not isinstance(prior, (int, float))
                                                     or not 0 <= prior < math.inf):
            return f"cells[{i}] has chosen_prior {prior!r}, not a number >= 0 or 'inf'"
        histogram = cell.get("chosen_prior_histogram", {})
        if not isinstance(histogram, dict) or not all(_is_prior(n) and type(k) is int and k >= 0
                                                      for n, k in histogram.items()):
            return f"cells[{i}] has chosen_prior_histogram {histogram!r}, not {{prior N: batches}}"
    clean = run.get("clean_accuracy")
    if clean is not None and (not isinstance(clean, (int, float)) or not 0 <= clean <= 1):
        return f"clean_accuracy must be null or in [0, 1], got {clean!r}"
    return _inconsistency(run)


# cell metrics summarised in results.json's mean, per_severity and per_corruption (their means)
_SUMMARY_KEYS = ("source_accuracy", "accuracy", "recovered", "source_error", "error", "source_ece",
                 "ece", "shift_score", *_ESTIMATE_KEYS)
_TOLERANCE = 1e-9  # float64 sums of at most a few thousand terms
# results.json's stream_clean (stream=mixture; docs/evaluation.md), optional: num_images
_STREAM_CLEAN_KEYS = ("accuracy", "num_examples", "source_accuracy", "forgetting")


def _finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _close(value: Any, expected: float | None) -> bool:
    if expected is None or value is None:
        return value is None and expected is None
    return _finite(value) and math.isclose(value, expected, rel_tol=_TOLERANCE, abs_tol=_TOLERANCE)


def _gap_closed(recovered: float, clean: Any, source: float) -> float | None:
    """recovered / (clean - source accuracy), None without clean accuracy or gap (as the pipeline)."""
    return None if clean is None or clean - source <= 1e-12 else recovered / (clean - source)


def _count_problem(name: str, accuracy: float, n: int) -> str | None:
    """Whether ``accuracy`` is a count of ``n`` predictions (``k / n``)."""
    if abs(accuracy * n - round(accuracy * n)) > 1e-6:
        return f"{name} {accuracy!r} is not a count of its {n} predictions"
    return None


def _confusion_problem(name: str, confusion: Any, accuracy: float, n: int) -> str | None:
    if confusion is None:
        return None
    if not isinstance(confusion, list) or not all(
            isinstance(row, list) and len(row) == len(confusion)
            and all(type(k) is int and k >= 0 for k in row) for row in confusion):
        return f"{name} is not a square matrix of counts"
    total = sum(map(sum, confusion))
    trace = sum(row[i] for i, row in enumerate(confusion))
    if total != n or not _close(accuracy, trace / max(total, 1)):
        return f"{name} (trace {trace} of {total}) does not give the accuracy {accuracy!r} of {n} predictions"
    return None


def _summary_problem(where: str, summary: Any, cells: Sequence[Mapping[str, Any]], clean: Any) -> str | None:
    """Why ``summary`` (results.json's ``mean`` or one of ``per_severity``/``per_corruption``)
    is not the summary of ``cells`` (means of the cell metrics; gap closed of the means), or None."""
    if not isinstance(summary, dict):
        return f"{where} must be an object, got {json.dumps(summary)[:40]}"
    means = {k: _mean(c.get(k) for c in cells) for k in _SUMMARY_KEYS}
    for key in _SUMMARY_KEYS:
        if key in summary and not _close(summary[key], means[key]):
            return f"{where}.{key} is {summary[key]!r} but the mean of its cells is {means[key]!r}"
    gap = summary.get("gap_closed")
    if gap is not None and not _close(gap, _gap_closed(means["recovered"], clean, means["source_accuracy"])):
        return (f"{where}.gap_closed is {gap!r} but recovered / (clean - source accuracy) is "
                f"{_gap_closed(means['recovered'], clean, means['source_accuracy'])!r}")
    for key in ("mce", "ce"):
        value = summary.get(key)
        if value is not None and not (_finite(value) and value >= 0):
            return f"{where}.{key} is {value!r}, not a finite number >= 0"
    return None


def _inconsistency(run: dict[str, Any]) -> str | None:
    """Why the numbers of ``run`` (passed :func:`_problem`'s structural checks) are not finite
    or disagree with each other, or None (see the module docstring)."""
    n, clean = run.get("num_examples"), run.get("clean_accuracy")
    if n is not None and (type(n) is not int or n < 1):
        return f"num_examples must be a positive int (images per cell) or null, got {n!r}"
    if n is not None and clean is not None and (why := _count_problem("clean_accuracy", clean, n)):
        return why
    if run.get("clean_error") is not None and not _close(run["clean_error"], None if clean is None else 1 - clean):
        return f"clean_error {run['clean_error']!r} is not 1 - clean_accuracy {clean!r}"
    speed = run.get("images_per_second")
    if speed is not None and not (_finite(speed) and speed > 0):
        return f"images_per_second must be null or a finite number > 0, got {speed!r}"
    for i, cell in enumerate(run["cells"]):
        where = f"cells[{i}] ({cell['corruption']}, severity {cell['severity']})"
        for key in ("recovered", "gap_closed", "source_error", "error", "source_ece", "ece"):
            value = cell.get(key)
            if value is not None and not _finite(value):
                return f"{where} has {key} {value!r}, not a finite number"
        for key in ("source_ece", "ece"):
            if cell.get(key) is not None and not 0 <= cell[key] <= 1:
                return f"{where} has {key} {cell[key]!r}, not in [0, 1]"
        source, accuracy = cell["source_accuracy"], cell["accuracy"]
        if not _close(cell["recovered"], accuracy - source):
            return f"{where} has recovered {cell['recovered']!r} but accuracy - source_accuracy is {accuracy - source!r}"
        for key, value in (("error", accuracy), ("source_error", source)):
            if cell.get(key) is not None and not _close(cell[key], 1 - value):
                return f"{where} has {key} {cell[key]!r} but 1 - its accuracy is {1 - value!r}"
        gap = cell.get("gap_closed")
        if gap is not None and not _close(gap, _gap_closed(cell["recovered"], clean, source)):
            return (f"{where} has gap_closed {gap!r} but recovered / (clean - source accuracy) is "
                    f"{_gap_closed(cell['recovered'], clean, source)!r}")
        visits = cell.get("num_examples", n)
        if visits is not None and (type(visits) is not int or visits < 1
                                   or (n is not None and visits % n != 0)):
            return (f"{where} has num_examples {visits!r}: not a positive multiple of the run's "
                    f"{n!r} images (each image seen once or more)")
        problems = ([] if n is None else [_count_problem(f"{where} source_accuracy", source, n),
                                          _confusion_problem(f"{where} source_confusion",
                                                             cell.get("source_confusion"), source, n)])
        if visits is not None:
            problems += [_count_problem(f"{where} accuracy", accuracy, visits),
                         _confusion_problem(f"{where} confusion", cell.get("confusion"), accuracy, visits)]
        if why := next((p for p in problems if p), None):
            return why
    cells = run["cells"]
    if "mean" in run and (why := _summary_problem("mean", run["mean"], cells, clean)):
        return why
    for name, field_of in (("per_severity", lambda c: str(c["severity"])), ("per_corruption", lambda c: c["corruption"])):
        summaries = run.get(name)
        if summaries is None:
            continue
        if not isinstance(summaries, dict) or set(summaries) != {field_of(c) for c in cells}:
            return f"{name} must be an object with one entry per {name[4:]} of the cells"
        for key, summary in summaries.items():
            if why := _summary_problem(f"{name}[{key!r}]", summary, [c for c in cells if field_of(c) == key], clean):
                return why
    return _stream_problem(run)


def _stream_problem(run: Mapping[str, Any]) -> str | None:
    """Why the run's ``stream_clean`` (mixture: the clean images in the stream) or
    ``stream_subset`` (imbalance: the subset's class sizes) is malformed or inconsistent, or None:
    accuracies in [0, 1] that are counts of the clean visits, ``forgetting`` = ``source_accuracy``
    - ``accuracy`` (0 for the source model), ``achieved_factor`` = largest / smallest class of
    ``class_counts``, whose sum is the run's ``num_examples``."""
    clean = run.get("stream_clean")
    if clean is not None:
        if not isinstance(clean, dict) or any(k not in clean for k in _STREAM_CLEAN_KEYS):
            return f"stream_clean must be an object with keys {list(_STREAM_CLEAN_KEYS)}, got {json.dumps(clean)[:80]}"
        visits, images = clean["num_examples"], clean.get("num_images")
        if type(visits) is not int or visits < 1:
            return f"stream_clean.num_examples must be a positive int (clean visits), got {visits!r}"
        if images is not None and (type(images) is not int or not 1 <= images <= visits):
            return f"stream_clean.num_images must be null or an int in [1, {visits}] (distinct clean images), got {images!r}"
        for key in ("accuracy", "source_accuracy"):
            if not (_finite(clean[key]) and 0 <= clean[key] <= 1):
                return f"stream_clean.{key} is {clean[key]!r}, not a number in [0, 1]"
            if why := _count_problem(f"stream_clean.{key}", clean[key], visits):
                return why
        expected = 0.0 if run["method"] == "source" else clean["source_accuracy"] - clean["accuracy"]
        if not _close(clean["forgetting"], clean["source_accuracy"] - clean["accuracy"]) or \
                not _close(clean["forgetting"], expected):
            return (f"stream_clean.forgetting is {clean['forgetting']!r} but source_accuracy - accuracy is "
                    f"{clean['source_accuracy'] - clean['accuracy']!r}" + (" (the source model forgets nothing)"
                                                                          if run["method"] == "source" else ""))
    subset = run.get("stream_subset")
    if subset is not None:
        counts = _dict(subset).get("class_counts")
        if not isinstance(counts, dict) or not counts or not all(type(k) is int and k >= 1 for k in counts.values()):
            return f"stream_subset.class_counts must be {{class: images >= 1}}, got {json.dumps(counts)[:80]}"
        factor, expected = subset.get("achieved_factor"), max(counts.values()) / min(counts.values())
        if not _close(factor, expected):
            return f"stream_subset.achieved_factor is {factor!r} but largest / smallest class is {expected!r}"
        if run.get("num_examples") is not None and sum(counts.values()) != run["num_examples"]:
            return (f"stream_subset.class_counts sum to {sum(counts.values())} images but the run has "
                    f"num_examples {run['num_examples']}")
    return None


def _is_prior(text: Any) -> bool:
    """Whether ``text`` is a histogram key of ``chosen_prior_histogram``: a number >= 0 or "inf"."""
    try:
        return float(text) >= 0
    except (TypeError, ValueError):
        return False


def _read(file: Path) -> tuple[Any, str | None]:
    try:
        return read_json(file), None
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None, f"{type(error).__name__}: {error}"


def _finished_at(obj: Any) -> datetime | None:
    value = obj.get("finished_at") if isinstance(obj, dict) else None
    try:
        time = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return time if time.tzinfo else time.replace(tzinfo=timezone.utc)


def _job_files(root: Path) -> dict[Path, dict[str, Path]]:
    """Job directories below ``root`` (or the job of the file ``root``) -> {"results", "error"}."""
    if root.is_file():
        return {root.parent: {"error" if root.name == ERROR_JSON else "results": root}}
    jobs: dict[Path, dict[str, Path]] = {}
    for name, kind in ((RESULTS_JSON, "results"), (ERROR_JSON, "error")):
        for file in root.rglob(name):
            jobs.setdefault(file.parent, {})[kind] = file
    return dict(sorted(jobs.items()))


def load_runs(paths: Iterable[str | Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Finished runs and problems below ``paths`` (run directories, sweep directories or
    results.json / error.json files).

    A job directory holding both ``results.json`` and ``error.json`` counts by the newer one
    (``finished_at``, UTC ISO 8601, when both files carry it, else the file modification
    time; a tie counts as failed). Outcomes nested inside another job's directory (earlier
    results moved aside) are not jobs.

    Returns:
        ``(runs, problems)``: each run is its results.json with ``path`` (the job directory)
        added; each problem is ``{"kind", "path", "file", "error_type", "error"}`` with kind
        ``"failed"`` (error.json), ``"unreadable"`` (a results.json / error.json that is not
        valid JSON or lacks required keys) or ``"ignored"`` (nested, see above).

    Raises:
        FileNotFoundError: a path does not exist.
    """
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"no such run or sweep directory: {str(path)!r}")
    runs, problems = [], []
    for path in paths:
        jobs = _job_files(path)
        for directory, files in jobs.items():
            def problem(kind: str, file: Path, error_type: str, error: str) -> None:
                problems.append({"kind": kind, "path": str(directory), "file": str(file),
                                 "error_type": error_type, "error": error})

            outer = next((p for p in directory.parents if p in jobs), None)
            if outer is not None:
                for file in files.values():
                    problem("ignored", file, "nested", f"inside the job directory {outer}")
                continue
            read = {kind: _read(file) for kind, file in files.items()}
            for kind, (_, error) in read.items():
                if error:
                    problem("unreadable", files[kind], error.split(":")[0], error)
            read = {kind: obj for kind, (obj, error) in read.items() if not error}
            if "results" in read and "error" in read:  # the newer outcome counts
                times = [_finished_at(read[k]) for k in ("results", "error")]
                if None in times:
                    times = [files[k].stat().st_mtime for k in ("results", "error")]
                del read["results" if times[1] >= times[0] else "error"]
            if "error" in read:
                error = read["error"] if isinstance(read["error"], dict) else {}
                problem("failed", files["error"], str(error.get("error_type", "unknown")),
                        str(error.get("error", read["error"])))
            elif "results" in read:
                why = _problem(read["results"])
                if why:
                    problem("unreadable", files["results"], "invalid results.json", why)
                else:
                    runs.append({**read["results"], "path": str(directory)})
    return runs, problems


# --- grouping -------------------------------------------------------------------------------

def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def group_key(run: Mapping[str, Any]) -> str:
    """What defines a run's source baseline, as a JSON string: model (name, fingerprint and,
    from the Hydra config, its weights/kwargs), dataset (name, fingerprint, config), images
    per cell, corruption preset and code fingerprint, and the set of (corruption, severity)
    cells. Not in it: method, stream and batch size (they change the adapted numbers, not the
    source model's, which is evaluated in eval mode) and ``seed`` (runs differing only in
    seed are replicates, reported as mean +- std)."""
    config, fingerprints = _dict(run.get("config")), _dict(run.get("fingerprints"))
    return json.dumps({
        "model": run.get("model"), "model_fingerprint": fingerprints.get("model"),
        "model_config": config.get("model"),
        "dataset": run.get("dataset"), "data_fingerprint": fingerprints.get("data"),
        "dataset_config": config.get("dataset"), "num_examples": run.get("num_examples"),
        "corruption_code": fingerprints.get("corruption_code"),
        "preset": _dict(config.get("corruption")).get("preset"),
        "cells": sorted({(c["corruption"], int(c["severity"])) for c in run["cells"]}),
    }, sort_keys=True, default=str)


@dataclass
class Entry:
    """One row of a group's tables: one protocol; ``runs`` are its replicates (one per seed)."""
    label: str
    runs: list[dict[str, Any]]


@dataclass
class Group:
    """Runs sharing one source baseline (:func:`group_key`)."""
    key: str
    entries: list[Entry]
    baseline: list[dict[str, Any]]  # one run per seed: its source_* and clean numbers
    name: str = ""  # file-name suffix ("" for a report with one group)
    warnings: list[str] = field(default_factory=list)

    @property
    def runs(self) -> list[dict[str, Any]]:
        return [run for entry in self.entries for run in entry.runs]

    @property
    def first(self) -> dict[str, Any]:
        return self.baseline[0]

    def title(self) -> str:
        run, fingerprints = self.first, _dict(self.first.get("fingerprints"))

        def named(value: Any, sha: Any) -> str:
            return f"{value} ({str(sha)[:8]})" if sha else str(value)

        return (f"model {named(run.get('model'), fingerprints.get('model'))}, dataset "
                f"{named(run.get('dataset'), fingerprints.get('data'))}, "
                f"{run.get('num_examples')} images per cell")

    def protocol(self) -> str:
        seeds = sorted({str(r.get("seed")) for r in self.runs})
        preset = json.loads(self.key)["preset"]
        return (f"{self.title()}; {len(_corruptions(self.runs))} corruption(s) x "
                f"{len(_severities(self.runs))} severity(ies)"
                + (f", corruption preset {preset}" if preset is not None else "")
                + f"; stream {', '.join(dict.fromkeys(map(_stream, self.runs)))}"
                + "".join(f"; {f}" for f in dict.fromkeys(filter(None, map(_achieved, self.runs))))
                + f"; batch size {', '.join(_distinct(self.runs, 'batch_size'))}; seed(s) {', '.join(seeds)}")


def _stream(run: Mapping[str, Any]) -> str:
    """The stream with its parameters, e.g. ``mixture(clean_fraction=0.25)``."""
    params = ",".join(f"{k}={_short(v)}" for k, v in sorted(_dict(run.get("stream_params")).items()))
    return f"{run.get('stream')}({params})" if params else str(run.get("stream"))


def _achieved(run: Mapping[str, Any]) -> str | None:
    """The class imbalance a run's subset achieved (``stream_subset``), e.g. ``imbalance achieved
    factor 11.7 (class sizes 3..35)``, or None."""
    counts = _dict(_dict(run.get("stream_subset")).get("class_counts"))
    if not counts:
        return None
    return (f"{run.get('stream')} achieved factor {run['stream_subset']['achieved_factor']:.3g} "
            f"(class sizes {min(counts.values())}..{max(counts.values())})")


def _distinct(runs: Sequence[Mapping[str, Any]], key: str) -> list[str]:
    return list(dict.fromkeys(str(r.get(key)) for r in runs))


def _source_signature(run: Mapping[str, Any]) -> str:
    return json.dumps([run.get("clean_accuracy"),
                       sorted((c["corruption"], int(c["severity"]), round(c["source_accuracy"], 9))
                              for c in run["cells"])])


def _label_free(run: Mapping[str, Any]) -> bool:
    """Whether the run made label-free estimates (results.json's ``label_free``)."""
    return bool(run.get("label_free"))


def _protocol(run: Mapping[str, Any]) -> str:
    return json.dumps([run.get(k) for k in ("method", "params", "stream", "stream_params",
                                            "batch_size", "baseline")] + [_label_free(run)],
                      sort_keys=True, default=str)


def group_runs(runs: Sequence[dict[str, Any]]) -> list[Group]:
    """Groups (ordered as their first run in ``runs``) of entries (ordered likewise).

    Runs with the same :func:`group_key` and seed must agree on the source accuracies; if
    they do not (a different model or data without a recorded fingerprint), the group is
    split by seed and source accuracies, with a warning."""
    keyed: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        keyed.setdefault(group_key(run), []).append(run)
    parts: list[tuple[str, list[dict[str, Any]], list[str]]] = []
    for key, members in keyed.items():
        signatures: dict[Any, set[str]] = {}
        for run in members:
            signatures.setdefault(run.get("seed"), set()).add(_source_signature(run))
        if all(len(s) == 1 for s in signatures.values()):
            parts.append((key, members, []))
            continue
        split: dict[tuple, list[dict[str, Any]]] = {}
        for run in members:
            split.setdefault((run.get("seed"), _source_signature(run)), []).append(run)
        warning = (f"runs of the same model name, dataset and protocol disagree on the source "
                   f"accuracies ({', '.join(r['path'] for r in members)}): a different model or "
                   f"data without a recorded fingerprint? Reported as {len(split)} separate groups.")
        parts += [(key, part, [warning]) for part in split.values()]
    groups = []
    for key, members, warnings in parts:
        entries: dict[str, list[list[dict[str, Any]]]] = {}
        for run in members:  # a repeated (protocol, seed) with other numbers is another entry
            replicates = entries.setdefault(_protocol(run), [])
            free = next((r for r in replicates if run.get("seed") not in
                         [x.get("seed") for x in r]), None)
            if free is None:
                replicates.append(free := [])
            free.append(run)
        rows = [replicate for replicates in entries.values() for replicate in replicates]
        labels = label_runs([replicate[0] for replicate in rows])
        baseline: dict[Any, dict[str, Any]] = {}
        for run in members:
            baseline.setdefault(run.get("seed"), run)
        groups.append(Group(key, [Entry(*e) for e in zip(labels, rows)],
                            list(baseline.values()), warnings=warnings))
    if len(groups) > 1:  # file-name suffixes; the group number where they would clash
        names = [re.sub(r"[^A-Za-z0-9._=-]+", "-", "{model}_{dataset}_n{num_examples}".format(
            **{k: g.first.get(k) for k in ("model", "dataset", "num_examples")})) for g in groups]
        for i, (group, name) in enumerate(zip(groups, names), 1):
            group.name = f"_{name}" if names.count(name) == 1 else f"_{name}-{i}"
    return groups


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def label_runs(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """A short, unique label per run, in this order: the method; its parameters that vary
    across the runs of that method, and ``prior=auto`` always (the prior chosen per batch);
    the stream with its parameters (``mixture(clean_fraction=0.5)``) when it is not the
    default ``reset`` or when streams differ; ``label_free`` when the run made label-free
    estimates; then batch size (``bs=``), images (``n=``), dataset, model and mCE baseline
    where they differ. ``seed`` is not one of them (seeds are replicates of one entry). Runs
    still equal after all that (the same protocol twice, e.g. one job in two sweeps) are
    numbered ``#1``, ``#2``, ... in the order given."""
    streams = {_stream(r) for r in runs}
    labels = []
    for run in runs:
        same_method = [r for r in runs if r["method"] == run["method"]]
        parts = [run["method"]]
        for key, value in sorted(_dict(run.get("params")).items()):
            if value == "auto" or len({json.dumps(_dict(r.get("params")).get(key), default=str)
                                       for r in same_method}) > 1:
                parts.append(f"{key}={_short(value)}")
        if len(streams) > 1 or run.get("stream") != DEFAULT_STREAM:
            parts.append(_stream(run))
        if _label_free(run):
            parts.append("label_free")
        for key, short in _LABEL_KEYS:
            if len({json.dumps(r.get(key), default=str) for r in runs}) > 1:
                parts.append(f"{short}={_short(run.get(key))}" if short else _short(run.get(key)))
        labels.append(" ".join(parts))
    totals, seen = {label: labels.count(label) for label in labels}, {}
    for i, label in enumerate(labels):
        if totals[label] > 1:
            seen[label] = seen.get(label, 0) + 1
            labels[i] = f"{label} #{seen[label]}"
    return labels


# --- numbers --------------------------------------------------------------------------------

def wilson_interval(correct: int, total: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval (Wilson 1927, without continuity correction) of the proportion
    ``correct / total``, via ``scipy.stats.binomtest(...).proportion_ci(method="wilson")``.

    Raises:
        ValueError: ``total < 1`` or ``correct`` outside ``0..total``.
    """
    from scipy.stats import binomtest

    ci = binomtest(int(correct), int(total)).proportion_ci(confidence, method="wilson")
    return float(ci.low), float(ci.high)


def _corruptions(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(c["corruption"] for run in runs for c in run["cells"]))


def _severities(runs: Sequence[Mapping[str, Any]]) -> list[int]:
    return sorted({int(c["severity"]) for run in runs for c in run["cells"]})


def _mean(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _cells(run: Mapping[str, Any], corruption: str | None = None,
           severity: int | None = None) -> list[Mapping[str, Any]]:
    return [c for c in run["cells"] if (corruption is None or c["corruption"] == corruption)
            and (severity is None or int(c["severity"]) == severity)]


def _cell_mean(run: Mapping[str, Any], key: str, corruption: str | None = None,
               severity: int | None = None) -> float | None:
    return _mean(c.get(key) for c in _cells(run, corruption, severity))


def _counts(runs: Sequence[Mapping[str, Any]], key: str, corruption: str | None = None,
            severity: int | None = None) -> tuple[int, int] | None:
    """Pooled (correct, images) of accuracy ``key`` over the runs' matching cells (or, for
    ``clean_accuracy``, over the runs), None when a count is unknown. Every cell counts the
    run's ``num_examples`` distinct images, also when the stream showed them several times
    (the cell's own ``num_examples`` counts the visits), so the pooled proportion is the
    unweighted mean over cells."""
    correct = total = 0
    for run in runs:
        n = run.get("num_examples")
        values = [run.get(key)] if key == "clean_accuracy" else \
            [c.get(key) for c in _cells(run, corruption, severity)]
        for value in values:
            if value is None or not isinstance(n, int) or n < 1:
                return None
            correct, total = correct + round(value * n), total + n
    return (correct, total) if total else None


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def _spread(values: Sequence[float | None], signed: bool = False,
            counts: tuple[int, int] | None = None) -> str:
    """``mean`` (%), ``+-std`` over seeds when more than one, ``[low, high]`` 95% Wilson."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    text = _pct(sum(values) / len(values), signed)
    if len(values) > 1:
        text += f" ±{100 * statistics.stdev(values):.1f}"
    if counts is not None:
        low, high = wilson_interval(*counts)
        text += f" [{100 * low:.1f}, {100 * high:.1f}]"
    return text


def _worst_class(confusion: Any) -> float | None:
    """Lowest per-class recall of a C x C confusion matrix (rows: true class), or None."""
    if not isinstance(confusion, list) or not all(isinstance(r, list) and len(r) == len(confusion)
                                                  for r in confusion):
        return None
    recalls = [row[i] / sum(row) for i, row in enumerate(confusion) if sum(row) > 0]
    return min(recalls) if recalls else None


# --- tables ---------------------------------------------------------------------------------

def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (first column left-aligned, the others right)."""
    def text(value: Any) -> str:
        return " ".join(str(value).split()).replace("|", "\\|")

    lines = ["| " + " | ".join(map(text, header)) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(map(text, row)) + " |" for row in rows]
    return "\n".join(lines)


def recovered_table(group: Group, severity: int | None = None) -> tuple[list[str], list[list[str]]]:
    """Accuracy recovered (percentage points) per entry x corruption, averaged over severities
    (or at one ``severity``), with the mean over corruptions in the last column; mean +- std
    over seeds when an entry has several. No interval: that of a paired difference needs the
    per-image predictions."""
    names = _corruptions(group.runs)
    rows = [[entry.label,
             *(_spread([_cell_mean(r, "recovered", c, severity) for r in entry.runs], True)
               for c in [*names, None])] for entry in group.entries]
    return ["method", *names, "mean"], rows


def accuracy_tables(group: Group) -> dict[int, tuple[list[str], list[list[str]]]]:
    """Per severity: accuracy (%) [95% Wilson interval] per entry x corruption with the mean
    over corruptions; the first row is the group's source model (no adaptation)."""
    names = _corruptions(group.runs)
    tables = {}
    for severity in _severities(group.runs):
        def row(label: str, runs: Sequence[Mapping[str, Any]], key: str) -> list[str]:
            return [label, *(_spread([_cell_mean(r, key, c, severity) for r in runs], False,
                                     _counts(runs, key, c, severity)) for c in [*names, None])]

        rows = [row("source (no adaptation)", group.baseline, "source_accuracy")]
        rows += [row(e.label, e.runs, "accuracy") for e in group.entries]
        tables[severity] = (["method", *names, "mean"], rows)
    return tables


def summary_table(group: Group) -> tuple[list[str], list[list[str]]]:
    """Per entry, means over all cells: clean, source and adapted accuracy with 95% Wilson
    intervals (pooled counts), recovered, gap closed, ECE, mCE, throughput; +- std over seeds."""
    header = ["method", "seeds", "clean acc", "source acc", "accuracy", "recovered",
              "gap closed", "ECE", "mCE", "images/s"]
    rows = []
    for entry in group.entries:
        runs = entry.runs
        means = [_dict(r.get("mean")) for r in runs]
        ips = _mean(r.get("images_per_second") for r in runs)
        rows.append([entry.label, len(runs),
                     _spread([r.get("clean_accuracy") for r in runs], False,
                             _counts(runs, "clean_accuracy")),
                     _spread([_cell_mean(r, "source_accuracy") for r in runs], False,
                             _counts(runs, "source_accuracy")),
                     _spread([_cell_mean(r, "accuracy") for r in runs], False,
                             _counts(runs, "accuracy")),
                     _spread([_cell_mean(r, "recovered") for r in runs], True),
                     _spread([m.get("gap_closed") for m in means]),
                     _spread([_cell_mean(r, "ece") for r in runs]),
                     _spread([m.get("mce") for m in means]),
                     "-" if ips is None else f"{ips:.0f}"])
    return header, rows


def _clean_counts(runs: Sequence[Mapping[str, Any]], key: str) -> tuple[int, int]:
    """Pooled (correct, total) of ``stream_clean[key]`` over the runs: over the distinct clean
    images (``num_images``) where recorded, else over the clean visits (``num_examples``)."""
    pairs = [(r["stream_clean"][key], r["stream_clean"].get("num_images") or r["stream_clean"]["num_examples"])
             for r in runs]
    return sum(round(value * n) for value, n in pairs), sum(n for _, n in pairs)


def stream_clean_table(group: Group) -> tuple[list[str], list[list[str]]] | None:
    """Per entry whose runs carry ``stream_clean`` (``stream=mixture``): the clean visits, the
    adapted model's accuracy on the clean images as the stream visits them and the source
    model's on the same visits (%, 95% Wilson interval pooled over seeds: over the distinct clean
    images where results.json records ``num_images``, else over the visits, which counts an image
    drawn twice as two draws and so is too narrow), and the forgetting = source accuracy -
    accuracy (points; > 0: adaptation lost accuracy on clean data); +- std over seeds.
    None when no entry has them."""
    rows = []
    for entry in group.entries:
        runs = [r for r in entry.runs if r.get("stream_clean") is not None]
        if not runs:
            continue
        clean = [r["stream_clean"] for r in runs]
        images = [c.get("num_images") for c in clean]
        rows.append([entry.label, len(runs), "/".join(dict.fromkeys(str(c["num_examples"]) for c in clean)),
                     "/".join(dict.fromkeys(str(n) for n in images)) if all(images) else "not recorded",
                     _spread([c["accuracy"] for c in clean], False, _clean_counts(runs, "accuracy")),
                     _spread([c["source_accuracy"] for c in clean], False, _clean_counts(runs, "source_accuracy")),
                     _spread([c["forgetting"] for c in clean], True)])
    if not rows:
        return None
    return ["method", "seeds", "clean visits", "distinct clean images", "accuracy on clean",
            "source acc on clean", "forgetting (points)"], rows


def label_free_tables(group: Group) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Per entry whose cells carry label-free estimates: one row per cell with the shift score
    and the measured beside the estimated accuracy (%), of the source and the adapted model,
    then the means over cells and the mean absolute error of the estimates (points); mean
    over seeds."""
    keys = ("source_accuracy", "source_estimated_accuracy", "accuracy", "estimated_accuracy")
    header = ["corruption", "severity", "shift score", "source acc", "source est.", "accuracy", "estimated"]
    tables = {}
    for entry in group.entries:
        if not any(k in c for r in entry.runs for c in r["cells"] for k in _ESTIMATE_KEYS):
            continue
        cells = list(dict.fromkeys((c["corruption"], int(c["severity"])) for r in entry.runs for c in r["cells"]))
        values = {cell: {k: _mean(_cell_mean(r, k, *cell) for r in entry.runs) for k in ("shift_score", *keys)}
                  for cell in cells}
        rows = [[c, s, "-" if v["shift_score"] is None else f"{v['shift_score']:.3g}", *(_pct(v[k]) for k in keys)]
                for (c, s), v in values.items()]
        rows.append(["mean", "", "", *(_pct(_mean(v[k] for v in values.values())) for k in keys)])
        errors = {k: _mean(abs(v[k] - v[m]) for v in values.values() if v[k] is not None and v[m] is not None)
                  for k, m in (("source_estimated_accuracy", "source_accuracy"), ("estimated_accuracy", "accuracy"))}
        rows.append(["mean abs. error (points)", "", "", "", _pct(errors["source_estimated_accuracy"]), "",
                     _pct(errors["estimated_accuracy"])])
        tables[entry.label] = (header, rows)
    return tables


def chosen_prior_tables(group: Group) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Per entry that chose its prior N per batch (``blend`` with ``prior=auto``): the cell's
    ``chosen_prior`` (lower median over its batches; ``inf`` = source statistics) per corruption
    x severity (seeds that differ joined by ``/``), and a last row with the histogram of the
    choices over all cells and batches."""
    severities = _severities(group.runs)
    tables = {}
    for entry in group.entries:
        if not any("chosen_prior" in c for r in entry.runs for c in r["cells"]):
            continue
        rows, histogram = [], {}
        for corruption in _corruptions(entry.runs):
            row = [corruption]
            for severity in severities:
                chosen = [_short(c["chosen_prior"]) for r in entry.runs for c in _cells(r, corruption, severity)
                          if c.get("chosen_prior") is not None]
                row.append("/".join(dict.fromkeys(chosen)) or "-")
            rows.append(row)
        for run in entry.runs:
            for cell in run["cells"]:
                for n, count in _dict(cell.get("chosen_prior_histogram")).items():
                    histogram[n] = histogram.get(n, 0) + count
        order = sorted(histogram, key=lambda n: float(n))
        rows.append(["all cells: N (batches)", " ".join(f"{n} ({histogram[n]})" for n in order),
                     *[""] * (len(severities) - 1)])
        tables[entry.label] = (["corruption", *(f"severity {s}" for s in severities)], rows)
    return tables


_CSV_COLUMNS = ["group", "label", "method", "params", "stream", "batch_size", "num_examples",
                "dataset", "model", "seed", "corruption", "severity", "clean_accuracy",
                "source_accuracy", "source_accuracy_ci95_low", "source_accuracy_ci95_high",
                "accuracy", "accuracy_ci95_low", "accuracy_ci95_high", "recovered", "gap_closed",
                "source_error", "error", "source_ece", "ece", "source_worst_class_accuracy",
                "worst_class_accuracy", "shift_score", "source_estimated_accuracy",
                "estimated_accuracy", "chosen_prior", "stream_params", "stream_achieved_factor",
                "stream_clean_num_examples", "stream_clean_num_images", "stream_clean_accuracy",
                "stream_clean_accuracy_ci95_low", "stream_clean_accuracy_ci95_high",
                "stream_clean_source_accuracy", "stream_clean_source_accuracy_ci95_low",
                "stream_clean_source_accuracy_ci95_high", "forgetting", "run_id", "path"]

_MEAN_COLUMNS = ("source_accuracy", "accuracy", "recovered", "source_error", "error",
                 "source_ece", "ece", "shift_score", *_ESTIMATE_KEYS)


def _report_csv(groups: Sequence[Group]) -> str:
    """One row per run and cell, then per run the means: over corruptions at each severity
    (corruption ``mean``), over severities per corruption (severity ``mean``) and over all
    cells (both ``mean``); intervals on pooled counts."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_CSV_COLUMNS)
    for number, group in enumerate(groups, 1):
        names, severities = _corruptions(group.runs), _severities(group.runs)
        for entry in group.entries:
            for run in entry.runs:
                stream = {"stream_params": json.dumps(run.get("stream_params", {}), sort_keys=True),
                          "stream_achieved_factor": _dict(run.get("stream_subset")).get("achieved_factor")}
                if run.get("stream_clean") is not None:  # run-level: repeated on each of its rows
                    clean = run["stream_clean"]
                    stream |= {"stream_clean_num_examples": clean["num_examples"],
                               "stream_clean_num_images": clean.get("num_images"),
                               "forgetting": clean["forgetting"]}
                    for key in ("accuracy", "source_accuracy"):
                        low, high = wilson_interval(*_clean_counts([run], key))
                        stream |= {f"stream_clean_{key}": clean[key], f"stream_clean_{key}_ci95_low": low,
                                   f"stream_clean_{key}_ci95_high": high}
                rows = [dict(cell, source_worst_class_accuracy=_worst_class(cell.get("source_confusion")),
                             worst_class_accuracy=_worst_class(cell.get("confusion")),
                             num_examples=run.get("num_examples"))  # distinct images, not visits
                        for cell in run["cells"]]
                for corruption, severity in ([(None, s) for s in severities]
                                             + [(c, None) for c in names] + [(None, None)]):
                    cells = _cells(run, corruption, severity)
                    row = {k: _mean(c.get(k) for c in cells) for k in _MEAN_COLUMNS}
                    clean, source = run.get("clean_accuracy"), row["source_accuracy"]
                    row["gap_closed"] = (row["recovered"] / (clean - source) if clean is not None
                                         and clean - source > 1e-12 else None)
                    rows.append({**row, "corruption": corruption or "mean",
                                 "severity": "mean" if severity is None else severity})
                for row in rows:
                    for key in ("source_accuracy", "accuracy"):
                        counts = _counts([run], key, *(None if row[k] == "mean" else row[k]
                                                      for k in ("corruption", "severity")))
                        if counts:
                            row[f"{key}_ci95_low"], row[f"{key}_ci95_high"] = wilson_interval(*counts)
                    row = {**run, **row, **stream, "group": number, "label": entry.label,
                           "params": json.dumps(run.get("params", {}), sort_keys=True)}
                    writer.writerow([row.get(c) for c in _CSV_COLUMNS])
    return out.getvalue()


# --- plots ----------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _heading(group: Group, what: str) -> str:
    streams = ", ".join(dict.fromkeys(map(_stream, group.runs)))
    sizes = ", ".join(_distinct(group.runs, "batch_size"))
    return f"{what}\n{group.title()}; stream {streams}; batch size {sizes}"


def recovered_heatmap(group: Group):
    """Figure: accuracy recovered (points), entries x corruptions (+ mean), mean over
    severities; every cell annotated with one decimal (and +-std over seeds), diverging
    colour-blind-safe map centred at 0."""
    plt = _pyplot()
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    names = [*_corruptions(group.runs), None]
    values = [[[_cell_mean(r, "recovered", c) for r in e.runs] for c in names]
              for e in group.entries]
    data = np.array([[100 * (_mean(v) if _mean(v) is not None else math.nan) for v in row]
                     for row in values], dtype=float)
    bound = max(1.0, float(np.nanmax(np.abs(data), initial=0.0)))
    fig, ax = plt.subplots(figsize=(1.5 + 0.75 * len(names), 1.6 + 0.5 * len(group.entries)))
    image = ax.imshow(data, cmap=HEATMAP_CMAP, norm=TwoSlopeNorm(0.0, -bound, bound),
                      aspect="auto")
    ax.set_xticks(range(len(names)), [n or "mean" for n in names], rotation=60, ha="right")
    ax.set_yticks(range(len(group.entries)), [e.label for e in group.entries])
    for (i, j), value in np.ndenumerate(data):
        seeds = [v for v in values[i][j] if v is not None]
        text = "-" if math.isnan(value) else f"{value:+.1f}"
        if len(seeds) > 1:
            text += f"\n±{100 * statistics.stdev(seeds):.1f}"
        ax.text(j, i, text, ha="center", va="center", fontsize=8,
                color="w" if abs(value) > 0.6 * bound else "k")
    fig.colorbar(image, ax=ax, label="accuracy recovered (points)")
    ax.set_title(_heading(group, "Accuracy recovered over the source model, mean over "
                                 "severities"), fontsize=9)
    return fig


def severity_plot(group: Group):
    """Figure: accuracy (%, mean over corruptions) against severity: the source model
    (dashed), one line per adapting entry (error bars: std over seeds when several), the
    clean accuracy (dotted); legend outside the axes."""
    plt = _pyplot()

    severities = _severities(group.runs)
    fig, ax = plt.subplots(figsize=(6.5, 4))

    def line(runs: Sequence[Mapping[str, Any]], key: str, style: str, label: str) -> None:
        values = [[_cell_mean(r, key, None, s) for r in runs] for s in severities]
        (drawn,) = ax.plot(severities, [100 * _mean(v) for v in values], style, label=label)
        if len(runs) > 1:  # the spread over seeds
            ax.errorbar(severities, drawn.get_ydata(), fmt="none", capsize=3,
                        yerr=[100 * statistics.stdev(v) for v in values], ecolor=drawn.get_color())

    line(group.baseline, "source_accuracy", "k--o", "source (no adaptation)")
    for entry in group.entries:
        if entry.runs[0]["method"] != "source":  # the source model is the dashed line
            line(entry.runs, "accuracy", "-o", entry.label)
    clean = _mean(r.get("clean_accuracy") for r in group.baseline)
    if clean is not None:
        ax.axhline(100 * clean, color="0.4", linestyle=":", label="clean (no corruption)")
    ax.set_xlabel("severity")
    ax.set_ylabel("accuracy (%), mean over corruptions")
    ax.set_xticks(severities)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
    ax.set_title(_heading(group, "Accuracy against severity"), fontsize=9)
    return fig


def _grids(group: Group) -> list[tuple[str, Any]]:
    """(name suffix, figure) per blend setting (stream, other parameters) whose entries vary
    both the prior N and the batch size: the figure of Schneider et al. (2020)."""
    plt = _pyplot()
    import numpy as np

    settings: dict[str, dict[tuple, float]] = {}
    for entry in group.entries:
        run = entry.runs[0]
        params = dict(_dict(run.get("params")))
        if run["method"] != "blend" or params.get("alpha") is not None or "prior" not in params:
            continue
        prior = params.pop("prior")
        if not isinstance(prior, (int, float)):  # "auto": chosen per batch, not a grid point
            continue
        setting = json.dumps([run.get("stream"), run.get("stream_params"), params],
                             sort_keys=True, default=str)
        settings.setdefault(setting, {}).setdefault(
            (prior, run.get("batch_size")), _mean(_cell_mean(r, "accuracy") for r in entry.runs))
    figures = []
    for setting, values in settings.items():
        priors, sizes = sorted({p for p, _ in values}), sorted({b for _, b in values})
        if len(priors) < 2 or len(sizes) < 2:
            continue
        data = np.array([[100 * values.get((p, b), math.nan) for b in sizes] for p in priors])
        fig, ax = plt.subplots(figsize=(2.0 + 0.8 * len(sizes), 2.0 + 0.5 * len(priors)))
        image = ax.imshow(data, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_yticks(range(len(priors)), [_short(p) for p in priors])
        for (i, j), value in np.ndenumerate(data):
            ax.text(j, i, "-" if math.isnan(value) else f"{value:.1f}", ha="center",
                    va="center", color="w", fontsize=8)
        ax.set_xlabel("batch size")
        ax.set_ylabel("prior N")
        fig.colorbar(image, ax=ax, label="accuracy (%)")
        stream, _, params = json.loads(setting)
        ax.set_title(f"blend: mean accuracy by prior N and batch size\n{group.title()}; stream "
                     f"{stream}" + "".join(f"; {k}={v}" for k, v in sorted(params.items())),
                     fontsize=9)
        figures.append(("" if len(figures) == 0 else f"_{len(figures) + 1}", fig))
    return figures


def estimate_plot(group: Group):
    """Figure, or None when no run has label-free estimates: estimated against measured
    accuracy (%), one point per cell (mean over seeds) for every entry's adapted model (filled)
    and its source model (hollow, same colour: its estimate depends on the entry's batches);
    the diagonal (a perfect estimate) dashed; the legend gives each series' mean absolute error."""
    series = []
    for number, entry in enumerate(group.entries):
        cells = list(dict.fromkeys((c["corruption"], int(c["severity"])) for r in entry.runs for c in r["cells"]))
        for measured, estimated, label in (("accuracy", "estimated_accuracy", entry.label),
                                           ("source_accuracy", "source_estimated_accuracy", f"{entry.label}: source model")):
            if entry.runs[0]["method"] == "source" and measured == "accuracy":
                continue  # the same points as its source series
            points = [(_mean(_cell_mean(r, measured, *cell) for r in entry.runs),
                       _mean(_cell_mean(r, estimated, *cell) for r in entry.runs)) for cell in cells]
            points = [(100 * x, 100 * y) for x, y in points if x is not None and y is not None]
            if points:
                series.append((label, points, measured == "source_accuracy", number))
    if not series:
        return None
    plt = _pyplot()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(6.5, 5))
    ax.plot([0, 100], [0, 100], "k--", linewidth=1, label="estimated = measured")
    for label, points, hollow, number in series:
        error = sum(abs(x - y) for x, y in points) / len(points)
        xs, ys = zip(*points)
        color = colors[number % len(colors)]
        ax.scatter(xs, ys, s=20, label=f"{label}: mean abs. error {error:.1f} points", edgecolors=color,
                   facecolors="none" if hollow else color)
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_aspect("equal")
    ax.set_xlabel("measured accuracy (%), with labels")
    ax.set_ylabel("label-free estimated accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
    ax.set_title(_heading(group, "Label-free estimate against measured accuracy, per cell"), fontsize=9)
    return fig


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


# --- the report -----------------------------------------------------------------------------

def _sort_key(order: Mapping[str, int]):
    return lambda r: (order.get(r["method"], len(order)),
                      json.dumps(r.get("params"), sort_keys=True, default=str),
                      str(r.get("stream", "")), str(r.get("batch_size", "")), r["path"])


def _unique(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drops repeated runs of the same protocol (e.g. the jobs ``adapt=source adapt.prior=1``
    and ``adapt=source adapt.prior=4`` of a sweep, source ignoring the prior)."""
    seen, unique = set(), []
    for run in runs:
        key = json.dumps([run.get(k) for k in ("method", "params", "stream", "stream_params",
                                                "batch_size", "num_examples", "dataset", "model",
                                                "fingerprints", "seed", "cells")],
                         sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            unique.append(run)
    return unique


def _run_warnings(run: Mapping[str, Any]) -> list[str]:
    warnings = run.get("warnings")
    if isinstance(warnings, str):
        return [warnings]
    return [str(w) for w in warnings] if isinstance(warnings, list) else []


def write_report(paths: Iterable[str | Path], out: str | Path, plots: bool = True) -> dict[str, Any]:
    """Writes ``out/report.md``, ``out/report.csv`` and the PNG plots for the runs below
    ``paths`` (one set per group; file names get a ``_<model>_<dataset>_n<images>`` suffix
    when there are several groups).

    Returns:
        ``{"markdown", "recovered" (the recovered-accuracy table(s) as Markdown), "files",
        "runs", "labels" (per run), "groups", "errors" (failed, unreadable and ignored jobs, see
        :func:`load_runs`), "warnings" ([{"path", "label", "warning"}]: the runs' own warnings,
        ignored nested outcomes, grouping problems)}``.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: no finished run was found (the message lists the failed and unreadable jobs).
    """
    paths, out = [str(p) for p in paths], Path(out)
    runs, problems = load_runs(paths)
    errors = problems  # an ignored (nested) outcome is a job left out: it fails the command too
    if not runs:
        raise ValueError(f"no readable results.json found below {paths}" + "".join(
            f"\n  {e['kind']}: {e['file']}: {e['error_type']}: {e['error']}" for e in errors))
    from tta.methods import list_methods

    runs.sort(key=_sort_key({name: i for i, name in enumerate(list_methods())}))
    runs = _unique(runs)
    groups = group_runs(runs)
    label_of = {id(r): e.label for g in groups for e in g.entries for r in e.runs}
    warnings = [{"path": r["path"], "label": label_of[id(r)], "warning": w}
                for r in runs for w in _run_warnings(r)]
    warnings += [{"path": p["file"], "label": "-", "warning": f"ignored: {p['error']}"}
                 for p in problems if p["kind"] == "ignored"]
    warnings += [{"path": "-", "label": g.title(), "warning": w} for g in groups for w in g.warnings]

    sections = ["# tta evaluation report", "",
                f"{len(runs)} run(s) in {len(groups)} group(s) from: {', '.join(paths)}. "
                "Percentages; recovered = accuracy - source accuracy (points); gap closed = "
                "recovered / (clean - source accuracy); ECE with 15 bins. A group shares one "
                "source baseline (model, dataset, images per cell, corruption preset, cells); "
                "nothing is averaged across groups. `[low, high]`: 95% Wilson interval from the "
                "correct of the cell's distinct images (an image a stream shows twice counts "
                "once); for a mean, Wilson on the counts pooled over its cells "
                "(and seeds), which treats them as independent although every cell holds the "
                "same images, so it understates the uncertainty. `±`: sample standard "
                "deviation over seeds."]
    failed = [e for e in errors if e["kind"] == "failed"]
    unreadable = [e for e in errors if e["kind"] == "unreadable"]
    if failed:
        sections += ["", "## Failed jobs", "", markdown_table(
            ["directory", "error type", "message"],
            [[e["path"], e["error_type"], e["error"]] for e in failed])]
    if unreadable:
        sections += ["", "## Unreadable results", "", markdown_table(
            ["file", "problem"], [[e["file"], e["error"]] for e in unreadable])]
    if warnings:
        sections += ["", "## Warnings", "", markdown_table(
            ["run", "directory", "warning"], [[w["label"], w["path"], w["warning"]]
                                               for w in warnings])]
    recovered, files = [], []
    for number, group in enumerate(groups, 1):
        h = "##"
        if len(groups) > 1:
            h = "###"
            sections += ["", f"## Group {number} of {len(groups)}: {group.title()}"]
        sections += ["", group.protocol() + ".", "",
                     f"{h} Summary (means over all cells)", "", markdown_table(*summary_table(group))]
        table = markdown_table(*recovered_table(group))
        recovered.append(table if len(groups) == 1 else f"Group {number}: {group.title()}\n\n{table}")
        sections += ["", f"{h} Accuracy recovered (points), mean over severities", "", table]
        severities = _severities(group.runs)
        if len(severities) > 1:
            for severity in severities:
                sections += ["", f"#{h} Accuracy recovered at severity {severity}", "",
                             markdown_table(*recovered_table(group, severity))]
        for severity, table in accuracy_tables(group).items():
            sections += ["", f"{h} Accuracy (%) at severity {severity}", "", markdown_table(*table)]
        sections += published_sections(group.runs, label_of, h)
        for label, table in chosen_prior_tables(group).items():
            sections += ["", f"{h} Prior N chosen without labels: {label}", "",
                         "Per cell the lower median of the N chosen for its batches (`inf`: source "
                         "statistics); last row: how many batches got each N.", "", markdown_table(*table)]
        table = stream_clean_table(group)
        if table is not None:
            distinct = all(r["stream_clean"].get("num_images") for r in group.runs if r.get("stream_clean"))
            sections += ["", f"{h} Clean images in the stream (forgetting)", "",
                         "The clean images a `mixture` stream interleaves with the corrupted ones "
                         "(results.json `stream_clean`): accuracy (%) of the adapted model on them as "
                         "the stream visits them, of the source model on exactly those visits, and the "
                         "forgetting = source acc - accuracy (points; > 0: adaptation lost accuracy on "
                         "clean data). `[low, high]`: 95% Wilson interval pooled over seeds, "
                         + ("over the distinct clean images." if distinct else
                            "over the clean **visits** (the distinct clean images are not recorded): "
                            "an image drawn twice counts twice, so the interval is too narrow."),
                         "", markdown_table(*table)]
        for label, table in label_free_tables(group).items():
            sections += ["", f"{h} Label-free accuracy estimates: {label}", "",
                         "Estimated without any test label (docs/label_free.md) beside the accuracy "
                         "measured with them (%); shift score: symmetric KL of the last BatchNorm "
                         "layer's input statistics from the source statistics (nats, ~0 on source-like "
                         "data).", "", markdown_table(*table)]
        if plots:
            figures = [("recovered_heatmap", recovered_heatmap(group)),
                       ("accuracy_vs_severity", severity_plot(group))]
            figures += [(f"prior_batch_grid{suffix}", fig) for suffix, fig in _grids(group)]
            estimates = estimate_plot(group)
            if estimates is not None:
                figures.append(("estimated_vs_measured", estimates))
            written = [_save(fig, out / f"{stem}{group.name}.png") for stem, fig in figures]
            files += written
            sections += ["", f"{h} Plots", ""] + [f"![{f.stem}]({f.name})" for f in written]
    markdown = "\n".join(sections) + "\n"
    atomic_write_bytes(out / "report.md", markdown.encode())
    atomic_write_bytes(out / "report.csv", _report_csv(groups).encode())
    files = [out / "report.md", out / "report.csv", *files]
    return {"markdown": markdown, "recovered": "\n\n".join(recovered), "files": files,
            "runs": runs, "labels": [label_of[id(r)] for r in runs], "groups": groups,
            "errors": errors, "warnings": warnings}
