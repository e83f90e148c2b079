"""Speed and fidelity of tta's corruptions against imagecorruptions-imaug.

Speed: ms per image for every registered corruption (averaged over the chosen
severities), ours on a batch (32 px: 1000 images, "cifar" preset; 224 px: 32 images,
"imagenet" preset) against imagecorruptions-imaug image by image on a subset of the
same images, side by side in this process, with the ratios; plus the time a full
15 x 5 x 10,000 set of 32-px images would take.

Fidelity: at 224 px with the "imagenet" preset on centre crops of scikit-image's
bundled photographs, per corruption and severity: the mean and 99th percentile of
|ours - reference| (meaningful for the deterministic corruptions) and the ratio of
the mean absolute deviations from the clean image (for the random ones).

    PYTHONPATH=. python scripts/bench_corruptions.py [--threads 1] [--skip-fidelity] [--skip-speed]

Needs the optional packages imagecorruptions-imaug and scikit-image (pip install 'tta-bn[reference]').
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from PIL import Image

from tta.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS, corrupt
from tta.corruptions._registry import registered_corruptions

DETERMINISTIC = ("defocus_blur", "zoom_blur", "gaussian_blur", "brightness", "contrast", "saturate", "pixelate",
                 "jpeg_compression")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "cat")


def photos(n: int, size: int) -> np.ndarray:
    """``n`` NHWC uint8 images: square centre crops of scikit-image's photographs, and
    random shifts of them when more are asked for, resized to ``size``."""
    import skimage.data

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        a = getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()
        h, w = a.shape[:2]
        s = min(h, w) if i < len(PHOTOS) else int(min(h, w) * rng.uniform(0.4, 0.9))
        top = (h - s) // 2 if i < len(PHOTOS) else int(rng.integers(0, h - s + 1))
        left = (w - s) // 2 if i < len(PHOTOS) else int(rng.integers(0, w - s + 1))
        crop = Image.fromarray(a[top : top + s, left : left + s])
        out.append(np.asarray(crop.resize((size, size), Image.BICUBIC)))
    return np.stack(out)


def crops224(n: int) -> np.ndarray:
    import skimage.data

    out = []
    for name in PHOTOS[:n]:
        a = getattr(skimage.data, name)()
        h, w = a.shape[:2]
        out.append(a[(h - 224) // 2 : (h - 224) // 2 + 224, (w - 224) // 2 : (w - 224) // 2 + 224])
    return np.stack(out)


def reference(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    import imagecorruptions

    np.random.seed(seed)
    kwargs = {"seed": seed} if name in ("glass_blur", "impulse_noise") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.stack([imagecorruptions.corrupt(a, corruption_name=name, severity=severity, **kwargs) for a in images])


def ours(images: np.ndarray, name: str, severity: int, preset: str) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return corrupt(x, name, severity, preset=preset).permute(0, 2, 3, 1).numpy()


def speed(names, severities, size: int, batch: int, ref_images: int, preset: str,
          rounds: int = 1) -> dict[str, tuple[float, float]]:
    images = photos(batch, size)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    reference(images[:2], "glass_blur", 1)  # compile imagecorruptions' numba loop outside the timing
    corrupt(x[:2], "glass_blur", 1, preset=preset)
    rows = {}
    print(f"\n### {size} px: ours on a batch of {batch} ({preset} preset), imagecorruptions-imaug on "
          f"{ref_images} images; ms per image, mean over severities {list(severities)}\n")
    print("| corruption | ours | imagecorruptions-imaug | speed-up |\n|---|---:|---:|---:|")
    for name in names:
        for s in severities:  # one-time costs (cached kernels, tables, schedules) outside the timing
            corrupt(x[:2], name, s, preset=preset)
        best_ours = best_ref = float("inf")
        for r in range(rounds):  # the minimum over rounds: other jobs only ever add time
            t_ours = t_ref = 0.0
            for s in severities:  # ours and the reference alternate (shared noise), first in turn
                for who in ("ours", "ref") if (r + s) % 2 == 0 else ("ref", "ours"):
                    t = time.perf_counter()
                    if who == "ours":
                        corrupt(x, name, s, preset=preset)
                        t_ours += (time.perf_counter() - t) / batch
                    else:
                        reference(images[:ref_images], name, s)
                        t_ref += (time.perf_counter() - t) / ref_images
            best_ours, best_ref = min(best_ours, t_ours), min(best_ref, t_ref)
        t_ours, t_ref = 1e3 * best_ours / len(severities), 1e3 * best_ref / len(severities)
        rows[name] = (t_ours, t_ref)
        print(f"| {name} | {t_ours:.3f} | {t_ref:.2f} | {t_ref / t_ours:.1f}x |", flush=True)
    for title, group in (("the 15", CORRUPTIONS), ("all 19", CORRUPTIONS + EXTRA_CORRUPTIONS)):
        if all(n in rows for n in group):
            a, b = sum(rows[n][0] for n in group), sum(rows[n][1] for n in group)
            print(f"| **sum of {title}** | {a:.2f} | {b:.1f} | {b / a:.1f}x |")
    if all(n in rows for n in CORRUPTIONS) and size == 32:
        total = sum(rows[n][0] for n in CORRUPTIONS) * 5 * 10_000 / 1e3
        print(f"\nFull 15 x 5 x 10,000 set of 32-px images (ours): {total:.0f} s = {total / 60:.1f} min")
    return rows


def fidelity(names, n_images: int) -> None:
    images = crops224(n_images)
    clean = images.astype(np.float64)
    print(f"\n### Fidelity at 224 px (imagenet preset, {n_images} photographs), s1..s5\n")
    print("| corruption | mean abs diff | p99 abs diff | deviation ours / reference |\n|---|---|---|---|")
    for name in names:
        mads, p99s, ratios = [], [], []
        for s in range(1, 6):
            a = ours(images, name, s, "imagenet").astype(np.float64)
            b = reference(images, name, s).astype(np.float64)
            d = np.abs(a - b)
            mads.append(d.mean())
            p99s.append(np.percentile(d, 99))
            ratios.append(np.abs(a - clean).mean() / np.abs(b - clean).mean())
        kind = "deterministic" if name in DETERMINISTIC else "random"
        print(f"| {name} ({kind}) | {' '.join(f'{m:.2f}' for m in mads)} | {' '.join(f'{p:.0f}' for p in p99s)} "
              f"| {' '.join(f'{r:.3f}' for r in ratios)} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1,
                   help="threads of torch, and of OpenCV and BLAS for the reference (default 1)")
    p.add_argument("--names", nargs="*", default=None, help="corruptions (default: all registered)")
    p.add_argument("--severities", type=int, nargs="*", default=[1, 2, 3, 4, 5])
    p.add_argument("--batch32", type=int, default=1000)
    p.add_argument("--batch224", type=int, default=32)
    p.add_argument("--ref32", type=int, default=100, help="images for the reference at 32 px")
    p.add_argument("--ref224", type=int, default=8, help="images for the reference at 224 px")
    p.add_argument("--fidelity-images", type=int, default=4)
    p.add_argument("--rounds", type=int, default=1, help="timed rounds per corruption (the minimum is shown)")
    p.add_argument("--sizes", type=int, nargs="*", default=[32, 224], choices=[32, 224])
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-fidelity", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    # The reference gets the same number of threads: OpenCV's pool and the BLAS pools.
    try:
        import cv2

        cv2.setNumThreads(args.threads)
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    except ImportError:
        pass
    order = [n for n in CORRUPTIONS + EXTRA_CORRUPTIONS if n in registered_corruptions()]
    names = args.names or order
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    if not args.skip_speed:
        if 32 in args.sizes:
            speed(names, args.severities, 32, args.batch32, args.ref32, "cifar", args.rounds)
        if 224 in args.sizes:
            speed(names, args.severities, 224, args.batch224, args.ref224, "imagenet", args.rounds)
    if not args.skip_fidelity:
        fidelity(names, args.fidelity_images)


if __name__ == "__main__":
    main()
