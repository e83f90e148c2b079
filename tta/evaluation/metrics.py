"""Classification metrics of the benchmark: accuracy, error, calibration (ECE), confusion
matrices and mCE.

All accuracies and errors are fractions in [0, 1]. The expected calibration error uses
``NUM_BINS`` equal-width confidence bins over (0, 1] (Guo et al., 2017; 15 bins as in most
test-time adaptation papers).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor

__all__ = ["NUM_BINS", "CalibrationCounts", "ConfusionCounts", "expected_calibration_error",
           "baseline_errors", "corruption_errors", "mean_corruption_error"]

NUM_BINS = 15


class CalibrationCounts:
    """Accumulates, per group (a benchmark cell) and confidence bin, the number of predictions,
    the sum of their confidences and the number of correct ones; accuracy and ECE follow.

    Args:
        num_groups: number of groups (cells) the predictions are attributed to.
        num_bins: number of equal-width confidence bins.
    """

    def __init__(self, num_groups: int, num_bins: int = NUM_BINS) -> None:
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        self.num_bins = num_bins
        self.count = torch.zeros(num_groups, num_bins, dtype=torch.float64)
        self.confidence = torch.zeros(num_groups, num_bins, dtype=torch.float64)
        self.correct = torch.zeros(num_groups, num_bins, dtype=torch.float64)

    @torch.no_grad()
    def update(self, logits: Tensor, targets: Tensor, groups: Tensor) -> Tensor:
        """Adds a batch: ``logits`` (B, K), ``targets`` (B,), ``groups`` (B,) group indices.
        Returns the predicted classes (B,) (argmax of the softmax), for :class:`ConfusionCounts`."""
        probs = logits.detach().double().softmax(dim=1)
        confidence, prediction = probs.max(dim=1)
        hit = (prediction == targets).double()
        # bin b holds confidences in (b/B, (b+1)/B]
        bins = (confidence * self.num_bins).ceil().long().sub_(1).clamp_(0, self.num_bins - 1)
        flat = groups.long() * self.num_bins + bins
        self.count.view(-1).index_add_(0, flat.cpu(), torch.ones_like(hit).cpu())
        self.confidence.view(-1).index_add_(0, flat.cpu(), confidence.cpu())
        self.correct.view(-1).index_add_(0, flat.cpu(), hit.cpu())
        return prediction

    def num_examples(self) -> Tensor:
        return self.count.sum(dim=1)

    def accuracy(self) -> Tensor:
        """Accuracy per group, shape (num_groups,)."""
        return self.correct.sum(dim=1) / self.num_examples().clamp(min=1)

    def ece(self) -> Tensor:
        """Expected calibration error per group, shape (num_groups,)."""
        n = self.num_examples().clamp(min=1)
        gap = (self.confidence - self.correct).abs()  # = count * |mean conf - accuracy| per bin
        return gap.sum(dim=1) / n


class ConfusionCounts:
    """Confusion matrix per group (a benchmark cell): ``counts[g, t, p]`` is the number of
    examples of group ``g`` with true class ``t`` predicted as class ``p`` (int64).

    Args:
        num_groups: number of groups.
        num_classes: number of classes C (the model's output width).
    """

    def __init__(self, num_groups: int, num_classes: int) -> None:
        self.num_classes = num_classes
        self.counts = torch.zeros(num_groups, num_classes, num_classes, dtype=torch.long)

    @torch.no_grad()
    def update(self, predictions: Tensor, targets: Tensor, groups: Tensor) -> None:
        """Adds a batch: predicted classes (B,), true classes (B,), group indices (B,).

        Raises:
            ValueError: a label outside ``0..num_classes - 1`` (the model and the data disagree
                on the number of classes).
        """
        c = self.num_classes
        targets = targets.cpu().long()
        if len(targets) and (targets.min() < 0 or targets.max() >= c):
            raise ValueError(f"labels {targets.min().item()}..{targets.max().item()} do not fit "
                             f"the model's {c} class scores (valid labels: 0..{c - 1})")
        flat = (groups.cpu().long() * c + targets) * c + predictions.cpu().long()
        self.counts.view(-1).index_add_(0, flat, torch.ones_like(flat))


def expected_calibration_error(logits: Tensor, targets: Tensor, num_bins: int = NUM_BINS) -> float:
    """ECE of one set of predictions (see :class:`CalibrationCounts`)."""
    counts = CalibrationCounts(1, num_bins)
    counts.update(logits, targets, torch.zeros(len(targets), dtype=torch.long))
    return float(counts.ece()[0])


def baseline_errors(keys: Iterable[tuple[str, int]],
                    baseline_cells: Iterable[Mapping]) -> dict[tuple[str, int], float]:
    """The baseline's error of every ``(corruption, severity)`` in ``keys``.

    Raises:
        ValueError: naming the cells of ``keys`` that ``baseline_cells`` lack (an mCE over
            part of the cells is not comparable, so it is refused rather than averaged).
    """
    base = {(c["corruption"], int(c["severity"])): float(c["error"]) for c in baseline_cells}
    keys = list(keys)
    missing = [f"{c}/{s}" for c, s in keys if (c, s) not in base]
    if missing:
        raise ValueError(f"the baseline has no error for {len(missing)} of the {len(keys)} cells "
                         f"of this run: {', '.join(missing)}; mCE needs the baseline's error on "
                         f"every (corruption, severity) of the run")
    return {key: base[key] for key in keys}


def corruption_errors(cells: Iterable[Mapping], baseline_cells: Iterable[Mapping]) -> dict[str, float]:
    """Corruption error CE_c = sum_s E_{c,s} / sum_s E^baseline_{c,s} (Hendrycks & Dietterich,
    2019) over the severities s of ``cells``.

    Both arguments are ``cells`` lists of a results.json (dicts with ``corruption``,
    ``severity`` and ``error``).

    Raises:
        ValueError: the baseline lacks a cell of ``cells`` (see :func:`baseline_errors`), or
            its errors of a corruption are all 0 (CE undefined).
    """
    cells = list(cells)
    base = baseline_errors([(c["corruption"], int(c["severity"])) for c in cells], baseline_cells)
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for cell in cells:
        key = (cell["corruption"], int(cell["severity"]))
        num[key[0]] = num.get(key[0], 0.0) + float(cell["error"])
        den[key[0]] = den.get(key[0], 0.0) + base[key]
    zero = [name for name in den if den[name] <= 0]
    if zero:
        raise ValueError(f"the baseline's errors of {', '.join(zero)} are 0: CE is undefined")
    return {name: num[name] / den[name] for name in num}


def mean_corruption_error(cells: Iterable[Mapping], baseline_cells: Iterable[Mapping]) -> float | None:
    """mCE: the mean of :func:`corruption_errors` over the corruptions of ``cells`` (None if
    there are no cells). Raises ValueError as :func:`corruption_errors`."""
    errors = corruption_errors(cells, baseline_cells)
    return sum(errors.values()) / len(errors) if errors else None
