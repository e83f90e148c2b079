"""``tta train-source``: train a source model on a clean train split and save a checkpoint.

    tta train-source                                              # ResNet-14 on Fashion-MNIST
    tta train-source dataset=digits epochs=1 output=/tmp/digits.pt
    tta train-source model=resnet8 +model.kwargs.width=8 dataset=digits
    python scripts/export_pretrained.py checkpoints/fashion_mnist_resnet14.pt

(``python scripts/train_source.py ...`` is the same Hydra app.) The checkpoint (written
atomically) is ``{"state_dict": ..., "tta": metadata}``
(:func:`tta.models.checkpoint.make_metadata`): the architecture and builder kwargs (with the
train split's input mean/std), the dataset and its classes, the test accuracy on the whole test
split, and ``config``, ``history``, ``training_time_s``, ``device``, ``command`` (the command
line as typed, ``sys.orig_argv``), ``versions``.
``tta evaluate model=<architecture> model.weights=<checkpoint>`` and
``tta.models.get_model(architecture, weights=<checkpoint>)`` rebuild exactly this model.

Re-runs: a checkpoint at ``output`` whose recorded ``config`` equals this run's (all but the
run options :data:`RUN_OPTIONS`) is finished work and is not retrained (``overwrite=true``
retrains it). Any other file there (another config, or not a checkpoint of this app) is never
overwritten: once the new model is trained it is moved to ``superseded/<UTC time>.<name>``
beside ``output``. The hyper-parameters, settings the app would ignore (``model.pretrained``,
unknown ``model.*`` keys) and whether ``output`` can be written are checked before anything is
loaded or written;
training that diverges (nan/inf loss or weights) writes no checkpoint. A failure prints one
line and exits with status 1 (``TTA_DEBUG=1``: the traceback).
"""
from __future__ import annotations

import logging
import os
import shlex
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import tta.data
import tta.models
from tta.apps import DEBUG_ENV, config_dir, debugging, error_line
from tta.models import save_checkpoint
from tta.evaluation.pipeline import resolve_device
from tta.evaluation.results import SUPERSEDED
from tta.models.checkpoint import METADATA_KEY, make_metadata
from tta.training import channel_stats, check_hparams, dataset_tensors, train

logger = logging.getLogger(__name__)

# options that change how a run goes, not what it trains: not compared on re-runs
RUN_OPTIONS = ("overwrite", "progress", "num_threads", "device", "output")
KEYS = {"dataset", "model", "normalize", "epochs", "batch_size", "lr", "momentum", "nesterov",
        "weight_decay", "schedule", "warmup_epochs", "label_smoothing", "augment", "seed", "device",
        "amp", "num_threads", "progress", "output", "overwrite"}
# the model group's keys this app uses (conf/model/*.yaml); pretrained must be null: it names a
# shipped trained model, which this app does not train from
MODEL_KEYS = {"name", "pretrained", "weights", "num_classes", "in_channels", "kwargs"}


def _plain(node: Any) -> dict[str, Any]:
    return {} if node is None else dict(OmegaConf.to_container(node, resolve=True))  # type: ignore[arg-type]


def protocol_config(config: dict[str, Any]) -> dict[str, Any]:
    """The resolved config without :data:`RUN_OPTIONS`: what decides whether a checkpoint is
    the finished result of this run."""
    return {k: v for k, v in config.items() if k not in RUN_OPTIONS}


def check_config(cfg: DictConfig) -> None:
    """Names, types and ranges of the settings (:func:`tta.training.check_hparams`), settings
    this app would ignore (``model.pretrained``: a shipped model; unknown ``model.*`` keys) and
    the writability of ``output`` (:func:`check_writable`), before anything is loaded or written:
    TypeError / ValueError naming the setting and valid values."""
    unknown = sorted(set(cfg) - KEYS) + sorted(f"augment.{k}" for k in set(cfg.augment) - {"crop_padding", "hflip"})
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; valid: {sorted(KEYS)} (augment: crop_padding, hflip)")
    unknown = sorted(f"model.{k}" for k in set(cfg.model) - MODEL_KEYS)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}: train-source would ignore them; valid: "
                         f"{sorted(f'model.{k}' for k in MODEL_KEYS)}")
    if cfg.model.get("pretrained") is not None:
        raise ValueError(f"model.pretrained={cfg.model.pretrained!r}: train-source trains model.name="
                         f"{cfg.model.name!r} from scratch (or from model.weights) and would ignore a shipped "
                         "model; pass model=<architecture> (e.g. model=resnet14) or model.pretrained=null")
    check_hparams(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, momentum=cfg.momentum,
                  nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, schedule=cfg.schedule,
                  warmup_epochs=cfg.warmup_epochs, label_smoothing=cfg.label_smoothing,
                  crop_padding=cfg.augment.crop_padding, hflip=cfg.augment.hflip, seed=cfg.seed,
                  amp=cfg.amp, progress=cfg.progress)
    for name in ("normalize", "overwrite"):
        if not isinstance(cfg[name], bool):
            raise TypeError(f"{name} must be true or false, got {cfg[name]!r}")
    threads = cfg.num_threads
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"num_threads must be null or an int >= 1, got {threads!r}")
    resolve_device(cfg.device)  # a torch device name, and cuda only where there is CUDA
    if not isinstance(cfg.output, str) or not cfg.output:
        raise ValueError(f"output must be a checkpoint path, got {cfg.output!r}")
    check_writable(Path(cfg.output))


def check_writable(output: Path) -> None:
    """ValueError unless a file can be written at ``output``: its nearest existing ancestor is a
    directory in which a file can be created (probed with a temporary file, removed at once;
    nothing else is created), so that a bad path fails before training, not after."""
    parent = output.expanduser().absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        if output.is_dir():
            raise IsADirectoryError(f"{output} is a directory")
        if not parent.is_dir():
            raise NotADirectoryError(f"{parent} is not a directory")
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        raise ValueError(f"output={os.fspath(output)!r} cannot be written: {error}") from None


def _recorded_protocol(output: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(checkpoint, its recorded protocol config) of the file at ``output``; (None, None) when
    it is no checkpoint of this app."""
    try:
        checkpoint = tta.models.load_checkpoint(output)
        config = checkpoint[METADATA_KEY]["config"]
        return checkpoint, protocol_config(config)
    except Exception:  # unreadable, foreign or older file: not finished work of this config
        return None, None


def _set_aside(output: Path) -> Path:
    """Moves ``output`` to ``superseded/<UTC time>.<name>`` beside it; returns the new path."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    target = output.parent / SUPERSEDED / f"{stamp}.{output.name}"
    target.parent.mkdir(exist_ok=True)
    os.replace(output, target)
    return target


def run(cfg: DictConfig) -> dict[str, Any]:
    """Trains as configured and returns the saved checkpoint dict (or the finished one).

    Raises:
        TypeError, ValueError: a bad setting (:func:`check_config`), before any work.
        FloatingPointError: training diverged; nothing is written.
    """
    check_config(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    current, output = protocol_config(config), Path(cfg.output)
    if output.exists():
        checkpoint, recorded = _recorded_protocol(output)
        if recorded == current and not cfg.overwrite:
            print(f"{output} holds a finished checkpoint of this config: skipping (overwrite=true retrains it)")
            return checkpoint
        if recorded is None:
            logger.warning("%s is not a checkpoint of this app: it will be moved to %s/", output, SUPERSEDED)
        elif recorded != current:
            changed = sorted(k for k in {*recorded, *current} if recorded.get(k) != current.get(k))
            logger.warning("%s was trained with another config (%s differ): retraining; it will be "
                           "moved to %s/", output, ", ".join(changed), SUPERSEDED)
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    device = resolve_device(cfg.device)
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
        config=config,
        history=result.history,
        training_time_s=result.training_time_s,
        device=str(torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()}"),
        command=shlex.join(sys.orig_argv),  # as typed: python ... or .../tta train-source ...
        versions={"torch": str(torch.__version__)},
    )
    checkpoint = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, METADATA_KEY: metadata}
    if output.exists() and _recorded_protocol(output)[1] != current:
        logger.warning("moved the previous %s to %s", output, _set_aside(output))
    save_checkpoint(checkpoint, output)
    print(f"test accuracy {result.test_accuracy:.4f} ({len(test_set)} images); "
          f"{result.training_time_s:.0f} s; saved {os.fspath(output)}")
    return checkpoint


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train_source")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except Exception as error:
        if debugging():
            raise
        logger.error("training failed: %s: %s (no checkpoint written; %s=1 shows the traceback)",
                     type(error).__name__, error_line(error), DEBUG_ENV)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
