"""AdaBN: recompute the running statistics of every BatchNorm layer on target data.

Per layer and channel we keep the exact sufficient statistics of all values seen, as
(count, mean, M2) in float64, merged batch by batch with Chan et al.'s parallel update. The
result is the dataset mean and (unbiased) total variance, spread of the batch means included,
unlike torch's ``momentum=None`` cumulative average of per-batch variances.
"""
from __future__ import annotations

import itertools
import logging
import numbers
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta.batchnorm import _AdaptiveBatchNormMixin, _check_prior, batch_moments
from tta.surgery import _restore, _snapshot

__all__ = ["recalibrate"]

logger = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised from a hook to end a forward pass early (exact mode)."""


class _Moments:
    """Exact pooled per-channel statistics of one layer's input."""

    def __init__(self, layer: _BatchNorm) -> None:
        device = layer.running_mean.device
        self.count = torch.zeros((), dtype=torch.float64, device=device)  # values per channel
        self.samples = torch.zeros((), dtype=torch.float64, device=device)
        self.mean = torch.zeros(layer.num_features, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(layer.num_features, dtype=torch.float64, device=device)

    def add(self, input: Tensor) -> tuple[Tensor, Tensor]:
        """Merge one non-empty batch (N, C, *); returns its (mean, biased var)."""
        mean, var = batch_moments(input)
        n = input.numel() // input.shape[1]
        total = self.count + n
        delta = mean.double() - self.mean
        self.mean += delta * (n / total)
        self.m2 += var.double() * n + delta.square() * (self.count * n / total)
        self.count = total
        self.samples += input.shape[0]
        return mean, var

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


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _comm_device(device: torch.device) -> torch.device:
    import torch.distributed as dist

    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def _raise_together(error: Exception | None, device: torch.device, values: Tensor | None = None) -> Tensor | None:
    """Every rank raises if any rank failed; otherwise returns ``values`` summed over ranks.

    One all-reduce of ``[failed, *values]``: each collective of recalibrate starts with this
    one, so a rank whose data raised (or ran out) never leaves the others waiting.
    """
    if not _distributed():
        if error is not None:
            raise error
        return values
    import torch.distributed as dist

    flat = torch.cat([torch.tensor([float(error is not None)], dtype=torch.float64, device=device),
                      torch.zeros(0, dtype=torch.float64, device=device) if values is None else values.to(device)])
    flat = flat.to(_comm_device(device))
    dist.all_reduce(flat)
    if error is not None:
        raise error
    if flat[0] > 0:
        raise _failed_elsewhere(int(flat[0]))
    return flat[1:].to(device)


def _failed_elsewhere(ranks: int) -> RuntimeError:
    return RuntimeError(f"recalibrate: failed on {ranks} other rank(s) (see their errors); no statistics were changed")


def _all_reduce(moments: list[_Moments], error: Exception | None, device: torch.device) -> None:
    """Replace each layer's local statistics by those of all ranks' data (torch.distributed).

    A rank without data contributes zero counts. Two all-reduces: status, counts and sums,
    then M2 about the global mean.
    """
    if not _distributed():
        _raise_together(error, device)
        return
    import torch.distributed as dist

    local = torch.cat([torch.cat([m.count.view(1), m.samples.view(1), m.mean * m.count]) for m in moments])
    total = _raise_together(error, device, local.to(device))
    m2 = []
    for m, part in zip(moments, total.split([2 + m.mean.numel() for m in moments])):
        count, samples = part[0], part[1]
        mean = part[2:] / count.clamp_min(1)
        # M2 about the global mean: own M2 plus the shift of the local mean.
        m2.append(m.m2 + (m.mean - mean.to(m.mean.device)).square() * m.count)
        m.count, m.samples, m.mean = count.to(m.mean.device), samples.to(m.mean.device), mean.to(m.mean.device)
    flat = torch.cat(m2).to(_comm_device(device))
    dist.all_reduce(flat)
    for m, part in zip(moments, flat.split([m.mean.numel() for m in moments])):
        m.m2 = part.to(m.mean.device)


def _inputs(data: Iterable[Any], max_batches: int | None) -> Iterator[Tensor]:
    """The input tensors of ``data``'s batches; pulls at most ``max_batches`` batches from it.

    Empty batches are skipped (they still count towards ``max_batches``).
    """
    for batch in itertools.islice(data, max_batches):
        if isinstance(batch, (tuple, list)):
            if not batch:
                raise ValueError("recalibrate: got an empty tuple as a batch")
            batch = batch[0]
        if not isinstance(batch, Tensor):
            raise TypeError(f"recalibrate: data must yield tensors or (input, target) tuples, got {type(batch).__name__}")
        if batch.numel() > 0:
            yield batch


def _check_input(layer: _BatchNorm, name: str, input: Tensor) -> None:
    """A clear error for an input the layer cannot take, before any statistic is computed."""
    problem = None
    if input.dim() < 2 or input.shape[1] != layer.num_features:
        problem = f"expected input (N, {layer.num_features}, *)"
    else:
        try:
            layer._check_input_dim(input)
        except ValueError as error:
            problem = str(error)
        except NotImplementedError:
            pass
    if problem:
        raise ValueError(f"recalibrate: BatchNorm layer {name!r} got input of shape {tuple(input.shape)}: {problem}; "
                         "data must yield batches shaped as the model's input (N, C, H, W) for images")


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
    are restored on exit. Adaptive layers keep a copy of their previous statistics, so
    :func:`tta.reset` undoes this. A failure (bad data, data raising midway, interrupt)
    leaves no trace: buffers, source copies, stats configurations, train flags and hooks are
    as before the call.

    Args:
        model: the model; its BatchNorm layers must track running statistics.
        data: an iterable of batches: input tensors of the model's input shape (e.g.
            ``(N, C, H, W)``) or ``(input, target, ...)`` tuples/lists, e.g. a list, a
            DataLoader or a generator; batches are moved to the model's device. Empty batches
            are skipped.
        max_batches: pull at most this many batches from ``data`` (never one more); a Python or
            NumPy int (``exact`` likewise takes a bool or ``np.bool_``).
        prior: weigh the previous running statistics as this many samples (partial
            recalibration); ``None`` or 0 replaces them.
        exact: if False, one pass in which every layer normalises with the current batch's
            statistics (as in train mode) while the statistics of its input are pooled over
            all batches. If True, each layer's statistics are those of its input over the
            whole data under the final recalibrated model in eval mode (one partial pass per
            layer: about L/2 passes for L BatchNorm layers). The batches are read once and kept
            (where ``data`` puts them, e.g. CPU memory for a DataLoader: the size of the data
            used), so every layer sees the same samples even from a shuffling DataLoader.
        progress: show a tqdm progress bar.

    Returns:
        ``model``, recalibrated in place.

    Raises:
        TypeError: ``data`` is a single tensor or yields something else than tensors/tuples;
            a bad argument type.
        ValueError: no batches (on any rank), an input shape a BatchNorm layer cannot take,
            bad ``max_batches``/``prior``, a model without tracked BatchNorm layers.

    Under ``torch.distributed`` the statistics are all-reduced, so every rank gets the
    statistics of all ranks' data; a rank without batches contributes nothing, and if one
    rank fails, all raise (none waits for the others).
    """
    # NumPy integers and booleans count, as everywhere in the API (tta.methods.base.check_int)
    if max_batches is not None and (isinstance(max_batches, (bool, np.bool_)) or not isinstance(max_batches, numbers.Integral)
                                    or not 1 <= max_batches <= sys.maxsize):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r} (at most {sys.maxsize})")
    max_batches = None if max_batches is None else int(max_batches)
    prior = None if prior is None else _check_prior(prior)
    if not isinstance(exact, (bool, np.bool_)):
        raise TypeError(f"exact must be a bool, got {exact!r}")
    exact = bool(exact)
    if isinstance(data, Tensor):
        raise TypeError(f"recalibrate: data must be an iterable of batches (a list of input tensors, a DataLoader), "
                        f"got a single tensor of shape {tuple(data.shape)}; pass [x] or x.split(batch_size)")
    names = {m: name for name, m in model.named_modules()}
    layers = [m for m in names if isinstance(m, _BatchNorm) and m.running_mean is not None]
    if not layers:
        raise ValueError("recalibrate: model has no BatchNorm layer with running statistics")
    device = layers[0].running_mean.device

    saved = _snapshot(layers)
    training = {m: m.training for m in model.modules()}
    hooks: list[Any] = []
    model.eval()
    try:
        for m in layers:
            if isinstance(m, _AdaptiveBatchNormMixin):
                m.save_source_stats()
                m.set_stats("source")  # torch eval behaviour: normalise with the running buffers
        run = _recalibrate_exact if exact else _recalibrate_once
        run(model, layers, names, data, max_batches, prior, device, saved, hooks, progress)
    except BaseException:
        _restore(saved)
        raise
    finally:
        for h in hooks:
            h.remove()
        for m, flag in training.items():
            m.training = flag
        for m, (_, config) in saved.items():
            if config is not None:
                m.set_stats(**config)
    return model


def _bar(iterable: Iterable[Any], progress: bool, desc: str) -> Iterable[Any]:
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


def _write(layer: _BatchNorm, name: str, moments: _Moments, prior: float | None, saved: dict) -> None:
    if moments.count.item() == 0:
        logger.warning("recalibrate: %r never saw a value; its statistics are unchanged", name)
        return
    buffers = saved[layer][0]
    mean, var = moments.finalize(buffers["running_mean"], buffers["running_var"], prior)
    layer.running_mean.copy_(mean)
    layer.running_var.copy_(var)


def _recalibrate_once(model, layers, names, data, max_batches, prior, device, saved, hooks, progress) -> None:
    moments = {layer: _Moments(layer) for layer in layers}

    def hook(layer: _BatchNorm, args: tuple[Any, ...]) -> None:
        _check_input(layer, names[layer], args[0])
        if args[0].numel() == 0:
            return
        mean, var = moments[layer].add(args[0])
        # Normalise this batch with its own statistics (train-mode behaviour) by handing them
        # to the eval-mode forward through the running buffers.
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)

    hooks.extend(layer.register_forward_pre_hook(hook) for layer in layers)
    batches, error = 0, None
    try:
        for x in _bar(_inputs(data, max_batches), progress, "recalibrate"):
            model(x.to(device, non_blocking=True))
            batches += 1
    except Exception as e:  # raised below on every rank together
        error = e
    total = _raise_together(error, device, torch.tensor([float(batches)], dtype=torch.float64, device=device))
    if total.item() == 0:
        raise ValueError("recalibrate: data yielded no batches" + (" on any rank" if _distributed() else ""))
    _all_reduce(list(moments.values()), None, device)
    for layer in layers:
        _write(layer, names[layer], moments[layer], prior, saved)
    logger.info("recalibrate: %d layers from %d batches", len(layers), batches)


def _execution_order(model: nn.Module, layers: list[_BatchNorm], names: dict, x: Tensor) -> list[int]:
    """Indices into ``layers`` in the order one forward pass of ``x`` calls them."""
    index = {layer: i for i, layer in enumerate(layers)}
    order: list[int] = []

    def hook(layer: _BatchNorm, args: tuple[Any, ...]) -> None:
        _check_input(layer, names[layer], args[0])
        if index[layer] not in order:
            order.append(index[layer])

    record = [layer.register_forward_pre_hook(hook) for layer in layers]
    try:
        model(x)
    finally:
        for h in record:
            h.remove()
    return order


def _agree_on_order(layers: list[_BatchNorm], order: list[int] | None, error: Exception | None,
                    device: torch.device) -> list[int]:
    """The execution order, the same on every rank (from the ranks that have data)."""
    if not _distributed():
        _raise_together(error, device)
        if order is None:
            raise ValueError("recalibrate: data yielded no batches")
        return order
    # position of each layer (-1: not called), or all -2 on a rank without data
    positions = torch.full((len(layers),), -2.0 if order is None else -1.0, dtype=torch.float64)
    for position, i in enumerate(order or []):
        positions[i] = position
    import torch.distributed as dist

    flat = torch.cat([torch.tensor([float(error is not None)], dtype=torch.float64), positions]).to(_comm_device(device))
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    if error is not None:
        raise error
    failed = sum(int(g[0].item()) for g in gathered)
    if failed:
        raise _failed_elsewhere(failed)
    with_data = [g[1:].cpu() for g in gathered if g[1] != -2]
    if not with_data:
        raise ValueError("recalibrate: data yielded no batches on any rank")
    if any(not torch.equal(p, with_data[0]) for p in with_data[1:]):
        raise ValueError("recalibrate(exact=True): the BatchNorm layers run in a different order on different ranks")
    called = [(p, i) for i, p in enumerate(with_data[0].tolist()) if p >= 0]
    return [i for _, i in sorted(called)]


def _recalibrate_exact(model, layers, names, data, max_batches, prior, device, saved, hooks, progress) -> None:
    # Read the batches once: every layer sees the same samples, also from a shuffling loader.
    cached: list[Tensor] = []
    order, error = None, None
    try:
        cached = list(_inputs(data, max_batches))
        if cached:
            order = _execution_order(model, layers, names, cached[0].to(device))
    except Exception as e:  # raised on every rank together
        error = e
    order = _agree_on_order(layers, order, error, device)
    called = [layers[i] for i in order]
    for layer in layers:
        if layer not in called:
            logger.warning("recalibrate: %r was never called; its statistics are unchanged", names[layer])
    # Layer k's input depends only on layers before it, which are final by then: collect its
    # statistics and stop the forward pass right there.
    for layer in _bar(called, progress, "recalibrate (exact)"):
        moments = _Moments(layer)

        def hook(m: _BatchNorm, args: tuple[Any, ...], moments: _Moments = moments) -> None:
            _check_input(m, names[m], args[0])
            if args[0].numel():
                moments.add(args[0])
            raise _Stop

        hooks.append(layer.register_forward_pre_hook(hook))
        error = None
        try:
            for x in cached:
                try:
                    model(x.to(device, non_blocking=True))
                except _Stop:
                    pass
        except Exception as e:  # raised on every rank together
            error = e
        finally:
            hooks.pop().remove()
        _all_reduce([moments], error, device)
        _write(layer, names[layer], moments, prior, saved)
    logger.info("recalibrate: %d layers, exact, %d batches kept, %d partial passes", len(called), len(cached), len(called))
