"""The benchmark job behind ``scripts/evaluate.py``: data, model, cached source metrics, the
adapted evaluation and the results files. Plain arguments only (the script maps its config)."""
from __future__ import annotations

import copy
import logging
import math
import numbers
import os
import platform
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

import tta
from tta.evaluation.metrics import (NUM_BINS, alexnet_baseline, baseline_errors, corruption_errors,
                                    mean_corruption_error,
                                    relative_mean_corruption_error)
from tta.evaluation.results import (CellCache, JsonCache, code_hash, content_hash, corruption_code_hash,
                                    finished, locked, model_hash, read_json, supersede,
                                    write_results)
from tta.evaluation.runner import (Cell, LabelFree, build_adapter, check_source_images, evaluate,
                                   method_hparams)
from tta.evaluation.streams import get_stream, imbalance_factor
from tta.methods.base import check_seed
from tta.label_free import AccuracyEstimator

__all__ = ["SEVERITIES", "CHANCE_MARGIN", "LABEL_FREE", "run_benchmark", "load_images", "build_model",
           "check_cells", "read_baseline", "check_baseline_data", "chance_accuracy", "resolve_device", "summarize",
           "label_free_params"]

logger = logging.getLogger(__name__)

SEVERITIES = (1, 2, 3, 4, 5)

# a clean accuracy below chance + CHANCE_MARGIN (a fraction: 5 points) gets a warning
CHANCE_MARGIN = 0.05

# stream=imbalance: an achieved factor (largest / smallest class, after the floors of the
# profile) more than this fraction away from the requested one gets a warning
FACTOR_TOLERANCE = 0.05

# version of the cached clean/source metric records (part of their key): bump it whenever
# their fields change, so that old records are recomputed instead of misread
RECORD_VERSION = 2

# label-free estimates per cell (docs/label_free.md); the defaults of conf/evaluate.yaml's
# label_free section. The estimator is fitted on the first fit_examples labelled images of
# split fit_split of the clean dataset (Fashion-MNIST: its train split), clean and under the
# synthetic shifts corruptions x severities (null: all 19), never on the evaluated images.
LABEL_FREE = {"enabled": False, "fit_split": "train", "fit_examples": 1000, "corruptions": None,
              "severities": [1, 2, 3, 4, 5]}


def resolve_device(device: str) -> str:
    """``"auto"``: cuda when available, else cpu; anything else is passed to torch.

    Raises:
        TypeError: ``device`` is not a str.
        ValueError: not a torch device name, or a cuda device without CUDA (named, with the
            valid choices), before any work.
    """
    if not isinstance(device, str):
        raise TypeError(f"device must be a str (auto, cpu, cuda, cuda:N), got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device={device!r} is not a torch device (auto, cpu, cuda, cuda:N): {error}") from None
    if kind.type == "cuda" and (not torch.cuda.is_available()
                                or (kind.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA "
                         "device(s): use device=cpu or device=auto")
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
    return _images(_open(dataset, split=split, root=root, num_examples=num_examples, **kwargs))


def _open(dataset: str, *, split: str, root: str | None, num_examples: int | None,
          **kwargs: Any) -> Dataset:
    """The registered dataset, checked to hold ``num_examples`` examples (images not loaded
    yet for file datasets)."""
    if root is not None and not Path(root).expanduser().exists():
        raise FileNotFoundError(f"data root {root!r} of dataset {dataset!r} does not exist")
    if num_examples is not None and (isinstance(num_examples, bool)
                                     or not isinstance(num_examples, int) or num_examples < 1):
        raise ValueError(f"num_examples must be a positive int or null, got {num_examples!r}")
    data = tta.data.get_dataset(dataset, split=split, root=root, num_examples=num_examples,
                                **kwargs)
    if num_examples is not None and len(data) != num_examples:
        raise ValueError(f"num_examples={num_examples} but dataset {dataset!r} ({split}) gave "
                         f"{len(data)} examples")
    return data


def _targets(data: Dataset) -> Tensor | None:
    targets = getattr(data, "targets", None)
    return None if targets is None else torch.as_tensor(targets[:len(data)], dtype=torch.long)


def _images(data: Dataset) -> tuple[Tensor, Tensor]:
    n = len(data)
    images, targets = getattr(data, "images", None), _targets(data)
    if isinstance(images, Tensor) and images.dtype == torch.uint8 and targets is not None:
        return images[:n].contiguous(), targets
    if callable(getattr(data, "load_images", None)):  # decodes in parallel (ImageNetC)
        return data.load_images()
    # generic map-style dataset of float [0, 1] images: stack and quantise to uint8
    pairs = [data[i] for i in range(n)]
    stacked = torch.stack([torch.as_tensor(image) for image, _ in pairs])
    images = stacked.mul(255).round_().clamp_(0, 255).to(torch.uint8)
    return images, torch.tensor([int(label) for _, label in pairs], dtype=torch.long)


def build_model(name: str | None, *, pretrained: str | None = None, weights: str | None = None,
                seed: int = 0, **kwargs: Any) -> nn.Module:
    """The shipped model ``load_pretrained(pretrained)``, or ``get_model(name, **kwargs)``
    (initialised under ``torch.manual_seed(seed)``, with ``weights`` if given), in eval mode.

    Raises:
        ValueError: for a shipped ``pretrained`` model, a ``name``, ``weights`` or builder
            kwarg it would not use: another architecture, any weights, or a kwarg that is not
            its recorded value (``num_classes``, ``in_channels`` may restate it); all named.
    """
    if pretrained is not None:
        _check_pretrained(pretrained, name, weights, kwargs)
        model = tta.models.load_pretrained(pretrained)
    else:
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = tta.models.get_model(name, weights=weights, **kwargs)
    return model.eval()


def _check_pretrained(pretrained: str, name: str | None, weights: Any, kwargs: Mapping[str, Any]) -> None:
    """Refuses what a shipped model would silently ignore (see :func:`build_model`)."""
    from tta.models.checkpoint import read_metadata

    info = read_metadata(tta.models.pretrained_info(pretrained), pretrained) or {}
    architecture, recorded = info.get("architecture"), dict(info.get("kwargs") or {})
    ignored = []
    if name is not None and name != architecture:
        ignored.append(f"model.name={name!r} (it is a {architecture})")
    if weights is not None:
        ignored.append(f"model.weights={weights!r} (its weights are shipped)")
    for key, value in kwargs.items():
        where = f"model.{key}" if key in ("num_classes", "in_channels") else f"model.kwargs.{key}"
        if value is not None and (key not in recorded or _json_safe(value) != recorded[key]):
            ignored.append(f"{where}={value!r} (it was built with "
                           + (f"{key}={recorded[key]!r})" if key in recorded else f"no {key})"))
    if ignored:
        raise ValueError(f"model.pretrained={pretrained!r} is a shipped trained model that cannot take "
                         f"{'; '.join(ignored)}: these would be ignored, so they are refused; set "
                         f"model.pretrained=null to build model.name with them (e.g. model=resnet14 "
                         f"model.weights=...), or leave them at the shipped model's values")


# what makes a baseline's errors comparable beside dataset, seed and preset (results.json keys),
# checked once the data are fingerprinted
_BASELINE_DATA = ("num_examples", "fingerprints.data", "fingerprints.corruption_code")


def _field(results: Mapping[str, Any], key: str) -> Any:
    """``results[key]`` for a dotted key; a missing ``preset`` comes from ``config.corruption``
    (results written before it was a top-level key); a missing key gives ``KeyError``."""
    if key == "preset" and key not in results:
        return results["config"]["corruption"]["preset"]
    value: Any = results
    for part in key.split("."):
        value = value[part]
    return value


def _compare_baseline(base: Mapping[str, Any], path: Path, this_run: Mapping[str, Any]) -> None:
    for key, value in this_run.items():
        try:
            theirs = _field(base, key)
        except (KeyError, TypeError):
            raise ValueError(f"baseline {str(path)!r} does not record {key!r}, so its errors cannot be shown "
                             f"to come from this run's protocol (this run: {key}={value!r}); use a "
                             f"results.json written by this version of scripts/evaluate.py") from None
        if theirs != value:
            raise ValueError(f"baseline {str(path)!r} was measured with {key}={theirs!r}, this run has "
                             f"{key}={value!r}: its errors are not comparable (mCE divides errors on the "
                             f"same images); use a baseline run of this protocol")


def check_baseline_data(base: Mapping[str, Any], path: str | Path, *, num_examples: int,
                        data: str, corruption_code: str | None) -> None:
    """Checks that the baseline results ``base`` (from :func:`read_baseline`) were measured on
    the same images as this run: ``num_examples`` per cell, ``fingerprints.data`` and (for
    synthetic corruptions) ``fingerprints.corruption_code``.

    Raises:
        ValueError: naming ``path``, the field and both values, or a field it lacks.
    """
    this_run = dict(zip(_BASELINE_DATA, (num_examples, data, corruption_code)))
    if corruption_code is None:  # precorrupted: the corrupted files are in the data fingerprint
        del this_run["fingerprints.corruption_code"]
    _compare_baseline(base, Path(path), this_run)


def read_baseline(path: str | Path, dataset: str, grid: Sequence[tuple[str, int]], *,
                  seed: int | None = None, preset: str | None = None,
                  precorrupted: bool = False) -> dict[str, Any]:
    """The baseline ``results.json`` that defines mCE, checked before any work (its ``cells``
    hold the errors; :func:`check_baseline_data` checks the images once they are known).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: naming ``path``: not readable JSON; not a results object with a non-empty
            ``cells`` list of ``{"corruption": str, "severity": int, "error": fraction}``;
            results on another dataset than ``dataset``; no error for some cells of ``grid``
            (the (corruption, severity) pairs of this run, all named); errors of a corruption
            that are 0 at every severity of ``grid`` (its CE would divide by 0); or, unless
            ``seed`` is None, another (or no recorded) ``seed`` or corruption ``preset``
            (both values named; not compared for ``precorrupted`` data).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"baseline results file {str(path)!r} does not exist")
    try:
        base = read_json(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"baseline {str(path)!r} is not readable JSON: {error}") from None
    cells = base.get("cells") if isinstance(base, dict) else None
    if not isinstance(cells, list) or not cells or not all(map(_is_error_cell, cells)):
        raise ValueError(f"baseline {str(path)!r} is not a results.json of scripts/evaluate.py: "
                         f"it needs a non-empty 'cells' list of objects with 'corruption' (str), "
                         f"'severity' (int) and 'error' (a fraction)")
    if base.get("dataset") != dataset:
        raise ValueError(f"baseline {str(path)!r} holds results on dataset "
                         f"{base.get('dataset')!r}, this run is on {dataset!r}: mCE compares "
                         f"errors on the same data")
    try:
        errors = baseline_errors(grid, cells)
    except ValueError as error:
        raise ValueError(f"baseline {str(path)!r}: {error}") from None
    zero = [c for c in dict.fromkeys(c for c, _ in grid) if sum(e for (k, _), e in errors.items() if k == c) <= 0]
    if zero:
        raise ValueError(f"baseline {str(path)!r} has error 0 at every severity of {', '.join(zero)}: the "
                         f"corruption error (this run's error / the baseline's) would divide by 0; use "
                         f"another baseline or leave {', '.join(zero)} out")
    if seed is not None and not precorrupted:
        _compare_baseline(base, path, {"seed": seed, "preset": preset})
    return base


def _is_error_cell(cell: Any) -> bool:
    return (isinstance(cell, dict) and isinstance(cell.get("corruption"), str)
            and type(cell.get("severity")) is int and type(cell.get("error")) in (int, float)
            and 0 <= cell["error"] <= 1)


def chance_accuracy(targets: Tensor) -> float:
    """Accuracy of always predicting the most frequent label of ``targets`` (N,): the chance
    level of the evaluated labels (1 / num_classes when the classes are balanced)."""
    return torch.bincount(targets).max().item() / len(targets)


@torch.no_grad()
def _check_num_classes(net: nn.Module, probe: Tensor, classes: Sequence[str] | None,
                       targets: Tensor, dataset: str, model_name: str | None) -> int:
    """The model's output width, from one forward pass on ``probe`` (1, C, H, W) in [0, 1];
    a ValueError unless it equals the dataset's number of classes (or, for a dataset without
    class names, exceeds its largest label)."""
    output = net(probe)
    if not isinstance(output, Tensor) or output.dim() != 2:
        raise ValueError(f"model {model_name!r} must return logits of shape (N, num_classes), "
                         f"got {getattr(output, 'shape', type(output))}")
    width = output.shape[1]
    expected = len(classes) if classes else int(targets.max()) + 1
    if width != expected if classes else width < expected:
        raise ValueError(f"model {model_name!r} outputs {width} class scores but dataset "
                         f"{dataset!r} has {expected} classes: set model.num_classes={expected} "
                         f"(and weights trained for those {expected} classes)")
    return width


def _trained_on(net: nn.Module, pretrained: str | None) -> str | None:
    """The dataset the model records it was trained on (None when it records none)."""
    model_info = getattr(tta.models, "model_info", None)
    info = model_info(net) if model_info is not None else None
    if info is None and pretrained is not None:
        info = tta.models.pretrained_info(pretrained)
    return None if info is None else info.get("dataset")


def _resolved_root(data: Dataset, root: str | None) -> str | None:
    root = getattr(data, "root", None) or root
    return None if root is None else str(Path(root).expanduser().resolve())


def _fingerprint(data: Dataset) -> str:
    """``tta.data.fingerprint`` of the dataset (cheap; files' content or size and mtime), else
    the content of its images and labels."""
    fingerprint = getattr(tta.data, "fingerprint", None)
    if fingerprint is not None:
        try:
            return fingerprint(data)
        except TypeError:
            pass
    return content_hash(*_images(data))


def _valid_record(record: Any, n: int, num_classes: int) -> bool:
    """Whether a cached clean/source record is whole: ``n`` examples, a (num_classes,
    num_classes) confusion matrix of counts summing to ``n``, accuracy and error that agree
    with it, an ECE in [0, 1]."""
    try:
        confusion = np.asarray(record["confusion"])
        accuracy = np.trace(confusion) / n
        return bool(confusion.dtype.kind == "i" and confusion.shape == (num_classes, num_classes)
                    and confusion.min() >= 0 and confusion.sum() == n == record["num_examples"]
                    and math.isclose(record["accuracy"], accuracy, abs_tol=1e-9)
                    and math.isclose(record["error"], 1 - accuracy, abs_tol=1e-9)
                    and 0 <= record["ece"] <= 1)
    except (KeyError, TypeError, ValueError, IndexError):
        return False


def _mean(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


# optional per-cell fields: label-free estimates and the prior chosen per batch
_ESTIMATE_KEYS = ("estimated_accuracy", "source_estimated_accuracy", "shift_score")
_OPTIONAL_CELL_KEYS = (*_ESTIMATE_KEYS, "chosen_prior", "chosen_prior_histogram")


def summarize(cells: Sequence[Mapping[str, Any]], clean_accuracy: float | None) -> dict[str, Any]:
    """Means of the per-cell metrics; ``gap_closed`` of the mean is mean recovered over
    (clean accuracy - mean source accuracy), a ratio of means."""
    keys = ("source_accuracy", "accuracy", "recovered", "source_error", "error",
            "source_ece", "ece")
    out = {k: _mean([c[k] for c in cells]) for k in keys}
    for k in _ESTIMATE_KEYS:  # label-free runs only
        if any(k in c for c in cells):
            out[k] = _mean([c.get(k) for c in cells])
    out["gap_closed"] = _gap_closed(out["recovered"], clean_accuracy, out["source_accuracy"])
    return out


def _gap_closed(recovered: float | None, clean: float | None, source: float | None) -> float | None:
    if recovered is None or clean is None or source is None or clean - source <= 1e-12:
        return None  # nothing to recover (or no clean reference)
    return recovered / (clean - source)


def _json_safe(value: Any) -> Any:
    """Hyper-parameters as JSON values: tuples become lists, tensors their shapes."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Tensor):
        return {"tensor": list(value.shape)}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def label_free_params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``label_free`` settings completed with :data:`LABEL_FREE`, checked (ValueError
    naming the bad key or value and the valid ones)."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(LABEL_FREE))
    if unknown:
        raise ValueError(f"unknown label_free key(s) {unknown}; valid keys are: {', '.join(LABEL_FREE)}")
    full = {**LABEL_FREE, **params}
    if not isinstance(full["enabled"], bool):
        raise ValueError(f"label_free.enabled must be true or false, got {full['enabled']!r}")
    if not isinstance(full["fit_split"], str):
        raise ValueError(f"label_free.fit_split must be a split name (train, test), got {full['fit_split']!r}")
    examples = full["fit_examples"]
    if examples is not None and (isinstance(examples, bool) or not isinstance(examples, int) or examples < 1):
        raise ValueError(f"label_free.fit_examples must be a positive int or null, got {examples!r}")
    if full["corruptions"] is not None:
        full["corruptions"] = [full["corruptions"]] if isinstance(full["corruptions"], str) else list(full["corruptions"])
    if isinstance(full["severities"], int):
        full["severities"] = [full["severities"]]
    try:
        check_cells(full["corruptions"] or list(tta.CORRUPTIONS), full["severities"])
    except ValueError as error:
        raise ValueError(f"label_free: {error}") from None
    return full


def _fit_estimator(net: nn.Module, images: Tensor, targets: Tensor, settings: Mapping[str, Any],
                   batch_size: int, device: str, progress: bool) -> AccuracyEstimator:
    """:func:`tta.fit_accuracy_estimator` on labelled source images (uint8) in test batches."""
    x = images.float() / 255
    batches = list(zip(x.split(batch_size), targets.split(batch_size)))
    return tta.fit_accuracy_estimator(copy.deepcopy(net).to(device), batches, corruptions=settings["corruptions"],
                                      severities=settings["severities"], progress=progress)


def _valid_estimator(record: Any) -> bool:
    try:
        AccuracyEstimator.from_dict(record)
        return True
    except (ValueError, TypeError, AttributeError):
        return False


def _label_free_code_hash() -> str:
    """Hash of the tta.label_free sources: a cached estimator of other code is refitted."""
    root = Path(tta.label_free.__file__).parent
    return content_hash(*(path.read_bytes() for path in sorted(root.glob("*.py"))))


def _check_arguments(*, ints: Mapping[str, Any], bools: Mapping[str, Any], strs: Mapping[str, Any],
                     optional: Mapping[str, Any], mappings: Mapping[str, Any]) -> None:
    """The plain arguments of :func:`run_benchmark`: ``ints`` positive ints (``batch_size``
    required, the others may be None), ``bools`` bools, ``strs`` non-empty strs, ``optional``
    None, a str or a path, ``mappings`` None or a mapping. ValueError (a bad value) or
    TypeError (a wrong type) naming the argument, the value and what is valid."""
    for name, value in ints.items():
        if value is None and name != "batch_size":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            null = "" if name == "batch_size" else " or null"
            raise ValueError(f"{name} must be a positive int{null}, got {value!r}")
    for name, value in bools.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be true or false, got {value!r}")
    for name, value in strs.items():
        if not isinstance(value, str) or not value:
            raise TypeError(f"{name} must be a non-empty str, got {value!r}")
    for name, value in optional.items():
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"{name} must be a str, a path or null, got {value!r}")
    for name, value in mappings.items():
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a mapping of names to values or null, got {value!r}")


def _set_aside(output_dir: Path) -> None:
    """Moves the directory's outcome to ``superseded/`` before a recompute (results.json
    first, each by an atomic rename), so that a killed recompute leaves no stale outcome
    looking current."""
    moved = supersede(output_dir)
    if moved:
        logger.info("recomputing: moved the earlier outcome to %s", moved[0].parent)


def _stream_clean_source(net: nn.Module, clean_images: Tensor, targets: Tensor, keys: Sequence[tuple[str, int]],
                         stream_def: Any, seed: int, stream_params: Mapping[str, Any], batch_size: int,
                         device: str) -> dict[str, Any]:
    """The source model's accuracy on the clean images that a stream with clean images
    (``mixture``) interleaves, each counted as often as the stream visits it:
    ``{"accuracy": fraction, "num_examples": visits}``, the reference of the forgetting (the
    adapted model's accuracy on the same visits is the stream's clean cell)."""
    clean = keys.index(("clean", 0))
    visits = torch.zeros(len(targets), dtype=torch.float64)
    for segment in stream_def.segments(keys, targets, seed, **stream_params):
        if clean in segment.cells:
            rows = segment.order[segment.order[:, 0] == segment.cells.index(clean), 1]
            visits += torch.bincount(rows, minlength=len(targets)).double()
    model = copy.deepcopy(net).to(device).eval()
    with torch.no_grad():
        predictions = torch.cat([model(x.to(device).float().div(255)).argmax(1).cpu()
                                 for x in clean_images.split(batch_size)])
    correct = (predictions == targets).double()
    return {"accuracy": float((visits * correct).sum() / visits.sum()), "num_examples": int(visits.sum()),
            "num_images": int((visits > 0).sum())}


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "numpy": np.__version__, "tta": tta.__version__}
    try:
        import hydra

        versions["hydra"] = hydra.__version__
    except ImportError:
        pass
    return versions


@locked
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
    clean_dataset_root: str | None = None,
    pretrained: str | None = None,
    weights: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    preset: str | None = None,
    cache_dir: str | Path | None = None,
    baseline: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    num_threads: int | None = None,
    label_free: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Runs one benchmark job and writes ``results.json``/``results.csv`` into ``output_dir``.

    The clean test images (the first ``num_examples``) are corrupted by :func:`tta.corrupt`
    per (corruption, severity) with ``seed`` (or, with ``precorrupted``, read from the
    corrupted dataset ``dataset`` while ``clean_dataset`` (under ``clean_dataset_root``, None: its
    default root) gives the clean images). Corrupted
    cells and the source model's metrics are cached under ``cache_dir`` by content hash.
    If ``output_dir`` already holds results of the same ``config`` the job is skipped (unless
    ``force``) and those results are returned.

    ``label_free`` (keys of :data:`LABEL_FREE`; ``enabled`` false by default) adds, per cell,
    the label-free accuracy estimates of the adapted and of the source model and the shift
    score (docs/label_free.md): the estimator is fitted once on labelled source data (the
    clean dataset's ``fit_split``, which must not be the evaluated split) and cached under
    ``cache_dir`` by model and data content; two more forward passes per test batch.

    Every argument is checked before any work (nothing read, built or moved). A recompute
    first moves the directory's earlier outcome to ``superseded/`` (with ``force`` or without
    ``config`` at once; for stale inputs once they are fingerprinted), so that a killed run
    leaves no stale outcome looking current.

    Returns:
        the results dict written to ``results.json`` (schema in docs/evaluation.md).

    Raises:
        ValueError: a bad value (named, with the valid ones): ints (``seed`` in [0, 2**63),
            ``batch_size``, ``num_examples``, ``num_threads`` >= 1), names, ``adapt.*`` values
            (e.g. ``fisher_images`` beyond the clean images), stream parameters the images
            cannot make, a shipped model given arguments it would ignore, a baseline of another
            protocol or with a zero-error corruption, results of another config in
            ``output_dir`` (without ``force``).
        TypeError: a flag that is not a bool, a name that is not a str, a mapping argument that
            is not a mapping.
        FileNotFoundError: a missing data root or baseline file.
    """
    started = time.perf_counter()
    output_dir = Path(output_dir)
    # validate every argument before any work (nothing read, built or moved yet)
    _check_arguments(
        ints={"batch_size": batch_size, "num_examples": num_examples, "num_threads": num_threads},
        bools={"precorrupted": precorrupted, "force": force, "progress": progress},
        strs={"dataset": dataset, "dataset_split": dataset_split, "method": method, "stream": stream},
        optional={"model": model, "pretrained": pretrained, "dataset_root": dataset_root,
                  "clean_dataset": clean_dataset, "clean_dataset_root": clean_dataset_root,
                  "weights": weights, "cache_dir": cache_dir, "baseline": baseline},
        mappings={"method_params": method_params, "stream_params": stream_params,
                  "dataset_kwargs": dataset_kwargs, "model_kwargs": model_kwargs,
                  "label_free": label_free, "config": config})
    seed = check_seed(seed)
    # the environment settings too, before anything is read or moved aside
    CellCache(cache_dir)  # $TTA_CACHE_MAX_GB
    tta.data.imagenet_c.default_num_workers()  # $TTA_NUM_WORKERS
    if model is None and pretrained is None:
        raise ValueError("model is null and so is pretrained: name a model (model.name) or a shipped "
                         f"pretrained one ({', '.join(sorted(tta.models.shipped.PRETRAINED))})")
    config = dict(config) if config is not None else None
    check_cells(corruptions, severities)
    corruptions, severities = list(corruptions), [int(s) for s in severities]
    grid = [(c, s) for s in severities for c in corruptions]
    method_params = method_hparams(method, method_params)
    check_source_images(method, method_params, num_examples)
    stream_def = get_stream(stream)
    stream_params = stream_def.params(stream_params)
    if preset is not None and preset not in tta.PRESETS:
        raise ValueError(f"unknown corruption preset {preset!r}; valid presets are: "
                         f"{', '.join(tta.PRESETS)} (or null for the dataset's default)")
    alexnet = baseline is not None and str(baseline) == "alexnet"  # the published AlexNet errors
    base = None if baseline is None else alexnet_baseline(dataset, grid) if alexnet else read_baseline(
        baseline, dataset, grid, seed=seed, preset=preset, precorrupted=precorrupted)
    baseline_cells = None if base is None else base["cells"]
    label_free = label_free_params(label_free)
    device = resolve_device(device)
    if config is not None and not force:
        finished(output_dir, config)  # results of another config there: refused, left alone
    # the model (a shipped one refuses arguments it would ignore), before any data is read
    net = build_model(model, pretrained=pretrained, weights=weights, seed=seed,
                      **dict(model_kwargs or {}))
    if force or config is None:  # recomputing whatever the directory holds
        _set_aside(output_dir)
    if num_threads is not None:
        torch.set_num_threads(num_threads)

    # data: the clean images (when there are any) and, for a precorrupted set, every cell's
    # dataset, opened and fingerprinted but not read yet
    dataset_kwargs = dict(dataset_kwargs or {})
    clean_name = clean_dataset if precorrupted else dataset
    clean_images = targets = classes = clean_key = None
    if clean_name is not None:
        clean_data = _open(clean_name, split=dataset_split,
                           root=clean_dataset_root if precorrupted else dataset_root, num_examples=num_examples,
                           **({} if precorrupted else dataset_kwargs))
        clean_images, targets = _images(clean_data)
        classes = getattr(clean_data, "classes", None)
        clean_key = content_hash("clean images", clean_images, targets)
    code_key = None if precorrupted else corruption_code_hash()
    opened: dict[tuple[str, int], Dataset] = {}
    cell_keys: dict[tuple[str, int], str] = {}
    for c, s in grid:
        if not precorrupted:
            cell_keys[c, s] = content_hash("cell", clean_key, c, s, seed, preset, code_key)
            continue
        data = opened[c, s] = _open(dataset, split=dataset_split, root=dataset_root,
                                    num_examples=num_examples, corruption=c, severity=s,
                                    **dataset_kwargs)
        labels = _targets(data)
        labels = _images(data)[1] if labels is None else labels
        if targets is None:
            targets, classes = labels, getattr(data, "classes", None)
        elif not torch.equal(labels, targets):
            raise ValueError(f"labels of {dataset} {c}/{s} differ from those of "
                             f"{clean_name or f'{dataset} {grid[0][0]}/{grid[0][1]}'}")
        cell_keys[c, s] = content_hash("precorrupted cell", _resolved_root(data, dataset_root),
                                       _fingerprint(data))
    if precorrupted:
        first = opened[grid[0]][0][0]  # (C, H, W) float: the shape without reading a cell
        cell_shape, probe = (len(targets), *first.shape), first.unsqueeze(0)
        data_key = content_hash("precorrupted", clean_key, [cell_keys[k] for k in grid])
    else:
        cell_shape, probe = tuple(clean_images.shape), clean_images[:1].float() / 255
        data_key = clean_key
    if stream_def.uses_clean and clean_images is None:
        raise ValueError(f"stream={stream} interleaves clean images, but dataset {dataset!r} has "
                         "none (set dataset.clean)")
    # label-free: labelled source data for the estimator, never the evaluated split
    fit_images = fit_targets = None
    if label_free["enabled"]:
        if clean_name is None:
            raise ValueError(f"label_free needs labelled clean source data to fit its estimator, but dataset "
                             f"{dataset!r} has none (set dataset.clean)")
        if label_free["fit_split"] == dataset_split:
            raise ValueError(f"label_free.fit_split={dataset_split!r} is the evaluated split: the estimator must "
                             f"never see the evaluated labels; use another labelled split (e.g. train)")
        try:
            fit_images, fit_targets = _images(_open(
                clean_name, split=label_free["fit_split"], root=clean_dataset_root if precorrupted else dataset_root,
                num_examples=label_free["fit_examples"], **({} if precorrupted else dataset_kwargs)))
        except ValueError as error:
            raise ValueError(f"label_free (fitting data {clean_name!r}, split {label_free['fit_split']!r}, "
                             f"fit_examples={label_free['fit_examples']}): {error}") from None
    # a stream that selects the images (imbalance): every cell, the clean images and the source
    # metrics use the same subset, which is part of the data fingerprint
    subset = None if stream_def.subset is None else stream_def.subset(targets, seed, **stream_params)
    subset_key = subset_info = None
    cell_source = clean_images  # every corrupted cell is made of all the images, then subset
    if subset is not None:
        subset_key = content_hash("subset", subset)
        data_key = content_hash(data_key, subset_key)
        targets = targets[subset]
        clean_images = None if clean_images is None else clean_images[subset]
        counts, achieved = imbalance_factor(targets)
        subset_info = {"class_counts": {str(k): v for k, v in counts.items()}, "achieved_factor": achieved}
    # the stream's segments, so that a stream these images cannot make fails now, as does a
    # count of images per segment beyond the shortest one (recalibrate's num_images: never truncated)
    keys = grid + ([("clean", 0)] if stream_def.uses_clean else [])
    shortest = min(len(seg.order) for seg in stream_def.segments(keys, targets, seed, **stream_params))
    if (method_params.get("num_images") or 0) > shortest:
        raise ValueError(f"adapt.num_images={method_params['num_images']} but the shortest segment of "
                         f"stream={stream} has {shortest} images: it would be truncated; use at most "
                         f"{shortest} or null (all of each segment) (adapt={method})")
    if clean_images is not None:  # the clean images as evaluated (an imbalanced subset: fewer)
        check_source_images(method, method_params, len(clean_images))
    if base is not None and not alexnet:
        check_baseline_data(base, baseline, num_examples=len(targets), data=data_key, corruption_code=code_key)

    # model: its output width must be the number of classes; then skip if already done
    model_name = pretrained or model
    num_classes = _check_num_classes(net, probe, classes, targets, dataset, model_name)
    fingerprints = {"model": model_hash(net), "data": data_key, "corruption_code": code_key,
                    "code": code_hash(),  # any change of tta's code or torch/numpy: recompute
                    "baseline": None if baseline_cells is None else content_hash(
                        sorted(baseline_errors(grid, baseline_cells).items()))}
    if label_free["enabled"]:  # the estimator: model, fitting data and settings, code
        fingerprints["label_free"] = content_hash(
            "label-free estimator", fingerprints["model"], fit_images, fit_targets, batch_size,
            label_free["corruptions"], label_free["severities"], torch.device(device).type,
            corruption_code_hash(), _label_free_code_hash())
    if not force and config is not None and finished(output_dir, config, fingerprints):
        logger.info("skipping: %s already holds these results (force=true to redo)", output_dir)
        stored = read_json(output_dir / "results.json")
        for message in stored.get("warnings") or []:
            logger.warning(message)
        return stored
    _set_aside(output_dir)  # a killed recompute must not leave the stale outcome as current
    warnings: list[str] = []

    def warn(message: str) -> None:
        logger.warning(message)
        warnings.append(message)

    requested = stream_params.get("factor")
    if subset_info is not None and requested and abs(subset_info["achieved_factor"] / requested - 1) > FACTOR_TOLERANCE:
        warn(f"stream=imbalance: the requested factor {requested:g} is not reached with these "
             f"{len(targets)} images: the class sizes {subset_info['class_counts']} give a factor of "
             f"{subset_info['achieved_factor']:.3g} (results.json: stream_subset); use more images "
             f"(num_examples) for the requested profile")

    trained_on = _trained_on(net, pretrained)
    evaluated = clean_name or dataset.removesuffix("_c")
    if trained_on is not None and trained_on != evaluated:
        warn(f"model {model_name!r} was trained on {trained_on!r} but is evaluated on "
             f"{dataset!r}: its accuracies, and what adaptation recovers, do not measure "
             f"robustness to a shift of its own data")

    # the adapted model, built now so that a bad hyper-parameter fails before any evaluation
    # (source too when the label-free estimates need its stream of batches)
    adapter = None if method == "source" and not label_free["enabled"] else build_adapter(
        copy.deepcopy(net), method, method_params, source_images=clean_images, device=device)
    cell_cache = CellCache(cache_dir)
    source_cache = JsonCache(cache_dir, "source")

    def loader(corruption: str, severity: int):
        key = cell_keys[corruption, severity]

        def compute() -> Tensor:
            if precorrupted:
                return _images(opened[corruption, severity])[0]
            return tta.corrupt(cell_source, corruption, severity, preset=preset, seed=seed)

        def load() -> Tensor:  # concurrent jobs compute a cell once (the key's file lock)
            images = cell_cache.get_or_compute(key, compute, shape=cell_shape)
            return images if subset is None else images[subset]

        return load

    cells = [Cell(c, s, loader(c, s)) for c, s in grid]

    # source model: clean and per-cell metrics, cached by (model, data, cell) content
    n = len(targets)
    evaluation = ("source", RECORD_VERSION, NUM_BINS, torch.device(device).type, fingerprints["code"])

    def valid(record: Any) -> bool:
        return _valid_record(record, n, num_classes)

    clean = None
    if clean_images is not None:
        clean_record_key = content_hash(*evaluation, fingerprints["model"], clean_key, subset_key)
        clean = source_cache.get(clean_record_key, check=valid)
        if clean is None:
            clean = evaluate(copy.deepcopy(net), [Cell("clean", 0, clean_images)], targets,
                             batch_size=batch_size, device=device,
                             num_classes=num_classes)["cells"][0]
            source_cache.put(clean_record_key, clean)
    source_keys = [content_hash(*evaluation, fingerprints["model"], cell_keys[k], subset_key)
                   for k in grid]
    source = [source_cache.get(k, check=valid) for k in source_keys]
    missing = [i for i, record in enumerate(source) if record is None]
    source_seconds = None
    if missing:
        logger.info("source model on %d cell(s)", len(missing))
        run = evaluate(copy.deepcopy(net), [cells[i] for i in missing], targets,
                       batch_size=batch_size, device=device, num_classes=num_classes,
                       progress=progress)
        source_seconds = run["seconds"]
        for i, record in zip(missing, run["cells"]):
            source[i] = record
            source_cache.put(source_keys[i], record)
    clean_accuracy = None if clean is None else clean["accuracy"]
    chance = chance_accuracy(targets)
    reference = clean_accuracy if clean is not None else _mean([r["accuracy"] for r in source])
    if reference < chance + CHANCE_MARGIN:
        what = "clean accuracy" if clean is not None else "mean source accuracy (no clean data)"
        warn(f"{what} {100 * reference:.1f}% is within {100 * CHANCE_MARGIN:.0f} points of "
             f"chance ({100 * chance:.1f}%, always predicting the most frequent of the {n} "
             f"labels): model {model_name!r} does not solve {dataset!r}, so the accuracy "
             f"recovered and gap_closed mean nothing")

    # label-free: the estimator (fitted once, cached) and the shift score of every cell (cached)
    estimator = label_free_info = None
    if label_free["enabled"]:
        label_free_cache, score_cache = JsonCache(cache_dir, "label_free"), JsonCache(cache_dir, "shift_score")
        reference = copy.deepcopy(net).to(device).eval()
        estimator_record = label_free_cache.get(fingerprints["label_free"], check=_valid_estimator)
        fit_seconds = None
        if estimator_record is None:
            logger.info("fitting the label-free accuracy estimator on %d labelled %s %s images",
                        len(fit_targets), clean_name, label_free["fit_split"])
            fit_start = time.perf_counter()
            estimator = _fit_estimator(net, fit_images, fit_targets, label_free, batch_size, device, progress)
            fit_seconds = time.perf_counter() - fit_start
            label_free_cache.put(fingerprints["label_free"], estimator.to_dict())
        else:
            estimator = AccuracyEstimator.from_dict(estimator_record)
        diagnosis_start = time.perf_counter()

        def shift_score(key: str | None, load) -> float:
            record_key = content_hash("shift score", fingerprints["model"], key, subset_key)
            record = score_cache.get(record_key, check=lambda r: isinstance(r, dict) and isinstance(
                r.get("shift_score"), float) and r["shift_score"] >= 0)
            if record is None:
                images = load()
                record = {"shift_score": tta.diagnose(reference, (images.float() / 255).split(batch_size)).score}
                score_cache.put(record_key, record)
            return record["shift_score"]

        scores = [shift_score(cell_keys[c, s], cell.load) for (c, s), cell in zip(grid, cells)]
        clean_score = None if clean_images is None else shift_score(clean_key, lambda: clean_images)
        label_free_info = {
            "estimator": {"method": estimator.method, "fit_dataset": clean_name, "fit_split": label_free["fit_split"],
                          **{k: estimator.info.get(k) for k in ("num_samples", "shifts", "corruptions", "severities",
                                                                "batch_size", "clean_accuracy")}},
            "regression": "source" if method == "source" else "batch",
            "clean_shift_score": clean_score, "fit_seconds": fit_seconds,
            "diagnosis_seconds": time.perf_counter() - diagnosis_start}

    # the adapted model
    stream_clean = source_clean = None
    if stream_def.uses_clean:  # the source model on the clean images as the stream visits them
        source_clean = _stream_clean_source(net, clean_images, targets, keys, stream_def, seed, stream_params,
                                            batch_size, device)
    if adapter is None:  # source; images_per_second is null when every cell came from the cache
        adapted = [dict(record) for record in source]
        seconds = source_seconds if len(missing) == len(grid) else None
        hparams: dict[str, Any] = {}
        if source_clean is not None:  # the source model's predictions do not depend on the stream
            stream_clean = dict(source_clean)
    else:
        stream_cells = cells + ([Cell("clean", 0, clean_images)] if stream_def.uses_clean else [])
        run = evaluate(adapter.model, stream_cells, targets, method=adapter, stream=stream,
                       stream_params=stream_params, batch_size=batch_size, device=device,
                       seed=seed, num_classes=num_classes, progress=progress,
                       label_free=None if estimator is None else LabelFree(
                           estimator, reference, label_free_info["regression"]))
        adapted, seconds, hparams = run["cells"][:len(cells)], run["seconds"], run["hparams"]
        if label_free_info is not None:
            label_free_info["seconds"] = run["label_free_seconds"]
            for cell, score in zip(adapted, scores):
                cell["shift_score"] = score
        if stream_def.uses_clean:
            clean_run = run["cells"][-1]
            stream_clean = {"accuracy": clean_run["accuracy"], "num_examples": clean_run["num_examples"]}
    if stream_clean is not None:  # forgetting: source minus adapted, on the same clean visits
        stream_clean["source_accuracy"] = source_clean["accuracy"]
        stream_clean["forgetting"] = source_clean["accuracy"] - stream_clean["accuracy"]
        stream_clean["num_images"] = source_clean["num_images"]  # distinct clean images visited

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
            "source_confusion": src["confusion"], "confusion": ada["confusion"],
            **{k: _json_safe(ada[k]) for k in _OPTIONAL_CELL_KEYS if k in ada},
        })
    results: dict[str, Any] = {
        "status": "ok",
        "warnings": warnings,
        "method": method, "params": _json_safe(hparams),
        "stream": stream, "stream_params": stream_params,
        **({} if subset_info is None else {"stream_subset": subset_info}),
        "batch_size": batch_size, "num_examples": n, "preset": preset,
        "dataset": dataset, "model": model_name, "seed": seed, "device": device,
        "num_classes": num_classes, "classes": None if classes is None else list(classes),
        "clean_accuracy": clean_accuracy,
        "clean_error": None if clean is None else clean["error"],
        "clean_ece": None if clean is None else clean["ece"],
        "clean_confusion": None if clean is None else clean["confusion"],
        "num_bins": NUM_BINS,
        "cells": rows,
        "mean": summarize(rows, clean_accuracy),
        "per_severity": {str(s): summarize([r for r in rows if r["severity"] == s], clean_accuracy)
                         for s in severities},
        "per_corruption": {c: summarize([r for r in rows if r["corruption"] == c], clean_accuracy)
                           for c in corruptions},
    }
    if stream_clean is not None:
        results["stream_clean"] = stream_clean
    if label_free_info is not None:
        results["label_free"] = label_free_info
    if baseline_cells is not None:
        for c, ce in corruption_errors(rows, baseline_cells).items():
            results["per_corruption"][c]["ce"] = ce
        results["mean"]["mce"] = mean_corruption_error(rows, baseline_cells)
        if base.get("clean_error") is not None and results["clean_error"] is not None:
            try:  # undefined where the baseline degrades by <= 0 over its clean error: null, said
                results["mean"]["relative_mce"] = relative_mean_corruption_error(
                    rows, results["clean_error"], baseline_cells, base["clean_error"])
            except ValueError as error:
                results["mean"]["relative_mce"] = None
                warn(f"relative mCE left null: {error}")
        results["baseline"] = str(baseline)
        results["mce_cells"] = [[c, s] for c, s in grid]
    results["fingerprints"] = fingerprints
    results["config"] = config
    results["versions"] = _versions()
    num_images = len(grid) * n
    results["images_per_second"] = num_images / seconds if seconds else None
    results["seconds"] = time.perf_counter() - started
    write_results(output_dir, results)
    logger.info("%s/%s: mean accuracy %.2f%% (source %.2f%%, recovered %+.2f points)", method,
                stream, 100 * results["mean"]["accuracy"], 100 * results["mean"]["source_accuracy"],
                100 * results["mean"]["recovered"])
    return results
