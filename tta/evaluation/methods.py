"""Adaptation methods: how a model is prepared for the test stream and adapted per segment.

A method converts the model's BatchNorm layers with :func:`tta.convert` (``source`` keeps the
model untouched) and may adapt at the start of every stream segment (``recalibrate`` runs AdaBN
on the segment's own images). Resetting between segments is the stream's decision
(:mod:`tta.evaluation.streams`); :func:`Method.reset` restores the prepared model.
"""
from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

import tta
from tta._registry import Registry
from tta.evaluation.streams import check_real

__all__ = ["Method", "register_method", "get_method", "list_methods"]

_METHODS: Registry[Method] = Registry("adapt method")


def _check_number(name: str, value: Any, low: float | None = None, high: float | None = None,
                  low_open: bool = False, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    check_real(f"adapt.{name}", value)  # a number, not nan or inf
    if low is not None and (value < low or (low_open and value == low)):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"adapt.{name} must be {bound}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"adapt.{name} must be <= {high}, got {value!r}")
    return value


def _check_int(name: str, value: Any, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"adapt.{name} must be a positive int{' or null' if allow_none else ''}, "
                         f"got {value!r}")
    return int(value)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"adapt.{name} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class Method:
    """One adaptation method.

    Args:
        name: registry name (also the ``adapt`` config group member).
        defaults: the parameters the method takes, with their default values.
        check: validates a full parameter dict (raises ValueError/TypeError).
        prepare: converts the model in place for this method.
        adapt: optional; called at the start of every segment as ``adapt(model, batches, params)``
            where ``batches(batch_size, num_images)`` iterates over the segment's first images.
        converts: whether ``prepare`` converts the BatchNorm layers (so :func:`tta.reset` applies).
        ignores: parameters accepted and ignored (set to None), so that one sweep can vary
            e.g. ``adapt.prior`` over several methods.
    """

    name: str
    defaults: Mapping[str, Any]
    check: Callable[[dict], None]
    prepare: Callable[[nn.Module, dict], None]
    adapt: Callable[[nn.Module, Callable[[int], Iterator[Tensor]], dict], None] | None = None
    converts: bool = True
    ignores: tuple[str, ...] = ()

    def params(self, params: Mapping[str, Any] | None = None) -> dict:
        """The full, validated parameters: ``defaults`` updated by ``params``."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown} for adapt method {self.name!r}; "
                             f"valid parameters are: {', '.join(self.defaults) or 'none'}")
        full = {**self.defaults, **params}
        for name in self.ignores:
            full[name] = None
        self.check(full)
        return full

    def snapshot(self, model: nn.Module) -> dict[str, Tensor]:
        """The prepared model's state, for :meth:`reset`."""
        return copy.deepcopy(model.state_dict())

    def reset(self, model: nn.Module, snapshot: Mapping[str, Tensor]) -> None:
        """Returns a prepared model to its state before any test data (clears EMA, AdaBN)."""
        model.load_state_dict(snapshot)
        if self.converts:
            tta.reset(model)


def register_method(name: str, **kwargs: Any) -> Method:
    """Registers a :class:`Method` built from ``kwargs`` under ``name`` and returns it."""
    method = Method(name=name, **kwargs)
    return _METHODS.register(name)(method)


def get_method(name: str) -> Method:
    """The method registered as ``name``; unknown names raise a ValueError listing valid ones."""
    return _METHODS.get(name)


def list_methods() -> list[str]:
    return _METHODS.names()


# --- the built-in methods -------------------------------------------------------------------

def _no_check(params: dict) -> None:
    pass


def _check_blend(params: dict) -> None:
    _check_number("prior", params["prior"], low=0)
    _check_number("alpha", params["alpha"], low=0, high=1, allow_none=True)
    _check_bool("pooled", params["pooled"])


def _check_ema(params: dict) -> None:
    _check_number("momentum", params["momentum"], low=0, high=1, low_open=True)


def _check_recalibrate(params: dict) -> None:
    _check_int("num_images", params["num_images"], allow_none=True)
    _check_bool("exact", params["exact"])
    _check_number("prior", params["prior"], low=0, allow_none=True)
    _check_int("batch_size", params["batch_size"])


def _recalibrate(model: nn.Module, batches: Callable[[int], Iterator[Tensor]], params: dict) -> None:
    # AdaBN on the first `num_images` images of the segment, in stream order, unlabelled
    tta.recalibrate(model, batches(params["batch_size"], params["num_images"]),
                    prior=params["prior"], exact=params["exact"])


# source, batch and ema accept (and ignore) `prior`, so that the documented sweep
# `adapt=source,batch,blend adapt.prior=1,4,16,64` composes for every method
register_method(
    "source", defaults={"prior": None}, check=_no_check, prepare=lambda model, p: None,
    converts=False, ignores=("prior",))
register_method(
    "batch", defaults={"prior": None}, check=_no_check, ignores=("prior",),
    prepare=lambda model, p: tta.convert(model, stats="batch"))
register_method(
    "blend", defaults={"prior": 16, "alpha": None, "pooled": False}, check=_check_blend,
    prepare=lambda model, p: tta.convert(model, stats="blend", prior=p["prior"],
                                         alpha=p["alpha"], pooled=p["pooled"]))
register_method(
    "ema", defaults={"momentum": 0.1, "prior": None}, check=_check_ema, ignores=("prior",),
    prepare=lambda model, p: tta.convert(model, stats="ema", momentum=p["momentum"]))
register_method(
    "recalibrate", defaults={"num_images": None, "exact": False, "prior": None, "batch_size": 256},
    check=_check_recalibrate, prepare=lambda model, p: tta.convert(model, stats="source"),
    adapt=_recalibrate)
