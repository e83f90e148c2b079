"""Per-image random numbers for the corruption suite.

Every image gets its own :class:`torch.Generator`, seeded from
``(seed, corruption name, severity, image index)``: numpy's ``SeedSequence``
(a documented, platform-independent hash) turns ``(seed, crc32(name), severity)``
into a 128-bit key ``(k0, k1)``, and image ``i`` gets
``splitmix64(k0 + (i + 1) * 0x9E3779B97F4A7C15) ^ k1`` (shifted to 63 bits),
computed for all indices at once. The draws an image
receives therefore depend only on that tuple and on the order in which the
corruption function asks for them, never on the other images of the call:
splitting a call into chunks (with ``index_offset``) gives identical results.
Draws are made on the CPU (generators are cheap there and device-independent)
and moved to the images' device. Where numpy's generator is faster (float64
uniforms for shot noise's inverse-CDF Poisson sampler and its raw 64-bit outputs
for the uint8 table path, float32 uniforms for impulse noise, elastic's fields
and fog's plasma, bytes for glass blur's offsets), an image also gets a
``numpy.random.Generator(PCG64(s))`` seeded with the same 63-bit seed ``s``: a
stream independent of the torch one, equally a function of the tuple.
"""
from __future__ import annotations

import functools
import zlib
from typing import Callable, Sequence

import numpy as np
import torch

__all__ = ["ImageRNG", "image_seeds"]


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@functools.lru_cache(maxsize=1024)
def _key(seed: int, name: str, severity: int) -> tuple[np.uint64, np.uint64]:
    """The 128-bit key of (seed, corruption, severity): computed once (SeedSequence
    costs tens of microseconds, once per chunk otherwise)."""
    tag = zlib.crc32(name.encode("utf-8"))
    k0, k1 = np.random.SeedSequence([seed, tag, severity]).generate_state(2, np.uint64)
    return k0, k1


def image_seeds(seed: int, name: str, severity: int, indices: Sequence[int]) -> list[int]:
    """The 63-bit generator seed of every image index (see the module docstring)."""
    k0, k1 = _key(int(seed), str(name), int(severity))
    i = np.asarray(indices, dtype=np.uint64).reshape(-1)
    with np.errstate(over="ignore"):
        z = k0 + (i + np.uint64(1)) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
    return ((z ^ k1) >> np.uint64(1)).tolist()


@functools.lru_cache(maxsize=None)
def _byte_divisor(d: int) -> tuple[np.uint16, int] | None:
    """``(m, s)`` with ``(v * m) >> s == v // d`` for every byte v, without 16-bit
    overflow (checked on all 256 bytes); None where there is none (d = 7, ...)."""
    v = np.arange(256, dtype=np.uint16)
    for s in range(8, 17):
        m = -(-(1 << s) // d)
        if 255 * m < 1 << 16 and np.array_equal((v * np.uint16(m)) >> s, v // d):
            return np.uint16(m), s
    return None


class ImageRNG:
    """Independent random streams, one per image of a batch.

    Every method returns a tensor of shape ``(N, *shape)`` whose row ``i`` is drawn
    from image ``i``'s own generator.

    Args:
        seeds: one integer seed per image (see :func:`image_seeds`).
        device: where the returned tensors live.
    """

    def __init__(self, seeds: Sequence[int] | Callable[[], Sequence[int]], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._seeds = seeds
        self._generators: list[torch.Generator] | None = None
        self._numpy_generators: list[np.random.Generator] | None = None

    def _seed_list(self) -> Sequence[int]:
        return self._seeds() if callable(self._seeds) else self._seeds

    @property
    def generators(self) -> list[torch.Generator]:
        # Created on first use: corruptions without randomness pay nothing.
        if self._generators is None:
            seeds = self._seed_list()
            self._generators = []
            for s in seeds:
                g = torch.Generator(device="cpu")
                g.manual_seed(int(s))
                self._generators.append(g)
        return self._generators

    @property
    def numpy_generators(self) -> list[np.random.Generator]:
        """numpy ``Generator(PCG64(s))`` per image, seeded with the image's seed ``s``."""
        if self._numpy_generators is None:
            self._numpy_generators = [np.random.Generator(np.random.PCG64(int(s))) for s in self._seed_list()]
        return self._numpy_generators

    def __len__(self) -> int:
        return len(self.generators)

    def _stack(self, rows: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(rows).to(self.device)

    def _fill(self, shape: tuple[int, ...], dtype: torch.dtype, fill) -> torch.Tensor:
        """``(N, *shape)``, row i filled in place by ``fill(row, generator_i)``: the draws of
        ``torch.rand``/``randn``/``randint`` (which fill a fresh tensor the same way), without
        stacking copies."""
        out = torch.empty((len(self.generators), *shape), dtype=dtype)
        for row, g in zip(out, self.generators):
            fill(row, g)
        return out.to(self.device)

    def uniform(self, *shape: int) -> torch.Tensor:
        """Uniform floats in [0, 1), float32."""
        return self._fill(shape, torch.float32, lambda row, g: row.uniform_(0, 1, generator=g))

    def normal(self, *shape: int) -> torch.Tensor:
        """Standard normal floats, float32."""
        return self._fill(shape, torch.float32, lambda row, g: row.normal_(0, 1, generator=g))

    def randint(self, low: int, high: int, *shape: int) -> torch.Tensor:
        """Integers in [low, high), int64."""
        return self._fill(shape, torch.int64, lambda row, g: row.random_(low, high, generator=g))

    def uniform64(self, *shape: int, indices: Sequence[int] | None = None) -> torch.Tensor:
        """Uniform float64 in [0, 1), ``(len(indices), *shape)``, from the numpy
        generators of the images ``indices`` (default: all), on the CPU (numpy's
        PCG64 doubles are 3x faster than torch's)."""
        gens = self.numpy_generators
        indices = range(len(gens)) if indices is None else indices
        out = np.empty((len(indices), *shape))
        for row, i in zip(out, indices):
            gens[i].random(out=row)
        return torch.from_numpy(out)

    def uniform32(self, *shape: int) -> torch.Tensor:
        """Uniform float32 in [0, 1), ``(N, *shape)``, from the images' numpy
        generators (faster than torch's), on the images' device."""
        out = np.empty((len(self.numpy_generators), *shape), dtype=np.float32)
        for row, g in zip(out, self.numpy_generators):
            g.random(out=row, dtype=np.float32)
        return torch.from_numpy(out).to(self.device)

    def small_randint(self, high: int, *shape: int) -> torch.Tensor:
        """Integers in [0, ``high``), ``high <= 256``, uint8, ``(N, *shape)``, on the CPU.

        Value k of an image is byte k of its numpy generator's raw 64-bit outputs,
        modulo ``high``; bytes at or above ``256 - 256 % high`` (none when ``high``
        divides 256) are redrawn from the bytes that follow, so every value is
        exactly uniform. Several times faster than torch's int64 ``random_`` or
        numpy's bounded integers."""
        if isinstance(high, bool) or not isinstance(high, int) or not 0 < high <= 256:
            raise ValueError(f"invalid high {high!r}; valid choices: an int from 1 to 256")
        count = int(np.prod(shape, dtype=np.int64))
        limit = 256 - 256 % high
        out = np.empty((len(self.numpy_generators), count), dtype=np.uint8)
        for row, g in zip(out, self.numpy_generators):
            row[:] = g.bit_generator.random_raw((count + 7) // 8).view(np.uint8)[:count]
            redraw = np.flatnonzero(row >= limit) if limit < 256 else ()
            while len(redraw):
                fresh = g.bit_generator.random_raw((len(redraw) + 7) // 8).view(np.uint8)[: len(redraw)]
                row[redraw] = fresh
                redraw = redraw[fresh >= limit]
            if high & (high - 1) == 0:
                np.bitwise_and(row, high - 1, out=row)  # high divides 256
            elif _byte_divisor(high) is not None:  # row - high * (row // high), 5x faster than np.remainder
                multiplier, shift = _byte_divisor(high)
                quotient = (row.astype(np.uint16) * multiplier) >> shift
                row -= quotient.astype(np.uint8) * np.uint8(high)
            else:
                np.remainder(row, high, out=row)
        return torch.from_numpy(out.reshape(len(out), *shape))

    def poisson(self, rate: torch.Tensor) -> torch.Tensor:
        """Poisson draws with the given per-image rates (shape ``(N, ...)``), float32."""
        rate = rate.detach().to("cpu", torch.float32)
        return self._stack([torch.poisson(r, generator=g) for r, g in zip(rate, self.generators)])
