"""The fast paths of the corruption suite give the values of the plain paths.

shot_noise, impulse_noise, zoom_blur and brightness have uint8 paths (lookup tables,
raw generator bits, byte transpositions) that must equal the float path on the same
images value for value; glass blur draws
its offsets with ImageRNG.small_randint, which must be exactly uniform; the uint8
conversion of every corruption is ``np.uint8(255 * clip(y, 0, 1))``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tta.corruptions import PRESETS, corrupt
from tta.corruptions._registry import lookup_pairs, to_uint8
from tta.corruptions._rng import ImageRNG
from tta.corruptions.noise import _uniform32_threshold


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, size // 4, size // 4, generator=g), size=(size, size),
                                             mode="bilinear")
    x = (smooth * 255).round().to(torch.uint8)
    x[0, :, :4] = 0  # the extreme levels, where the tables have their edge cases
    x[0, :, 4:8] = 255
    return x


@pytest.mark.parametrize("name", ["shot_noise", "impulse_noise", "zoom_blur", "brightness"])
@pytest.mark.parametrize("preset", PRESETS)
def test_uint8_path_equals_the_float_path(name, preset):
    x = _images(3, 48, seed=len(preset))  # 48 px: zoom blur interpolates (no matrix)
    for severity in range(1, 6):
        fast = corrupt(x, name, severity, preset=preset, seed=3)
        plain = to_uint8(corrupt(x.double() / 255, name, severity, preset=preset, seed=3).float())
        assert torch.equal(fast, plain), (name, preset, severity)


def test_brightness_table_covers_every_pixel_kind():
    # Every (channel byte b, largest byte v) pair with b <= v, black pixels among them,
    # as RGB pixels (b, v, 0) and (v, 0, b); and every byte of a grey image.
    v, b = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    keep = b <= v
    v, b = v[keep].to(torch.uint8), b[keep].to(torch.uint8)
    zero = torch.zeros_like(v)
    rgb = torch.stack([torch.stack([b, v, zero]), torch.stack([v, zero, b])]).view(2, 3, -1, 257)  # 2 x 3 x 128 x 257
    grey = torch.arange(256, dtype=torch.uint8).view(1, 1, 8, 32).repeat(1, 1, 4, 1)
    for x in (rgb, grey):
        for preset in PRESETS:
            for severity in range(1, 6):
                fast = corrupt(x, "brightness", severity, preset=preset)
                plain = to_uint8(corrupt(x.float().div_(255.0), "brightness", severity, preset=preset))
                assert torch.equal(fast, plain), (tuple(x.shape), preset, severity)


def test_lookup_pairs_is_table_indexing():
    g = torch.Generator().manual_seed(0)
    table = torch.randint(0, 256, (256, 256), generator=g, dtype=torch.uint8)
    high = torch.randint(0, 256, (2, 1, 5, 7), generator=g, dtype=torch.uint8)
    low = torch.randint(0, 256, (2, 3, 5, 7), generator=g, dtype=torch.uint8)
    expected = np.empty((2, 3, 5, 7), dtype=np.uint8)
    for i, j, r, c in np.ndindex(*expected.shape):  # written out, one entry at a time
        expected[i, j, r, c] = table[int(high[i, 0, r, c]), int(low[i, j, r, c])]
    out = lookup_pairs(table, high, low)  # high broadcasts over the channels
    assert out.dtype == torch.uint8 and np.array_equal(out.numpy(), expected)
    one = lookup_pairs(table, high[1, 0, 2, 3], low[1, 2, 2, 3])  # 0-d in, 0-d out
    assert one.shape == () and int(one) == expected[1, 2, 2, 3]


def test_to_uint8_is_numpys_truncation_of_the_clipped_values():
    # In the input's dtype (float32 for every corruption): numpy's float32 arithmetic,
    # including values within float32 round-off of a level boundary.
    g = torch.Generator().manual_seed(0)
    near = (torch.arange(1, 255, dtype=torch.float64) - 1e-3) / 255  # 255 y + 1e-3 lands on k
    y = torch.cat([torch.rand(10_000, generator=g) * 1.4 - 0.2, torch.arange(256) / 255.0, near.float(),
                   torch.tensor([0.0, 1.0, -1e-9, 1 + 1e-9])])
    y32 = y.numpy()
    expected = np.floor(np.clip(y32, np.float32(0), np.float32(1)) * np.float32(255) + np.float32(1e-3))
    assert np.array_equal(to_uint8(y.clone()).numpy(), expected.astype(np.uint8))
    y64 = y.double()
    expected64 = np.floor(np.clip(y64.numpy(), 0, 1) * 255 + 1e-3).astype(np.uint8)
    assert np.array_equal(to_uint8(y64.clone()).numpy(), expected64)  # float64 in: float64 arithmetic
    assert np.array_equal(to_uint8(torch.arange(256) / 255.0).numpy(), np.arange(256))  # every level survives


@pytest.mark.parametrize("amount", [0.01, 0.015, 0.03, 0.045, 0.135, 0.27, 0.5])
def test_impulse_threshold_is_the_float32_comparison(amount):
    # r passes iff numpy's float32 uniform (r >> 8) 2^-24 compares <= amount in torch
    t = int(_uniform32_threshold(amount))
    for r in (t - 256, t - 1, t, t + 255):
        u = torch.tensor((r >> 8) * 2.0**-24, dtype=torch.float32)
        assert bool(u <= amount) == (r < t), (amount, r, t)


@pytest.mark.parametrize("amount", [-0.1, 1.0, 1 - 2**-25, 1.5])
def test_impulse_threshold_refuses_amounts_outside_the_unit_interval(amount):
    with pytest.raises(ValueError, match="amount"):
        _uniform32_threshold(amount)


@pytest.mark.parametrize("high", [3, 4, 36, 64, 256])
def test_small_randint_is_uniform_and_deterministic(high):
    stats = pytest.importorskip("scipy.stats")
    draws = ImageRNG([5, 6, 7]).small_randint(high, 60_000)
    assert draws.shape == (3, 60_000) and draws.dtype == torch.uint8
    assert int(draws.max()) < high
    counts = np.bincount(draws.numpy().reshape(-1), minlength=high)
    assert stats.chisquare(counts).pvalue > 1e-4
    assert torch.equal(draws, ImageRNG([5, 6, 7]).small_randint(high, 60_000))
    assert torch.equal(draws[1:], ImageRNG([6, 7]).small_randint(high, 60_000))  # per image
    assert not torch.equal(draws[0], draws[1])


@pytest.mark.parametrize("high", [0, 257, 2.0, True])
def test_small_randint_refuses_bad_ranges(high):
    with pytest.raises(ValueError, match="invalid high"):
        ImageRNG([1]).small_randint(high, 10)


def test_first_above_is_searchsorted_per_row():
    from tta.corruptions.noise import _first_above

    rng = np.random.default_rng(0)
    rows, length = 50, 40
    values = np.sort(rng.random((rows, length)), axis=1)
    values[:, -1] = np.inf
    values[3, 5:9] = values[3, 5]  # ties
    row = rng.integers(0, rows, 5000)
    u = rng.random(5000)
    u[:100] = values[row[:100], 5]  # exactly on a value: counted as below (<=)
    start = rng.integers(0, 10, 5000)
    start = np.minimum(start, [np.searchsorted(values[r], x, side="right") for r, x in zip(row, u)])
    ours = _first_above(values.reshape(-1), row * length + start, row * length + length - 1, u) - row * length
    expected = np.array([np.searchsorted(values[r], x, side="right") for r, x in zip(row, u)])
    assert np.array_equal(ours, expected)
