"""Test-time adaptation through BatchNorm statistics alone: ``source``, ``batch`` (test-time
BN, Nado et al. 2020), ``blend`` (Schneider et al. 2020), ``ema`` and ``recalibrate`` (AdaBN, Li
et al. 2016). No gradients, no optimizer: the model's BatchNorm layers are converted by
:func:`tta.convert` and normalise with the chosen statistics (docs/batchnorm.md).

Two options shared by the statistics methods:

* ``window=k`` (``batch``, ``blend``): the statistics of each prediction come from the last
  ``k`` samples of the stream (the current batch and up to ``k - n`` earlier samples), for
  single-sample streams. The earlier samples are forwarded again with the current batch and
  only the current batch's logits are returned, as the sliding window of the online-TTA
  benchmark of Marsden et al. (``TEST.WINDOW_LENGTH`` in its ``methods/base.py``).
* ``layers``: adapt only the BatchNorm layers whose module names match one of these
  ``fnmatch`` patterns (e.g. ``["layer1*", "layer2*"]`` for the first two stages of a
  torchvision ResNet); the others keep the source statistics.
* ``moments``: adapt ``"both"`` moments, only the ``"mean"`` or only the ``"var"``iance
  (the other keeps the source value). With ``layers``, the partly adaptive BN of Schneider et
  al. 2020.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta.methods import register_method
from tta.methods.base import (Adapter, batchnorm_layers, check_bool, check_choice, check_int, check_number,
                              start_from_source)
from tta.recalibration import recalibrate
from tta.batchnorm import _AdaptiveBatchNormMixin
from tta.label_free.prior import OnlinePriorSelector
from tta.surgery import adaptive_layers, convert

__all__ = ["Source", "Batch", "Blend", "EMA", "Recalibrate"]

VARIANCES = ("biased", "unbiased")
MOMENTS = ("both", "mean", "var")


def _check_layers(layers: Any) -> tuple[str, ...] | None:
    if layers is None:
        return None
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, Sequence) or not layers or not all(isinstance(p, str) and p for p in layers):
        raise ValueError(f"layers must be None, a name pattern or a non-empty list of name patterns, got {layers!r}")
    return tuple(layers)


def _layer_names(model: nn.Module, patterns: tuple[str, ...] | None) -> set[str] | None:
    """Names of the BatchNorm layers matching ``patterns`` (None: all); ValueError if none does."""
    if patterns is None:
        return None
    names = [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    chosen = {name for name in names if any(fnmatch.fnmatchcase(name, p) for p in patterns)}
    if not chosen:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise ValueError(f"layers={list(patterns)!r} matches no BatchNorm layer; the layers are: {shown}")
    return chosen


class _Statistics(Adapter):
    """Shared code of the statistics methods: convert, optional window, optional layer subset."""

    state_attributes = ("_buffer",)

    def _convert(self, stats: str, layers: tuple[str, ...] | None, **params: Any) -> None:
        """Convert (the first change: it raises before changing anything), source statistics
        back, eval mode."""
        chosen = _layer_names(self.model, layers)  # before anything changes (names survive convert)
        convert(self.model, stats=stats, **params)
        start_from_source(self.model)
        self.model.eval()
        if chosen is not None:
            for name, module in self.model.named_modules():
                if isinstance(module, _AdaptiveBatchNormMixin) and name not in chosen:
                    module.set_stats("source")

    def _setup_window(self, window: int | None) -> None:
        self.window = window
        self._buffer: Tensor | None = None

    def reset_state(self) -> None:
        self._buffer = None

    def _predict(self, x: Tensor) -> Tensor:
        if self.window is None or len(x) >= self.window:
            self._remember(x)
            return self.model(x)
        inputs = x if self._buffer is None else torch.cat([self._buffer[-(self.window - len(x)):], x])
        self._remember(inputs)
        return self.model(inputs)[-len(x):]

    def _remember(self, inputs: Tensor) -> None:
        if self.window is not None and self.window > 1:
            self._buffer = inputs[-(self.window - 1):].detach().clone()


@register_method("source")
class Source(Adapter):
    """No adaptation: the model in eval mode with its training (source) statistics.

    The reference point of every benchmark table. A plain model is not converted; BatchNorm
    layers converted earlier (:func:`tta.convert`, an earlier adapter) are switched to
    ``stats="source"`` and get their saved source statistics back (after EMA or
    recalibration). Weights changed by an earlier gradient method stay changed: adapt a fresh
    copy of the source model. State kept: none.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        start_from_source(model)
        for layer in adaptive_layers(model):
            layer.set_stats("source")
        model.eval()
        self._snapshot()

    def _predict(self, x: Tensor) -> Tensor:
        return self.model(x)


@register_method("batch")
class Batch(_Statistics):
    """Test-time BatchNorm: normalise with the statistics of the test batch alone.

    Nado et al. 2020 ("Evaluating prediction-time batch normalization"), Schneider et al. 2020
    with N = 0; the ``norm`` method of tent's repository (Wang et al. 2021). Mean and biased
    variance of the batch per channel (torch's train-mode output), running statistics untouched.

    Args:
        model: a classifier with torch BatchNorm layers (converted in place).
        window: statistics over the last ``window`` samples of the stream (int >= 1) instead
            of the current batch alone; None (default): the current batch.
        layers: ``fnmatch`` patterns of the BatchNorm layers to adapt; None (default): all.
        moments: ``"both"`` (default), ``"mean"`` or ``"var"``: which moments adapt.

    State kept: the last ``window - 1`` inputs when ``window`` is set (in ``state_dict``).
    """

    def __init__(self, model: nn.Module, *, window: int | None = None,
                 layers: str | Sequence[str] | None = None, moments: str = "both") -> None:
        super().__init__(model)
        window = check_int("window", window, none=True)
        layers = _check_layers(layers)
        moments = check_choice("moments", moments, MOMENTS)
        self.hparams = {"window": window, "layers": layers, "moments": moments}
        self._convert("batch", layers, moments=moments)
        self._setup_window(window)
        self._snapshot()


@register_method("blend")
class Blend(_Statistics):
    r"""Blend the source and the test-batch statistics (Schneider et al., NeurIPS 2020).

    ``w = n / (prior + n)`` for a batch of n samples (or ``w = alpha``),
    ``mean = (1 - w) mean_source + w mean_batch``, likewise the variance (plus
    ``w (1 - w) (mean_source - mean_batch)^2`` with ``pooled``).

    Args:
        model: a classifier with torch BatchNorm layers (converted in place).
        prior: prior strength N, the source statistics counted as N samples (a number >= 0).
            Default 16 (Schneider et al.'s choice for small batches; their Fig. 3). Or
            ``"auto"``: N is chosen without labels for every batch, from that batch and the
            earlier ones since the last :meth:`reset` (:class:`tta.label_free.OnlinePriorSelector`:
            empirical Bayes over every BatchNorm layer, candidates
            :data:`tta.label_free.CANDIDATES`, ``math.inf`` = source statistics; one more
            forward pass per batch, with the source statistics). docs/label_free.md.
        alpha: a fixed weight of the batch statistics in [0, 1], overriding ``prior``
            (must be None with ``prior="auto"``).
        pooled: add the between-distribution variance term. Default False.
        variance: ``"biased"`` (default) or ``"unbiased"`` batch variance (robusta's
            BayesianBatchNorm and the benchmark's AlphaBatchNorm use the unbiased one).
        window, layers, moments: see :class:`Batch`.

    Attributes:
        chosen_priors: with ``prior="auto"``, the N chosen for each batch since the last
            :meth:`reset` (a new list of floats, ``math.inf`` = source statistics); None otherwise.

    State kept: the last ``window - 1`` inputs when ``window`` is set; with ``prior="auto"``
    the evidence of the batches since the last :meth:`reset`.

    Raises:
        ValueError: a bad value (e.g. ``prior="aut"``: the message names the valid choices),
            before the model is changed.
    """

    def __init__(self, model: nn.Module, *, prior: float | str = 16.0, alpha: float | None = None,
                 pooled: bool = False, variance: str = "biased", window: int | None = None,
                 layers: str | Sequence[str] | None = None, moments: str = "both") -> None:
        super().__init__(model)
        auto = isinstance(prior, str)
        if auto and prior != "auto":
            raise ValueError(f"prior must be a number >= 0 or 'auto' (chosen per batch without labels); got {prior!r}")
        prior = prior if auto else check_number("prior", prior, low=0.0)
        alpha = check_number("alpha", alpha, low=0.0, high=1.0, none=True)
        if auto and alpha is not None:
            raise ValueError(f"alpha must be None with prior='auto' (alpha overrides the prior); got {alpha!r}")
        pooled = check_bool("pooled", pooled)
        variance = check_choice("variance", variance, VARIANCES)
        window = check_int("window", window, none=True)
        layers = _check_layers(layers)
        moments = check_choice("moments", moments, MOMENTS)
        self.hparams = {"prior": prior, "alpha": alpha, "pooled": pooled, "variance": variance,
                        "window": window, "layers": layers, "moments": moments}
        self._convert("blend", layers, prior=16.0 if auto else prior, alpha=alpha, pooled=pooled,
                      variance=variance, moments=moments)
        self.selector = OnlinePriorSelector(self.model) if auto else None
        self._blended = [m for m in adaptive_layers(self.model) if m.stats_config()["stats"] == "blend"]
        self._setup_window(window)
        self._snapshot()

    state_attributes = ("_buffer", "_selection")

    @property
    def chosen_priors(self) -> list[float] | None:
        return None if self.selector is None else list(self.selector.priors)

    @property
    def _selection(self) -> dict[str, Any] | None:
        """With ``prior="auto"``: the selector's evidence of the segment and its choices (state_dict)."""
        if self.selector is None:
            return None
        return {"layers": self.selector._evidence.layers, "priors": self.selector.priors}

    @_selection.setter
    def _selection(self, value: dict[str, Any] | None) -> None:
        if self.selector is not None and value is not None:
            self.selector._evidence.layers = value["layers"]
            self.selector.priors = list(value["priors"])

    def reset_state(self) -> None:
        super().reset_state()
        if self.selector is not None:
            self.selector.reset()

    def _predict(self, x: Tensor) -> Tensor:
        if self.selector is not None:
            prior = self.selector.step(x)
            for layer in self._blended:
                if math.isinf(prior):
                    layer.set_stats("source")
                else:
                    layer.set_stats("blend", prior=prior)
        return super()._predict(x)


@register_method("ema")
class EMA(_Statistics):
    """An exponential moving average of the test-batch statistics, starting from the source.

    ``mean <- (1 - m) mean + m mean_batch`` (likewise the variance), then the batch is
    normalised with the updated estimate (one pass). The estimate persists across batches until
    :meth:`reset`.

    Args:
        model: a classifier with torch BatchNorm layers (converted in place).
        momentum: m in (0, 1]. Default 0.1 (torch's BatchNorm momentum).
        variance: ``"biased"`` (default) or ``"unbiased"`` batch variance.
        layers, moments: see :class:`Batch`.

    State kept: the running statistics (in the BatchNorm buffers; the source copy is restored
    by :meth:`reset`).
    """

    def __init__(self, model: nn.Module, *, momentum: float = 0.1, variance: str = "biased",
                 layers: str | Sequence[str] | None = None, moments: str = "both") -> None:
        super().__init__(model)
        momentum = check_number("momentum", momentum, low=0.0, high=1.0, low_open=True)
        variance = check_choice("variance", variance, VARIANCES)
        layers = _check_layers(layers)
        moments = check_choice("moments", moments, MOMENTS)
        self.hparams = {"momentum": momentum, "variance": variance, "layers": layers, "moments": moments}
        self._convert("ema", layers, momentum=momentum, variance=variance, moments=moments)
        self._setup_window(None)
        self._snapshot()


@register_method("recalibrate")
class Recalibrate(Adapter):
    """AdaBN (Li et al., 2016): re-estimate every BatchNorm layer's statistics on unlabelled
    target data, then predict with them (eval mode).

    ``adapter.fit(data)`` runs :func:`tta.recalibrate` on ``data`` (an iterable of input
    batches); ``adapter(x)`` predicts without changing anything.

    Args:
        model: a classifier with torch BatchNorm layers (converted in place).
        prior: weigh the source statistics as this many samples (None: replace them).
        exact: exact per-layer statistics under the final model (about L/2 passes).
        num_images: how many images of each stream segment the evaluation pipeline hands to
            :meth:`fit` (None: all of them).
        batch_size: the batch size of those images. Default 256.

    State kept: the recalibrated running statistics (the source copy is restored by :meth:`reset`).
    """

    def __init__(self, model: nn.Module, *, prior: float | None = None, exact: bool = False,
                 num_images: int | None = None, batch_size: int = 256) -> None:
        super().__init__(model)
        self.hparams = {"prior": check_number("prior", prior, low=0.0, none=True),
                        "exact": check_bool("exact", exact),
                        "num_images": check_int("num_images", num_images, none=True),
                        "batch_size": check_int("batch_size", batch_size)}
        layers = batchnorm_layers(model)
        if layers and all(m.running_mean is None for m in layers):
            raise ValueError("recalibrate re-estimates running statistics, but the model's BatchNorm layers have "
                             "track_running_stats=False")
        convert(model, stats="source")
        start_from_source(model)
        model.eval()
        self._snapshot()

    def fit(self, data: Iterable[Any]) -> "Recalibrate":
        """AdaBN on ``data`` (input tensors or (input, target, ...) tuples; targets unused)."""
        self._check_usable()
        recalibrate(self.model, data, prior=self.hparams["prior"], exact=self.hparams["exact"])
        return self

    def _predict(self, x: Tensor) -> Tensor:
        return self.model(x)
