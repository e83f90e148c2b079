"""Test streams: the order in which the corrupted images reach the model and when the
adaptation state is reset.

A stream turns the list of benchmark cells (corruption, severity) into segments. Each segment
is a sequence of ``(cell position, image index)`` pairs seen in order; the model is reset to
its prepared state before a segment whose ``reset`` is true. A cell may appear in several
segments (``gradual`` visits severities twice); its accuracy is then over all its visits.

Two optional parts of a stream: ``subset(targets, seed, **params)`` selects the images every
cell is made of (``imbalance``: a class-imbalanced test set; the source and clean accuracies
are computed on the same images), and ``uses_clean``: the stream interleaves the clean images,
passed as the last cell with key ``("clean", 0)`` (``mixture``).
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

__all__ = ["Segment", "Stream", "register_stream", "get_stream", "list_streams", "dirichlet_order",
           "imbalance_subset", "imbalance_factor", "mixture_clean_count"]


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
    subset: Callable[..., Tensor] | None = None
    uses_clean: bool = False

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


def _gradual_segments(cells: Sequence[tuple[str, int]], targets: Tensor, seed: int) -> Iterator[Segment]:
    # CoTTA's gradual protocol (cifar10c_gradual.py): one reset at the start; the first
    # corruption from the highest severity down, every later one up and back down
    # (1, 2, 3, 4, 5, 4, 3, 2, 1), so the shift changes by one severity step at a time
    corruptions = list(dict.fromkeys(c for c, _ in cells))
    first = True
    for k, corruption in enumerate(corruptions):
        levels = sorted(s for c, s in cells if c == corruption)
        visits = levels[::-1] if k == 0 else levels + levels[-2::-1]
        for severity in visits:
            i = cells.index((corruption, severity))
            yield Segment([i], _in_order(i, len(targets)), reset=first)
            first = False


def imbalance_subset(targets: Tensor, seed: int, factor: float) -> Tensor:
    """Indices of a long-tailed subset of the test set: with the classes in a random order
    (seeded), class k of C keeps ``floor(n_max * factor ** (-k / (C - 1)))`` of its images
    (n_max: the smallest class count, so every class can supply its share), the exponential
    profile of CIFAR-10-LT (Cui et al., CVPR 2019); ``factor`` = largest / smallest class size.
    Sorted indices into ``targets``. The floors make the achieved factor
    (:func:`imbalance_factor` of the subset's labels) differ from ``factor`` when n_max is small.

    Raises:
        ValueError: ``n_max < factor``: the smallest class would keep no image, so the profile
            cannot be built (the message names n_max, the requested factor and the fix).
    """
    targets = np.asarray(targets)
    classes = np.unique(targets)
    rng = np.random.default_rng([seed, 10])
    ranked = rng.permutation(classes)
    n_max = min(int((targets == c).sum()) for c in classes)
    if len(classes) > 1 and n_max < factor:
        raise ValueError(f"stream.factor={factor!r} needs at least {math.ceil(factor)} images in every "
                         f"class (the smallest class keeps n_max / factor of them), but the smallest class "
                         f"of these {len(targets)} images has {n_max}: use more images (num_examples) or "
                         f"a factor <= {n_max}")
    keep = []
    for k, label in enumerate(ranked):
        count = int(n_max * factor ** (-k / max(len(classes) - 1, 1)))
        keep.append(rng.permutation(np.flatnonzero(targets == label))[:max(count, 1)])  # float rounding
    return torch.as_tensor(np.sort(np.concatenate(keep)), dtype=torch.long)


def imbalance_factor(targets: Tensor) -> tuple[dict[int, int], float]:
    """The per-class image counts of ``targets`` (N,) (classes present only) and the achieved
    imbalance factor, largest / smallest count."""
    labels, counts = np.unique(np.asarray(targets), return_counts=True)
    return {int(k): int(v) for k, v in zip(labels, counts)}, float(counts.max() / counts.min())


def _check_imbalance(params: dict) -> None:
    factor = check_real("stream.factor", params["factor"])
    if factor < 1:
        raise ValueError(f"stream.factor must be a finite number >= 1 (largest / smallest class "
                         f"size, e.g. 10 or 100), got {factor!r}")


def _imbalance_segments(cells: Sequence[tuple[str, int]], targets: Tensor, seed: int,
                        factor: float) -> Iterator[Segment]:
    # the images are already the imbalanced subset (Stream.subset); each cell in random order
    for i in range(len(cells)):
        rng = np.random.default_rng([seed, 11, i])
        yield Segment([i], _in_order(i, len(targets), rng.permutation(len(targets))), reset=True)


def _check_mixture(params: dict) -> None:
    fraction = check_real("stream.clean_fraction", params["clean_fraction"])
    if not 0.0 < fraction < 1.0:  # 0: no clean image, so no clean accuracy nor forgetting
        raise ValueError(f"stream.clean_fraction must be in (0, 1) (the clean share of the stream; its "
                         f"accuracy and the forgetting need clean images), got {fraction!r}")


def mixture_clean_count(n: int, clean_fraction: float) -> int:
    """The clean images shuffled into each segment of ``mixture`` beside ``n`` corrupted ones:
    ``round(n * f / (1 - f))``, so that they are the fraction f of the segment.

    Raises:
        ValueError: the count rounds to 0 (no clean accuracy could be measured).
    """
    k = round(n * clean_fraction / (1.0 - clean_fraction))
    if k < 1:
        raise ValueError(f"stream.clean_fraction={clean_fraction!r} of {n} images per cell rounds to no "
                         f"clean image, so there would be no clean accuracy nor forgetting: use a larger "
                         f"clean_fraction or more images (num_examples)")
    return k


def _mixture_segments(cells: Sequence[tuple[str, int]], targets: Tensor, seed: int,
                      clean_fraction: float) -> Iterator[Segment]:
    # continual over the corrupted cells, each shuffled together with clean images that make
    # up `clean_fraction` of its segment (drawn without replacement until the clean set is used
    # up, then again): accuracy on the clean part measures forgetting
    if ("clean", 0) not in cells:
        raise ValueError("stream=mixture needs the clean images as the cell ('clean', 0)")
    clean = cells.index(("clean", 0))
    n = len(targets)
    k = mixture_clean_count(n, clean_fraction)
    rng = np.random.default_rng([seed, 12])
    pool = np.empty(0, dtype=np.int64)
    corrupted = [i for i in range(len(cells)) if i != clean]
    for j, i in enumerate(corrupted):
        while len(pool) < k:
            pool = np.concatenate([pool, rng.permutation(n)])
        drawn, pool = pool[:k], pool[k:]
        position = np.concatenate([np.zeros(n, dtype=np.int64), np.ones(k, dtype=np.int64)])
        index = np.concatenate([np.arange(n), drawn])
        shuffle = rng.permutation(n + k)
        order = torch.as_tensor(np.stack([position[shuffle], index[shuffle]], axis=1), dtype=torch.long)
        yield Segment([i, clean], order, reset=j == 0)


register_stream("reset", defaults={}, segments=_reset_segments)
register_stream("continual", defaults={}, segments=_continual_segments)
register_stream("mixed", defaults={}, segments=_mixed_segments)
register_stream("dirichlet", defaults={"delta": 0.1}, segments=_dirichlet_segments,
                check=_check_dirichlet)
register_stream("gradual", defaults={}, segments=_gradual_segments)
register_stream("imbalance", defaults={"factor": 10.0}, segments=_imbalance_segments,
                check=_check_imbalance,
                subset=imbalance_subset)
register_stream("mixture", defaults={"clean_fraction": 0.25}, segments=_mixture_segments,
                check=_check_mixture, uses_clean=True)
