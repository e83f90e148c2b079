"""AdaBN: recompute the running statistics of every BatchNorm layer on target data.

Per layer and channel we keep the exact sufficient statistics of all values seen, as
(count, mean, M2) in float64, merged batch by batch with Chan et al.'s parallel update. The
result is the dataset mean and (unbiased) total variance, spread of the batch means included,
unlike torch's ``momentum=None`` cumulative average of per-batch variances.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta.batchnorm import _AdaptiveBatchNormMixin, _check_prior, batch_moments

__all__ = ["recalibrate"]

logger = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised from a hook to end a forward pass early (exact mode)."""


class _Moments:
    """Exact pooled per-channel statistics of one layer's input."""

    def __init__(self, channels: int, device: torch.device) -> None:
        self.count = torch.zeros((), dtype=torch.float64, device=device)  # values per channel
        self.samples = torch.zeros((), dtype=torch.float64, device=device)
        self.mean = torch.zeros(channels, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(channels, dtype=torch.float64, device=device)

    def add(self, input: Tensor) -> tuple[Tensor, Tensor]:
        """Merge one batch; returns its (mean, biased var)."""
        mean, var = batch_moments(input)
        n = input.numel() // input.shape[1]
        total = self.count + n
        delta = mean.double() - self.mean
        self.mean += delta * (n / total)
        self.m2 += var.double() * n + delta.square() * (self.count * n / total)
        self.count = total
        self.samples += input.shape[0]
        return mean, var

    def all_reduce(self) -> None:
        """Replace the local statistics by those of all ranks' data (torch.distributed)."""
        import torch.distributed as dist

        device = self.mean.device if dist.get_backend() == "nccl" else torch.device("cpu")
        first = torch.cat([self.count.view(1), self.samples.view(1), self.mean * self.count]).to(device)
        dist.all_reduce(first)
        count, samples, total = first[0], first[1], first[2:]
        mean = total / count.clamp_min(1)
        # M2 about the global mean: own M2 plus the shift of the local mean.
        m2 = (self.m2 + (self.mean - mean.to(self.mean.device)).square() * self.count).to(device)
        dist.all_reduce(m2)
        home = self.mean.device
        self.count, self.samples, self.mean, self.m2 = count.to(home), samples.to(home), mean.to(home), m2.to(home)

    def finalize(self, source_mean: Tensor, source_var: Tensor, prior: float | None) -> tuple[Tensor, Tensor]:
        """Mean and unbiased variance of the data, optionally blended with the source as ``prior`` samples."""
        count = float(self.count)
        mean = self.mean
        var = self.m2 / max(count - 1.0, 1.0)
        if prior:
            # Pool with the source as `prior` pseudo-samples: mixture mean and total variance.
            w = float(self.samples) / (prior + float(self.samples))
            src_mean, src_var = source_mean.double(), source_var.double()
            var = torch.lerp(src_var, var, w) + w * (1.0 - w) * (mean - src_mean).square()
            mean = torch.lerp(src_mean, mean, w)
        return mean, var


def _inputs(data: Iterable[Any], max_batches: int | None, device: torch.device) -> Iterable[Tensor]:
    for i, batch in enumerate(data):
        if max_batches is not None and i >= max_batches:
            return
        if isinstance(batch, (tuple, list)):
            if not batch:
                raise ValueError("recalibrate: got an empty tuple as a batch")
            batch = batch[0]
        if not isinstance(batch, Tensor):
            raise TypeError(f"recalibrate: data must yield tensors or (input, target) tuples, got {type(batch).__name__}")
        yield batch.to(device, non_blocking=True)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@torch.no_grad()
def recalibrate(
    model: nn.Module,
    data: Iterable[Any],
    *,
    max_batches: int | None = None,
    prior: float | None = None,
    exact: bool = False,
    progress: bool = False,
) -> nn.Module:
    """Replace the running statistics of every BatchNorm layer by statistics of target data (AdaBN).

    Works on plain torch models and on converted ones. The model runs without gradients in
    eval mode (Dropout off); every module's train flag and every adaptive layer's ``stats``
    are restored on exit, and on error the running statistics are restored too. Adaptive
    layers keep a copy of their previous statistics, so :func:`tta.reset` undoes this.

    Args:
        model: the model; its BatchNorm layers must track running statistics.
        data: iterable of input tensors or of ``(input, target, ...)`` tuples/lists.
        max_batches: use at most this many batches (per pass).
        prior: weigh the previous running statistics as this many samples (partial
            recalibration); ``None`` or 0 replaces them.
        exact: if False, one pass in which every layer normalises with the current batch's
            statistics (as in train mode) while the statistics of its input are pooled over
            all batches. If True, each layer's statistics are those of its input over the
            whole data under the final recalibrated model in eval mode (one partial pass per
            layer: about L/2 passes for L BatchNorm layers).
        progress: show a tqdm progress bar.

    Returns:
        ``model``, recalibrated in place.

    Under ``torch.distributed`` the statistics are all-reduced, so every rank gets the
    statistics of all ranks' data.
    """
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    prior = None if prior is None else _check_prior(prior)
    if not isinstance(exact, bool):
        raise TypeError(f"exact must be a bool, got {exact!r}")
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None]
    if not layers:
        raise ValueError("recalibrate: model has no BatchNorm layer with running statistics")
    if exact and iter(data) is data:  # type: ignore[call-overload]
        raise TypeError("recalibrate(exact=True) iterates the data once per layer: pass a re-iterable "
                        "(list, DataLoader), not an iterator or generator")
    try:
        device = next(iter(layers[0].buffers())).device
    except StopIteration:  # pragma: no cover - a tracked BN always has buffers
        device = torch.device("cpu")

    training = {m: m.training for m in model.modules()}
    configs = {m: m.stats_config() for m in layers if isinstance(m, _AdaptiveBatchNormMixin)}
    before = {m: (m.running_mean.clone(), m.running_var.clone()) for m in layers}
    hooks: list[Any] = []
    model.eval()
    for m in configs:
        m.save_source_stats()
        m._stats = "source"  # torch eval behaviour: normalise with the running buffers
    try:
        if exact:
            _recalibrate_exact(model, layers, data, max_batches, prior, device, before, hooks, progress)
        else:
            _recalibrate_once(model, layers, data, max_batches, prior, device, before, hooks, progress)
    except BaseException:
        for m, (mean, var) in before.items():
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
        raise
    finally:
        for h in hooks:
            h.remove()
        for m, flag in training.items():
            m.training = flag
        for m, config in configs.items():
            m.set_stats(**config)
    return model


def _bar(iterable: Iterable[Any], progress: bool, desc: str) -> Iterable[Any]:
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


def _write(layer: _BatchNorm, moments: _Moments, prior: float | None, before: dict) -> None:
    if moments.count.item() == 0:
        raise ValueError("recalibrate: data yielded no values for a BatchNorm layer")
    mean, var = moments.finalize(*before[layer], prior)
    layer.running_mean.copy_(mean)
    layer.running_var.copy_(var)


def _recalibrate_once(model, layers, data, max_batches, prior, device, before, hooks, progress) -> None:
    moments: dict[nn.Module, _Moments] = {}

    def hook(layer: _BatchNorm, args: tuple[Any, ...]) -> None:
        if layer not in moments:
            moments[layer] = _Moments(layer.num_features, layer.running_mean.device)
        mean, var = moments[layer].add(args[0])
        # Normalise this batch with its own statistics (train-mode behaviour) by handing them
        # to the eval-mode forward through the running buffers.
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)

    hooks.extend(layer.register_forward_pre_hook(hook) for layer in layers)
    batches = 0
    for x in _bar(_inputs(data, max_batches, device), progress, "recalibrate"):
        model(x)
        batches += 1
    if batches == 0:
        raise ValueError("recalibrate: data yielded no batches")
    if _distributed():
        for m in moments.values():
            m.all_reduce()
    for layer in layers:
        if layer in moments:
            _write(layer, moments[layer], prior, before)
        else:
            logger.warning("recalibrate: %s was never called; its statistics are unchanged", type(layer).__name__)
            layer.running_mean.copy_(before[layer][0])
            layer.running_var.copy_(before[layer][1])
    logger.info("recalibrate: %d layers from %d batches", len(moments), batches)


def _recalibrate_exact(model, layers, data, max_batches, prior, device, before, hooks, progress) -> None:
    # Execution order of the layers, from one forward pass of the first batch.
    order: list[nn.Module] = []
    record = [layer.register_forward_pre_hook(lambda m, a: order.append(m) if m not in order else None)
              for layer in layers]
    try:
        first = next(iter(_inputs(data, max_batches, device)), None)
        if first is None:
            raise ValueError("recalibrate: data yielded no batches")
        model(first)
    finally:
        for h in record:
            h.remove()
    for layer in layers:
        if layer not in order:
            logger.warning("recalibrate: %s was never called; its statistics are unchanged", type(layer).__name__)
    # Layer k's input depends only on layers before it, which are final by then: collect its
    # statistics and stop the forward pass right there.
    for layer in _bar(order, progress, "recalibrate (exact)"):
        moments = _Moments(layer.num_features, layer.running_mean.device)

        def hook(m: nn.Module, args: tuple[Any, ...], moments: _Moments = moments) -> None:
            moments.add(args[0])
            raise _Stop

        handle = layer.register_forward_pre_hook(hook)
        try:
            for x in _inputs(data, max_batches, device):
                try:
                    model(x)
                except _Stop:
                    pass
        finally:
            handle.remove()
        if _distributed():
            moments.all_reduce()
        _write(layer, moments, prior, before)
    logger.info("recalibrate: %d layers, exact, %d partial passes", len(order), len(order))
