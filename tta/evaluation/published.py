"""Our results beside the published ones: the "ours vs published" view of the reproduction
configs (``conf/experiment/*.yaml``, docs/reproduction.md).

Every experiment config carries a ``published`` block, which a run composed with
``+experiment=<name>`` records in its results.json (``config.published``)::

    published:
      reference: "<paper; file and table the numbers come from>"
      metric: error | mce          # top-1 error (%) or AlexNet-normalised mCE (%)
      protocol: {dataset, model, batch_size, severities, corruptions, stream, num_examples}
      results:
        <method>: {overrides: [adapt=<method>, ...], mean: <%>, per_corruption: {<name>: <%>}}

:func:`compare_published` checks that a run followed that protocol (a run with another batch
size, model, ... is refused: its numbers are not comparable) and returns ours and the published
numbers per corruption; :func:`published_sections` renders them for the report.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tta.evaluation.metrics import alexnet_baseline_cells, corruption_errors

__all__ = ["EXPERIMENT_DIR", "METRICS", "load_published", "compare_published", "published_sections"]

logger = logging.getLogger(__name__)

def _experiment_dir() -> Path:
    try:  # the Hydra config directory of the installed package or the clone
        from tta.apps import config_dir

        return Path(config_dir()) / "experiment"
    except (ImportError, FileNotFoundError):
        return Path(__file__).resolve().parents[2] / "conf" / "experiment"


EXPERIMENT_DIR = _experiment_dir()
METRICS = ("error", "mce")
_PROTOCOL_KEYS = ("dataset", "model", "batch_size", "severities", "corruptions", "stream", "num_examples")


def _check(block: Any, where: str) -> dict[str, Any]:
    """``block`` if it is a well-formed published block, else ValueError naming ``where``."""
    def fail(message: str) -> None:
        raise ValueError(f"{where}: {message}")

    if not isinstance(block, Mapping):
        fail(f"the published block must be a mapping, got {type(block).__name__}")
    if block.get("metric") not in METRICS:
        fail(f"published.metric must be one of {METRICS}, got {block.get('metric')!r}")
    protocol = block.get("protocol")
    if not isinstance(protocol, Mapping) or set(protocol) != set(_PROTOCOL_KEYS):
        fail(f"published.protocol must have exactly the keys {list(_PROTOCOL_KEYS)}, got {protocol!r}")
    results = block.get("results")
    if not isinstance(results, Mapping) or not results:
        fail("published.results must map method names to published numbers")
    for method, entry in results.items():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("mean"), (int, float)):
            fail(f"published.results.{method} needs a numeric 'mean' (%)")
    return dict(block)


def load_published(experiment: str | Path) -> dict[str, Any]:
    """The ``published`` block of experiment config ``experiment`` (a name in
    :data:`EXPERIMENT_DIR` or a path to a yaml file).

    Raises:
        FileNotFoundError: no such config (the message lists the available names).
        ValueError: the block is missing or malformed.
    """
    path = Path(experiment)
    if path.suffix != ".yaml":
        path = EXPERIMENT_DIR / f"{experiment}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in EXPERIMENT_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"experiment config {str(path)!r} does not exist; available: {names}")
    config = yaml.safe_load(path.read_text()) or {}
    return _check(config.get("published"), str(path))


def _protocol_mismatches(run: Mapping[str, Any], published: Mapping[str, Any], entry: Mapping[str, Any]) -> list[str]:
    config = run.get("config") or {}
    ran = {"dataset": run.get("dataset"), "model": run.get("model"), "batch_size": run.get("batch_size"),
           "severities": sorted({int(c["severity"]) for c in run.get("cells", [])}),
           "corruptions": list(dict.fromkeys(c["corruption"] for c in run.get("cells", []))),
           "stream": run.get("stream"), "num_examples": config.get("num_examples", run.get("num_examples"))}
    wanted = dict(published["protocol"])
    wanted["severities"] = sorted(wanted["severities"])
    problems = [f"{key}={ran[key]!r} (published: {wanted[key]!r})" for key in _PROTOCOL_KEYS if ran[key] != wanted[key]]
    params = run.get("params") or {}
    for override in entry.get("overrides", []):
        key, _, value = str(override).partition("=")
        if key.startswith("adapt.") and params.get(key[len("adapt."):]) != yaml.safe_load(value):
            problems.append(f"{key}={params.get(key[len('adapt.'):])!r} (published: {yaml.safe_load(value)!r})")
    return problems


def compare_published(run: Mapping[str, Any], published: Mapping[str, Any] | None = None, *,
                      strict: bool = True) -> dict[str, Any]:
    """Our numbers beside the published ones for one run (a results.json dict).

    Args:
        run: the results of ``scripts/evaluate.py`` (``method``, ``cells``, ``per_corruption``,
            ``config`` ...).
        published: a published block (:func:`load_published`); default: the one the run
            recorded (``run["config"]["published"]``, present with ``+experiment=<name>``).
        strict: refuse a run whose protocol differs from the published one; with False the
            differences are returned in ``"mismatches"`` instead.

    Returns:
        ``{"reference", "metric", "method", "rows": [{"corruption", "ours", "published",
        "difference"}, ...], "mean": {"ours", "published", "difference"}, "mismatches"}``,
        all numbers in percent (error, or AlexNet-normalised CE/mCE for metric ``mce``);
        ``published`` is None for a corruption without a published number.

    Raises:
        ValueError: no published block; the run's method has no published number (the valid
            ones are named); or, with ``strict``, the protocol differs (every difference named).
    """
    where = "the published block given"
    if published is None:
        published = (run.get("config") or {}).get("published")
        where = "the run's config.published (run scripts/evaluate.py with +experiment=<name>)"
        if published is None:
            raise ValueError(f"{where} is missing: nothing to compare with")
    published = _check(published, where)
    method = run.get("method")
    entry = published["results"].get(method)
    if entry is None:
        raise ValueError(f"no published number for method {method!r}; published: {sorted(published['results'])}")
    mismatches = _protocol_mismatches(run, published, entry)
    if mismatches and strict:
        raise ValueError(f"this {method} run does not follow the published protocol ({published['reference']}): "
                         f"{'; '.join(mismatches)}; its numbers are not comparable (strict=False to show them anyway)")
    cells = run["cells"]
    corruptions = list(dict.fromkeys(c["corruption"] for c in cells))
    if published["metric"] == "mce":
        keys = [(c["corruption"], int(c["severity"])) for c in cells]
        ours = corruption_errors(cells, alexnet_baseline_cells(run["dataset"], keys))
    else:
        ours = {name: run["per_corruption"][name]["error"] for name in corruptions}
    given = entry.get("per_corruption") or {}

    def row(ours_value: float, published_value: float | None) -> dict[str, float | None]:
        ours_value = 100 * ours_value
        return {"ours": ours_value, "published": published_value,
                "difference": None if published_value is None else ours_value - published_value}

    rows = [{"corruption": name, **row(ours[name], given.get(name))} for name in corruptions]
    mean = row(sum(ours.values()) / len(ours), float(entry["mean"]))
    return {"reference": published["reference"], "metric": published["metric"], "method": method,
            "rows": rows, "mean": mean, "mismatches": mismatches}


def published_sections(runs: Sequence[Mapping[str, Any]], labels: Mapping[int, str] | None = None,
                       heading: str = "##") -> list[str]:
    """Markdown lines of an "ours vs published" table per run that recorded a published block
    and has a published number for its method ([] when none has); a run whose protocol differs
    gets its differences listed instead of a table. ``labels`` maps ``id(run)`` to its label."""
    from tta.evaluation.report import markdown_table

    lines: list[str] = []
    for run in runs:
        block = (run.get("config") or {}).get("published")
        if block is None or run.get("method") not in (block.get("results") or {}):
            continue
        label = (labels or {}).get(id(run), run.get("method"))
        comparison = compare_published(run, strict=False)
        what = "error (%)" if comparison["metric"] == "error" else "CE / mCE (%, AlexNet = 100)"
        lines += ["", f"{heading} Ours vs published: {label}, {what}", "",
                  f"Published: {comparison['reference']}."]
        if comparison["mismatches"]:
            logger.warning("%s is not comparable with %s: %s", label, comparison["reference"],
                           "; ".join(comparison["mismatches"]))
            lines += ["", "Not comparable, the protocol differs: " + "; ".join(comparison["mismatches"]) + "."]
            continue

        def fmt(value: float | None, signed: bool = False) -> str:
            return "-" if value is None else f"{value:+.1f}" if signed else f"{value:.1f}"

        table = [[r["corruption"], fmt(r["ours"]), fmt(r["published"]), fmt(r["difference"], True)]
                 for r in comparison["rows"]]
        m = comparison["mean"]
        table.append(["mean" if comparison["metric"] == "error" else "mCE", fmt(m["ours"]),
                      fmt(m["published"]), fmt(m["difference"], True)])
        lines += ["", markdown_table(["corruption", "ours", "published", "ours - published"], table)]
    return lines
