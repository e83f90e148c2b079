"""Online normalisation with the statistics of the whole segment seen so far.

``blend`` estimates the target statistics from the current batch alone; at batch size 8 that
estimate is noisy, and the prior N can only trade that noise for source bias. Within a stream
segment (one shift, e.g. one benchmark cell) every earlier batch is evidence too: here each
BatchNorm layer normalises batch ``t`` with the exact pooled statistics of the layer's inputs
over batches ``1..t`` of the segment (the ``recalibrate`` statistics, computed incrementally:
the same running sums as :class:`tta.recalibration._Moments`), blended with the source
statistics as ``prior`` pseudo-samples (mixture mean and total variance; Schneider et al.
2020 with ``n`` = all samples of the segment so far). It is online (only past and current
batches), and as the segment grows it approaches AdaBN on the whole segment (Li et al. 2016,
"Revisiting batch normalization for practical domain adaptation"), which is offline.
Like an EMA it assumes the shift stays the same within a segment: call :meth:`reset` when it
changes (e.g. when the diagnosis score of the current batch jumps).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tta.label_free._observe import batchnorm_layers, hooked
from tta.label_free.prior import CANDIDATES, DEFAULT_SCALE, OnlinePriorSelector, _check_candidates
from tta.recalibration import _Moments

__all__ = ["CumulativeBlend"]


class CumulativeBlend:
    """Normalise each batch of a stream segment with the pooled statistics of the segment so far.

    Args:
        model: a torch model with BatchNorm layers (plain or converted); it is only changed
            during a call, and restored after it (buffers, ``stats``, train flags).
        prior: the source statistics count as this many samples (``math.inf``: source only;
            0: the segment's statistics alone), or ``"auto"``: chosen per batch by
            :class:`tta.label_free.OnlinePriorSelector` (one more forward pass per batch).
            Default 16.
        candidates, scale: for ``prior="auto"`` (see :func:`tta.select_prior`).

    Example::

        adapt = tta.label_free.CumulativeBlend(model, prior="auto")
        for x in segment:
            logits = adapt(x)
        adapt.reset()                      # next segment
    """

    def __init__(self, model: nn.Module, prior: float | str = 16.0, *, candidates: Sequence[float] = CANDIDATES,
                 scale: float = DEFAULT_SCALE) -> None:
        self.model = model
        self.layers = batchnorm_layers(model)
        if prior == "auto":
            self.selector: OnlinePriorSelector | None = OnlinePriorSelector(model, candidates, scale=scale)
        else:
            _check_candidates([prior])
            self.selector = None
        self.prior = prior
        self.priors: list[float] = []
        self._moments: dict[nn.Module, _Moments] = {}

    def reset(self) -> None:
        """Start a new segment."""
        self._moments = {}
        self.priors = []
        if self.selector is not None:
            self.selector.reset()

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        """Logits (N, K) for batch ``x`` (N, C, H, W); its statistics join the segment's."""
        if not isinstance(x, Tensor):
            raise TypeError(f"CumulativeBlend takes one input tensor (N, C, H, W), got {type(x).__name__}")
        prior = self.selector.step(x) if self.selector is not None else float(self.prior)
        self.priors.append(prior)
        layers = self.layers
        # New moments are merged only when the whole forward pass succeeds.
        moments = {m: self._moments.get(m) or _Moments(m) for m in layers}
        pending = {m: _Moments(m) for m in layers}
        sources: dict[nn.Module, tuple[Tensor, Tensor]] = {}

        def hook(layer: nn.Module, args: tuple[Any, ...]) -> None:
            if not args[0].numel():
                return
            merged = pending[layer]
            merged.count, merged.samples = moments[layer].count.clone(), moments[layer].samples.clone()
            merged.mean, merged.m2 = moments[layer].mean.clone(), moments[layer].m2.clone()
            merged.add(args[0])
            mean, var = merged.finalize(*sources[layer], None if prior == 0 else (1e300 if math.isinf(prior) else prior))
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)

        with hooked(self.model, layers, hook) as saved:
            sources.update({m: (saved[m][0]["running_mean"], saved[m][0]["running_var"]) for m in layers})
            logits = self.model(x.to(next(iter(layers)).running_mean.device))
        self._moments = {m: pending[m] if float(pending[m].count) > 0 else moments[m] for m in layers}
        return logits
