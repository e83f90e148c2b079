"""Model surgery: swap torch BatchNorm layers for adaptive ones and back, switch statistics."""
from __future__ import annotations

import contextlib
import copy
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.module import _WrappedHook
from torch.nn.utils import parametrize

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
# What an adaptive layer has beyond torch's: its configuration attributes and the buffers of
# the source copy.
_EXTRA_ATTRS = frozenset(vars(AdaptiveBatchNorm1d(1, device="meta"))) - frozenset(vars(nn.BatchNorm1d(1, device="meta")))
_EXTRA_BUFFERS = frozenset(AdaptiveBatchNorm1d(1, device="meta")._buffers) - frozenset(nn.BatchNorm1d(1, device="meta")._buffers)
# Per-module containers the new layer gets its own copy of (same tensors and submodules).
_CONTAINERS = ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules")


def adaptive_layers(model: nn.Module) -> list[_AdaptiveBatchNormMixin]:
    """Every adaptive BatchNorm layer of ``model`` (``model`` itself included), once each."""
    return [m for m in model.modules() if isinstance(m, _AdaptiveBatchNormMixin)]


def _plain_type(module: nn.Module) -> type:
    """The module's class, or for a ``torch.nn.utils.parametrize`` module the class it was made from."""
    return type(module).__base__ if parametrize.is_parametrized(module) else type(module)  # type: ignore[return-value]


def _rebuild(src: nn.Module, cls: type, name: str) -> nn.Module:
    """A new ``cls`` module with the whole state of ``src``, nothing copied and ``src`` unchanged.

    It takes ``src``'s parameters, buffers, submodules and plain attributes (train flag, eps,
    pruning's ``weight``, ...) as the same objects in its own containers, and ``src``'s hook
    dicts themselves, so hooks keep firing and handles the user kept still remove them
    (:func:`_commit` then empties ``src``'s). Adaptive-only attributes and buffers come from a
    fresh ``cls`` layer when ``cls`` is adaptive and are dropped otherwise. A module
    parametrised with ``torch.nn.utils.parametrize`` gets the same properties on a new
    ``Parametrized<cls>`` class.
    """
    if "forward" in vars(src) or "_compiled_call_impl" in vars(src):
        raise ValueError(f"convert/revert: layer {name!r} ({type(src).__name__}) has an instance-level forward "
                         "(patched or compiled); swap its layers before patching or compiling it")
    new = cls(src.num_features, device="meta")
    state = {key: copy.copy(value) if key in _CONTAINERS else value for key, value in vars(src).items()}
    adaptive = isinstance(new, _AdaptiveBatchNormMixin)
    for key in _EXTRA_ATTRS | {"_input_dims"}:
        state.pop(key, None)
    for key in _EXTRA_BUFFERS:
        state["_buffers"].pop(key, None)
        state["_non_persistent_buffers_set"].discard(key)
    if adaptive:
        state.update({key: vars(new)[key] for key in _EXTRA_ATTRS})
        state["_buffers"].update({key: None for key in _EXTRA_BUFFERS})
        state["_non_persistent_buffers_set"] |= _EXTRA_BUFFERS
        if type(src) is nn.SyncBatchNorm:
            state["_input_dims"] = None  # any input rank, as SyncBatchNorm
    if parametrize.is_parametrized(src):
        properties = {k: v for k, v in vars(type(src)).items() if k not in ("__module__", "__doc__", "__dict__", "__weakref__")}
        new.__class__ = type(f"Parametrized{cls.__name__}", (cls,), properties)
    vars(new).clear()
    vars(new).update(state)
    if adaptive:
        # Reapplying the configuration lets the layer record its (now real) running buffers.
        new.set_stats(**new.stats_config())
    return new


def _commit(src: nn.Module, dst: nn.Module) -> None:
    """Hand ``src``'s hooks over to ``dst`` (the dicts are already shared): hooks bound to
    ``src`` are rebound, and ``src`` gets empty hook dicts."""
    for key, hooks in vars(src).items():
        if "hooks" not in key or not isinstance(hooks, dict):
            continue
        for hook_id, hook in hooks.items():
            if isinstance(hook, _WrappedHook) and hook.with_module and hook.module() is src:
                hooks[hook_id] = _WrappedHook(hook.hook, dst)
        vars(src)[key] = type(hooks)()


def _swap(model: nn.Module, should_swap: Callable[[nn.Module], bool], make: Callable[[nn.Module, str], nn.Module]
          ) -> tuple[nn.Module, int]:
    """Replace every submodule for which ``should_swap`` holds by ``make(module, name)``, in place.

    Every new module is made before the first change, so an error leaves the model as it was.
    A module reachable under several names is replaced by one shared new module.
    """
    made = {id(m): (m, make(m, name or type(m).__name__)) for name, m in model.named_modules() if should_swap(m)}
    for old, new in made.values():
        _commit(old, new)
    if id(model) in made:
        return made[id(model)][1], 1
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in made:
                parent._modules[name] = made[id(child)][1]
    return model, len(made)


def _is_other_batchnorm(module: nn.Module) -> bool:
    """BatchNorm variants that convert leaves alone (subclasses, frozen BN, timm's BatchNormAct2d).

    InstanceNorm (also a ``_NormBase``) is not BatchNorm and is not counted.
    """
    if _plain_type(module) in _TO_ADAPTIVE or isinstance(module, _AdaptiveBatchNormMixin):
        return False
    return isinstance(module, _BatchNorm) or "BatchNorm" in type(module).__name__


def _to_adaptive(bn: nn.Module, name: str) -> nn.Module:
    return _rebuild(bn, _TO_ADAPTIVE[_plain_type(bn)], name)


def _to_torch(layer: nn.Module, name: str) -> nn.Module:
    if "process_group" in vars(layer):  # converted from SyncBatchNorm
        return _rebuild(layer, nn.SyncBatchNorm, name)
    return _rebuild(layer, next(base for adaptive, base in _TO_TORCH.items() if isinstance(layer, adaptive)), name)


def convert(
    model: nn.Module,
    stats: str = "blend",
    prior: float = 16.0,
    alpha: float | None = None,
    momentum: float = 0.1,
    pooled: bool = False,
    variance: str = "biased",
    moments: str = "both",
) -> nn.Module:
    """Replace every torch ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` by an adaptive layer.

    Replacement is by exact type (a ``torch.nn.utils.parametrize`` module counts as its
    original class) and in place. A new layer takes over the old layer's whole state without
    copies: the same parameters and buffers, eps, momentum, affine, track_running_stats, the
    train flag, device, dtype, other attributes, and its hooks (forward, pre-forward, backward,
    state-dict and load-state-dict hooks; handles kept by the user still remove them), so
    pruned (``torch.nn.utils.prune``), parametrised and spectral-normed weights keep working.
    Subclasses from other libraries are left alone (one logged warning). Layers that are
    already adaptive are reconfigured. Every new layer is built before the first swap: an
    error leaves the model unchanged.

    Args:
        model: any module (a bare BatchNorm layer too: then the new layer is returned).
        stats, prior, alpha, pooled, variance, moments: see :class:`tta.AdaptiveBatchNorm2d`.
        momentum: EMA momentum (the layers' ``ema_momentum``).

    Returns:
        ``model`` (converted in place).

    Raises:
        ValueError: no torch BatchNorm in ``model``, a bad ``stats``/parameter, ``blend``/``ema``
            on layers without running statistics, or a layer with an instance-level
            ``forward`` (patched or compiled; named in the message).
    """
    _check_stats(stats)
    params = {"prior": prior, "alpha": alpha, "momentum": momentum, "pooled": pooled, "variance": variance,
              "moments": moments}
    # Validate everything before the first change so a bad call leaves the model intact.
    AdaptiveBatchNorm1d(1, device="meta", stats="source").set_stats(stats, **params)
    candidates = [m for m in model.modules() if _plain_type(m) in _TO_ADAPTIVE or isinstance(m, _AdaptiveBatchNormMixin)]
    others = Counter(type(m).__name__ for m in model.modules() if _is_other_batchnorm(m))
    if not candidates:
        extra = f" (left alone, not torch BatchNorm: {dict(others)})" if others else ""
        raise ValueError(f"convert: model has no torch BatchNorm1d/2d/3d or SyncBatchNorm layer{extra}")
    needs_running = stats in ("blend", "ema") or (stats == "batch" and moments != "both")
    if needs_running:
        untracked = sorted({n for n, m in model.named_modules() if m in candidates and m.running_mean is None})
        if untracked:
            what = f"stats={stats!r}" + (f" with moments={moments!r}" if stats == "batch" else "")
            raise ValueError(f"{what} needs running statistics, but these layers have "
                             f"track_running_stats=False: {untracked}; use 'source' or 'batch'")
    if others:
        logger.warning("convert: left %d BatchNorm-like layers alone (not exactly torch BatchNorm): %s",
                       sum(others.values()), ", ".join(f"{k} x{v}" for k, v in sorted(others.items())))
    syncs = sum(type(m) is nn.SyncBatchNorm for m in candidates)
    if syncs:
        logger.info("convert: %d SyncBatchNorm layers become adaptive layers (no cross-process sync)", syncs)
    model, count = _swap(model, lambda m: _plain_type(m) in _TO_ADAPTIVE, _to_adaptive)
    for layer in adaptive_layers(model):
        layer.set_stats(stats, **params)
    logger.info("convert: %d BatchNorm layers now adaptive with stats=%r", count, stats)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Turn every adaptive layer back into plain torch BatchNorm, keeping the current running stats.

    Like :func:`convert`, the torch layer takes over the whole state, hooks included; the
    source copy (``source_mean``/``source_var``) is dropped.

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
    variance: str = _KEEP,
    moments: str = _KEEP,
) -> nn.Module:
    """Switch every adaptive layer to ``stats`` (one of :data:`tta.STATS`); omitted parameters
    are kept (see :meth:`tta.AdaptiveBatchNorm2d.set_stats`).

    Returns:
        ``model``.

    Raises:
        ValueError: bad ``stats`` or parameter, ``blend``/``ema`` on layers without running
            statistics; raised before any layer changes.
    """
    layers = _layers_or_raise(model, "set_stats")
    _check_stats(stats)
    if stats in ("blend", "ema") and any(layer.running_mean is None for layer in layers):
        raise ValueError(f"stats={stats!r} needs running statistics, but some layers have "
                         "track_running_stats=False; use 'source' or 'batch'")
    if stats != "source" and any(layer.running_mean is None and (layer.moments if moments is _KEEP else moments) != "both"
                                 for layer in layers):
        raise ValueError(f"moments other than 'both' need running statistics, but some layers have "
                         "track_running_stats=False; use moments='both'")
    # All layers get the same arguments: the first one validates them before it changes.
    for layer in layers:
        layer.set_stats(stats, prior=prior, alpha=alpha, momentum=momentum, pooled=pooled, variance=variance,
                        moments=moments)
    return model


Snapshot = dict[nn.Module, tuple[dict[str, Tensor | None], dict[str, Any] | None]]


@torch.no_grad()
def _snapshot(layers: Iterable[nn.Module]) -> Snapshot:
    """Copies of every buffer (running statistics, num_batches_tracked, the source copy) and the
    stats configuration of ``layers``, for :func:`_restore`."""
    return {layer: ({k: None if v is None else v.clone() for k, v in layer._buffers.items()},
                    layer.stats_config() if isinstance(layer, _AdaptiveBatchNormMixin) else None)
            for layer in layers}


@torch.no_grad()
def _restore(snapshot: Snapshot) -> None:
    """Put the state saved by :func:`_snapshot` back (in place where the tensor is still there)."""
    for layer, (buffers, config) in snapshot.items():
        for name, saved in buffers.items():
            current = layer._buffers.get(name)
            if saved is not None and current is not None and current.shape == saved.shape:
                current.copy_(saved)
            else:
                layer._buffers[name] = saved
        if config is not None:
            layer.set_stats(**config)


@contextlib.contextmanager
def use_stats(
    model: nn.Module,
    stats: str,
    *,
    prior: float = _KEEP,
    alpha: float | None = _KEEP,
    momentum: float = _KEEP,
    pooled: bool = _KEEP,
    variance: str = _KEEP,
    moments: str = _KEEP,
) -> Iterator[nn.Module]:
    """Context manager: :func:`set_stats` on entry; on exit (also when the block raises) every
    adaptive layer's configuration *and buffers* are put back: ``running_mean``/``running_var``
    (EMA steps, recalibration or train-mode updates inside the block are undone),
    ``num_batches_tracked`` and the source copy (so :func:`reset` behaves as before the block).
    Parameters (weight, bias) and train flags are not touched.

    Memory: one copy of every adaptive layer's buffers (a few vectors per layer).
    """
    layers = _layers_or_raise(model, "use_stats")
    saved = _snapshot(layers)
    try:
        set_stats(model, stats, prior=prior, alpha=alpha, momentum=momentum, pooled=pooled, variance=variance,
                        moments=moments)
        yield model
    finally:
        _restore(saved)


def reset(model: nn.Module) -> nn.Module:
    """Put back the source running statistics of every adaptive layer (undoes EMA updates and
    recalibration). The ``stats`` setting of the layers is not changed.

    Returns:
        ``model``.
    """
    for layer in _layers_or_raise(model, "reset"):
        layer.restore_source_stats()
    return model
