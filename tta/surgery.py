"""Model surgery: swap torch BatchNorm layers for adaptive ones and back, switch statistics."""
from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

from torch import nn

from tta.batchnorm import (
    _KEEP,
    AdaptiveBatchNorm1d,
    AdaptiveBatchNorm2d,
    AdaptiveBatchNorm3d,
    _AdaptiveBatchNormMixin,
    _check_stats,
)

__all__ = ["convert", "revert", "set_stats", "use_stats", "reset", "adaptive_layers"]

logger = logging.getLogger(__name__)

_TO_ADAPTIVE: dict[type, type] = {
    nn.BatchNorm1d: AdaptiveBatchNorm1d,
    nn.BatchNorm2d: AdaptiveBatchNorm2d,
    nn.BatchNorm3d: AdaptiveBatchNorm3d,
    # SyncBatchNorm accepts any rank: the converted layer does too (see _input_dims).
    nn.SyncBatchNorm: AdaptiveBatchNorm2d,
}
_TO_TORCH: dict[type, type] = {
    AdaptiveBatchNorm1d: nn.BatchNorm1d,
    AdaptiveBatchNorm2d: nn.BatchNorm2d,
    AdaptiveBatchNorm3d: nn.BatchNorm3d,
}


def adaptive_layers(model: nn.Module) -> list[_AdaptiveBatchNormMixin]:
    """Every adaptive BatchNorm layer of ``model`` (``model`` itself included), once each."""
    return [m for m in model.modules() if isinstance(m, _AdaptiveBatchNormMixin)]


def _share(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Make ``dst`` use the parameters, buffers and train flag of ``src`` (no copies)."""
    for name in ("weight", "bias"):
        setattr(dst, name, getattr(src, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(dst, name, getattr(src, name))
    dst.train(src.training)
    return dst


def _to_adaptive(bn: nn.Module) -> nn.Module:
    cls = _TO_ADAPTIVE[type(bn)]
    # Built on the meta device (nothing allocated), then given bn's own tensors.
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
    if type(bn) is nn.SyncBatchNorm:
        new._input_dims = None
        new._sync_process_group = bn.process_group
    return _share(bn, new)


def _to_torch(layer: nn.Module) -> nn.Module:
    if hasattr(layer, "_sync_process_group"):
        new = nn.SyncBatchNorm(layer.num_features, layer.eps, layer.momentum, layer.affine,
                               layer.track_running_stats, process_group=layer._sync_process_group, device="meta")
    else:
        cls = next(base for adaptive, base in _TO_TORCH.items() if isinstance(layer, adaptive))
        new = cls(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats, device="meta")
    return _share(layer, new)


def _swap(model: nn.Module, should_swap: Any, make: Any) -> tuple[nn.Module, int]:
    """Replace every submodule for which ``should_swap`` holds by ``make(module)``, in place.

    A module reachable under several names is replaced by one shared new module.
    """
    made: dict[int, nn.Module] = {}

    def get(module: nn.Module) -> nn.Module:
        if id(module) not in made:
            made[id(module)] = make(module)
        return made[id(module)]

    if should_swap(model):
        return get(model), 1
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and should_swap(child):
                parent._modules[name] = get(child)
    return model, len(made)


def _is_other_batchnorm(module: nn.Module) -> bool:
    """BatchNorm variants that convert leaves alone (subclasses, frozen BN, timm's BatchNormAct2d)."""
    if type(module) in _TO_ADAPTIVE or isinstance(module, _AdaptiveBatchNormMixin):
        return False
    return isinstance(module, nn.modules.batchnorm._NormBase) or "BatchNorm" in type(module).__name__


def convert(
    model: nn.Module,
    stats: str = "blend",
    prior: float = 16.0,
    alpha: float | None = None,
    momentum: float = 0.1,
    pooled: bool = False,
) -> nn.Module:
    """Replace every torch ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` by an adaptive layer.

    Replacement is by exact type and in place; the new layers share the old layers'
    parameters and buffers and carry eps, momentum, affine, track_running_stats, the train
    flag, device and dtype. Subclasses from other libraries are left alone (one logged
    warning). Layers that are already adaptive are reconfigured.

    Args:
        model: any module (a bare BatchNorm layer too: then the new layer is returned).
        stats, prior, alpha, pooled: see :class:`tta.AdaptiveBatchNorm2d`.
        momentum: EMA momentum (the layers' ``ema_momentum``).

    Returns:
        ``model`` (converted in place).
    """
    _check_stats(stats)
    params = {"prior": prior, "alpha": alpha, "momentum": momentum, "pooled": pooled}
    # Validate everything before the first change so a bad call leaves the model intact.
    AdaptiveBatchNorm1d(1, device="meta", stats="source").set_stats(stats, **params)
    candidates = [m for m in model.modules() if type(m) in _TO_ADAPTIVE or isinstance(m, _AdaptiveBatchNormMixin)]
    others = Counter(type(m).__name__ for m in model.modules() if _is_other_batchnorm(m))
    if not candidates:
        extra = f" (left alone, not torch BatchNorm: {dict(others)})" if others else ""
        raise ValueError(f"convert: model has no torch BatchNorm1d/2d/3d or SyncBatchNorm layer{extra}")
    if stats in ("blend", "ema"):
        untracked = sorted({n for n, m in model.named_modules() if m in candidates and m.running_mean is None})
        if untracked:
            raise ValueError(f"stats={stats!r} needs running statistics, but these layers have "
                             f"track_running_stats=False: {untracked}; use 'source' or 'batch'")
    if others:
        logger.warning("convert: left %d BatchNorm-like layers alone (not exactly torch BatchNorm): %s",
                       sum(others.values()), ", ".join(f"{k} x{v}" for k, v in sorted(others.items())))
    syncs = sum(type(m) is nn.SyncBatchNorm for m in candidates)
    if syncs:
        logger.info("convert: %d SyncBatchNorm layers become adaptive layers (no cross-process sync)", syncs)
    model, count = _swap(model, lambda m: type(m) in _TO_ADAPTIVE, _to_adaptive)
    for layer in adaptive_layers(model):
        layer.set_stats(stats, **params)
    logger.info("convert: %d BatchNorm layers now adaptive with stats=%r", count, stats)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Turn every adaptive layer back into plain torch BatchNorm, keeping the current running stats.

    Returns:
        ``model`` (in place; a bare adaptive layer is replaced by a new torch layer).
    """
    if not adaptive_layers(model):
        raise ValueError("revert: model has no tta adaptive BatchNorm layer (was it converted with tta.convert?)")
    model, _ = _swap(model, lambda m: isinstance(m, _AdaptiveBatchNormMixin), _to_torch)
    return model


def _layers_or_raise(model: nn.Module, what: str) -> list[_AdaptiveBatchNormMixin]:
    layers = adaptive_layers(model)
    if not layers:
        raise ValueError(f"{what}: model has no tta adaptive BatchNorm layer; call tta.convert(model) first")
    return layers


def set_stats(
    model: nn.Module,
    stats: str,
    *,
    prior: float = _KEEP,
    alpha: float | None = _KEEP,
    momentum: float = _KEEP,
    pooled: bool = _KEEP,
) -> nn.Module:
    """Switch every adaptive layer to ``stats`` (one of :data:`tta.STATS`); omitted parameters are kept.

    Returns:
        ``model``.
    """
    layers = _layers_or_raise(model, "set_stats")
    _check_stats(stats)
    if stats in ("blend", "ema") and any(layer.running_mean is None for layer in layers):
        raise ValueError(f"stats={stats!r} needs running statistics, but some layers have "
                         "track_running_stats=False; use 'source' or 'batch'")
    for layer in layers:
        layer.set_stats(stats, prior=prior, alpha=alpha, momentum=momentum, pooled=pooled)
    return model


@contextlib.contextmanager
def use_stats(
    model: nn.Module,
    stats: str,
    *,
    prior: float = _KEEP,
    alpha: float | None = _KEEP,
    momentum: float = _KEEP,
    pooled: bool = _KEEP,
) -> Iterator[nn.Module]:
    """Context manager: :func:`set_stats` on entry, every layer's previous configuration on exit
    (also when the block raises)."""
    layers = _layers_or_raise(model, "use_stats")
    saved = [layer.stats_config() for layer in layers]
    try:
        set_stats(model, stats, prior=prior, alpha=alpha, momentum=momentum, pooled=pooled)
        yield model
    finally:
        for layer, config in zip(layers, saved):
            layer.set_stats(**config)


def reset(model: nn.Module) -> nn.Module:
    """Put back the source running statistics of every adaptive layer (undoes EMA updates and
    recalibration). The ``stats`` setting of the layers is not changed.

    Returns:
        ``model``.
    """
    for layer in _layers_or_raise(model, "reset"):
        layer.restore_source_stats()
    return model

