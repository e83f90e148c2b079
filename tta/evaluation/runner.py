"""The evaluation loop: a prepared model, a stream of corrupted cells, metrics per cell."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tta.evaluation.methods import get_method
from tta.evaluation.metrics import NUM_BINS, CalibrationCounts, ConfusionCounts
from tta.evaluation.streams import get_stream

__all__ = ["Cell", "evaluate"]

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


@torch.no_grad()
def evaluate(
    model: nn.Module,
    cells: Sequence[Cell],
    targets: Tensor,
    *,
    method: str = "source",
    method_params: Mapping[str, Any] | None = None,
    stream: str = "reset",
    stream_params: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    seed: int = 0,
    num_bins: int = NUM_BINS,
    num_classes: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    r"""Evaluates ``model`` adapted by ``method`` on the ``cells`` in the order of ``stream``.

    The model is prepared once (:func:`tta.convert` in place, so pass a copy if you still need
    the original) and reset to that prepared state whenever the stream says so.

    Args:
        model: a classifier taking float images in [0, 1].
        cells: the benchmark cells; all hold the same images, corrupted differently, so
            ``targets`` apply to every cell.
        targets: labels, shape (N,).
        method: a name from :func:`tta.evaluation.list_methods`.
        method_params: its parameters (see the method's ``defaults``).
        stream: a name from :func:`tta.evaluation.list_streams`.
        stream_params: its parameters.
        batch_size: test batch size (part of the protocol: batch statistics depend on it).
        device: where the model runs.
        seed: seeds the stream order (mixed, dirichlet).
        num_bins: confidence bins of the ECE.
        num_classes: the number of classes C; None: the model's output width.
        progress: show a tqdm progress bar.

    Returns:
        ``{"cells": [{"corruption", "severity", "num_examples", "accuracy", "error", "ece",
        "confusion"}], "num_images": int, "seconds": float}`` with accuracies as fractions and
        ``confusion`` a C x C list of ints (row: true class, column: predicted class).

    Raises:
        ValueError: the model's output width is not ``num_classes``, or a label does not fit it.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    adapt = get_method(method)
    params = adapt.params(method_params)
    order_of = get_stream(stream)
    s_params = order_of.params(stream_params)
    device = torch.device(device)
    targets = torch.as_tensor(targets, dtype=torch.long)

    model.to(device).eval()
    adapt.prepare(model, params)
    model.eval()
    snapshot = adapt.snapshot(model)
    counts = CalibrationCounts(len(cells), num_bins)
    confusion = None  # sized by the first logits
    keys = [(cell.corruption, int(cell.severity)) for cell in cells]
    total = len(cells) * len(targets)
    bar = tqdm(total=total, desc=f"{method}/{stream}", unit="img", disable=not progress,
               leave=False, dynamic_ncols=True)
    start = time.perf_counter()
    for segment in order_of.segments(keys, targets, seed, **s_params):
        if segment.reset:
            adapt.reset(model, snapshot)
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

        if adapt.adapt is not None:
            adapt.adapt(model, batches, params)
            model.eval()
        for begin in range(0, len(order), batch_size):
            part = order[begin:begin + batch_size]
            logits = model(_to_float(stacked[part[:, 0], part[:, 1]], device))
            if confusion is None:
                confusion = _confusion(len(cells), num_classes, logits.shape[-1])
            labels, groups = targets[part[:, 1]], cell_index[part[:, 0]]
            predictions = counts.update(logits, labels.to(logits.device), groups)
            confusion.update(predictions, labels, groups)
            bar.update(len(part))
        del loaded, stacked
    seconds = time.perf_counter() - start
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
    return {"cells": results, "num_images": total, "seconds": seconds}


def _confusion(num_groups: int, num_classes: int | None, width: int) -> ConfusionCounts:
    if num_classes is not None and width != num_classes:
        raise ValueError(f"the model outputs {width} class scores but num_classes={num_classes}")
    return ConfusionCounts(num_groups, width)
