"""Train a source model on a clean train split and save a checkpoint (Hydra app).

    python scripts/train_source.py                                # ResNet-14 on Fashion-MNIST
    python scripts/train_source.py dataset=digits epochs=1 output=/tmp/digits.pt
    python scripts/train_source.py model=resnet8 +model.kwargs.width=8 dataset=digits
    python scripts/export_pretrained.py checkpoints/fashion_mnist_resnet14.pt

The checkpoint (written atomically) is ``{"state_dict": ..., "tta": metadata}``
(:func:`tta.models.checkpoint.make_metadata`): the architecture and builder kwargs (with the
train split's input mean/std), the dataset and its classes, the test accuracy on the whole test
split, and ``config``, ``history``, ``training_time_s``, ``device``, ``command``, ``versions``.
``scripts/evaluate.py model=<architecture> model.weights=<checkpoint>`` and
``tta.models.get_model(architecture, weights=<checkpoint>)`` rebuild exactly this model. A
finished checkpoint at ``output`` is not retrained (pass ``overwrite=true``).
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import tta.data
import tta.models
from tta.models import save_checkpoint
from tta.models.checkpoint import METADATA_KEY, make_metadata
from tta.training import channel_stats, dataset_tensors, train


def _plain(node: Any) -> dict[str, Any]:
    return {} if node is None else dict(OmegaConf.to_container(node, resolve=True))  # type: ignore[arg-type]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Trains as configured and returns the saved checkpoint dict."""
    output = Path(cfg.output)
    if output.is_file() and not cfg.get("overwrite", False):
        print(f"{output} exists: skipping (pass overwrite=true to retrain)")
        return tta.models.load_checkpoint(output)
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    data_kwargs = _plain(cfg.dataset.get("kwargs"))
    train_set = tta.data.get_dataset(cfg.dataset.name, split="train", root=cfg.dataset.root, **data_kwargs)
    test_set = tta.data.get_dataset(cfg.dataset.name, split="test", root=cfg.dataset.root, **data_kwargs)
    images, targets = dataset_tensors(train_set)

    kwargs: dict[str, Any] = _plain(cfg.model.get("kwargs"))
    kwargs["num_classes"] = int(cfg.model.get("num_classes") or int(targets.max()) + 1)
    kwargs["in_channels"] = int(cfg.model.get("in_channels") or images.shape[1])
    classes = getattr(test_set, "classes", None)
    if int(targets.max()) >= kwargs["num_classes"] or (classes is not None and len(classes) != kwargs["num_classes"]):
        raise ValueError(
            f"num_classes={kwargs['num_classes']} does not fit dataset {cfg.dataset.name!r} "
            f"(labels up to {int(targets.max())}, {None if classes is None else len(classes)} classes)"
        )
    if cfg.normalize and "mean" not in kwargs:
        mean, std = channel_stats(images)
        kwargs["mean"] = [round(v, 4) for v in mean]
        kwargs["std"] = [round(v, 4) for v in std]
    torch.manual_seed(cfg.seed)
    model = tta.models.get_model(cfg.model.name, **kwargs)
    if cfg.model.get("weights"):
        # an initial checkpoint (fine-tuning); not part of the model's kwargs
        model.load_state_dict(tta.models.extract_state_dict(tta.models.load_checkpoint(cfg.model.weights)))
    print(f"training {cfg.model.name} {kwargs} on {cfg.dataset.name} ({len(images)} images) on {device}")

    def report(record: dict[str, float]) -> None:
        print(
            f"epoch {record['epoch']:3d}: loss {record['train_loss']:.4f}  "
            f"train acc {record['train_accuracy']:.4f}  test acc {record['test_accuracy']:.4f}  "
            f"({record['elapsed_s']:.0f} s)",
            flush=True,
        )

    result = train(
        model, train_set, test_set,
        epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, momentum=cfg.momentum,
        nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, schedule=cfg.schedule,
        warmup_epochs=cfg.warmup_epochs, label_smoothing=cfg.label_smoothing,
        crop_padding=cfg.augment.crop_padding, hflip=cfg.augment.hflip, seed=cfg.seed,
        device=device, amp=cfg.amp, progress=cfg.progress, on_epoch_end=report,
    )
    metadata = make_metadata(
        cfg.model.name, kwargs, dataset=cfg.dataset.name, classes=classes,
        test_accuracy=result.test_accuracy, split="test", num_examples=len(test_set),
        config=OmegaConf.to_container(cfg, resolve=True),
        history=result.history,
        training_time_s=result.training_time_s,
        device=str(torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()}"),
        command=shlex.join(["python", *sys.argv]),
        versions={"torch": str(torch.__version__)},
    )
    checkpoint = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, METADATA_KEY: metadata}
    save_checkpoint(checkpoint, output)
    print(f"test accuracy {result.test_accuracy:.4f} ({len(test_set)} images); "
          f"{result.training_time_s:.0f} s; saved {os.fspath(output)}")
    return checkpoint


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_source")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
