"""Label-free accuracy estimation, calibrated on labelled source data only.

Two methods, both fitted by :func:`fit_accuracy_estimator` on labelled *source* (validation)
data and synthetic shifts that tta makes from it with its own corruption suite; neither
ever reads a target label.

``"agreement"`` (default): a per-sample model of "the prediction is correct". For every
sample, from the predictions of the model as configured (``p``), of the model with source
statistics (``p_s``) and with the statistics of the current batch (``p_b``), seven features::

    max p, max p_s, max p_b, [argmax p_s == argmax p_b], p_b[argmax p], p_s[argmax p], H(p)

(H: entropy in nats) and a logistic regression per configuration ``P(correct | features)``
fitted on the labelled source samples of every synthetic shift. The accuracy estimate of a set
of samples (a batch, a cell) is the mean of ``P(correct)`` over them. The signal is the
disagreement between source- and batch-normalised predictions: under a covariate shift the
batch-normalised model is far more accurate, so where the two disagree the source model is
mostly wrong (cf. agreement-based estimates: Jiang et al. 2022, ICLR, "Assessing
generalization of SGD via disagreement"; Baek et al. 2022, NeurIPS, "Agreement-on-the-line";
Chen et al. 2021, NeurIPS, "Detecting errors and estimating accuracy on unlabeled data with
self-training ensembles"), and the confidences weigh it per sample.

``"atc"``: Average Thresholded Confidence (Garg et al. 2022, ICLR, "Leveraging unlabeled data
to predict out-of-distribution performance", ATC-NE): the score is the negative entropy of
the prediction; the threshold ``t`` is set on the clean labelled data so that the fraction of
samples scoring above ``t`` equals the clean accuracy; the estimate is the fraction of target
samples scoring above ``t``. Kept as the baseline.

The predictions come from two forward passes per batch (source and batch statistics; a third
for a model configured otherwise, e.g. ``blend`` with prior N), the same passes that give the
shift diagnosis (:func:`tta.diagnose`), so :meth:`AccuracyEstimator.estimate` returns both.
"""
from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tta._atomic import atomic_file
from tta.label_free._observe import Observation, configuration, observe
from tta.label_free.diagnosis import Diagnosis, diagnosis_from

__all__ = ["METHODS", "FEATURES", "AccuracyEstimator", "AccuracyEstimate", "fit_accuracy_estimator", "features"]

logger = logging.getLogger(__name__)

METHODS = ("agreement", "atc")
FEATURES = ("confidence", "source_confidence", "batch_confidence", "source_batch_agreement",
            "batch_probability", "source_probability", "entropy")
_FORMAT = 1


def _entropy(p: Tensor) -> Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(1)


def features(logits: Tensor, source_logits: Tensor, batch_logits: Tensor) -> Tensor:
    """Per-sample features (n, 7) float64 of :data:`FEATURES` (module docstring) from the
    configured model's, the source-statistics and the batch-statistics logits, each (n, K)."""
    if not (logits.shape == source_logits.shape == batch_logits.shape) or logits.dim() != 2:
        raise ValueError(f"logits, source_logits and batch_logits must have the same shape (n, K), got "
                         f"{tuple(logits.shape)}, {tuple(source_logits.shape)}, {tuple(batch_logits.shape)}")
    p, ps, pb = (x.double().softmax(1) for x in (logits, source_logits, batch_logits))
    pred = p.argmax(1, keepdim=True)
    return torch.stack([p.max(1).values, ps.max(1).values, pb.max(1).values,
                        (ps.argmax(1) == pb.argmax(1)).double(),
                        pb.gather(1, pred).squeeze(1), ps.gather(1, pred).squeeze(1), _entropy(p)], 1)


@dataclass
class AccuracyEstimate:
    """Label-free accuracy estimates from one observation of the data.

    Attributes:
        accuracy: configuration -> estimated accuracy (fraction in [0, 1]) over all samples;
            always ``"source"`` and ``"batch"`` (before and after batch-statistics adaptation),
            plus the model's own configuration.
        batch_accuracy: configuration -> list with the estimate of each batch alone.
        config: the model's configuration (:func:`tta.label_free.configuration`); the
            estimate of the model as given is ``accuracy[config]``.
        diagnosis: the shift diagnosis from the same pass (:class:`tta.label_free.Diagnosis`).
        num_samples: samples seen.
    """

    accuracy: dict[str, float]
    batch_accuracy: dict[str, list[float]]
    config: str
    diagnosis: Diagnosis | None
    num_samples: int

    def __str__(self) -> str:
        lines = [f"estimated accuracy ({self.num_samples} samples, no labels):"]
        for config, value in self.accuracy.items():
            mark = "  <- the model as configured" if config == self.config else ""
            lines.append(f"  {config:<24} {100 * value:6.2f} %{mark}")
        return "\n".join(lines)


@dataclass
class AccuracyEstimator:
    """A fitted label-free accuracy estimator (see :func:`fit_accuracy_estimator`).

    Attributes:
        method: ``"agreement"`` or ``"atc"``.
        models: configuration -> parameters: for ``"agreement"`` ``{"coef": [7 floats],
            "intercept": float}`` of the logistic regression on :data:`FEATURES`; for
            ``"atc"`` ``{"threshold": float}`` on the negative entropy.
        info: how it was fitted (shifts, samples, clean accuracy per configuration).
    """

    method: str
    models: dict[str, dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ per-sample core
    def _model_for(self, config: str) -> dict[str, Any]:
        if config in self.models:
            return self.models[config]
        if config.startswith("blend(prior=") and "blend" in self.models:
            return self.models["blend"]
        raise ValueError(f"this estimator was fitted for the configurations {sorted(self.models)}, not {config!r}; "
                         "refit with fit_accuracy_estimator(..., priors=...) or configure the model as one of them")

    def sample_correctness(self, logits: Tensor, source_logits: Tensor, batch_logits: Tensor,
                           config: str = "source") -> Tensor:
        """Per-sample estimated probability (n,) float64 that ``argmax logits`` is correct (for
        ``"atc"``: 1 where the score is above the threshold, else 0). ``config`` names which
        fitted model to use: the configuration that produced ``logits``. All logits (n, K):
        the configured model's, the source-statistics and the batch-statistics ones (of the
        same batch: ``batch_logits`` depend on the batch size)."""
        params = self._model_for(config)
        if self.method == "atc":
            return (-_entropy(logits.double().softmax(1)) > params["threshold"]).double()
        x = features(logits, source_logits, batch_logits)
        z = x @ torch.tensor(params["coef"], dtype=torch.float64) + params["intercept"]
        return torch.sigmoid(z)

    # ------------------------------------------------------------------ estimates
    def estimate_observation(self, obs: Observation, diagnose: bool = True) -> AccuracyEstimate:
        """Estimates from an :class:`Observation` made with ``batch_pass=True`` (no forward pass)."""
        if not obs.batch_logits:
            raise ValueError("the observation has no batch-statistics pass; observe(..., batch_pass=True)")
        runs = {"source": obs.source_logits, "batch": obs.batch_logits}
        if obs.logits and obs.config not in runs:
            runs[obs.config] = obs.logits
        accuracy, per_batch = {}, {}
        for config, logits in runs.items():
            try:
                self._model_for(config)
            except ValueError:
                if config == obs.config:
                    raise
                continue
            values = [self.sample_correctness(l, s, b, config)
                      for l, s, b in zip(logits, obs.source_logits, obs.batch_logits)]
            per_batch[config] = [float(v.mean()) for v in values]
            accuracy[config] = float(torch.cat(values).mean())
        diagnosis = diagnosis_from(obs) if diagnose else None
        return AccuracyEstimate(accuracy, per_batch, obs.config, diagnosis, obs.num_samples)

    def estimate(self, model: nn.Module, batches: Iterable[Any], *, diagnose: bool = True,
                 max_batches: int | None = None, progress: bool = False) -> AccuracyEstimate:
        """Estimate the accuracy of ``model`` before (source statistics) and after (batch
        statistics) adaptation and as configured, and diagnose the shift, from two forward
        passes per batch (three for a model configured as neither, e.g. ``blend``).

        Args:
            model: the model, plain or converted (``source``, ``batch`` or ``blend``
                configuration; ``ema`` cannot be evaluated batch by batch: use
                :meth:`sample_correctness` on its logits). Nothing in it changes.
            batches: unlabelled input tensors (N, C, H, W) or ``(input, ...)`` tuples (the
                rest is never read), batched as the model will see them (batch statistics
                depend on the batch size).

        Raises:
            ValueError: the model's configuration was not fitted; see :func:`tta.label_free.observe`.
        """
        self._model_for(configuration(model))  # refuse before any forward pass
        obs = observe(model, batches, batch_pass=True, configured_pass=True, max_batches=max_batches,
                      progress=progress, what="estimate accuracy")
        return self.estimate_observation(obs, diagnose=diagnose)

    def __call__(self, model: nn.Module, batches: Iterable[Any], **kwargs: Any) -> float:
        """The estimated accuracy (fraction) of ``model`` as configured on ``batches`` (no labels read)."""
        result = self.estimate(model, batches, diagnose=False, **kwargs)
        return result.accuracy[result.config]

    @classmethod
    def fit_samples(cls, samples: dict[str, tuple[Tensor, Tensor]], method: str = "agreement",
                    info: dict[str, Any] | None = None) -> AccuracyEstimator:
        """Fit from labelled per-sample rows: configuration -> (features (n, 7) of :data:`FEATURES`
        from :func:`features`, correct (n,) 0/1 of each sample's prediction). For ``"atc"`` pass
        the clean samples only. This is what :func:`fit_accuracy_estimator` ends with; use it to
        refit on a subset of shifts without new forward passes (e.g. leave-one-corruption-out).

        Raises:
            ValueError: bad ``method``; no samples; all predictions right (or all wrong).
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        models: dict[str, dict[str, Any]] = {}
        for config, (x, correct) in samples.items():
            x, y = np.asarray(x, dtype=np.float64), np.asarray(correct, dtype=np.float64)
            if x.ndim != 2 or x.shape[1] != len(FEATURES) or len(y) != len(x) or not len(y):
                raise ValueError(f"samples[{config!r}] must be (features (n, {len(FEATURES)}), correct (n,)) with n > 0, "
                                 f"got shapes {x.shape} and {y.shape}")
            if method == "atc":
                models[config] = {"threshold": _atc_threshold(-x[:, FEATURES.index("entropy")], float(y.mean()))}
            else:
                models[config] = _fit_logistic(x, y)
        return cls(method, models, dict(info or {}))

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, "method": self.method, "models": self.models, "info": self.info}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AccuracyEstimator:
        if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get("method") not in METHODS:
            raise ValueError(f"not a saved AccuracyEstimator (format {_FORMAT}, method in {METHODS}): {str(data)[:200]}")
        return cls(data["method"], data["models"], data.get("info", {}))

    def save(self, path: str | os.PathLike) -> None:
        """Write as JSON (atomically): plain numbers, no pickle."""
        with atomic_file(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> AccuracyEstimator:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def _check_labelled(batch: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2 or not isinstance(batch[0], Tensor) \
            or not isinstance(batch[1], Tensor):
        raise TypeError("fit_accuracy_estimator: labelled_batches must yield (input, target) tensor pairs, "
                        f"got {type(batch).__name__}")
    return batch[0], batch[1]


def _fit_logistic(x: np.ndarray, correct: np.ndarray) -> dict[str, Any]:
    from tta._extras import require_extra

    with require_extra("sklearn", "the label-free accuracy estimator"):
        from sklearn.linear_model import LogisticRegression

    if correct.min() == correct.max():
        raise ValueError("fit_accuracy_estimator: every prediction is " + ("right" if correct[0] else "wrong") +
                         " in the fitting data; add harder shifts (severities) or more data")
    fit = LogisticRegression(C=1.0, max_iter=5000).fit(x, correct)
    return {"coef": fit.coef_[0].tolist(), "intercept": float(fit.intercept_[0])}


def _atc_threshold(scores: np.ndarray, accuracy: float) -> float:
    """The threshold t with mean(scores > t) == accuracy (Garg et al. 2022, eq. of ATC)."""
    return float(np.quantile(scores, 1.0 - accuracy, method="lower")) if accuracy < 1.0 else float(scores.min()) - 1.0


def fit_accuracy_estimator(
    model: nn.Module,
    labelled_batches: Iterable[Any],
    *,
    method: str = "agreement",
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    priors: Sequence[float] = (),
    seed: int = 0,
    max_batches: int | None = None,
    progress: bool = False,
) -> AccuracyEstimator:
    """Fit a label-free accuracy estimator on labelled source (validation) data.

    The labelled batches are read once and kept in memory; they are used clean and, for
    ``"agreement"``, under every synthetic shift ``tta.corrupt(x, corruption, severity,
    seed=seed)`` (images in [0, 1]). For each shift, the source, batch and (for ``priors``)
    ``blend`` predictions are computed as :meth:`AccuracyEstimator.estimate` computes them,
    with the same batches (so fit with the batch size you will estimate at). Only these
    labels are read; a fitted estimator never sees target labels.

    Args:
        model: the model whose accuracy will be estimated (plain or converted; not changed).
        labelled_batches: ``(input, target)`` batches of clean source data: held-out images
            the model was not trained on (its training images would look easier than new
            ones), e.g. a validation split.
        method: ``"agreement"`` (default) or ``"atc"`` (fitted on the clean data only).
        corruptions: synthetic shifts for ``"agreement"``: names from ``tta.CORRUPTIONS +
            tta.EXTRA_CORRUPTIONS`` (default: all 19); ``()`` fits on clean data only.
        severities: severities of each corruption (default 1 to 5).
        priors: also fit ``blend`` with these prior strengths (pooled into one model used
            for every ``blend(prior=...)`` configuration).
        seed: corruption seed.
        max_batches: use at most this many labelled batches.
        progress: tqdm progress bar over the shifts.

    Returns:
        an :class:`AccuracyEstimator` with models for ``"source"``, ``"batch"`` (and ``"blend"``).

    Raises:
        TypeError: batches that are not ``(input, target)`` tensor pairs.
        ValueError: bad ``method``/corruption/severity/prior; no data; inputs outside [0, 1]
            when corruptions are asked for.
    """
    import tta

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    valid = tuple(tta.CORRUPTIONS) + tuple(tta.EXTRA_CORRUPTIONS)
    corruptions = valid if corruptions is None else tuple(corruptions)
    for name in corruptions:
        if name not in valid:
            raise ValueError(f"unknown corruption {name!r}; valid: {', '.join(valid)}")
    for severity in severities:
        if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
            raise ValueError(f"severities must be ints in 1..5, got {severity!r}")
    priors = tuple(float(p) for p in priors)
    if any(not (math.isfinite(p) and p >= 0) for p in priors):
        raise ValueError(f"priors must be finite numbers >= 0, got {priors!r}")
    if method == "atc":
        corruptions = ()
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"fit_accuracy_estimator: max_batches must be a positive int or None, got {max_batches!r}")
    inputs, targets = [], []
    for batch in itertools.islice(labelled_batches, max_batches):
        x, y = _check_labelled(batch)
        if x.numel():
            inputs.append(x)
            targets.append(y.reshape(-1).cpu())
    if not inputs:
        raise ValueError("fit_accuracy_estimator: labelled_batches yielded no (non-empty) batch")
    if corruptions:
        low, high = min(float(x.min()) for x in inputs), max(float(x.max()) for x in inputs)
        if low < 0.0 or high > 1.0:
            raise ValueError(f"fit_accuracy_estimator: synthetic shifts need images in [0, 1] (got values in "
                             f"[{low:g}, {high:g}]); pass corruptions=() to fit on the clean data only")
    work = model
    if priors:
        work = tta.convert(copy.deepcopy(model), stats="source")
    shifts = [("clean", 0)] + [(c, s) for c in corruptions for s in severities]
    bar = shifts
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(shifts, desc="fit_accuracy_estimator")
    target = torch.cat(targets)
    configs = ["source", "batch"] + (["blend"] if priors else [])
    x_rows: dict[str, list[Tensor]] = {c: [] for c in configs}
    correct: dict[str, list[Tensor]] = {c: [] for c in configs}
    clean_accuracy: dict[str, float] = {}
    for corruption, severity in bar:
        if corruption == "clean":
            shifted = inputs
        else:
            offsets = np.cumsum([0] + [len(x) for x in inputs])
            shifted = [tta.corrupt(x, corruption, severity, seed=seed, index_offset=int(o)) for x, o in zip(inputs, offsets)]
        obs = observe(work, shifted, batch_pass=True, what="fit_accuracy_estimator")
        runs = {"source": obs.source_logits, "batch": obs.batch_logits}
        for config, logits in runs.items():
            x_rows[config].append(torch.cat([features(l, s, b) for l, s, b in
                                             zip(logits, obs.source_logits, obs.batch_logits)]))
            correct[config].append((torch.cat(logits).argmax(1).cpu() == target).double())
        for prior in priors:
            blend = _blend_logits(work, shifted, prior)
            x_rows["blend"].append(torch.cat([features(l, s, b) for l, s, b in
                                              zip(blend, obs.source_logits, obs.batch_logits)]))
            correct["blend"].append((torch.cat(blend).argmax(1).cpu() == target).double())
        if corruption == "clean":
            clean_accuracy = {c: float(v[0].mean()) for c, v in correct.items()}
    samples = {c: (torch.cat(x_rows[c]), torch.cat(correct[c])) for c in configs}
    info = {"num_samples": int(len(target)), "shifts": len(shifts), "corruptions": list(corruptions),
            "severities": list(severities), "priors": list(priors), "seed": seed,
            "clean_accuracy": clean_accuracy, "batch_size": int(len(inputs[0]))}
    logger.info("fit_accuracy_estimator(%s): %d samples x %d shifts", method, len(target), len(shifts))
    return AccuracyEstimator.fit_samples(samples, method, info)


@torch.no_grad()
def _blend_logits(model: nn.Module, batches: Sequence[Tensor], prior: float) -> list[Tensor]:
    """Logits of converted ``model`` with ``stats="blend", prior=prior`` in eval mode (restored)."""
    import tta

    training = {m: m.training for m in model.modules()}
    device = next(model.parameters()).device
    model.eval()
    try:
        with tta.use_stats(model, "blend", prior=prior):
            return [model(x.to(device)).float().cpu() for x in batches]
    finally:
        for m, flag in training.items():
            m.training = flag
