"""Cost of every adaptation method of ``tta.adapt``: images per second and peak memory relative
to ``source``, measured side by side in one run on the shipped Fashion-MNIST model (or, with
``--model``, any ``tta.models`` architecture with random weights on synthetic images).

    python scripts/bench_methods.py                          # CPU, all methods
    python scripts/bench_methods.py --device cuda --batch-size 200
    python scripts/bench_methods.py --methods source,batch,tent --repeats 7
    python scripts/bench_methods.py --device cuda --model resnet50 --amp none,bf16,fp16 --skip-memory

Throughput: every method adapts on the same ``--batches`` batches of fog-corrupted test images;
the methods run interleaved (one batch set each, in rotating order) ``--repeats`` times and the
median is reported, so machine noise hits all methods alike. Memory: on CUDA the peak allocated
memory of the adaptation loop (``torch.cuda.max_memory_allocated``); on CPU the growth of the
peak resident set size (VmHWM, reset through ``/proc/self/clear_refs`` once the data are
loaded) of a fresh process that builds the adapter and runs the loop, minus its resident size
before the adapter exists. Both are given as ratios to
``source`` (for memory: extra memory over source's, in MiB, is printed beside the ratio).

Models: ``--model fashion_mnist`` (default) is the shipped checkpoint on fog-corrupted (severity
3) Fashion-MNIST test images; any other name is ``tta.models.get_model(name)`` (random weights,
the builder's number of classes) on ``torch.rand`` images of ``--image-size`` pixels (default
224 for torchvision models, 32 otherwise), EATA's Fisher images another ``torch.rand`` set.
``--amp`` (a comma-separated list of none, fp16, bf16) runs the whole adaptation loop (``fit``
included) under ``torch.autocast`` with that dtype; every setting gets its own table.
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

try:
    import tta  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import tta

# methods that need more than the model (EATA's Fisher information: in-distribution images)
_NEEDS_CLEAN = {"eata": "fisher_images"}
# keep the slow augmentation methods affordable on CPU (the reference values are 32 and 64)
_CPU_LIMITS = {"cotta": {"num_augmentations": 4}, "dua": {"num_copies": 16}}


AMP = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def _image_size(args: argparse.Namespace) -> int:
    from tta.models.torchvision import TORCHVISION_CLASSIFIERS

    return args.image_size or (224 if args.model in TORCHVISION_CLASSIFIERS else 32)


def _data(num: int, device: str, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    if args.model != "fashion_mnist":
        generator, size = torch.Generator().manual_seed(0), _image_size(args)
        images = torch.rand(2 * num, 3, size, size, generator=generator).to(device)
        return images[:num], images[num:]
    images = tta.data.get_dataset("fashion_mnist", split="test").images[:num]
    corrupted = tta.corrupt(images, "fog", 3, seed=0).float().div(255).to(device)
    return corrupted, images.float().div(255).to(device)


def _adapter(method: str, clean: torch.Tensor, device: str, reference: bool, model_name: str) -> tta.Adapter:
    if model_name == "fashion_mnist":
        model = tta.models.load_pretrained("fashion_mnist").to(device)
    else:
        torch.manual_seed(0)
        model = tta.models.get_model(model_name).eval().to(device)
    params = {} if reference or device != "cpu" else dict(_CPU_LIMITS.get(method, {}))
    if method in _NEEDS_CLEAN:
        params[_NEEDS_CLEAN[method]] = clean
    return tta.adapt(model, method, **params)


def _run(adapter: tta.Adapter, batches: list[torch.Tensor], amp: str = "none") -> float:
    """Seconds to adapt on and predict every batch, from the state right after tta.adapt, under
    ``torch.autocast`` with dtype ``AMP[amp]`` (none: no autocast)."""
    adapter.reset()
    if batches[0].is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(batches[0].device.type, dtype=AMP[amp], enabled=AMP[amp] is not None):
        if adapter.name == "recalibrate":
            adapter.fit(batches)
        with torch.no_grad():
            for x in batches:
                adapter(x)
    if batches[0].is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(args: argparse.Namespace) -> int:
    """One method in this (fresh) process; prints JSON with the peak-RSS growth in MiB."""
    x, clean = _data(args.batch_size * args.batches, "cpu", args)
    batches = list(x.split(args.batch_size))
    _reset_peak_rss()
    before = _peak_rss_mib()
    _run(_adapter(args.memory_of, clean, "cpu", args.reference, args.model), batches, args.amp)
    print(json.dumps({"method": args.memory_of, "mib": _peak_rss_mib() - before}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(tta.list_methods()))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8, help="batches per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reference", action="store_true",
                        help="CoTTA with 32 augmentations and DUA with 64 copies on CPU too")
    parser.add_argument("--model", default="fashion_mnist",
                        help="fashion_mnist (shipped weights, real images) or a tta.models name (random weights)")
    parser.add_argument("--image-size", type=int, default=0, help="synthetic images' size (0: 224 torchvision, else 32)")
    parser.add_argument("--amp", default="none", help=f"comma-separated torch.autocast dtypes from {list(AMP)}")
    parser.add_argument("--skip-memory", action="store_true", help="throughput only")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of every method per --amp setting")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    amps = args.amp.split(",")
    bad = [a for a in amps if a not in AMP]
    if bad or (args.model != "fashion_mnist" and args.model not in tta.models.list_models()):
        parser.error(f"--amp {bad} not in {list(AMP)}" if bad else
                     f"--model {args.model!r} not in ['fashion_mnist'] + {tta.models.list_models()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        return memory_child(args)
    methods = args.methods.split(",")
    if methods[0] != "source":
        methods = ["source"] + [m for m in methods if m != "source"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {args.device}, "
          f"batch size {args.batch_size}, {args.batches} batches x {args.repeats} repeats")
    if args.device == "cpu" and not args.reference:
        print(f"reduced on CPU (--reference for the published values): {_CPU_LIMITS}")

    x, clean = _data(args.batch_size * args.batches, args.device, args)
    batches = list(x.split(args.batch_size))
    adapters = {m: _adapter(m, clean, args.device, args.reference, args.model) for m in methods}
    images = args.batch_size * args.batches
    print(f"model {args.model}, input {tuple(batches[0].shape)}")
    for amp in amps:
        seconds: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(args.warmup):  # one-time costs (autotuning, autocast casts, allocator) outside the timing
            for m in methods:
                _run(adapters[m], batches, amp)
        for r in range(args.repeats):
            order = methods[r % len(methods):] + methods[:r % len(methods)]
            for m in order:
                seconds[m].append(_run(adapters[m], batches, amp))
        memory = {} if args.skip_memory else _memory(args, methods, adapters, batches, amp)
        ips = {m: images / statistics.median(s) for m, s in seconds.items()}
        print(f"\n{args.model} {tuple(batches[0].shape)} on {args.device}, amp {amp}: median of {args.repeats}\n")
        print("| method | images/s | vs source | peak MiB | vs source |\n|---|---:|---:|---:|---:|")
        for m in methods:
            if m in memory:
                ratio = memory[m] / memory["source"] if memory["source"] > 0 else float("nan")
                mem = f"{memory[m]:.1f} | {ratio:.2f}"
            else:
                mem = "- | -"
            print(f"| {m} | {ips[m]:.1f} | {ips[m] / ips['source']:.2f} | {mem} |")
    return 0


def _memory(args: argparse.Namespace, methods: list[str], adapters: dict[str, tta.Adapter],
            batches: list[torch.Tensor], amp: str) -> dict[str, float]:
    """Peak memory of each method's loop in MiB (see the module docstring)."""
    memory: dict[str, float] = {}
    for m in methods:
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            _run(adapters[m], batches, amp)
            memory[m] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            command = [sys.executable, __file__, "--memory-of", m, "--batch-size", str(args.batch_size),
                       "--batches", str(args.batches), "--model", args.model, "--image-size",
                       str(args.image_size), "--amp", amp] + (["--reference"] if args.reference else [])
            if args.threads:
                command += ["--threads", str(args.threads)]
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            memory[m] = json.loads(out.stdout.strip().splitlines()[-1])["mib"]
    return memory

if __name__ == "__main__":
    sys.exit(main())
