"""The table of corruption functions and their per-preset parameters.

A corruption function has the signature ``fn(x, params, rng) -> Tensor``:

* ``x``: float32 tensor ``(N, C, H, W)`` in [0, 1], C in {1, 3}, any device; a fresh
  copy that the function may overwrite;
* ``params``: the entry of the chosen preset's table for the chosen severity
  (whatever the module put there: a number, a tuple, a small dict);
* ``rng``: an :class:`~tta.corruptions._rng.ImageRNG` with one stream per image.

It returns a float tensor of the same shape; values may leave [0, 1] (the caller
clips and converts back to the input dtype). A function with an 8-bit path may set
``fn.uint8_native = True``: for uint8 input it then gets the uint8 batch and returns
uint8. Two kinds do: those that work on 8-bit values anyway (Pillow's pixelate and
JPEG), and those whose uint8 path gives the float path's bytes exactly, faster (tables
or integer arithmetic: shot and impulse noise, zoom blur, brightness).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

PRESETS = ("cifar", "tiny", "imagenet")


@dataclass(frozen=True)
class Corruption:
    name: str
    fn: Callable
    params: dict  # preset name -> list of 5 severity entries
    chunk_values: int | None = None  # values per chunk that corrupt() hands to fn (None: its default)


_CORRUPTIONS: dict[str, Corruption] = {}


def register_corruption(name: str, *, cifar: Sequence[Any], tiny: Sequence[Any], imagenet: Sequence[Any],
                        chunk_values: int | None = None):
    """Decorator: register ``fn`` under ``name`` with its three severity tables.

    ``chunk_values``: the batch size (in values, N C H W) that :func:`tta.corrupt`
    hands to ``fn`` at a time; per-value corruptions are fastest on chunks that fit
    in the cache. Results do not depend on it."""
    tables = {"cifar": list(cifar), "tiny": list(tiny), "imagenet": list(imagenet)}
    for preset, table in tables.items():
        if len(table) != 5:
            raise ValueError(f"corruption {name!r}: preset {preset!r} needs 5 severities, got {len(table)}")

    def wrap(fn: Callable) -> Callable:
        if name in _CORRUPTIONS:
            raise ValueError(f"corruption {name!r} is already registered")
        _CORRUPTIONS[name] = Corruption(name, fn, tables, chunk_values)
        return fn

    return wrap


def get_corruption(name: str) -> Corruption:
    try:
        return _CORRUPTIONS[name]
    except KeyError:
        raise ValueError(f"unknown corruption {name!r}; valid choices: {sorted(_CORRUPTIONS)}") from None


def registered_corruptions() -> list[str]:
    return sorted(_CORRUPTIONS)


def to_uint8(y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Float images (any values) -> uint8 like the reference's ``np.uint8(255 * clip(y, 0, 1))``.

    The cast truncates; a tolerance of 1e-3 grey levels keeps float round-off
    (``k / 255 * 255 = k - 1e-5``) from losing a level. The arithmetic is in ``y``'s
    dtype (float32 for every corruption), so a value within its round-off of a level
    boundary lands as that dtype's arithmetic puts it. Works in place on ``y``
    (a fresh tensor) and writes into ``out`` (a uint8 tensor of ``y``'s shape) when
    given. Corruptions that tabulate their uint8 results use this same function, so
    their tables agree with the float path value for value."""
    y = y.detach().clamp_(0.0, 1.0).mul_(255.0).add_(1e-3)
    if out is None:
        out = torch.empty_like(y, dtype=torch.uint8)  # y's memory layout: the cast needs no transposition
    if y.device.type == "cpu" and out.device.type == "cpu":
        # numpy's float -> uint8 cast is vectorised (about 4x torch's copy_ on the CPU);
        # both truncate the same in-range values.
        np.copyto(out.numpy(), y.numpy(), casting="unsafe")
    else:
        out.copy_(y)
    return out


def lookup_pairs(table: torch.Tensor, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """``table[high, low]`` elementwise: ``table`` (256, 256) uint8, ``high`` and ``low``
    uint8 tensors of one shape (or broadcastable ones); returns uint8 of their shape.
    On the CPU a numpy take over ``high << 8 | low`` (16-bit indices): several times
    faster than torch's int64 indexing. For corruptions whose output byte is a function
    of two bytes, tabulated with the float path's own arithmetic."""
    if table.device.type == "cpu" and high.device.type == "cpu" and low.device.type == "cpu":
        index = (high.numpy().astype(np.uint16) << 8) | low.numpy()
        return torch.from_numpy(np.asarray(table.numpy().reshape(-1).take(index)))  # 0-d: an array, not a scalar
    return table.to(high.device).reshape(-1)[(high.to(torch.int64) << 8) | low]
