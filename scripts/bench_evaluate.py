"""Throughput of the evaluation pipeline: images per second per adapt method and stream, and
of the corruption suite, measured side by side in one run; estimates the benchmark times.

    python scripts/bench_evaluate.py                      # shipped model, Fashion-MNIST
    python scripts/bench_evaluate.py --num-examples 2000 --threads 2

Ratios are relative to source/reset in the same run (timings on a shared machine are noisy;
the ratios are what to compare).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

try:
    import tta  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import tta
from tta.evaluation import Cell, evaluate, list_methods, list_streams
from tta.evaluation.pipeline import load_images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--pretrained", default="fashion_mnist")
    parser.add_argument("--num-examples", type=int, default=1000, help="images per cell")
    parser.add_argument("--corruption-examples", type=int, default=200,
                        help="images per corruption for the corruption throughput")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {args.device}")

    images, targets = load_images(args.dataset, num_examples=args.num_examples)
    model = tta.models.load_pretrained(args.pretrained)

    # the corruption suite, all 15 corruptions at severity 3
    sample = images[: args.corruption_examples]
    corrupt_seconds = {}
    for name in tta.CORRUPTIONS:
        start = time.perf_counter()
        tta.corrupt(sample, name, 3, seed=0)
        corrupt_seconds[name] = time.perf_counter() - start
    corrupt_ips = len(sample) * len(tta.CORRUPTIONS) / sum(corrupt_seconds.values())
    print(f"\ncorruption suite: {corrupt_ips:.0f} images/s over all 15 corruptions "
          f"(slowest: {max(corrupt_seconds, key=corrupt_seconds.get)})")

    cells = [Cell(c, 3, tta.corrupt(images, c, 3, seed=0)) for c in ("fog", "contrast")]
    plan = [(m, "reset") for m in list_methods()]
    plan += [(m, s) for m in ("blend", "ema") for s in list_streams() if s != "reset"]
    rows = []
    for method, stream in plan:
        out = evaluate(copy.deepcopy(model), cells, targets, method=method, stream=stream,
                       batch_size=args.batch_size, device=args.device)
        rows.append((method, stream, out["num_images"] / out["seconds"],
                     sum(c["accuracy"] for c in out["cells"]) / len(cells)))
    base = rows[0][2]
    print(f"\n{'method':12s} {'stream':10s} {'images/s':>9s} {'vs source':>9s} {'accuracy':>9s}")
    for method, stream, ips, acc in rows:
        print(f"{method:12s} {stream:10s} {ips:9.0f} {ips / base:9.2f} {100 * acc:8.1f}%")

    ips = {m: i for m, s, i, _ in rows if s == "reset"}
    cells_full = len(tta.CORRUPTIONS) * 5

    def estimate(n: int, methods: list[str]) -> float:
        images = cells_full * n
        seconds = images / corrupt_ips + n / ips["source"]  # corrupt once, clean accuracy
        seconds += images / ips["source"]  # source accuracies (cached, reused by all methods)
        seconds += sum(images / ips[m] for m in methods if m != "source")
        return seconds

    print(f"\nestimates (15 corruptions x 5 severities, batch size {args.batch_size}):")
    for n, methods in ((10000, ["source", "batch", "blend"]), (1000, list_methods()),
                       (10000, list_methods())):
        print(f"  {n:5d} images/cell, {','.join(methods)}: {estimate(n, methods) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
