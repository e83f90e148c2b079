"""Test streams: the order in which the corrupted images reach the model and when the
adaptation state is reset.

A stream turns the list of benchmark cells (corruption, severity) into segments. Each segment
is a sequence of ``(cell position, image index)`` pairs seen in order; the model is reset to
its prepared state before a segment whose ``reset`` is true.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from tta._registry import Registry

__all__ = ["Segment", "Stream", "register_stream", "get_stream", "list_streams", "dirichlet_order"]


@dataclass
class Segment:
    """A contiguous part of a stream.

    Args:
        cells: indices (into the benchmark's cell list) of the cells whose images it uses.
        order: long tensor of shape (M, 2): position in ``cells`` and image index, in order.
        reset: whether the model is reset to its prepared state before this segment.
    """

    cells: list[int]
    order: Tensor
    reset: bool


@dataclass(frozen=True)
class Stream:
    """A test-stream protocol; ``segments(cells, targets, seed, **params)`` yields
    :class:`Segment`; ``cells`` is a list of ``(corruption, severity)``."""

    name: str
    defaults: Mapping[str, Any]
    segments: Callable[..., Iterator[Segment]]
    check: Callable[[dict], None] = lambda params: None

    def params(self, params: Mapping[str, Any] | None = None) -> dict:
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown} for stream {self.name!r}; "
                             f"valid parameters are: {', '.join(self.defaults) or 'none'}")
        full = {**self.defaults, **params}
        for name, default in self.defaults.items():
            if isinstance(default, float):
                check_real(f"stream.{name}", full[name])
        self.check(full)
        return full


_STREAMS: Registry[Stream] = Registry("stream")


def register_stream(name: str, **kwargs: Any) -> Stream:
    return _STREAMS.register(name)(Stream(name=name, **kwargs))


def get_stream(name: str) -> Stream:
    """The stream registered as ``name``; unknown names raise a ValueError listing valid ones."""
    return _STREAMS.get(name)


def list_streams() -> list[str]:
    return _STREAMS.names()


def _in_order(cell: int, n: int, permutation: np.ndarray | None = None) -> Tensor:
    index = torch.arange(n) if permutation is None else torch.as_tensor(permutation, dtype=torch.long)
    return torch.stack([torch.zeros_like(index), index], dim=1)


def _reset_segments(cells: Sequence[tuple[str, int]], targets: Tensor, seed: int) -> Iterator[Segment]:
    for i in range(len(cells)):
        yield Segment([i], _in_order(i, len(targets)), reset=True)


def _continual_segments(cells: Sequence[tuple[str, int]], targets: Tensor, seed: int) -> Iterator[Segment]:
    # one reset before the first cell, then the state carries over the whole sequence
    for i in range(len(cells)):
        yield Segment([i], _in_order(i, len(targets)), reset=i == 0)


def _mixed_segments(cells: Sequence[tuple[str, int]], targets: Tensor, seed: int) -> Iterator[Segment]:
    # all corruptions of one severity shuffled into one stream; reset between severities
    severities = sorted({severity for _, severity in cells})
    n = len(targets)
    for severity in severities:
        members = [i for i, (_, s) in enumerate(cells) if s == severity]
        rng = np.random.default_rng([seed, severity])
        position = np.repeat(np.arange(len(members)), n)
        index = np.tile(np.arange(n), len(members))
        permutation = rng.permutation(len(position))
        order = torch.as_tensor(np.stack([position[permutation], index[permutation]], axis=1),
                                dtype=torch.long)
        yield Segment(members, order, reset=True)


def dirichlet_order(targets: Tensor | np.ndarray, delta: float, rng: np.random.Generator,
                    num_slots: int | None = None) -> np.ndarray:
    """A label-correlated permutation of ``range(len(targets))`` (the non-i.i.d. test stream
    of NOTE, Gong et al. 2022, also used by RoTTA, Yuan et al. 2023).

    The stream is cut into ``num_slots`` consecutive time slots (default: the number of
    classes). For every class, proportions over the slots are drawn from a symmetric
    Dirichlet(``delta``) and its (shuffled) images are split over the slots accordingly;
    within a slot the classes' chunks follow in random order. Small ``delta`` concentrates each
    class in few slots (long runs of one label); large ``delta`` approaches an i.i.d. order.
    """
    targets = np.asarray(targets)
    classes = np.unique(targets)
    slots = len(classes) if num_slots is None else num_slots
    proportions = rng.dirichlet(np.full(slots, float(delta)), size=len(classes))
    chunks: list[list[np.ndarray]] = [[] for _ in range(slots)]
    for label, p in zip(classes, proportions):
        members = rng.permutation(np.flatnonzero(targets == label))
        cuts = np.round(np.cumsum(p)[:-1] * len(members)).astype(int)
        for slot, chunk in enumerate(np.split(members, cuts)):
            chunks[slot].append(chunk)
    order = [slot_chunks[j] for slot_chunks in chunks for j in rng.permutation(len(slot_chunks))]
    return np.concatenate(order)


def check_real(name: str, value: Any) -> float:
    """``value`` as a finite float: TypeError unless it is a real number (bool is not),
    ValueError for nan and +-inf; both messages name ``name`` and ``value``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_dirichlet(params: dict) -> None:
    delta = check_real("stream.delta", params["delta"])
    if delta <= 0:
        raise ValueError(f"stream.delta must be a finite number > 0 (default 0.1), got {delta!r}")


def _dirichlet_segments(cells: Sequence[tuple[str, int]], targets: Tensor, seed: int,
                        delta: float) -> Iterator[Segment]:
    for i in range(len(cells)):
        rng = np.random.default_rng([seed, i])
        yield Segment([i], _in_order(i, len(targets), dirichlet_order(targets, delta, rng)),
                      reset=True)


register_stream("reset", defaults={}, segments=_reset_segments)
register_stream("continual", defaults={}, segments=_continual_segments)
register_stream("mixed", defaults={}, segments=_mixed_segments)
register_stream("dirichlet", defaults={"delta": 0.1}, segments=_dirichlet_segments,
                check=_check_dirichlet)
