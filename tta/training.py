"""Supervised training of a source model on a clean train split (used by scripts/train_source.py).

The whole split is held as one uint8 tensor and augmented a batch at a time in torch (random
crop with zero padding, horizontal flip), which is much faster on small images than a
per-image ``DataLoader`` pipeline.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = ["TrainResult", "SCHEDULES", "check_hparams", "dataset_tensors", "channel_stats", "augment_batch",
           "evaluate", "train"]

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "constant")


@dataclass
class TrainResult:
    """``test_accuracy``: top-1 accuracy (fraction) on the whole clean test split after the last
    epoch; ``history``: one record per epoch (epoch, train_loss, train_accuracy, test_accuracy,
    lr, elapsed_s)."""

    test_accuracy: float
    training_time_s: float
    history: list[dict[str, float]] = field(default_factory=list)


def dataset_tensors(dataset) -> tuple[Tensor, Tensor]:
    """Returns ``(images, targets)`` of a whole split: uint8 (N, C, H, W) and int64 (N,).

    Uses the dataset's ``images``/``targets`` tensors when it has them (tta's datasets do);
    otherwise stacks its float [0, 1] items and quantises them to uint8.
    """
    images, targets = getattr(dataset, "images", None), getattr(dataset, "targets", None)
    if isinstance(images, Tensor) and images.dtype == torch.uint8 and images.dim() == 4:
        return images, torch.as_tensor(targets).long()
    items = [dataset[i] for i in range(len(dataset))]
    stacked = torch.stack([torch.as_tensor(image) for image, _ in items])
    if stacked.dtype != torch.uint8:
        stacked = (stacked.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return stacked, torch.tensor([int(label) for _, label in items], dtype=torch.long)


def channel_stats(images: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, C, H, W), on the [0, 1] scale."""
    x = images.to(torch.float64).div_(255.0)
    std, mean = torch.std_mean(x, dim=(0, 2, 3))
    return mean.tolist(), std.tolist()


def augment_batch(images: Tensor, *, crop_padding: int = 0, hflip: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """Random crop after zero padding by ``crop_padding`` pixels and random horizontal flip.

    Each image gets its own offsets and flip. Works on any dtype; shape is kept.
    """
    n, _, h, w = images.shape
    device = images.device
    if crop_padding > 0:
        padded = F.pad(images, (crop_padding,) * 4)
        size = 2 * crop_padding + 1
        dy = torch.randint(size, (n,), generator=generator, device="cpu").to(device)
        dx = torch.randint(size, (n,), generator=generator, device="cpu").to(device)
        rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]  # (N, 1, H, 1)
        cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]  # (N, 1, 1, W)
        batch = torch.arange(n, device=device)[:, None, None, None]
        channel = torch.arange(images.shape[1], device=device)[None, :, None, None]
        images = padded[batch, channel, rows, cols]
    if hflip:
        flip = (torch.rand(n, generator=generator, device="cpu") < 0.5).to(device)
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    return images


@torch.inference_mode()
def evaluate(model: nn.Module, images: Tensor, targets: Tensor, *, batch_size: int = 512, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on uint8 images."""
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device, non_blocking=True).float().div_(255.0)
        y = targets[start : start + batch_size].to(device, non_blocking=True)
        correct += int((model(x).argmax(1) == y).sum())
    return correct / max(len(images), 1)


def _lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0  # constant


def _check(name: str, value: Any, kind: type, valid: str, ok: Callable[[Any], bool]) -> None:
    """TypeError unless ``value`` is a ``kind`` (bool is no number; an int is a float), ValueError
    unless it is finite and ``ok(value)``; both name ``name``, the value and ``valid``."""
    numeric = kind is not bool
    types = (int, float) if kind is float else kind
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, types):
        raise TypeError(f"{name} must be {valid}, got {value!r} ({type(value).__name__})")
    if numeric and not (math.isfinite(value) and ok(value)):
        raise ValueError(f"{name} must be {valid}, got {value!r}")


def check_hparams(*, epochs: int, lr: float, batch_size: int, momentum: float, nesterov: bool,
                  weight_decay: float, schedule: str, warmup_epochs: float, label_smoothing: float,
                  crop_padding: int, hflip: bool, seed: int, amp: bool, progress: bool) -> None:
    """Checks the hyper-parameters of :func:`train` (same names), before any work.

    Raises:
        TypeError: a value of the wrong type (``lr="abc"``, ``epochs=1.5``, ``hflip=1``).
        ValueError: a value outside its range (nan and +-inf included); the message names the
            parameter, the value and the valid range.
    """
    _check("epochs", epochs, int, "an int >= 1", lambda v: v >= 1)
    _check("batch_size", batch_size, int, "an int >= 1", lambda v: v >= 1)
    _check("lr", lr, float, "a finite number > 0 (default 0.1)", lambda v: v > 0)
    _check("momentum", momentum, float, "a finite number in [0, 1) (default 0.9)", lambda v: 0 <= v < 1)
    _check("weight_decay", weight_decay, float, "a finite number >= 0 (default 5e-4)", lambda v: v >= 0)
    _check("warmup_epochs", warmup_epochs, float, f"a finite number in [0, epochs={epochs}] (default 1)",
           lambda v: 0 <= v <= epochs)
    _check("label_smoothing", label_smoothing, float, "a finite number in [0, 1] (default 0)",
           lambda v: 0 <= v <= 1)
    _check("crop_padding", crop_padding, int, "an int >= 0 (default 2)", lambda v: v >= 0)
    _check("seed", seed, int, "an int in [0, 2**63)", lambda v: 0 <= v < 2**63)
    for name, value in (("nesterov", nesterov), ("hflip", hflip), ("amp", amp), ("progress", progress)):
        _check(name, value, bool, "true or false", bool)
    if nesterov and momentum == 0:
        raise ValueError("nesterov=true needs momentum > 0, got momentum=0")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {list(SCHEDULES)}")


def _non_finite(model: nn.Module) -> list[str]:
    """Names of the model's parameters and buffers holding nan or +-inf."""
    return [name for name, t in model.state_dict().items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def train(
    model: nn.Module,
    train_set,
    test_set,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 128,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    warmup_epochs: float = 1.0,
    label_smoothing: float = 0.0,
    crop_padding: int = 2,
    hflip: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    amp: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Trains ``model`` in place with SGD and a per-step learning-rate schedule.

    Args:
        model: the classifier; it takes [0, 1] images (normalisation inside the model).
        train_set, test_set: datasets (see :func:`dataset_tensors`).
        epochs: passes over the train split.
        lr: peak learning rate (reached after ``warmup_epochs`` of linear warm-up).
        schedule: ``"cosine"`` (to zero) or ``"constant"``.
        crop_padding, hflip: batch augmentation (see :func:`augment_batch`).
        seed: seeds the initial shuffle/augmentation generator (model init is the caller's).
        device: where to train. ``amp`` uses bfloat16 autocast on CUDA.
        on_epoch_end: called with the epoch's record (epoch, loss, train/test accuracy, lr).

    Returns:
        :class:`TrainResult` with the final clean test accuracy and the per-epoch history.

    Raises:
        TypeError, ValueError: a hyper-parameter of the wrong type or out of range
            (:func:`check_hparams`), before any work.
        FloatingPointError: the training loss or a weight became nan or infinite (checked
            after every epoch, e.g. a learning rate far too large); ``model`` is then unusable.
    """
    check_hparams(epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum, nesterov=nesterov,
                  weight_decay=weight_decay, schedule=schedule, warmup_epochs=warmup_epochs,
                  label_smoothing=label_smoothing, crop_padding=crop_padding, hflip=hflip, seed=seed,
                  amp=amp, progress=progress)
    device = torch.device(device)
    train_images, train_targets = dataset_tensors(train_set)
    test_images, test_targets = dataset_tensors(test_set)
    # Small datasets fit on the device: move once, index there.
    train_images, train_targets = train_images.to(device), train_targets.to(device)
    model.to(device)
    decay, no_decay = [], []
    for param in model.parameters():
        # No weight decay on BatchNorm affine parameters and biases (1-d tensors).
        (no_decay if param.dim() <= 1 else decay).append(param)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, momentum=momentum, nesterov=nesterov,
    )
    steps_per_epoch = math.ceil(len(train_images) / batch_size)
    total_steps = epochs * steps_per_epoch
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(schedule, step, total_steps, warmup_steps)
    )
    generator = torch.Generator().manual_seed(seed)
    use_amp = amp and device.type == "cuda"
    history: list[dict[str, float]] = []
    start_time = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(train_images), generator=generator).to(device)
        # Running sums stay on the device: no host sync per step.
        total_loss = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{epochs}", disable=not progress, leave=False)
        for step in bar:
            index = order[step * batch_size : (step + 1) * batch_size]
            x = augment_batch(train_images[index], crop_padding=crop_padding, hflip=hflip, generator=generator)
            x = x.float().div_(255.0)
            y = train_targets[index]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
            if progress and step % 50 == 0:
                bar.set_postfix(loss=f"{float(total_loss) / seen:.3f}", acc=f"{int(correct) / seen:.3f}")
        bad = _non_finite(model)
        if not math.isfinite(float(total_loss)) or bad:
            raise FloatingPointError(
                f"training diverged in epoch {epoch}: mean train loss {float(total_loss) / seen}, "
                f"{len(bad)} non-finite parameter(s)/buffer(s) {bad[:3]} (lr={lr}); try a smaller lr")
        test_accuracy = evaluate(model, test_images, test_targets, device=device)
        record = {
            "epoch": epoch,
            "train_loss": float(total_loss) / seen,
            "train_accuracy": int(correct) / seen,
            "test_accuracy": test_accuracy,
            "lr": optimizer.param_groups[0]["lr"],
            "elapsed_s": time.perf_counter() - start_time,
        }
        history.append(record)
        log.info("epoch %d/%d: loss %.4f, train acc %.4f, test acc %.4f", epoch, epochs,
                 record["train_loss"], record["train_accuracy"], test_accuracy)
        if on_epoch_end is not None:
            on_epoch_end(record)
    return TrainResult(history[-1]["test_accuracy"], time.perf_counter() - start_time, history)
