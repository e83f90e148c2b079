"""Benchmark: cost of tta's adaptive BatchNorm and recalibration relative to plain torch (CPU).

For each model (torchvision resnet18 at 32x32, batch 128; resnet50 at 224x224, batch 16) the
per-forward time of a converted model in each stats mode is measured against the same torch
model in eval mode, in repeated interleaved runs; results and ratios are printed. Then the time
of ``tta.recalibrate`` relative to one plain ``no_grad`` pass over the same batches.

    PYTHONPATH=. python scripts/bench_bn.py                      # both models
    PYTHONPATH=. python scripts/bench_bn.py --models resnet18 --repeats 20 --exact
    PYTHONPATH=. python scripts/bench_bn.py --skip-recal --compile  # + torch.compile (inductor)

Goals (issue 2): batch/blend/ema <= 1.10x, source <= 1.02x, recalibrate(exact=False) <= 1.2x.
With --compile, the same models compiled with ``torch.compile(fullgraph=True)`` (inductor, which
needs a C++ compiler on CPU) are timed against the compiled torch model; a failure to compile is
reported and does not stop the script.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import traceback
from collections.abc import Callable

import torch
import torchvision

import tta

CONFIGS = {"resnet18": (32, 128), "resnet50": (224, 16)}


def _time(fn: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


STATISTIC = statistics.median  # --stat min: robust to other jobs on a shared machine


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median (or min) seconds per call; the candidates alternate in every round (shared noise)."""
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        names = list(fns) if r % 2 == 0 else list(reversed(fns))  # no fixed position bias
        for name in names:
            times[name].append(_time(fns[name]))
    return {name: STATISTIC(t) for name, t in times.items()}


def bench_forward(name: str, repeats: int, device: str) -> dict[str, float]:
    size, batch = CONFIGS[name]
    torch.manual_seed(0)
    plain = getattr(torchvision.models, name)(num_classes=1000).eval().to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    models = {"torch eval": plain}
    for stats in tta.STATS:
        models[stats] = tta.convert(copy.deepcopy(plain), stats=stats).eval()
    with torch.no_grad():
        results = _interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, repeats)
    base = results["torch eval"]
    print(f"\n{name} {size}x{size} batch {batch} on {device}: per-forward {STATISTIC.__name__} over {repeats} interleaved runs")
    for k, t in results.items():
        print(f"  {k:<11} {t * 1e3:9.1f} ms   {t / base:5.3f}x")
    return {k: t / base for k, t in results.items()}


def bench_compiled(name: str, repeats: int, device: str) -> dict[str, float] | None:
    """Per-forward time of inductor-compiled converted models relative to the compiled torch model."""
    size, batch = CONFIGS[name]
    torch.manual_seed(0)
    plain = getattr(torchvision.models, name)(num_classes=1000).eval().to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    fns: dict[str, Callable[[], object]] = {}
    try:
        for stats in ("torch eval", "batch", "blend", "ema"):
            model = copy.deepcopy(plain) if stats == "torch eval" else tta.convert(copy.deepcopy(plain), stats=stats).eval()
            compiled = torch.compile(model, fullgraph=True)
            start = time.perf_counter()
            with torch.no_grad():
                compiled(x)
            print(f"  compiled {name} {stats}: {time.perf_counter() - start:.0f} s to compile")
            fns[stats] = lambda c=compiled: c(x)
        with torch.no_grad():
            results = _interleaved(fns, repeats)
    except Exception:  # noqa: BLE001 - report and go on: compilation is optional here
        print(f"\ntorch.compile (inductor) failed for {name} on {device}:\n{traceback.format_exc(limit=3)}")
        return None
    base = results["torch eval"]
    print(f"\n{name} {size}x{size} batch {batch} on {device}, torch.compile(fullgraph=True, inductor): "
          f"per-forward {STATISTIC.__name__} over {repeats} interleaved runs")
    for k, t in results.items():
        print(f"  {k:<11} {t * 1e3:9.1f} ms   {t / base:5.3f}x")
    return {k: t / base for k, t in results.items()}


def bench_recalibration(name: str, repeats: int, batches: int, exact: bool) -> None:
    size, batch = CONFIGS[name]
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=1000).eval()
    data = [torch.randn(batch, 3, size, size) for _ in range(batches)]

    def plain_pass() -> None:
        with torch.no_grad():
            for x in data:
                model(x)

    fns: dict[str, Callable[[], object]] = {"no_grad pass": plain_pass,
                                            "recalibrate": lambda: tta.recalibrate(model, data)}
    results = _interleaved(fns, repeats)
    if exact:  # many passes: timed once
        results["recalibrate exact"] = _time(lambda: tta.recalibrate(model, data, exact=True))
    base = results["no_grad pass"]
    print(f"\n{name}: recalibration over {batches} batches of {batch}, {STATISTIC.__name__} over {repeats} runs")
    for k, t in results.items():
        print(f"  {k:<18} {t * 1e3:9.1f} ms   {t / base:5.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,resnet50", help="comma-separated: resnet18, resnet50")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds per measurement")
    parser.add_argument("--recal-batches", type=int, default=4, help="batches per recalibration run")
    parser.add_argument("--exact", action="store_true", help="also time recalibrate(exact=True)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu (the goals' setting) or cuda")
    parser.add_argument("--skip-recal", action="store_true", help="only the per-forward ratios")
    parser.add_argument("--stat", default="median", choices=["median", "min"], help="statistic over the runs")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (inductor) models")
    args = parser.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        raise SystemExit(f"unknown model(s) {bad}; choose from {sorted(CONFIGS)}")
    global STATISTIC
    STATISTIC = min if args.stat == "min" else statistics.median
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print("reference (issue 2, 2-core machine): second-BatchNorm wrapper blend 1.14x/1.28x, "
          "torch.var_mean layer 1.40x/1.55x, two-pass EMA > 2x (resnet18/resnet50)")
    summary = {name: bench_forward(name, args.repeats, args.device) for name in names}
    for name in [] if args.skip_recal else names:
        bench_recalibration(name, max(3, args.repeats // 3), args.recal_batches, args.exact)
    compiled = {name: bench_compiled(name, args.repeats, args.device) for name in names} if args.compile else {}
    print("\nsummary (ratio to torch eval):")
    for name, ratios in summary.items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items() if k != "torch eval"))
    for name, ratios in compiled.items():
        print(f"  {name} compiled: " + ("failed (see above)" if ratios is None else
                                        ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items() if k != "torch eval")))


if __name__ == "__main__":
    main()
