"""CPU throughput of the small ResNets at Fashion-MNIST size (1x28x28), side by side.

    PYTHONPATH=. python scripts/bench_models.py [--seconds 5] [--threads N]

Prints eval images/s (torch.inference_mode, batch 256), training images/s (batch 128, SGD step)
and the implied time of one Fashion-MNIST training epoch (60,000 images), with ratios to
ResNet-20 measured in the same run (the machine's load affects absolute numbers).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import tta.models


def rate(step, batch: int, seconds: float) -> float:
    step()  # warm-up
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        count += batch
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet14", "resnet8"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x_eval, x_train = torch.rand(256, 1, 28, 28), torch.rand(128, 1, 28, 28)
    y_train = torch.randint(0, 10, (128,))
    results = {}
    for name in args.models:
        model = tta.models.get_model(name, num_classes=10, in_channels=1, mean=[0.286], std=[0.353])
        model.eval()
        with torch.inference_mode():
            eval_rate = rate(lambda: model(x_eval), 256, args.seconds)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def train_step():
            loss = F.cross_entropy(model(x_train), y_train)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        train_rate = rate(train_step, 128, args.seconds)
        results[name] = (eval_rate, train_rate)
    base_eval, base_train = results.get("resnet20", next(iter(results.values())))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':10s} {'params':>8s} {'eval img/s':>11s} {'x r20':>6s} {'train img/s':>12s} {'epoch s':>8s} {'x r20':>6s}")
    for name, (eval_rate, train_rate) in results.items():
        params = sum(p.numel() for p in tta.models.get_model(name, in_channels=1).parameters())
        print(f"{name:10s} {params:8d} {eval_rate:11.0f} {eval_rate / base_eval:6.2f} {train_rate:12.0f} "
              f"{60000 / train_rate:8.0f} {train_rate / base_train:6.2f}")


if __name__ == "__main__":
    main()
