"""Choose the prior strength N of ``blend`` without labels (empirical Bayes).

``stats="blend"`` normalises with ``mu = (1 - w) mu_s + w mu_b``, ``w = n / (N + n)``
(Schneider et al. 2020, NeurIPS, "Improving robustness against common corruptions by covariate
shift adaptation", eq. 2): a shrinkage estimate of the target mean from a batch of ``n``
samples towards the source mean. Per channel, with the target mean ``mu_t``, the between-sample
variance ``v`` of the samples' own channel means (so the batch mean has variance ``v / n``)
and the bias ``b = mu_s - mu_t``, the expected squared error of the blended mean

    E[(mu - mu_t)^2] = (1 - w)^2 b^2 + w^2 v / n

is smallest at ``w = b^2 / (b^2 + v / n)``, i.e. ``N = v / b^2``, whatever the batch size
(James & Stein 1961; Efron & Morris 1973, JASA 68, "Stein's estimation rule and its
competitors - an empirical Bayes approach"). Summed over a layer's channels in the units the
layer normalises to (``/ var_t``) and over layers::

    N* = scale * sum(v / var_t) / sum(b^2 / var_t - v / (k var_t))

where ``k`` is the number of samples seen, ``b^2 - v/k`` corrects the squared difference of
the observed means for their sampling noise, and ``scale`` (default 4) corrects for what the
squared-error model leaves out (errors of deep layers propagate; the variance is estimated
too): measured on validation data, see docs/label_free.md. No detectable shift (denominator
<= 0) gives ``N* = inf``: the source statistics, so clean data keeps the source accuracy.
``N*`` is then snapped to the nearest candidate on a ``log(1 + N)`` scale; ``inf`` is taken
when ``N* >= 2 x`` the largest finite candidate.

Statistics come from one pass with the source statistics (the pass of :func:`tta.diagnose`).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tta.label_free._observe import Observation, observe

__all__ = ["CANDIDATES", "DEFAULT_SCALE", "select_prior", "OnlinePriorSelector", "prior_estimate", "snap_prior"]

CANDIDATES = (0.0, 1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, math.inf)
# Multiplier of the squared-error-optimal N; chosen on the validation cells (docs/label_free.md).
DEFAULT_SCALE = 4.0


def _check_candidates(candidates: Any) -> tuple[float, ...]:
    if isinstance(candidates, (str, bytes, Tensor)) or not isinstance(candidates, Iterable):
        raise TypeError(f"candidates must be a sequence of prior strengths (numbers >= 0, math.inf allowed), "
                        f"got {candidates!r}")
    values = []
    for c in candidates:
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or math.isnan(float(c)) or float(c) < 0:
            raise ValueError(f"every candidate prior must be a number >= 0 or math.inf, got {c!r} in {candidates!r}")
        values.append(float(c))
    if not values:
        raise ValueError("candidates is empty; give at least one prior strength, e.g. (0, 16, math.inf)")
    return tuple(sorted(set(values)))


def _check_scale(scale: Any) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (0 < float(scale) < math.inf):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    return float(scale)


def snap_prior(estimate: float, candidates: Sequence[float] = CANDIDATES) -> float:
    """The candidate nearest to ``estimate`` on a ``log(1 + N)`` scale; ``math.inf`` (if a
    candidate) when ``estimate >= 2 x`` the largest finite candidate (or no finite one)."""
    candidates = _check_candidates(candidates)
    finite = [c for c in candidates if math.isfinite(c)]
    if math.inf in candidates and (not finite or estimate >= 2 * finite[-1]):
        return math.inf
    if not finite:
        return math.inf
    target = math.log1p(estimate) if math.isfinite(estimate) else math.inf
    return min(finite, key=lambda c: abs(math.log1p(c) - target))


class _Evidence:
    """Running sums, per BatchNorm layer, from which :meth:`prior` computes ``N*``."""

    def __init__(self) -> None:
        self.layers: dict[str, dict[str, Any]] = {}

    def add(self, obs: Observation, index: int) -> None:
        """Merge batch ``index`` of ``obs``."""
        size = obs.sizes[index]
        for name, (mean, var) in obs.batch_moments[index].items():
            sums = obs.sample_sums[index][name]
            acc = self.layers.get(name)
            if acc is None:
                ref_mean, _ = obs.reference[name]
                acc = self.layers[name] = {"k": 0, "s1": torch.zeros_like(ref_mean), "s2": torch.zeros_like(ref_mean),
                                           "m1": torch.zeros_like(ref_mean), "m2": torch.zeros_like(ref_mean),
                                           "ref": ref_mean, "eps": obs.eps[name]}
            # Sample-weighted sums (every sample has the same number of values per channel).
            acc["k"] += size
            acc["s1"] += size * mean
            acc["s2"] += size * (var + mean.square())
            acc["m1"] += sums[0]
            acc["m2"] += sums[1]

    def prior(self, scale: float) -> float:
        """``N*`` of the module docstring (``inf`` when no shift is detectable)."""
        noise = bias = 0.0
        for acc in self.layers.values():
            k = acc["k"]
            if k < 2:
                continue
            mean = acc["s1"] / k
            var = (acc["s2"] / k - mean.square()).clamp_min(0.0) + acc["eps"]
            between = ((acc["m2"] - acc["m1"].square() / k) / (k - 1)).clamp_min(0.0)
            v = float((between / var).sum())
            noise += v
            bias += float(((acc["ref"] - mean).square() / var).sum()) - v / k
        if noise == 0.0 and bias <= 0.0:
            return math.inf
        return scale * noise / bias if bias > 0 else math.inf


def prior_estimate(obs: Observation, scale: float = DEFAULT_SCALE, upto: int | None = None) -> float:
    """Unsnapped ``N*`` (module docstring) from the first ``upto`` batches of ``obs`` (all by default)."""
    evidence = _Evidence()
    for i in range(len(obs.sizes) if upto is None else upto):
        evidence.add(obs, i)
    return evidence.prior(_check_scale(scale))


def select_prior(
    model: nn.Module,
    batches: Iterable[Any],
    candidates: Sequence[float] = CANDIDATES,
    *,
    online: bool = False,
    scale: float = DEFAULT_SCALE,
    max_batches: int | None = None,
    progress: bool = False,
) -> float | list[float]:
    """Choose the prior strength N of ``stats="blend"`` for unlabelled data, without labels.

    Empirical Bayes (module docstring): the N that minimises the expected squared error of the
    blended per-channel means, estimated from the data's own spread and its distance to the
    source statistics, times ``scale``, snapped to ``candidates``. One forward pass with the
    source statistics; nothing in ``model`` changes. On source-like data it returns large N or
    ``math.inf`` (source statistics).

    Args:
        model: a torch model with BatchNorm layers (plain or converted).
        batches: the segment's unlabelled batches: input tensors (N, C, H, W) or
            ``(input, ...)`` tuples (only the input is read); read once.
        candidates: allowed prior strengths (samples; ``math.inf`` = source statistics).
            Default: ``(0, 1, 4, 16, 64, 256, 1024, math.inf)``.
        online: if False (default), one N for the whole segment from all its batches. If True,
            a list with one N per batch, each chosen from that batch and the batches before
            it only (what a stream can know when that batch arrives; for a live stream use
            :class:`OnlinePriorSelector`).
        scale: multiplier of the squared-error-optimal N (default :data:`DEFAULT_SCALE`).
        max_batches: read at most this many batches.
        progress: tqdm progress bar.

    Returns:
        the chosen N (a float; ``math.inf`` for the source statistics), or a list of them.

    Raises:
        TypeError: bad ``candidates``/``batches`` types.
        ValueError: bad candidate values, ``scale``, ``max_batches``; no batches; a model without
            BatchNorm layers with running statistics.

    Example::

        N = tta.select_prior(model, segment_batches)
        tta.convert(model, stats="source" if N == math.inf else "blend", prior=0 if N == math.inf else N)
    """
    candidates = _check_candidates(candidates)
    scale = _check_scale(scale)
    if not isinstance(online, bool):
        raise TypeError(f"online must be a bool, got {online!r}")
    obs = observe(model, batches, batch_pass=False, max_batches=max_batches, progress=progress, what="select_prior")
    evidence = _Evidence()
    chosen = []
    for i in range(len(obs.sizes)):
        evidence.add(obs, i)
        if online:
            chosen.append(snap_prior(evidence.prior(scale), candidates))
    return chosen if online else snap_prior(evidence.prior(scale), candidates)


class OnlinePriorSelector:
    """Choose N batch by batch on a live stream: :meth:`step` takes the next batch and returns
    the N for it, from that batch and the earlier ones of the current segment; :meth:`reset`
    starts a new segment. Each step is one forward pass with the source statistics.

    Example::

        selector = tta.label_free.OnlinePriorSelector(model)   # model converted by tta.convert
        for x in stream:
            N = selector.step(x)
            with tta.use_stats(model, "source") if N == math.inf else tta.use_stats(model, "blend", prior=N):
                logits = model(x)
    """

    def __init__(self, model: nn.Module, candidates: Sequence[float] = CANDIDATES, *, scale: float = DEFAULT_SCALE) -> None:
        self.model = model
        self.candidates = _check_candidates(candidates)
        self.scale = _check_scale(scale)
        self.priors: list[float] = []
        self._evidence = _Evidence()

    def step(self, x: Tensor) -> float:
        """Observe one batch (N, C, H, W) and return the prior strength N for it."""
        if not isinstance(x, Tensor):
            raise TypeError(f"OnlinePriorSelector.step takes one input tensor (N, C, H, W), got {type(x).__name__}")
        obs = observe(self.model, [x], batch_pass=False, what="OnlinePriorSelector")
        self._evidence.add(obs, 0)
        self.priors.append(snap_prior(self._evidence.prior(self.scale), self.candidates))
        return self.priors[-1]

    def reset(self) -> None:
        """Forget the segment (call when the stream is reset or the shift changes)."""
        self._evidence = _Evidence()
        self.priors = []
