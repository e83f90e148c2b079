"""How far has the data moved from the training data, and where in the network.

Every BatchNorm layer stores the per-channel mean and variance of its input on the training
data (``running_mean``/``running_var``). One pass of the unlabelled target data through the
unadapted model gives the same statistics on the target. Treating each channel as a Gaussian
(the assumption behind BatchNorm adaptation: Li et al. 2016, AdaBN; Schneider et al. 2020,
NeurIPS, "Improving robustness against common corruptions by covariate shift adaptation"),
we compare them per channel with two closed-form divergences and average over channels:

* **symmetric KL** (Jeffreys divergence) ``J(P, Q) = KL(P||Q) + KL(Q||P)``; for 1-D Gaussians
  ``P = N(m1, v1)``, ``Q = N(m2, v2)``::

      J = (v1/v2 + v2/v1)/2 - 1 + (m1 - m2)^2 (1/v1 + 1/v2)/2

  (the KL divergence of two Gaussians: Kullback 1959, "Information Theory and Statistics";
  Jeffreys 1946, Proc. R. Soc. A 186, for the symmetrised form);
* **2-Wasserstein distance** in the layer's normalised units (the coordinates the layer
  normalises to, ``(x - m_source) / s_source``)::

      W2 = sqrt((m1 - m2)^2 + (s1 - s2)^2) / s_source

  (W2 between Gaussians: Dowson & Landau 1982, J. Multivariate Anal. 12; Olkin & Pukelsheim
  1982, Linear Algebra Appl. 48).

Variances include the layer's ``eps`` (the quantity the layer normalises with), so dead
channels (variance 0) give finite values. Why symmetric KL and the last layer for the score:
see docs/label_free.md (measured Spearman correlations with the accuracy drop).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from tta.label_free._observe import Observation, observe

__all__ = ["DIVERGENCES", "AGGREGATES", "Diagnosis", "diagnose", "symmetric_kl", "wasserstein2", "layer_divergences"]

DIVERGENCES = ("kl", "w2")
AGGREGATES = ("last", "mean", "max")


def symmetric_kl(mean1: Tensor, var1: Tensor, mean2: Tensor, var2: Tensor) -> Tensor:
    """Jeffreys divergence ``KL(P||Q) + KL(Q||P)`` of ``P = N(mean1, var1)``, ``Q = N(mean2, var2)``,
    elementwise (broadcast), in nats; variances must be > 0. Formula: module docstring."""
    return 0.5 * (var1 / var2 + var2 / var1) - 1.0 + 0.5 * (mean1 - mean2).square() * (1.0 / var1 + 1.0 / var2)


def wasserstein2(mean1: Tensor, var1: Tensor, mean2: Tensor, var2: Tensor) -> Tensor:
    """2-Wasserstein distance of ``N(mean1, var1)`` and ``N(mean2, var2)`` divided by the standard
    deviation of the second (the source), elementwise; formula in the module docstring."""
    std1, std2 = var1.sqrt(), var2.sqrt()
    return ((mean1 - mean2).square() + (std1 - std2).square()).sqrt() / std2


_FUNCTIONS = {"kl": symmetric_kl, "w2": wasserstein2}


def _check_choice(name: str, value: Any, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise ValueError(f"{name} must be one of {valid}, got {value!r}")
    return value


def layer_divergences(
    obs: Observation, divergence: str = "kl", moments: dict[str, tuple[Tensor, Tensor]] | None = None
) -> dict[str, float]:
    """Per-layer divergence (mean over channels) of the observed input statistics from the
    layer's reference (running) statistics, in forward order.

    Args:
        obs: an :class:`Observation` (its pooled moments are used unless ``moments`` is given).
        divergence: ``"kl"`` (symmetric KL, nats) or ``"w2"`` (2-Wasserstein in source std units).
        moments: layer name -> (mean, biased var) float64 (C,), e.g. one batch's
            (``obs.batch_moments[i]``).
    """
    function = _FUNCTIONS[_check_choice("divergence", divergence, DIVERGENCES)]
    result = {}
    for name in obs.names:
        if moments is None:
            m = obs.moments[name]
            if float(m.count) < 2:
                continue
            mean, var = m.mean, m.m2 / float(m.count)  # biased: as the layer would normalise
        elif name in moments:
            mean, var = moments[name]
        else:
            continue
        ref_mean, ref_var = obs.reference[name]
        eps = obs.eps[name]
        result[name] = float(function(mean, var + eps, ref_mean, ref_var + eps).mean())
    return result


def _aggregate(layers: dict[str, float], aggregate: str) -> float:
    values = list(layers.values())
    if aggregate == "last":
        return values[-1]
    if aggregate == "max":
        return max(values)
    return sum(values) / len(values)


@dataclass(frozen=True)
class Diagnosis:
    """The result of :func:`diagnose`.

    Attributes:
        score: the shift score (float >= 0): ``aggregate`` of ``layers`` (by default the last
            BatchNorm layer's symmetric KL, in nats); about 0 on source-like data (sampling
            noise and the train/eval gap of the running statistics leave a small positive
            value, 0.005 for the shipped Fashion-MNIST model on 1,000 clean test images).
        layers: layer name -> divergence (mean over channels), in forward order.
        divergence: ``"kl"`` or ``"w2"``; aggregate: ``"last"``, ``"mean"`` or ``"max"``.
        kl, w2: both divergences per layer (``layers`` is one of them).
        num_samples: samples seen.
        batch_scores: the score of each batch alone (its own moments; noisier than ``score``).
    """

    score: float
    layers: dict[str, float]
    divergence: str
    aggregate: str
    kl: dict[str, float]
    w2: dict[str, float]
    num_samples: int
    batch_scores: list[float] = field(default_factory=list)

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` layers that moved most, largest first."""
        return sorted(self.layers.items(), key=lambda item: -item[1])[:k]

    def __str__(self) -> str:
        width = max(len("layer"), *(len(n) for n in self.layers))
        top = {name for name, _ in self.top()}
        lines = [f"shift score {self.score:.4f} ({self.aggregate} layer, "
                 f"{'symmetric KL' if self.divergence == 'kl' else '2-Wasserstein'}; {self.num_samples} samples)",
                 f"{'layer':<{width}}  {'sym. KL':>9}  {'W2':>7}",
                 f"{'-' * width}  {'-' * 9}  {'-' * 7}"]
        for name in self.layers:
            mark = "  <- moved most" if name in top else ""
            lines.append(f"{name:<{width}}  {self.kl.get(name, math.nan):9.4f}  {self.w2.get(name, math.nan):7.4f}{mark}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return {"score": self.score, "divergence": self.divergence, "aggregate": self.aggregate,
                "layers": dict(self.layers), "kl": dict(self.kl), "w2": dict(self.w2),
                "num_samples": self.num_samples, "batch_scores": list(self.batch_scores)}

    def plot(self, ax: Any = None, log: bool = True) -> Any:
        """Bar chart of both divergences per layer in forward order; returns the matplotlib Axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(self.layers)), 3.5))
        names = list(self.layers)
        positions = range(len(names))
        ax.bar([p - 0.2 for p in positions], [self.kl[n] for n in names], width=0.4, label="symmetric KL (nats)")
        ax.bar([p + 0.2 for p in positions], [self.w2[n] for n in names], width=0.4, label="W2 (source std)")
        ax.set_xticks(list(positions))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
        if log:
            ax.set_yscale("log")
        ax.set_ylabel("divergence from source statistics")
        ax.set_title(f"shift score {self.score:.3g} ({self.num_samples} samples)")
        ax.legend(fontsize=8)
        ax.figure.tight_layout()
        return ax


def diagnosis_from(obs: Observation, divergence: str = "kl", aggregate: str = "last") -> Diagnosis:
    """A :class:`Diagnosis` from an :class:`Observation` (no forward pass)."""
    _check_choice("divergence", divergence, DIVERGENCES)
    _check_choice("aggregate", aggregate, AGGREGATES)
    both = {name: layer_divergences(obs, name) for name in DIVERGENCES}
    if not both[divergence]:
        raise ValueError("diagnose: no BatchNorm layer saw more than one value per channel")
    batch_scores = [_aggregate(layer_divergences(obs, divergence, moments), aggregate)
                    for moments in obs.batch_moments if moments]
    return Diagnosis(score=_aggregate(both[divergence], aggregate), layers=both[divergence], divergence=divergence,
                     aggregate=aggregate, kl=both["kl"], w2=both["w2"], num_samples=obs.num_samples,
                     batch_scores=batch_scores)


def diagnose(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    divergence: str = "kl",
    aggregate: str = "last",
    max_batches: int | None = None,
    progress: bool = False,
) -> Diagnosis:
    """Diagnose the shift of unlabelled data from the model's training data, per BatchNorm layer.

    One forward pass with the source (running) statistics; each BatchNorm layer's input
    statistics are pooled exactly (float64) over all batches and compared per channel with the
    layer's running statistics (symmetric KL and 2-Wasserstein of the per-channel Gaussians,
    averaged over channels; formulas in the module docstring).

    Args:
        model: a torch model with BatchNorm layers (plain, or converted by :func:`tta.convert`:
            the pass uses the running statistics whatever ``stats`` is set; nothing is changed).
        batches: iterable of unlabelled input tensors (N, C, H, W) (or ``(input, ...)``
            tuples; the rest is never read), e.g. a list or a DataLoader; read once.
        divergence: ``"kl"`` (default) or ``"w2"``: which one ``layers`` and ``score`` use.
        aggregate: how ``score`` combines the layers: ``"last"`` (default: the last BatchNorm
            layer in forward order, the best measured predictor of the accuracy drop, see
            docs/label_free.md), ``"mean"`` or ``"max"``.
        max_batches: read at most this many batches.
        progress: tqdm progress bar.

    Returns:
        a :class:`Diagnosis` (prints as a table; ``.plot()``; ``.top(k)``; ``.to_dict()``).

    Raises:
        TypeError: ``batches`` is a single tensor or yields something else than tensors/tuples.
        ValueError: bad ``divergence``/``aggregate``/``max_batches``; no batches; a model
            without BatchNorm layers with running statistics.
    """
    _check_choice("divergence", divergence, DIVERGENCES)
    _check_choice("aggregate", aggregate, AGGREGATES)
    obs = observe(model, batches, batch_pass=False, max_batches=max_batches, progress=progress, what="diagnose")
    return diagnosis_from(obs, divergence, aggregate)
