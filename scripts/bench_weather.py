"""Fidelity and speed of tta's snow, frost, fog, spatter and elastic_transform
against imagecorruptions-imaug (optional dependency: ``pip install 'tta-bn[reference]'``).

Fidelity: on crops of scikit-image's sample images at 224 px with the imagenet
preset, the mean absolute deviation (grey levels) from the clean image per
severity, ours against the reference's. Speed: ms per image at 32 px (batch of
1000, cifar preset) and 224 px (batch of 32, imagenet preset), measured side by
side in this process.

    PYTHONPATH=. python scripts/bench_weather.py [--fidelity-images 16] [--skip-speed]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

import tta
from tta.corruptions import weather  # noqa: F401  (registers the corruptions)

NAMES = ("snow", "frost", "fog", "spatter", "elastic_transform")


def natural_images(n: int, size: int) -> np.ndarray:
    """``n`` RGB crops (N, size, size, 3) uint8 from scikit-image's bundled samples."""
    from skimage import data

    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(),
               data.immunohistochemistry(), data.hubble_deep_field(), data.retina(), data.cat()]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = torch.from_numpy(sources[i % len(sources)]).permute(2, 0, 1).float()[None]
        side = int(min(img.shape[-2:]) * rng.uniform(0.5, 1.0))
        top = int(rng.integers(0, img.shape[-2] - side + 1))
        left = int(rng.integers(0, img.shape[-1] - side + 1))
        crop = F.interpolate(img[..., top:top + side, left:left + side], size=(size, size),
                             mode="bilinear", antialias=True, align_corners=False)
        out.append(crop[0].round().clamp(0, 255).byte().permute(1, 2, 0).numpy())
    return np.stack(out)


def reference(name: str, img: np.ndarray, severity: int) -> np.ndarray:
    from PIL import Image
    from imagecorruptions import corruptions as ic

    arg = Image.fromarray(img) if name == "spatter" else img  # its mud mode needs a PIL image
    return np.uint8(np.clip(getattr(ic, name)(arg, severity), 0, 255))


def deviation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def fidelity(n: int) -> None:
    clean = natural_images(n, 224)
    x = torch.from_numpy(clean).permute(0, 3, 1, 2).contiguous()
    np.random.seed(0)
    print(f"\nFidelity at 224 px, imagenet preset, {n} images: mean |corrupted - clean| (grey levels)\n")
    print("| corruption | severity | tta | imagecorruptions-imaug | ratio |")
    print("|---|---|---|---|---|")
    for name in NAMES:
        for s in range(1, 6):
            ours = tta.corrupt(x, name, s, preset="imagenet").permute(0, 2, 3, 1).numpy()
            ref = np.stack([reference(name, img, s) for img in clean])
            d_ours, d_ref = deviation(ours, clean), deviation(ref, clean)
            print(f"| {name} | {s} | {d_ours:.2f} | {d_ref:.2f} | {d_ours / d_ref:.3f} |", flush=True)


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def speed() -> None:
    print("\nSpeed: ms per image (severity 3 and 5), ours vs imagecorruptions-imaug, side by side\n")
    print("| corruption | size | batch | tta s3 | ref s3 | tta s5 | ref s5 | speed-up s3 / s5 |")
    print("|---|---|---|---|---|---|---|---|")
    for size, batch, preset, ref_n in ((32, 1000, "cifar", 100), (224, 32, "imagenet", 8)):
        clean = natural_images(batch, size)
        x = torch.from_numpy(clean).permute(0, 3, 1, 2).contiguous()
        for name in NAMES:
            row = []
            for s in (3, 5):
                ours = timed(lambda: tta.corrupt(x, name, s, preset=preset), 2) / batch
                ref = timed(lambda: [reference(name, img, s) for img in clean[:ref_n]]) / ref_n
                row.append((ours * 1e3, ref * 1e3))
            (o3, r3), (o5, r5) = row
            print(f"| {name} | {size} | {batch} | {o3:.3f} | {r3:.3f} | {o5:.3f} | {r5:.3f} | "
                  f"{r3 / o3:.1f}x / {r5 / o5:.1f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fidelity-images", type=int, default=16)
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 avoids OpenMP oversubscription on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_fidelity:
        fidelity(args.fidelity_images)
    if not args.skip_speed:
        speed()


if __name__ == "__main__":
    main()
