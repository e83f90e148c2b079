"""Tests of the corruption suite: API, determinism, chunking, severity ordering, and
exactness of the deterministic corruptions against independent implementations
(scipy, scikit-image, Pillow, plain loops)."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

import tta
from tta.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS, PRESETS, corrupt, default_preset
from tta.corruptions import blur, digital
from tta.corruptions._rng import ImageRNG, image_seeds

ALL = CORRUPTIONS + EXTRA_CORRUPTIONS
OURS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "defocus_blur", "glass_blur",
    "motion_blur", "zoom_blur", "gaussian_blur", "brightness", "contrast", "saturate", "pixelate",
    "jpeg_compression",
)


def natural_images(size: int, n: int = 4) -> torch.Tensor:
    """Centre crops of scikit-image's bundled photographs, resized to size x size, uint8 NCHW."""
    import skimage.data

    names = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")[:n]
    out = []
    for name in names:
        a = getattr(skimage.data, name)()
        h, w = a.shape[:2]
        s = min(h, w)
        a = a[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        out.append(np.asarray(Image.fromarray(a).resize((size, size), Image.BICUBIC)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def images32() -> torch.Tensor:
    return natural_images(32)


def deviation(x: torch.Tensor, y: torch.Tensor) -> float:
    return (y.double() - x.double()).abs().mean().item()


# ----------------------------------------------------------------------------- names


def test_names_and_order():
    assert CORRUPTIONS == (
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
        "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
        "jpeg_compression",
    )
    assert EXTRA_CORRUPTIONS == ("speckle_noise", "gaussian_blur", "spatter", "saturate")
    assert PRESETS == ("cifar", "tiny", "imagenet")
    assert tta.CORRUPTIONS is CORRUPTIONS and tta.corrupt is corrupt
    from tta.corruptions._registry import registered_corruptions

    assert sorted(registered_corruptions()) == sorted(ALL)


def test_default_preset_rule():
    assert default_preset(28, 28) == "cifar"  # Fashion-MNIST
    assert default_preset(32, 32) == "cifar"
    assert default_preset(48, 300) == "cifar"
    assert default_preset(49, 49) == "tiny"
    assert default_preset(64, 64) == "tiny"
    assert default_preset(128, 500) == "tiny"
    assert default_preset(129, 129) == "imagenet"
    assert default_preset(224, 224) == "imagenet"


def test_preset_none_equals_chosen_preset(images32):
    for name in ("gaussian_noise", "contrast", "glass_blur"):
        assert torch.equal(corrupt(images32, name, 3), corrupt(images32, name, 3, preset="cifar"))
        assert not torch.equal(corrupt(images32, name, 3), corrupt(images32, name, 3, preset="imagenet"))


# ------------------------------------------------------------------- shapes and dtypes


@pytest.mark.parametrize("name", ALL)
def test_shapes_dtypes_and_determinism(name):
    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (3, 3, 30, 41), generator=g, dtype=torch.uint8)
    grey = torch.randint(0, 256, (2, 1, 28, 28), generator=g, dtype=torch.uint8)
    for x in (rgb, grey):
        for severity in (1, 5):
            y = corrupt(x, name, severity)
            assert y.shape == x.shape and y.dtype == torch.uint8
            assert torch.equal(y, corrupt(x, name, severity))  # deterministic
        # (C, H, W) in, (C, H, W) out: the same as image 0 of a batch
        single = corrupt(x[0], name, 2)
        assert single.shape == x[0].shape and torch.equal(single, corrupt(x, name, 2)[0])
        # float in, float out, in [0, 1]; it agrees with the uint8 path up to 8-bit quantisation
        for dtype in (torch.float32, torch.float64):
            xf = x.to(dtype) / 255
            kept = xf.clone()
            yf = corrupt(xf, name, 3)
            assert torch.equal(xf, kept), f"{name} modified its input"
            assert yf.dtype == dtype and yf.shape == x.shape
            assert 0 <= yf.min() and yf.max() <= 1
            diff = (yf * 255 - corrupt(x, name, 3).double()).abs()
            assert diff.mean() < 1.0, f"{name}: float and uint8 paths disagree by {diff.mean():.2f}"


@pytest.mark.parametrize("name", ALL)
def test_chunking_and_index_offset(name):
    x = torch.randint(0, 256, (5, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    whole = corrupt(x, name, 4, seed=7)
    parts = torch.cat([corrupt(x[:2], name, 4, seed=7), corrupt(x[2:], name, 4, seed=7, index_offset=2)])
    assert torch.equal(whole, parts)
    # an image's result does not depend on the other images of the call
    assert torch.equal(corrupt(x[3:4], name, 4, seed=7, index_offset=3), whole[3:4])


RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur", "motion_blur",
          "snow", "frost", "fog", "elastic_transform", "spatter")


@pytest.mark.parametrize("name", RANDOM)
def test_seed_and_index_change_the_noise(name, images32):
    x = images32[:1].repeat(2, 1, 1, 1)
    y = corrupt(x, name, 3, seed=0)
    assert not torch.equal(y[0], y[1]), "two indices got the same draws"
    assert not torch.equal(y, corrupt(x, name, 3, seed=1)), "the seed changed nothing"
    assert not torch.equal(corrupt(x, name, 3, seed=0), corrupt(x, name, 4, seed=0))


def test_image_seeds_are_a_function_of_their_inputs():
    a = image_seeds(0, "fog", 3, range(100))
    assert len(set(a)) == 100 and all(0 <= s < 2**63 for s in a)
    assert image_seeds(0, "fog", 3, [40, 41]) == a[40:42]
    assert image_seeds(1, "fog", 3, [40])[0] != a[40]
    assert image_seeds(0, "snow", 3, [40])[0] != a[40]
    assert image_seeds(0, "fog", 2, [40])[0] != a[40]


# ------------------------------------------------------------------------- errors


def test_invalid_arguments_raise_with_choices():
    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="unknown corruption 'blurr'.*gaussian_noise.*saturate"):
        corrupt(x, "blurr", 1)
    for severity in (0, 6, -1, 2.0, True, "3", None):
        with pytest.raises(ValueError, match="severity.*valid choices: 1, 2, 3, 4, 5"):
            corrupt(x, "fog", severity)
    with pytest.raises(ValueError, match="unknown preset 'cifar10'.*cifar, tiny, imagenet"):
        corrupt(x, "fog", 1, preset="cifar10")
    with pytest.raises(ValueError, match=r"invalid shape \(32, 32\).*\(N, C, H, W\) or \(C, H, W\)"):
        corrupt(x[0, 0], "fog", 1)
    with pytest.raises(ValueError, match="invalid shape"):
        corrupt(x[None], "fog", 1)
    for c in (2, 4):
        with pytest.raises(ValueError, match=f"channels {c}.*valid choices: 1, 3"):
            corrupt(torch.zeros(1, c, 32, 32, dtype=torch.uint8), "fog", 1)
    with pytest.raises(ValueError, match="27x32 is too small.*at least 28"):
        corrupt(torch.zeros(1, 3, 27, 32, dtype=torch.uint8), "fog", 1)
    for dtype in (torch.int32, torch.int64, torch.bool):
        with pytest.raises(ValueError, match="invalid dtype.*uint8"):
            corrupt(x.to(dtype), "fog", 1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        corrupt(np.zeros((3, 32, 32), np.uint8), "fog", 1)
    with pytest.raises(ValueError, match="index_offset"):
        corrupt(x, "fog", 1, index_offset=-1)
    with pytest.raises(ValueError, match="seed"):
        corrupt(x, "fog", 1, seed=-3)


# --------------------------------------------------------------- severity and presets

# Corruptions whose parameters strengthen monotonically in every table.
MONOTONE = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "defocus_blur", "zoom_blur",
            "gaussian_blur", "brightness", "contrast", "pixelate", "jpeg_compression")


@pytest.mark.parametrize("preset,size", [("cifar", 32), ("tiny", 64)])
def test_deviation_grows_with_severity(preset, size):
    x = natural_images(size)
    for name in MONOTONE:
        devs = [deviation(x, corrupt(x, name, s, preset=preset)) for s in range(1, 6)]
        assert all(a < b for a, b in zip(devs, devs[1:])), f"{name} {preset}: {devs}"
    # Random blurs: monotone up to noise (motion blur's s3 and s4 differ only in a
    # radius beyond the Gaussian's reach in the cifar table).
    for name in ("glass_blur", "motion_blur"):
        devs = [deviation(x, corrupt(x, name, s, preset=preset)) for s in range(1, 6)]
        assert all(b > 0.9 * a for a, b in zip(devs, devs[1:])) and devs[4] > devs[0] * 1.1, f"{name}: {devs}"


def test_small_presets_are_weaker_than_imagenet(images32):
    x64 = natural_images(64)
    for name in ALL:
        cifar = np.mean([deviation(images32, corrupt(images32, name, s, preset="cifar")) for s in range(1, 6)])
        big = np.mean([deviation(images32, corrupt(images32, name, s, preset="imagenet")) for s in range(1, 6)])
        assert cifar < big, f"{name}: cifar {cifar:.1f} >= imagenet {big:.1f} at 32 px"
        if name == "saturate":
            continue  # the tiny table is stronger at s5 (x30 against x20)
        tiny = np.mean([deviation(x64, corrupt(x64, name, s, preset="tiny")) for s in range(1, 6)])
        big = np.mean([deviation(x64, corrupt(x64, name, s, preset="imagenet")) for s in range(1, 6)])
        assert tiny <= big + 0.5, f"{name}: tiny {tiny:.1f} > imagenet {big:.1f} at 64 px"


# ------------------------------------------------- exactness against independent code


def test_gaussian_blur_matches_scipy(images32):
    from scipy import ndimage

    x = images32.double() / 255
    for sigma in (0.4, 1.0, 3.0):
        ours = blur.gaussian_filter(x.float(), sigma).double()
        ref = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=4.0)
        assert np.abs(ours.numpy() - ref).max() < 1e-5


def test_defocus_blur_matches_scipy_correlate(images32):
    from scipy import ndimage

    x = images32.float() / 255
    for radius, alias in ((0.5, 0.6), (3, 0.1), (10, 0.5)):
        k = blur.disk_kernel(radius, alias)
        # unit sum unless the disk reaches the grid's edge (r = 10), where the
        # reference's reflect-101 anti-aliasing adds mass
        assert k.shape[0] % 2 == 1 and (radius == 10 or abs(k.sum() - 1) < 1e-5)
        ours = blur.defocus_blur(x, (radius, alias), None)
        ref = ndimage.correlate(x.double().numpy(), k[None, None].astype(np.float64), mode="mirror")
        assert np.abs(ours.double().numpy() - ref).max() < 1e-5


def test_disk_kernel_shape():
    k = blur.disk_kernel(3, 0.1)  # radius 3 on the 17 x 17 grid, barely blurred
    assert k.shape == (9, 9)  # cropped to the disk plus the anti-aliasing ring
    assert k[4, 4] == k.max() and k[4, 1] > 0.5 * k[4, 4] and k[0, 0] == 0
    big = blur.disk_kernel(10, 0.5)
    assert big.shape == (21, 21) and big[10, 0] > 0


def test_zoom_blur_matches_scipy_zoom(images32):
    from scipy import ndimage

    x = (images32[:2].float() / 255).numpy()
    factors = blur._zoom_factors(1.16, 0.01)
    out = x.copy()
    for z in factors:
        for i in range(2):
            h = x.shape[2]
            ch = int(np.ceil(h / z))
            top = (h - ch) // 2
            zoomed = ndimage.zoom(x[i][:, top : top + ch, top : top + ch], (1, z, z), order=1)
            trim = (zoomed.shape[1] - h) // 2
            out[i] += zoomed[:, trim : trim + h, trim : trim + h]
    ref = out / (len(factors) + 1)
    ours = blur.zoom_blur(torch.from_numpy(x), factors, None).numpy()
    assert np.abs(ours - ref).max() < 1e-5


def _sequential_glass(y: np.ndarray, draws: dict, d: int, iterations: int) -> np.ndarray:
    """The reference's loop, with its copy-not-swap of numpy views, on (C, H, W)."""
    y = y.copy()
    _, h, w = y.shape
    for i in range(iterations):
        for row in range(h - d, d, -1):
            for col in range(w - d, d, -1):
                dx, dy = draws[i, row, col]
                y[:, row, col] = y[:, row + dy, col + dx]
    return y


@pytest.mark.parametrize("h,w,d,iterations", [(28, 31, 1, 2), (30, 29, 2, 3), (33, 40, 4, 2)])
def test_glass_blur_wavefronts_equal_the_sequential_loop(h, w, d, iterations):
    x = torch.rand(3, 3, h, w, generator=torch.Generator().manual_seed(h))
    seeds = image_seeds(0, "glass_blur", 1, range(3))
    sigma = 0.01  # Gaussian radius 0: the blurs are the identity, the swaps are all there is
    out = blur.glass_blur(x, (sigma, d, iterations), ImageRNG(seeds)).numpy()
    # the same draws, assigned to (iteration, row, col) as glass_blur documents
    order, flat, _ = blur.glass_schedule(h, w, d, iterations)
    q = ImageRNG(seeds).small_randint(4 * d * d, len(flat)).numpy()
    rows = h - 2 * d
    cols = w - 2 * d
    it = order.numpy() // (rows * cols)
    y = (torch.floor(x * 255 + 1e-3) / 255).numpy()
    ref = []
    for n in range(3):
        draws = {(int(i), int(f) // w, int(f) % w): (int(v) % (2 * d) - d, int(v) // (2 * d) - d)
                 for i, f, v in zip(it, flat.numpy(), q[n])}
        assert len(draws) == iterations * rows * cols  # every visit once
        ref.append(_sequential_glass(y[n], draws, d, iterations))
    ref = np.stack(ref)
    assert np.array_equal(out, ref)
    assert not np.array_equal(out, y)  # pixels moved


@pytest.mark.parametrize("many", [False, True])  # per image, or grouped by shift (>= 32 images)
def test_motion_blur_matches_shift_and_add_loop(images32, many):
    x = images32[:3].double() / 255
    angles = torch.tensor([-40.0, 3.0, 33.0])
    if many:
        x = torch.cat([x, torch.rand(37, 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)])
        angles = torch.cat([angles, torch.rand(37, generator=torch.Generator().manual_seed(6)) * 90 - 45])
        angles[5:9] = 3.0  # a group sharing every shift
    assert (len(x) >= blur._MOTION_GROUP_IMAGES) == many
    radius, sigma = 8, 2.5
    ours = blur.motion_blur_batch(x, radius, sigma, angles).numpy()
    k = np.exp(-np.arange(2 * radius + 1) ** 2 / (2 * sigma**2))
    k /= k.sum()
    h, w = x.shape[2:]
    for n, a in enumerate(angles.tolist()):
        ref = np.zeros((3, h, w))
        img = x[n].numpy()
        for i in range(2 * radius + 1):
            dy = -math.ceil(i * math.sin(math.radians(a)) - 0.5)
            dx = -math.ceil(i * math.cos(math.radians(a)) - 0.5)
            rows = np.clip(np.arange(h) - dy, 0, h - 1)
            cols = np.clip(np.arange(w) - dx, 0, w - 1)
            ref += k[i] * img[:, rows][:, :, cols]
        assert np.abs(ours[n] - ref).max() < 1e-9


def test_brightness_and_saturate_match_skimage_hsv(images32):
    from skimage.color import hsv2rgb, rgb2hsv

    x = images32.double() / 255
    x[0, :, :4, :4] = 0.5  # grey pixels
    x[0, :, 4:8, :4] = 0.0  # black pixels
    hwc = x.permute(0, 2, 3, 1).numpy()
    for shift in (0.05, 0.5):
        hsv = rgb2hsv(hwc)
        hsv[..., 2] = np.clip(hsv[..., 2] + shift, 0, 1)
        ref = hsv2rgb(hsv)
        ours = digital.brightness(x, shift, None).permute(0, 2, 3, 1).numpy()
        assert np.abs(ours - ref).max() < 1e-9
    for scale, offset in ((0.1, 0), (2, 0.1), (30, 0.2)):
        hsv = rgb2hsv(hwc)
        hsv[..., 1] = np.clip(hsv[..., 1] * scale + offset, 0, 1)
        ref = hsv2rgb(hsv)
        ours = digital.saturate(x, (scale, offset), None).permute(0, 2, 3, 1).numpy()
        assert np.abs(ours - ref).max() < 1e-9


def test_float_input_slightly_outside_unit_range_is_clipped():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 1 + 1e-6, -1e-6
    for name in ("pixelate", "jpeg_compression", "contrast"):
        assert torch.equal(corrupt(x, name, 2), corrupt(x.clamp(0, 1), name, 2))


def test_grayscale_colour_corruptions():
    g = torch.linspace(0, 1, 28 * 28).view(1, 1, 28, 28)
    assert torch.allclose(corrupt(g, "brightness", 3, preset="imagenet"), (g + 0.3).clamp(0, 1))
    assert torch.equal(corrupt(g, "saturate", 5), g)  # a grey image has no saturation


def test_contrast_is_per_channel_mean(images32):
    x = images32.double() / 255
    mean = x.mean(dim=(2, 3), keepdim=True)
    ref = ((x - mean) * 0.4 + mean).clamp(0, 1)
    assert torch.allclose(corrupt(x, "contrast", 3, preset="cifar"), ref, atol=1e-12)


@pytest.mark.parametrize("gather", [True, False])  # the upscale as a gather, or Pillow's (fallback)
@pytest.mark.parametrize("size,scale", [(32, 0.65), (64, 0.7), (224, 0.25), (45, 0.95), (300, 0.3), (28, 0.95)])
def test_pixelate_equals_pillow_box(size, scale, gather, monkeypatch):
    if not gather:
        monkeypatch.setattr(digital, "_box_upscale_index", lambda size_in, size_out: None)
    x = torch.randint(0, 256, (2, 3, size, size + 3), generator=torch.Generator().manual_seed(size), dtype=torch.uint8)
    ours = digital.pixelate(x.float() / 255, scale, None)
    ours = torch.round(ours * 255).to(torch.uint8)
    assert torch.equal(digital.pixelate(x, scale, None), ours)  # the uint8 path corrupt() takes
    for i in range(2):
        pil = Image.fromarray(x[i].permute(1, 2, 0).numpy())
        small = pil.resize((int((size + 3) * scale), int(size * scale)), Image.BOX)
        ref = np.asarray(small.resize((size + 3, size), Image.BOX))
        assert np.array_equal(ours[i].permute(1, 2, 0).numpy(), ref)


def test_jpeg_equals_pillow(images32):
    for x in (images32[:2], images32[:2, :1]):
        ours = corrupt(x, "jpeg_compression", 5, preset="cifar")
        for i in range(2):
            a = x[i].permute(1, 2, 0).numpy()
            buf = io.BytesIO()
            Image.fromarray(a[..., 0] if a.shape[2] == 1 else a).save(buf, format="JPEG", quality=40)
            ref = np.asarray(Image.open(buf)).reshape(a.shape)
            assert np.array_equal(ours[i].permute(1, 2, 0).numpy(), ref)


# ------------------------------------------------------------------ noise statistics


def test_noise_statistics():
    x = torch.full((4, 3, 64, 64), 0.5)
    y = corrupt(x, "gaussian_noise", 5, preset="imagenet")  # sigma 0.38, clipped at 0 and 1
    z = (y - 0.5).flatten()
    assert abs(z.mean().item()) < 0.01
    clipped_std = torch.randn(10**6, generator=torch.Generator().manual_seed(0)).mul(0.38).clamp(-0.5, 0.5).std()
    assert abs(z.std().item() - clipped_std.item()) < 0.01
    y = corrupt(x, "impulse_noise", 5, preset="imagenet")  # amount 0.27
    changed = (y != 0.5).float().mean().item()
    assert abs(changed - 0.27) < 0.01
    assert abs((y == 1).float().mean().item() - (y == 0).float().mean().item()) < 0.01
    y = corrupt(x, "shot_noise", 1, preset="imagenet")  # Poisson(60 * 0.5) / 60
    counts = y.flatten() * 60
    assert torch.allclose(counts, counts.round(), atol=1e-4)
    assert abs(counts.mean().item() - 30) < 0.3 and abs(counts.var().item() - 30) < 1.5
    y = corrupt(x, "speckle_noise", 1, preset="imagenet")  # x + x * N(0, 0.15)
    assert abs((y - 0.5).std().item() - 0.5 * 0.15) < 0.003


@pytest.mark.parametrize("rate", [3.0, 60.0, 500.0])
def test_poisson_inversion_matches_scipy_quantiles(rate):
    stats = pytest.importorskip("scipy.stats")
    from tta.corruptions import noise

    g = torch.Generator().manual_seed(int(rate))
    levels = torch.randint(0, 256, (20000,), generator=g, dtype=torch.int32)
    u = torch.rand(20000, generator=g, dtype=torch.float64)
    u[:2000] = 1 - torch.rand(2000, generator=g, dtype=torch.float64) * 1e-6  # far tail bins
    u[2000:2500] = torch.rand(500, generator=g, dtype=torch.float64) * 1e-6  # lowest bins
    ours = noise._poisson_by_inversion(levels, rate, u).numpy()
    lam = (np.arange(256, dtype=np.float32) / np.float32(255) * np.float32(rate)).astype(np.float64)
    # inverse CDF with scipy's CDF: X = #{j : F(j) <= u}
    j = np.arange(int(rate + 20 * math.sqrt(rate) + 40))
    cdf = stats.poisson.cdf(j[None, :], lam[:, None])
    expected = np.array([np.searchsorted(cdf[k], v, side="right") for k, v in zip(levels.numpy(), u.numpy())])
    close = np.abs(cdf[levels.numpy()] - u.numpy()[:, None]).min(axis=1) < 1e-12  # round-off ties
    assert (~close).sum() > 19000
    assert np.array_equal(ours[~close], expected[~close])


def test_shot_noise_on_and_off_the_8_bit_grid():
    # Image 0 is on the 8-bit grid (inversion sampler), image 1 between grid values
    # (torch.poisson): both are Poisson(rate x) / rate, and chunking changes nothing.
    x = torch.full((2, 3, 64, 64), 128 / 255, dtype=torch.float64)
    x[1] += 0.3 / 255
    y = corrupt(x, "shot_noise", 2, preset="imagenet")  # rate 25
    for i in range(2):
        counts = y[i].flatten() * 25
        assert torch.allclose(counts, counts.round(), atol=1e-4)
        lam = 25 * float(x[i, 0, 0, 0])
        assert abs(counts.mean().item() - lam) < 0.3 and abs(counts.var().item() - lam) < 1.5
        assert torch.equal(corrupt(x[i : i + 1], "shot_noise", 2, preset="imagenet", index_offset=i), y[i : i + 1])


@pytest.mark.parametrize("scale, low, high", [(255.0, 0.0, 255.0), (1.0, -0.01, 1.0), (1.0, 0.0, 1.003)])
def test_float_input_outside_unit_range_is_refused(scale, low, high):
    # 0..255 floats (a forgotten / 255) and values more than half a grey level outside [0, 1]
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * scale
    x[0, 0, 0, 0], x[1, 0, 0, 0] = low, high
    with pytest.raises(ValueError) as e:
        corrupt(x, "contrast", 2)
    message = str(e.value)
    assert f"[{low:g}, {high:g}]" in message and "uint8" in message and "255" in message
    assert torch.isfinite(x).all()  # the input is untouched


def test_float_input_nan_is_refused_and_half_level_round_off_accepted():
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    x[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="must lie in \\[0, 1\\]"):
        corrupt(x, "fog", 1)
    x[0, 1, 2, 3], x[0, 0, 0, 0] = 1 + 0.4 / 255, -0.4 / 255  # within half a grey level: clipped
    assert torch.equal(corrupt(x, "contrast", 2), corrupt(x.clamp(0, 1), "contrast", 2))



# ------------------------------------------------------------- speed paths (issue 12)

def _pillow_jpeg(a: np.ndarray, quality: int) -> np.ndarray:
    """Pillow's JPEG round trip of an (H, W, C) uint8 image, C in {1, 3}."""
    buf = io.BytesIO()
    Image.fromarray(a[..., 0] if a.shape[2] == 1 else a).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf)).reshape(a.shape)


def _jpeg_test_images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = [natural_images(s, 2) for s in (32, 64, 224)]
    images.append(torch.randint(0, 256, (2, 3, 45, 37), generator=g, dtype=torch.uint8))  # partial 16 x 16 blocks
    return images + [x[:, :1].contiguous() for x in images]  # and grey


def _all_jpeg_qualities() -> list[int]:
    from tta.corruptions._registry import get_corruption

    table = get_corruption("jpeg_compression").params
    return sorted({q for p in PRESETS for q in table[p]})


def test_torchvision_jpeg_is_bit_identical_to_pillow_at_every_quality():
    # the fact jpeg_compression's torchvision path rests on, over every quality of the three
    # presets, natural and random images, RGB and grey
    import warnings

    from torchvision.io import decode_jpeg, encode_jpeg

    assert digital._torchvision_jpeg() is not None  # the run-time check agrees in this environment
    qualities = _all_jpeg_qualities()
    assert qualities == [7, 10, 15, 18, 25, 40, 50, 58, 65, 80]
    for quality in qualities:
        for x in _jpeg_test_images():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                ours = decode_jpeg(encode_jpeg(list(x), quality=quality))
            for img, out in zip(x, ours):
                ref = _pillow_jpeg(img.permute(1, 2, 0).numpy(), quality)
                assert np.array_equal(out.permute(1, 2, 0).numpy(), ref), (quality, tuple(img.shape))


@pytest.mark.parametrize("torchvision_path", [True, False])
def test_jpeg_equals_pillow_at_every_size_and_severity(torchvision_path, monkeypatch):
    if not torchvision_path:  # the Pillow fallback (torchvision's codecs missing or different)
        monkeypatch.setattr(digital, "_torchvision_jpeg", lambda: None)
    from tta.corruptions._registry import get_corruption

    table = get_corruption("jpeg_compression").params
    for x in _jpeg_test_images():
        preset = default_preset(*x.shape[2:])
        for severity in (1, 5):
            quality = table[preset][severity - 1]
            ours = corrupt(x, "jpeg_compression", severity)
            as_float = corrupt(x.float() / 255, "jpeg_compression", severity)
            assert torch.equal(torch.round(as_float * 255).to(torch.uint8), ours)
            for img, out in zip(x, ours):
                assert np.array_equal(out.permute(1, 2, 0).numpy(), _pillow_jpeg(img.permute(1, 2, 0).numpy(), quality))


def test_torchvision_jpeg_mismatch_falls_back_to_pillow(monkeypatch, caplog):
    # a torchvision whose round trip differs from Pillow's is refused, loudly, and never used
    import torchvision.io

    digital._torchvision_jpeg.cache_clear()
    monkeypatch.setattr(torchvision.io, "decode_jpeg", lambda data: [torch.zeros(1, 1, 1, dtype=torch.uint8)] * len(data))
    try:
        with caplog.at_level("WARNING", logger="tta.corruptions.digital"):
            assert digital._torchvision_jpeg() is None
        assert "differs from Pillow's" in caplog.text
    finally:
        digital._torchvision_jpeg.cache_clear()
    monkeypatch.undo()
    assert digital._torchvision_jpeg() is not None


def test_pixelate_equals_pillow_on_large_grey_images():
    # the plane-wise Pillow path (images over 64 x 64) and the grey case
    x = natural_images(224, 2)[:, :1].contiguous()
    ours = corrupt(x, "pixelate", 5, preset="imagenet")
    for img, out in zip(x, ours):
        small = Image.fromarray(img[0].numpy()).resize((56, 56), Image.BOX)
        assert np.array_equal(out[0].numpy(), np.asarray(small.resize((224, 224), Image.BOX)))


def test_zoom_blur_matches_scipy_zoom_beyond_the_matrix_path():
    # 72 px: the interpolation path (all images and channels as one NHWC image), imagenet's
    # strongest factors, chunks of several images
    from scipy import ndimage

    x = (natural_images(72, 3).double() / 255).float().numpy()
    factors = blur._zoom_factors(1.31, 0.03)
    h = x.shape[2]
    out = x.astype(np.float64)
    for z in factors:
        ch = int(np.ceil(h / z))
        top = (h - ch) // 2
        for i in range(len(x)):
            zoomed = ndimage.zoom(x[i][:, top : top + ch, top : top + ch].astype(np.float64), (1, z, z), order=1)
            trim = (zoomed.shape[1] - h) // 2
            out[i] += zoomed[:, trim : trim + h, trim : trim + h]
    ref = out / (len(factors) + 1)
    ours = blur.zoom_blur(torch.from_numpy(x), factors, None).numpy()
    assert np.abs(ours - ref).max() < 1e-5


def test_defocus_blur_cached_spectrum_follows_the_size():
    # the kernel spectrum is cached per (kernel, FFT size): alternate sizes stay exact
    from scipy import ndimage

    k = blur.disk_kernel(6, 0.5)
    for size in (40, 33, 40):
        x = natural_images(size, 1).float() / 255
        ours = blur.defocus_blur(x, (6, 0.5), None)
        ref = ndimage.correlate(x.double().numpy(), k[None, None].astype(np.float64), mode="mirror")
        assert np.abs(ours.double().numpy() - ref).max() < 1e-5
