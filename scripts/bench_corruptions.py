"""Speed and fidelity of tta's corruptions against imagecorruptions-imaug.

Speed: ms per image for every registered corruption (averaged over the chosen
severities), ours on a batch (32 px: 1000 images, "cifar" preset; 224 px: 32 images,
"imagenet" preset) against imagecorruptions-imaug image by image on a subset of the
same images, side by side in this process, with the ratios, at each of the given thread
counts (``--threads 1 2``: the counts alternate by round and by corruption); plus the
time a full 15 x 5 x 10,000 set of 32-px images would take.

Fidelity: at 224 px with the "imagenet" preset on centre crops of scikit-image's
bundled photographs, per corruption and severity: the mean and 99th percentile of
|ours - reference| (meaningful for the deterministic corruptions) and the ratio of
the mean absolute deviations from the clean image (for the random ones).

    PYTHONPATH=. python scripts/bench_corruptions.py [--threads 1 2] [--skip-fidelity] [--skip-speed]

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


def set_threads(n: int) -> None:
    """``n`` threads for torch and, for the reference, OpenCV's pool and the BLAS pools."""
    torch.set_num_threads(n)
    try:
        import cv2

        cv2.setNumThreads(n)
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # part of the `reference` extra
        warnings.warn("threadpoolctl is missing: the reference's BLAS pools keep their own thread counts")
    else:
        threadpool_limits(n)
    torch.zeros(1 << 20).add_(1)  # start torch's thread team outside the timings


def speed(names, severities, size: int, batch: int, ref_images: int, preset: str, rounds: int = 1,
          threads: tuple[int, ...] = (1,)) -> dict[int, dict[str, tuple[float, float]]]:
    """ms per image, ``{threads: {name: (ours, reference)}}``. The thread counts alternate by round
    and by corruption, ours and the reference by round, corruption and severity (shared noise)."""
    images = photos(batch, size)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    rows: dict[int, dict[str, tuple[float, float]]] = {t: {} for t in threads}
    label = {t: f"{t} thread{'s' if t > 1 else ''}" for t in threads}
    print(f"\n### {size} px: ours on a batch of {batch} ({preset} preset), imagecorruptions-imaug on "
          f"{ref_images} images; ms per image, mean over severities {list(severities)}; "
          f"minimum over {rounds} round(s)\n")
    head = " | ".join(f"ours, {label[t]} | imagecorruptions-imaug, {label[t]} | speed-up, {label[t]}" for t in threads)
    print(f"| corruption | {head} |\n|---|" + "---:|---:|---:|" * len(threads))
    for i, name in enumerate(names):
        for s in severities:  # one-time costs outside the timing: our cached tables, schedules and
            # textures (the whole batch: frost decodes the textures its images draw), the
            # reference's lazy imports and numba compilation
            corrupt(x, name, s, preset=preset)
            reference(images[:1], name, s)
        best = {t: [float("inf"), float("inf")] for t in threads}
        for r in range(rounds):  # the minimum over rounds: other jobs only ever add time
            # the thread counts alternate by round and by corruption (so even one round has no fixed order)
            for t in threads if (r + i) % 2 == 0 else threads[::-1]:
                set_threads(t)
                t_ours = t_ref = 0.0
                for j, s in enumerate(severities):  # ours and the reference alternate, first in turn
                    for who in ("ours", "ref") if (r + i + j) % 2 == 0 else ("ref", "ours"):
                        start = time.perf_counter()
                        if who == "ours":
                            corrupt(x, name, s, preset=preset)
                            t_ours += (time.perf_counter() - start) / batch
                        else:
                            reference(images[:ref_images], name, s)
                            t_ref += (time.perf_counter() - start) / ref_images
                best[t] = [min(best[t][0], t_ours), min(best[t][1], t_ref)]
        cells = []
        for t in threads:
            ours_ms, ref_ms = (1e3 * v / len(severities) for v in best[t])
            rows[t][name] = (ours_ms, ref_ms)
            cells.append(f"{ours_ms:.3f} | {ref_ms:.2f} | {ref_ms / ours_ms:.1f}x")
        print(f"| {name} | {' | '.join(cells)} |", flush=True)
    for title, group in (("the 15", CORRUPTIONS), ("all 19", CORRUPTIONS + EXTRA_CORRUPTIONS)):
        if all(n in rows[threads[0]] for n in group):
            cells = []
            for t in threads:
                a, b = sum(rows[t][n][0] for n in group), sum(rows[t][n][1] for n in group)
                cells.append(f"{a:.2f} | {b:.1f} | {b / a:.1f}x")
            print(f"| **sum of {title}** | {' | '.join(cells)} |")
    if all(n in rows[threads[0]] for n in CORRUPTIONS) and size == 32:
        for t in threads:
            total = sum(rows[t][n][0] for n in CORRUPTIONS) * 5 * 10_000 / 1e3
            print(f"\nFull 15 x 5 x 10,000 set of 32-px images (ours, {label[t]}, at the ms per image of "
                  f"batches of {batch}): {total:.0f} s = {total / 60:.1f} min")
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
    p.add_argument("--threads", type=int, nargs="+", default=[1],
                   help="thread counts of torch, and of OpenCV and BLAS for the reference, measured "
                        "side by side per corruption (default 1; e.g. --threads 1 2); the fidelity "
                        "part runs at the first")
    p.add_argument("--names", nargs="+", default=None, help="corruptions (default: all registered)")
    p.add_argument("--severities", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--batch32", type=int, default=1000)
    p.add_argument("--batch224", type=int, default=32)
    p.add_argument("--ref32", type=int, default=100, help="images for the reference at 32 px")
    p.add_argument("--ref224", type=int, default=8, help="images for the reference at 224 px")
    p.add_argument("--fidelity-images", type=int, default=4)
    p.add_argument("--rounds", type=int, default=1, help="timed rounds per corruption (the minimum is shown)")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 224], choices=[32, 224])
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-fidelity", action="store_true")
    args = p.parse_args()
    if any(t < 1 for t in args.threads) or len(set(args.threads)) != len(args.threads):
        p.error(f"--threads {args.threads}: give distinct thread counts of at least 1")
    order = [n for n in CORRUPTIONS + EXTRA_CORRUPTIONS if n in registered_corruptions()]
    names = args.names or order
    unknown = [n for n in names if n not in order]
    if unknown:
        p.error(f"unknown corruption(s) {unknown}; valid choices: {', '.join(order)}")
    if len(set(names)) != len(names):
        p.error(f"--names {names}: each corruption once")
    if any(s not in (1, 2, 3, 4, 5) for s in args.severities) or len(set(args.severities)) != len(args.severities):
        p.error(f"--severities {args.severities}: valid choices are 1 to 5, each once")
    if not args.skip_speed:
        for option in ("rounds", *(f"{kind}{size}" for size in args.sizes for kind in ("batch", "ref"))):
            if getattr(args, option) < 1:
                p.error(f"--{option} {getattr(args, option)}: it must be at least 1")
        for size in args.sizes:
            batch, ref = getattr(args, f"batch{size}"), getattr(args, f"ref{size}")
            if ref > batch:  # the reference runs on the first images of our batch
                p.error(f"--ref{size} {ref}: it must not exceed --batch{size} ({batch})")
    if not args.skip_fidelity and not 1 <= args.fidelity_images <= len(PHOTOS):
        p.error(f"--fidelity-images {args.fidelity_images}: valid choices are 1 to {len(PHOTOS)}")
    set_threads(args.threads[0])
    print(f"torch {torch.__version__}, thread counts {args.threads}")
    if not args.skip_speed:
        if 32 in args.sizes:
            speed(names, args.severities, 32, args.batch32, args.ref32, "cifar", args.rounds, tuple(args.threads))
        if 224 in args.sizes:
            speed(names, args.severities, 224, args.batch224, args.ref224, "imagenet", args.rounds,
                  tuple(args.threads))
    if not args.skip_fidelity:
        fidelity(names, args.fidelity_images)


if __name__ == "__main__":
    main()
