"""Classification metrics of the benchmark: accuracy, error, calibration (ECE), confusion
matrices and mCE (against a baseline run, or against the published AlexNet errors of
Hendrycks & Dietterich 2019 with relative mCE).

All accuracies and errors are fractions in [0, 1]. The expected calibration error uses
``NUM_BINS`` equal-width confidence bins over (0, 1] (Guo et al., 2017; 15 bins as in most
test-time adaptation papers).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor

__all__ = ["NUM_BINS", "CalibrationCounts", "ConfusionCounts", "expected_calibration_error",
           "baseline_errors", "corruption_errors", "mean_corruption_error", "ALEXNET_ERRORS",
           "ALEXNET_CLEAN_ERROR", "ALEXNET_DATASETS", "alexnet_baseline", "alexnet_baseline_cells",
           "relative_corruption_errors", "relative_mean_corruption_error"]

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
    return _summed_ratios(cells, baseline_cells, 0.0, 0.0)


def _summed_ratios(cells: Iterable[Mapping], baseline_cells: Iterable[Mapping], clean: float,
                   baseline_clean: float) -> dict[str, float]:
    """Per corruption: sum_s (E_c,s - clean) / sum_s (E^baseline_c,s - baseline_clean)."""
    cells = list(cells)
    base = baseline_errors([(c["corruption"], int(c["severity"])) for c in cells], baseline_cells)
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for cell in cells:
        key = (cell["corruption"], int(cell["severity"]))
        num[key[0]] = num.get(key[0], 0.0) + float(cell["error"]) - clean
        den[key[0]] = den.get(key[0], 0.0) + base[key] - baseline_clean
    bad = [name for name in den if den[name] <= 0]
    if bad:
        raise ValueError(f"the baseline's errors of {', '.join(bad)} are not above "
                         f"{baseline_clean} (its clean error, 0 for CE): the ratio is undefined")
    return {name: num[name] / den[name] for name in num}


def mean_corruption_error(cells: Iterable[Mapping], baseline_cells: Iterable[Mapping]) -> float | None:
    """mCE: the mean of :func:`corruption_errors` over the corruptions of ``cells`` (None if
    there are no cells). Raises ValueError as :func:`corruption_errors`."""
    errors = corruption_errors(cells, baseline_cells)
    return sum(errors.values()) / len(errors) if errors else None


# ---------------------------------------------------------------- AlexNet-normalised mCE

# Top-1 errors of AlexNet (torchvision's ``alexnet-owt-4df8aa71.pth``, the network of Hendrycks &
# Dietterich's ImageNet-C/test.py) on the 50,000 ImageNet-C validation images, per corruption
# at severities 1..5 (fractions). Hendrycks & Dietterich, "Benchmarking Neural Network Robustness
# to Common Corruptions and Perturbations", ICLR 2019: the denominators of CE_c and relative
# CE_c. The per-severity values are those distributed with the ImageNet-C evaluation code (as
# timm's ``imagenetc_alexnet_error_rates_list``); their severity means are the per-corruption
# AlexNet errors of the paper (gaussian_noise 0.886428, ..., jpeg_compression 0.606500).
# RobustBench's ``robustbench/eval.py`` (``corruptions_evaluation``) computes the same
# CE_c = mean_s E_c,s / mean_s E^AlexNet_c,s, but with an AlexNet row it measured itself on its
# 5,000-image subset (``model_info/imagenet/corruptions/unaggregated_results.csv``).
ALEXNET_ERRORS: dict[str, tuple[float, float, float, float, float]] = {
    "gaussian_noise": (0.69528, 0.82542, 0.93554, 0.98138, 0.99452),
    "shot_noise": (0.71224, 0.85108, 0.93574, 0.98182, 0.99146),
    "impulse_noise": (0.78374, 0.89808, 0.94870, 0.98720, 0.99548),
    "defocus_blur": (0.65624, 0.73202, 0.85036, 0.91364, 0.94714),
    "glass_blur": (0.64308, 0.75054, 0.88806, 0.91622, 0.93344),
    "motion_blur": (0.58430, 0.70048, 0.82108, 0.89750, 0.92638),
    "zoom_blur": (0.70008, 0.76992, 0.80784, 0.84198, 0.87198),
    "snow": (0.71726, 0.88392, 0.86468, 0.91870, 0.94952),
    "frost": (0.61390, 0.79734, 0.88790, 0.89942, 0.93430),
    "fog": (0.67474, 0.76050, 0.84378, 0.87260, 0.94500),
    "brightness": (0.45140, 0.48502, 0.54048, 0.62166, 0.72440),
    "contrast": (0.64548, 0.76150, 0.88874, 0.97760, 0.99270),
    "elastic_transform": (0.52596, 0.70116, 0.55686, 0.64076, 0.80554),
    "pixelate": (0.52218, 0.54620, 0.73728, 0.87092, 0.91262),
    "jpeg_compression": (0.51002, 0.54718, 0.57294, 0.65458, 0.74778),
}
# AlexNet's clean ImageNet validation error (torchvision: acc@1 56.522%; the paper's 43.5%).
ALEXNET_CLEAN_ERROR = 1 - 0.56522
# the datasets whose cells the AlexNet table describes
ALEXNET_DATASETS = ("imagenet_c",)


def alexnet_baseline_cells(dataset: str, keys: Iterable[tuple[str, int]]) -> list[dict]:
    """The AlexNet errors of the ``(corruption, severity)`` pairs ``keys`` as the ``cells`` of
    a baseline results.json (``{"corruption", "severity", "error"}``), so that
    :func:`corruption_errors` / :func:`mean_corruption_error` give the published,
    AlexNet-normalised CE and mCE without a baseline run (:data:`ALEXNET_ERRORS`).

    Raises:
        ValueError: ``dataset`` is not one of :data:`ALEXNET_DATASETS` (the table holds
            ImageNet-C errors only), or a key is not one of the 15 corruptions at severity
            1-5 (all such keys are named).
    """
    if dataset not in ALEXNET_DATASETS:
        raise ValueError(f"baseline 'alexnet' holds AlexNet's ImageNet-C errors; this run is on "
                         f"dataset {dataset!r} (valid: {', '.join(ALEXNET_DATASETS)}); use a "
                         f"baseline results.json on {dataset!r} instead")
    keys = list(keys)
    bad = [f"{c}/{s}" for c, s in keys if c not in ALEXNET_ERRORS or s not in range(1, 6)]
    if bad:
        raise ValueError(f"AlexNet has no published ImageNet-C error for {', '.join(bad)}; valid: "
                         f"severities 1-5 of {', '.join(ALEXNET_ERRORS)}")
    return [{"corruption": c, "severity": s, "error": ALEXNET_ERRORS[c][s - 1]} for c, s in keys]


def alexnet_baseline(dataset: str, keys: Iterable[tuple[str, int]]) -> dict:
    """The published AlexNet baseline in the layout of a baseline results.json: ``{"dataset",
    "cells"`` (:func:`alexnet_baseline_cells`), ``"clean_error"`` (:data:`ALEXNET_CLEAN_ERROR`),
    ``"reference"}``; what ``baseline=alexnet`` of scripts/evaluate.py stands for. Raises as
    :func:`alexnet_baseline_cells`."""
    return {"dataset": dataset, "cells": alexnet_baseline_cells(dataset, keys),
            "clean_error": ALEXNET_CLEAN_ERROR,
            "reference": "AlexNet, Hendrycks & Dietterich (ICLR 2019), ImageNet-C"}


def relative_corruption_errors(cells: Iterable[Mapping], clean_error: float,
                               baseline_cells: Iterable[Mapping],
                               baseline_clean_error: float) -> dict[str, float]:
    """Relative corruption error (Hendrycks & Dietterich, 2019, sec. 3):
    RelCE_c = sum_s (E_c,s - E_clean) / sum_s (E^baseline_c,s - E^baseline_clean), over the
    severities s of ``cells`` (fractions; 1 = degrades like the baseline).

    Args:
        cells, baseline_cells: ``cells`` lists of results.json (see :func:`corruption_errors`);
            :func:`alexnet_baseline_cells` for the published AlexNet baseline.
        clean_error: this model's error on the clean images, a fraction.
        baseline_clean_error: the baseline's clean error (:data:`ALEXNET_CLEAN_ERROR`).

    Raises:
        ValueError: the baseline lacks a cell (see :func:`baseline_errors`), or its summed
            degradation of a corruption is <= 0 (relative CE undefined; named).
    """
    return _summed_ratios(cells, baseline_cells, float(clean_error), float(baseline_clean_error))


def relative_mean_corruption_error(cells: Iterable[Mapping], clean_error: float,
                                   baseline_cells: Iterable[Mapping],
                                   baseline_clean_error: float) -> float | None:
    """Relative mCE: the mean of :func:`relative_corruption_errors` over the corruptions of
    ``cells`` (None if there are none). Raises as :func:`relative_corruption_errors`."""
    errors = relative_corruption_errors(cells, clean_error, baseline_cells, baseline_clean_error)
    return sum(errors.values()) / len(errors) if errors else None
