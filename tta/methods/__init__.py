"""Test-time adaptation methods as a library: ``tta.adapt(model, name, **hparams)``.

Each method is one short module in the style of tent's reference ``tent.py`` (configure the
model, collect the parameters it updates, check, forward and adapt, reset) and a subclass of
:class:`tta.methods.base.Adapter`. docs/methods.md has the table of methods, their papers,
defaults and measured costs.

Examples::

    >>> adapted = tta.adapt(model, "tent", lr=1e-3)
    >>> logits = adapted(x)          # adapts on x, returns logits for x
    >>> adapted.reset()              # back to the state right after tta.adapt
    >>> tta.list_methods()
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

from torch import nn

from tta._registry import Registry
from tta.methods.base import Adapter

__all__ = ["Adapter", "adapt", "list_methods", "get_method", "register_method"]

_METHODS: Registry[type[Adapter]] = Registry("adaptation method", ordered=False)
A = TypeVar("A", bound=type[Adapter])


def register_method(name: str) -> Callable[[A], A]:
    """Class decorator: registers an :class:`Adapter` subclass under ``name`` (its ``name``).

    Raises:
        ValueError: ``name`` is already registered.
    """

    def wrapper(cls: A) -> A:
        cls.name = name
        return _METHODS.register(name)(cls)

    return wrapper


def get_method(name: str) -> type[Adapter]:
    """The :class:`Adapter` class registered as ``name`` (ValueError listing the valid names)."""
    return _METHODS.get(name)


def list_methods() -> list[str]:
    """The sorted names of every method usable in :func:`adapt` and in ``conf/adapt``."""
    return _METHODS.names()


def adapt(model: nn.Module, method: str, **hparams: Any) -> Adapter:
    """Wraps ``model`` in test-time adaptation method ``method``.

    ``model`` is modified in place as the method requires (BatchNorm layers converted and back
    on their source statistics, the parameters it does not train frozen, eval mode) and a
    snapshot is kept for ``reset()``. The model then belongs to the returned adapter: adapt a
    fresh copy (``copy.deepcopy``) for another method, or ``adapter.release()`` it first.

    Args:
        model: a classifier taking float input (N, C, H, W) and returning logits (N, K).
        method: one of :func:`list_methods`.
        **hparams: the method's hyper-parameters (see its class docstring); omitted ones take
            the defaults of the method's reference configuration.

    Returns:
        a :class:`Adapter` (an ``nn.Module``): ``adapter(x)`` adapts and returns logits,
        ``adapter.reset()`` restores the state right after this call.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: unknown method or hyper-parameter (the message lists the valid ones), a
            bad value, a model the method cannot adapt, or a model (or a module of it) already
            wrapped by a live adapter; raised before the model is changed.
        RuntimeError: a gradient method built under ``torch.inference_mode()``.
    """
    cls = get_method(method)
    valid = cls.defaults()
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise ValueError(f"unknown hyper-parameter(s) {unknown} for method {method!r}; valid: "
                         f"{', '.join(valid) or 'none'}")
    return cls(model, **hparams)


# the built-in methods register themselves on import
from tta.methods import cotta, dua, eata, norm, sar, tent  # noqa: E402,F401
