"""The source models shipped inside the package (``tta/models/pretrained/``).

Each shipped model is two files: ``<stem>.pt``, a float32 state_dict, and ``<stem>.json``:
``{"name", "file", "sha256", "size_bytes", "tta": metadata}``, where ``metadata`` is the block a
tta checkpoint carries (:func:`tta.models.checkpoint.make_metadata`: architecture and kwargs to
build the model, dataset, classes, test accuracy, training config, time and command). The
older layout (``"model": {"name", "kwargs"}``, ``"clean_test_accuracy"``) still loads.
:func:`load_pretrained` checks the sha256 before loading, so a corrupted or swapped file is
refused.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from tta.models.checkpoint import CheckpointError, attach_metadata, extract_state_dict, load_checkpoint, read_metadata

__all__ = ["PRETRAINED", "PRETRAINED_DIR", "pretrained_info", "load_pretrained", "sha256_of"]

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"

# name -> file stem in PRETRAINED_DIR. "fashion_mnist" is the default source model; the
# cheaper variants trade a little accuracy for CPU throughput (see docs/models.md).
PRETRAINED: dict[str, str] = {
    "fashion_mnist": "fashion_mnist_resnet14",
    "fashion_mnist_resnet20": "fashion_mnist_resnet20",
    "fashion_mnist_resnet8": "fashion_mnist_resnet8",
}


def sha256_of(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _paths(name: str, directory: str | os.PathLike | None) -> tuple[Path, Path]:
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; valid: {sorted(PRETRAINED)}")
    base = Path(directory) if directory is not None else PRETRAINED_DIR
    return base / f"{PRETRAINED[name]}.pt", base / f"{PRETRAINED[name]}.json"


def pretrained_info(name: str, directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """Returns the contents of shipped model ``name``'s ``.json`` (see the module docstring).

    Raises:
        ValueError: unknown name.
        FileNotFoundError: the ``.json`` is not there.
        CheckpointError: the ``.json`` is not valid JSON (e.g. truncated) or lacks its keys
            (``sha256`` and the model's metadata); the message names the file.
    """
    _, meta = _paths(name, directory)
    if not meta.is_file():
        raise FileNotFoundError(f"metadata of pretrained model {name!r} not found: {meta}")
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{meta} is not valid JSON (truncated or corrupt?): {exc}") from None
    if not isinstance(info, dict) or not isinstance(info.get("sha256"), str) or read_metadata(info, meta) is None:
        keys = sorted(info) if isinstance(info, dict) else type(info).__name__
        raise CheckpointError(
            f"{meta} is not the metadata of a shipped model: it needs 'sha256' and 'tta' (or the "
            f"older 'model' and 'clean_test_accuracy'), found {keys}"
        )
    return info


def load_pretrained(name: str = "fashion_mnist", directory: str | os.PathLike | None = None) -> nn.Module:
    """Builds shipped model ``name``, loads its weights (sha256-checked, strict) in eval mode.

    The model carries its recorded metadata (:func:`tta.models.model_info`, ``"source"`` is
    ``name``).

    Args:
        name: one of :data:`PRETRAINED`, all trained on Fashion-MNIST (10 classes, 1x28x28
            images in [0, 1]; the input normalisation mean 0.286, std 0.353 is inside the model):

            - ``"fashion_mnist"`` (default): ResNet-14, 94.30 % clean test accuracy,
            - ``"fashion_mnist_resnet20"``: ResNet-20, 94.56 %,
            - ``"fashion_mnist_resnet8"``: ResNet-8, 93.18 %

            (facts recorded in each model's ``.json``; test set of 10,000 images).
        directory: where the files are (the package's ``pretrained/`` by default).

    Raises:
        ValueError: unknown name.
        FileNotFoundError: the files are not there.
        CheckpointError: the ``.json`` is corrupt, or the weights file does not match its
            recorded sha256.
    """
    from tta.models import get_model  # the registry imports this module

    weights, meta = _paths(name, directory)
    info = pretrained_info(name, directory)
    if not weights.is_file():
        raise FileNotFoundError(f"weights of pretrained model {name!r} not found: {weights}")
    actual = sha256_of(weights)
    if actual != info["sha256"]:
        raise CheckpointError(
            f"{weights} has sha256 {actual}, but {meta.name} records {info['sha256']}: "
            "the file is corrupt or was replaced"
        )
    metadata = read_metadata(info, meta)
    model = get_model(metadata["architecture"], **metadata["kwargs"])
    model.load_state_dict(extract_state_dict(load_checkpoint(weights)), strict=True)
    return attach_metadata(model.eval(), metadata, name)
