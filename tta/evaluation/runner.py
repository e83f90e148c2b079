"""The evaluation loop: a prepared model, a stream of corrupted cells, metrics per cell."""
from __future__ import annotations

import logging
import numbers
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import tta.methods
from tta.evaluation.metrics import NUM_BINS, CalibrationCounts, ConfusionCounts
from tta.evaluation.streams import get_stream
from tta.label_free import AccuracyEstimator, observe

__all__ = ["Cell", "LabelFree", "evaluate", "method_hparams", "build_adapter", "check_source_images",
           "SWEEP_KEYS"]

logger = logging.getLogger(__name__)


@dataclass
class Cell:
    """One benchmark cell: a corruption at a severity, with its images.

    Args:
        corruption: corruption name (``"clean"`` for uncorrupted data).
        severity: 1..5 (0 for clean data).
        images: uint8 tensor (N, C, H, W), or a callable returning it (loaded when needed).
    """

    corruption: str
    severity: int
    images: Tensor | Callable[[], Tensor]

    def load(self) -> Tensor:
        images = self.images() if callable(self.images) else self.images
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"cell {self.corruption}/{self.severity}: images must be a uint8 "
                             f"tensor (N, C, H, W), got {getattr(images, 'dtype', type(images))}")
        return images


def _to_float(images: Tensor, device: torch.device) -> Tensor:
    return images.to(device, non_blocking=True).float().div_(255.0)


class _Batches:
    """Re-iterable float batches of the first ``limit`` images of a segment, in stream order
    (exact recalibration passes over them once per layer)."""

    def __init__(self, stacked: Tensor, order: Tensor, size: int, limit: int | None,
                 device: torch.device) -> None:
        self.stacked, self.order, self.size, self.device = stacked, order, size, device
        self.stop = len(order) if limit is None else min(limit, len(order))

    def __len__(self) -> int:
        return -(-self.stop // self.size)

    def __iter__(self) -> Iterator[Tensor]:
        for begin in range(0, self.stop, self.size):
            part = self.order[begin:min(begin + self.size, self.stop)]
            yield _to_float(self.stacked[part[:, 0], part[:, 1]], self.device)


@dataclass
class LabelFree:
    """Label-free accuracy estimates per cell inside :func:`evaluate` (docs/label_free.md).

    For every test batch ``x``, the *unadapted* ``model`` gives the predictions with source and
    with batch statistics (:func:`tta.label_free.observe`: two forward passes, nothing
    changed, no label read), and ``estimator`` scores, per sample, the probability that the
    adapted model's prediction (the loop's logits) is right, with its fitted regression
    ``config``, and that the source model's is (regression ``"source"``).

    Args:
        estimator: fitted on labelled source data (:func:`tta.fit_accuracy_estimator`), at
            the evaluated batch size.
        model: the model before adaptation (not the adapter's, whose statistics or weights
            may have moved), on the evaluation device; it is not changed.
        config: the regression that scores the adapted predictions: ``"source"`` for an
            unadapted model, ``"batch"`` (default) for every adapting method (fitted on
            batch-statistics predictions, the nearest fitted configuration).
    """

    estimator: AccuracyEstimator
    model: nn.Module
    config: str = "batch"

    def correctness(self, x: Tensor, logits: Tensor) -> Tensor:
        """(B, 2) float64: estimated probability that the adapted / the source prediction of
        each sample of ``x`` (B, C, H, W) is right; ``logits`` (B, K) are the adapted ones."""
        obs = observe(self.model, [x], batch_pass=True, what="label-free estimate")
        source, batch = obs.source_logits[0], obs.batch_logits[0]
        adapted = self.estimator.sample_correctness(logits.float().cpu(), source, batch, self.config)
        return torch.stack([adapted, self.estimator.sample_correctness(source, source, batch, "source")], 1)


def _chosen(priors: list[float]) -> dict[str, Any]:
    """A cell's record of the per-batch prior choices: their lower median (a candidate) and
    histogram (``"inf"``: source statistics)."""
    if not priors:
        return {"chosen_prior": None, "chosen_prior_histogram": {}}
    return {"chosen_prior": statistics.median_low(priors),
            "chosen_prior_histogram": {f"{n:g}": k for n, k in sorted(Counter(priors).items())}}


# adapt.* keys that every method accepts from the config and drops when it does not have them,
# so that one sweep can vary e.g. adapt.prior over several methods (adapt=source,batch,blend)
SWEEP_KEYS = ("prior",)


def method_hparams(method: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The config's ``adapt.*`` values as :func:`tta.adapt` hyper-parameters of ``method``.

    Keys of :data:`SWEEP_KEYS` that the method does not take are dropped.

    Raises:
        ValueError: unknown method, or a key the method does not take (the message lists the
            valid ones).
    """
    valid = tta.methods.get_method(method).defaults()
    params = {k: v for k, v in dict(params or {}).items() if k in valid or k not in SWEEP_KEYS}
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for adapt method {method!r}; valid "
                         f"parameters are: {', '.join(valid) or 'none'}")
    return params


def check_source_images(method: str, params: Mapping[str, Any], available: int | None) -> int | None:
    """The number of in-distribution images that ``params`` asks ``method`` to take (its
    ``source_images`` hyper-parameter given as an int k in the config, e.g. EATA's
    ``fisher_images``), checked before any work; None when the method takes none or ``params``
    passes the images themselves.

    Raises:
        TypeError: a bool, or another type than an int, a tensor or an iterable of batches.
        ValueError: k outside [1, ``available``] (``available``: the clean images of the
            benchmark; None: not known yet, only k >= 1 is checked); never truncated.
    """
    key = getattr(tta.methods.get_method(method), "source_images", None)
    value = None if key is None else params.get(key)
    if key is None or value is None or isinstance(value, (Tensor, list, tuple)):
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"adapt.{key} must be an int (how many clean images of the benchmark), got "
                        f"{value!r} ({type(value).__name__}) (adapt={method})")
    high = "the number of clean images" if available is None else available
    if value < 1 or (available is not None and value > available):
        raise ValueError(f"adapt.{key} must be an int in [1, {high}], got {value!r} (adapt={method}; "
                         f"a larger value is not truncated: set adapt.{key} or num_examples)")
    return int(value)


def build_adapter(model: nn.Module, method: str, params: Mapping[str, Any] | None, *,
                  source_images: Tensor | None = None, device: str | torch.device = "cpu") -> tta.Adapter:
    """``tta.adapt(model, method, **hparams)`` on ``device`` in eval mode.

    A method that estimates something on in-distribution data (its class attribute
    ``source_images`` names that hyper-parameter, e.g. EATA's ``fisher_images``) may be given
    an int k in the config: the first k of ``source_images`` (uint8 (N, C, H, W), the clean
    images of the benchmark; their labels are never used) are passed as float [0, 1] input;
    k must be in [1, N] (:func:`check_source_images`).
    """
    hparams = method_hparams(method, params)
    key = getattr(tta.methods.get_method(method), "source_images", None)
    count = check_source_images(method, hparams, None if source_images is None else len(source_images))
    if count is not None:
        if source_images is None:
            raise ValueError(f"adapt={method} needs {count} in-distribution images for "
                             f"adapt.{key}, but this benchmark has no clean images (dataset.clean)")
        hparams[key] = _to_float(source_images[:count], torch.device(device))
    model.to(device).eval()
    try:
        return tta.adapt(model, method, **hparams)
    except (ValueError, TypeError) as error:  # in the config's words: adapt.prior, not prior
        message = str(error)
        if message.split(" ", 1)[0] in tta.methods.get_method(method).defaults():
            message = "adapt." + message
        raise type(error)(f"{message} (adapt={method})") from None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    cells: Sequence[Cell],
    targets: Tensor,
    *,
    method: str | tta.Adapter = "source",
    method_params: Mapping[str, Any] | None = None,
    stream: str = "reset",
    stream_params: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    seed: int = 0,
    num_bins: int = NUM_BINS,
    num_classes: int | None = None,
    source_images: Tensor | None = None,
    label_free: LabelFree | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    r"""Evaluates ``model`` adapted by ``method`` on the ``cells`` in the order of ``stream``.

    The model is wrapped once by :func:`tta.adapt` (in place, so pass a copy if you still
    need the original) and reset (``adapter.reset()``) whenever the stream says so. At the start
    of every segment a method with an offline phase (``fit``, e.g. ``recalibrate``) fits on the
    segment's first ``hparams["num_images"]`` images in stream order, in batches of
    ``hparams["batch_size"]``. Gradients are enabled only for methods that need them.

    Args:
        model: a classifier taking float images in [0, 1].
        cells: the benchmark cells; all hold the same images, corrupted differently, so
            ``targets`` apply to every cell.
        targets: labels, shape (N,).
        method: a name from :func:`tta.list_methods`, or an adapter already built around
            ``model`` (then ``method_params`` is ignored).
        method_params: its hyper-parameters (see the method's docstring).
        stream: a name from :func:`tta.evaluation.list_streams`.
        stream_params: its parameters.
        batch_size: test batch size (part of the protocol: batch statistics depend on it).
        device: where the model runs.
        seed: seeds the stream order (mixed, dirichlet, imbalance, mixture).
        num_bins: confidence bins of the ECE.
        num_classes: the number of classes C; None: the model's output width.
        source_images: clean uint8 images for methods that take in-distribution data.
        label_free: also estimate every cell's accuracy without labels (:class:`LabelFree`).
        progress: show a tqdm progress bar.

    Returns:
        ``{"cells": [{"corruption", "severity", "num_examples", "accuracy", "error", "ece",
        "confusion"}], "num_images": int, "seconds": float, "hparams": dict}`` with accuracies
        as fractions and ``confusion`` a C x C list of ints (row: true class, column: predicted
        class); ``hparams``: the method's hyper-parameters as used. An adapter that chooses a
        hyper-parameter per batch (``chosen_priors`` not None: ``blend`` with
        ``prior="auto"``) adds to each cell ``chosen_prior`` (the lower median of the N chosen
        for the batches holding its images, ``math.inf`` = source statistics) and
        ``chosen_prior_histogram`` (``{"16": batches, "inf": batches}``). With ``label_free``
        each cell has ``estimated_accuracy`` (the adapted model) and
        ``source_estimated_accuracy`` (the unadapted model), fractions, and the result
        ``label_free_seconds``, the time of those passes (not in ``seconds``).

    Raises:
        ValueError: the model's output width is not ``num_classes``, or a label does not fit it.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    order_of = get_stream(stream)
    s_params = order_of.params(stream_params)
    device = torch.device(device)
    targets = torch.as_tensor(targets, dtype=torch.long)

    if isinstance(method, tta.Adapter):
        adapter = method
    else:
        adapter = build_adapter(model, method, method_params, source_images=source_images, device=device)
    fits = type(adapter).fit is not tta.Adapter.fit
    chooses = getattr(adapter, "chosen_priors", None) is not None
    chosen: list[list[float]] = [[] for _ in cells]
    estimated = torch.zeros(len(cells), 2, dtype=torch.float64)
    label_free_seconds = 0.0
    counts = CalibrationCounts(len(cells), num_bins)
    confusion = None  # sized by the first logits
    keys = [(cell.corruption, int(cell.severity)) for cell in cells]
    total = len(cells) * len(targets)
    bar = tqdm(total=total, desc=f"{adapter.name}/{stream}", unit="img", disable=not progress,
               leave=False, dynamic_ncols=True)
    start = time.perf_counter()
    for segment in order_of.segments(keys, targets, seed, **s_params):
        if segment.reset:
            adapter.reset()
        loaded = [cells[i].load() for i in segment.cells]
        for i, images in zip(segment.cells, loaded):
            if len(images) != len(targets):
                raise ValueError(f"cell {keys[i]} has {len(images)} images but there are "
                                 f"{len(targets)} targets")
        stacked = loaded[0].unsqueeze(0) if len(loaded) == 1 else torch.stack(loaded)
        order = segment.order
        cell_index = torch.as_tensor(segment.cells, dtype=torch.long)

        def batches(size: int, limit: int | None) -> _Batches:
            return _Batches(stacked, order, size, limit, device)

        if fits:  # offline phase on the segment's first images, unlabelled
            adapter.fit(batches(adapter.hparams.get("batch_size", batch_size), adapter.hparams.get("num_images")))
        for begin in range(0, len(order), batch_size):
            part = order[begin:begin + batch_size]
            x = _to_float(stacked[part[:, 0], part[:, 1]], device)
            with torch.set_grad_enabled(adapter.needs_grad):
                logits = adapter(x).detach()
            if confusion is None:
                confusion = _confusion(len(cells), num_classes, logits.shape[-1])
            groups = cell_index[part[:, 0]]
            if chooses:
                prior = adapter.chosen_priors[-1]
                for group in groups.unique().tolist():
                    chosen[group].append(prior)
            if label_free is not None:  # before the labels are touched
                label_free_start = time.perf_counter()
                estimated.index_add_(0, groups, label_free.correctness(x, logits))
                label_free_seconds += time.perf_counter() - label_free_start
            labels = targets[part[:, 1]]
            predictions = counts.update(logits, labels.to(logits.device), groups)
            confusion.update(predictions, labels, groups)
            bar.update(len(part))
        del loaded, stacked
    seconds = time.perf_counter() - start - label_free_seconds
    bar.close()
    accuracy = counts.accuracy()
    ece = counts.ece()
    n = counts.num_examples()
    if confusion is None:  # no images
        confusion = _confusion(len(cells), num_classes, num_classes or 0)
    results = [
        {"corruption": c, "severity": s, "num_examples": int(n[i]),
         "accuracy": float(accuracy[i]), "error": 1.0 - float(accuracy[i]), "ece": float(ece[i]),
         "confusion": confusion.counts[i].tolist()}
        for i, (c, s) in enumerate(keys)
    ]
    for i, cell in enumerate(results):
        if chooses:
            cell.update(_chosen(chosen[i]))
        if label_free is not None:
            size = max(int(n[i]), 1)
            cell["estimated_accuracy"] = float(estimated[i, 0]) / size
            cell["source_estimated_accuracy"] = float(estimated[i, 1]) / size
    out = {"cells": results, "num_images": total, "seconds": seconds, "hparams": dict(adapter.hparams)}
    if label_free is not None:
        out["label_free_seconds"] = label_free_seconds
    return out


def _confusion(num_groups: int, num_classes: int | None, width: int) -> ConfusionCounts:
    if num_classes is not None and width != num_classes:
        raise ValueError(f"the model outputs {width} class scores but num_classes={num_classes}")
    return ConfusionCounts(num_groups, width)
