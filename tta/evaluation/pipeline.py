"""The benchmark job behind ``scripts/evaluate.py``: data, model, cached source metrics, the
adapted evaluation and the results files. Plain arguments only (the script maps its config)."""
from __future__ import annotations

import copy
import logging
import platform
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

import tta
from tta.evaluation.methods import get_method
from tta.evaluation.metrics import NUM_BINS, corruption_errors, mean_corruption_error
from tta.evaluation.results import (CellCache, JsonCache, content_hash, corruption_code_hash,
                                    finished, model_hash, read_json, write_results)
from tta.evaluation.runner import Cell, evaluate
from tta.evaluation.streams import get_stream

__all__ = ["SEVERITIES", "run_benchmark", "load_images", "build_model", "check_cells",
           "resolve_device", "summarize"]

logger = logging.getLogger(__name__)

SEVERITIES = (1, 2, 3, 4, 5)


def resolve_device(device: str) -> str:
    """``"auto"``: cuda when available, else cpu; anything else is passed to torch."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    torch.device(device)  # raises on nonsense
    return device


def check_cells(corruptions: Sequence[str], severities: Sequence[int]) -> None:
    """Validates corruption names and severities (ValueError naming the valid choices)."""
    valid = (*tta.CORRUPTIONS, *tta.EXTRA_CORRUPTIONS)
    if isinstance(corruptions, str) or not len(corruptions):
        raise ValueError(f"corruption.names must be a non-empty list, got {corruptions!r}")
    if isinstance(severities, (str, int)) or not len(severities):
        raise ValueError(f"corruption.severities must be a non-empty list, got {severities!r}")
    for name in corruptions:
        if name not in valid:
            raise ValueError(f"unknown corruption {name!r}; valid names are: {', '.join(valid)}")
    for severity in severities:
        if isinstance(severity, bool) or severity not in SEVERITIES:
            raise ValueError(f"invalid severity {severity!r}; valid severities are: "
                             f"{', '.join(map(str, SEVERITIES))}")
    for what, items in (("corruption", corruptions), ("severity", severities)):
        if len(set(items)) != len(items):
            raise ValueError(f"duplicate {what} in {list(items)!r}")


def load_images(dataset: str, *, split: str = "test", root: str | None = None,
                num_examples: int | None = None, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """``num_examples`` images of a registered dataset (its builder picks them: the first ones
    for the tensor datasets) as uint8 (N, C, H, W) and their labels (N,)."""
    if root is not None and not Path(root).expanduser().exists():
        raise FileNotFoundError(f"data root {root!r} of dataset {dataset!r} does not exist")
    if num_examples is not None and (isinstance(num_examples, bool)
                                     or not isinstance(num_examples, int) or num_examples < 1):
        raise ValueError(f"num_examples must be a positive int or null, got {num_examples!r}")
    data = tta.data.get_dataset(dataset, split=split, root=root, num_examples=num_examples,
                                **kwargs)
    n = len(data)
    if num_examples is not None and n != num_examples:
        raise ValueError(f"num_examples={num_examples} but dataset {dataset!r} ({split}) gave "
                         f"{n} examples")
    images = getattr(data, "images", None)
    targets = getattr(data, "targets", None)
    if isinstance(images, Tensor) and images.dtype == torch.uint8 and targets is not None:
        return images[:n].contiguous(), torch.as_tensor(targets[:n], dtype=torch.long)
    # generic map-style dataset of float [0, 1] images: stack and quantise to uint8
    pairs = [data[i] for i in range(n)]
    stacked = torch.stack([torch.as_tensor(image) for image, _ in pairs])
    images = stacked.mul(255).round_().clamp_(0, 255).to(torch.uint8)
    return images, torch.tensor([int(label) for _, label in pairs], dtype=torch.long)


def build_model(name: str | None, *, pretrained: str | None = None, weights: str | None = None,
                seed: int = 0, **kwargs: Any) -> nn.Module:
    """The shipped model ``load_pretrained(pretrained)``, or ``get_model(name, **kwargs)``
    (initialised under ``torch.manual_seed(seed)``, with ``weights`` if given), in eval mode."""
    if pretrained is not None:
        model = tta.models.load_pretrained(pretrained)
    else:
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = tta.models.get_model(name, weights=weights, **kwargs)
    return model.eval()


def _mean(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarize(cells: Sequence[Mapping[str, Any]], clean_accuracy: float | None) -> dict[str, Any]:
    """Means of the per-cell metrics; ``gap_closed`` of the mean is mean recovered over
    (clean accuracy - mean source accuracy), a ratio of means."""
    keys = ("source_accuracy", "accuracy", "recovered", "source_error", "error",
            "source_ece", "ece")
    out = {k: _mean([c[k] for c in cells]) for k in keys}
    out["gap_closed"] = _gap_closed(out["recovered"], clean_accuracy, out["source_accuracy"])
    return out


def _gap_closed(recovered: float | None, clean: float | None, source: float | None) -> float | None:
    if recovered is None or clean is None or source is None or clean - source <= 1e-12:
        return None  # nothing to recover (or no clean reference)
    return recovered / (clean - source)


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "numpy": np.__version__, "tta": tta.__version__}
    try:
        import hydra

        versions["hydra"] = hydra.__version__
    except ImportError:
        pass
    return versions


def run_benchmark(
    output_dir: str | Path,
    *,
    dataset: str,
    model: str | None,
    corruptions: Sequence[str],
    severities: Sequence[int],
    method: str = "source",
    method_params: Mapping[str, Any] | None = None,
    stream: str = "reset",
    stream_params: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    num_examples: int | None = None,
    seed: int = 0,
    device: str = "auto",
    dataset_root: str | None = None,
    dataset_split: str = "test",
    dataset_kwargs: Mapping[str, Any] | None = None,
    precorrupted: bool = False,
    clean_dataset: str | None = None,
    pretrained: str | None = None,
    weights: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    preset: str | None = None,
    cache_dir: str | Path | None = None,
    baseline: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    num_threads: int | None = None,
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Runs one benchmark job and writes ``results.json``/``results.csv`` into ``output_dir``.

    The clean test images (the first ``num_examples``) are corrupted by :func:`tta.corrupt`
    per (corruption, severity) with ``seed`` (or, with ``precorrupted``, read from the
    corrupted dataset ``dataset`` while ``clean_dataset`` gives the clean images). Corrupted
    cells and the source model's metrics are cached under ``cache_dir`` by content hash.
    If ``output_dir`` already holds results of the same ``config`` the job is skipped (unless
    ``force``) and those results are returned.

    Returns:
        the results dict written to ``results.json`` (schema in docs/evaluation.md).
    """
    started = time.perf_counter()
    output_dir = Path(output_dir)
    config = dict(config) if config is not None else None
    # validate everything cheap before any data is touched
    check_cells(corruptions, severities)
    corruptions, severities = list(corruptions), [int(s) for s in severities]
    method_params = get_method(method).params(method_params)
    stream_params = get_stream(stream).params(stream_params)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if preset is not None and preset not in tta.PRESETS:
        raise ValueError(f"unknown corruption preset {preset!r}; valid presets are: "
                         f"{', '.join(tta.PRESETS)} (or null for the dataset's default)")
    if baseline is not None and not Path(baseline).exists():
        raise FileNotFoundError(f"baseline results file {str(baseline)!r} does not exist")
    if not force and config is not None and finished(output_dir, config):
        logger.info("skipping: %s already holds these results (force=true to redo)", output_dir)
        return read_json(output_dir / "results.json")
    device = resolve_device(device)
    if num_threads:
        torch.set_num_threads(int(num_threads))

    # data and model
    dataset_kwargs = dict(dataset_kwargs or {})
    clean_name = clean_dataset if precorrupted else dataset
    clean_images = targets = None
    if clean_name is not None:
        clean_images, targets = load_images(clean_name, split=dataset_split,
                                            root=None if precorrupted else dataset_root,
                                            num_examples=num_examples,
                                            **({} if precorrupted else dataset_kwargs))
    net = build_model(model, pretrained=pretrained, weights=weights, seed=seed,
                      **dict(model_kwargs or {}))
    model_key = model_hash(net)
    cell_cache = CellCache(cache_dir)
    source_cache = JsonCache(cache_dir, "source")

    if precorrupted:
        first = load_images(dataset, split=dataset_split, root=dataset_root,
                            num_examples=num_examples, corruption=corruptions[0],
                            severity=severities[0], **dataset_kwargs)
        if targets is None:
            targets = first[1]
        data_key = content_hash("precorrupted", dataset, dataset_kwargs, targets)
    else:
        data_key = content_hash(clean_name, clean_images, targets)
    code_key = corruption_code_hash()

    def cell_key(corruption: str, severity: int) -> str:
        if precorrupted:
            return content_hash("cell", data_key, corruption, severity)
        return content_hash("cell", data_key, corruption, severity, seed, preset, code_key)

    def loader(corruption: str, severity: int):
        key = cell_key(corruption, severity)

        def load() -> Tensor:
            images = cell_cache.get(key)
            if images is None:
                if precorrupted:
                    images, labels = load_images(dataset, split=dataset_split, root=dataset_root,
                                                 num_examples=num_examples, corruption=corruption,
                                                 severity=severity, **dataset_kwargs)
                    if not torch.equal(labels, targets):
                        raise ValueError(f"labels of {dataset} {corruption}/{severity} differ "
                                         f"from those of the clean data")
                else:
                    images = tta.corrupt(clean_images, corruption, severity, preset=preset,
                                         seed=seed)
                cell_cache.put(key, images)
            return images

        return load

    grid = [(c, s) for s in severities for c in corruptions]
    cells = [Cell(c, s, loader(c, s)) for c, s in grid]

    # source model: clean and per-cell metrics, cached by (model, data, cell) content
    clean = None
    if clean_images is not None:
        clean_key = content_hash("clean", model_key, data_key, NUM_BINS)
        clean = source_cache.get(clean_key)
        if clean is None:
            clean = evaluate(copy.deepcopy(net), [Cell("clean", 0, clean_images)], targets,
                             batch_size=batch_size, device=device)["cells"][0]
            source_cache.put(clean_key, clean)
    source_keys = [content_hash("source", model_key, cell_key(c, s), NUM_BINS) for c, s in grid]
    source = [source_cache.get(k) for k in source_keys]
    missing = [i for i, record in enumerate(source) if record is None]
    source_seconds = None
    if missing:
        logger.info("source model on %d cell(s)", len(missing))
        run = evaluate(copy.deepcopy(net), [cells[i] for i in missing], targets,
                       batch_size=batch_size, device=device, progress=progress)
        source_seconds = run["seconds"]
        for i, record in zip(missing, run["cells"]):
            source[i] = record
            source_cache.put(source_keys[i], record)

    # the adapted model
    if method == "source":  # images_per_second is null when every cell came from the cache
        adapted = [dict(record) for record in source]
        seconds = source_seconds if len(missing) == len(grid) else None
    else:
        run = evaluate(copy.deepcopy(net), cells, targets, method=method,
                       method_params=method_params, stream=stream, stream_params=stream_params,
                       batch_size=batch_size, device=device, seed=seed, progress=progress)
        adapted, seconds = run["cells"], run["seconds"]
    clean_accuracy = None if clean is None else clean["accuracy"]

    rows = []
    for (c, s), src, ada in zip(grid, source, adapted):
        recovered = ada["accuracy"] - src["accuracy"]
        rows.append({
            "corruption": c, "severity": s, "num_examples": ada["num_examples"],
            "source_accuracy": src["accuracy"], "accuracy": ada["accuracy"],
            "recovered": recovered,
            "gap_closed": _gap_closed(recovered, clean_accuracy, src["accuracy"]),
            "source_error": src["error"], "error": ada["error"],
            "source_ece": src["ece"], "ece": ada["ece"],
        })
    results: dict[str, Any] = {
        "status": "ok",
        "method": method, "params": method_params,
        "stream": stream, "stream_params": stream_params,
        "batch_size": batch_size, "num_examples": len(targets),
        "dataset": dataset, "model": pretrained or model, "seed": seed, "device": device,
        "clean_accuracy": clean_accuracy,
        "clean_error": None if clean is None else clean["error"],
        "clean_ece": None if clean is None else clean["ece"],
        "num_bins": NUM_BINS,
        "cells": rows,
        "mean": summarize(rows, clean_accuracy),
        "per_severity": {str(s): summarize([r for r in rows if r["severity"] == s], clean_accuracy)
                         for s in severities},
        "per_corruption": {c: summarize([r for r in rows if r["corruption"] == c], clean_accuracy)
                           for c in corruptions},
    }
    if baseline is not None:
        base = read_json(baseline)
        errors = corruption_errors(rows, base["cells"])
        for c, ce in errors.items():
            results["per_corruption"][c]["ce"] = ce
        results["mean"]["mce"] = mean_corruption_error(rows, base["cells"])
        results["baseline"] = str(baseline)
    results["config"] = config
    results["versions"] = _versions()
    num_images = len(grid) * len(targets)
    results["images_per_second"] = num_images / seconds if seconds else None
    results["seconds"] = time.perf_counter() - started
    write_results(output_dir, results)
    logger.info("%s/%s: mean accuracy %.2f%% (source %.2f%%, recovered %+.2f points)", method,
                stream, 100 * results["mean"]["accuracy"], 100 * results["mean"]["source_accuracy"],
                100 * results["mean"]["recovered"])
    return results
