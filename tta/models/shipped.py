"""The source models shipped inside the package (``tta/models/pretrained/``).

Each shipped model is two files: ``<stem>.pt``, a float32 state_dict, and ``<stem>.json``, its
metadata: the model name and kwargs to build it, the sha256 of the ``.pt``, the clean test
accuracy, the training config, time and command. :func:`load_pretrained` checks the sha256
before loading, so a corrupted or swapped file is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from tta.models.checkpoint import CheckpointError, extract_state_dict, load_checkpoint

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
    """Returns the metadata (``.json``) of shipped model ``name``."""
    weights, meta = _paths(name, directory)
    if not meta.is_file():
        raise FileNotFoundError(f"metadata of pretrained model {name!r} not found: {meta}")
    with meta.open() as f:
        return json.load(f)


def load_pretrained(name: str = "fashion_mnist", directory: str | os.PathLike | None = None) -> nn.Module:
    """Builds shipped model ``name``, loads its weights (sha256-checked, strict) in eval mode.

    Args:
        name: one of :data:`PRETRAINED` (``"fashion_mnist"``: a ResNet-20 that takes
            1x28x28 images in [0, 1]; the input normalisation is inside the model).
        directory: where the files are (the package's ``pretrained/`` by default).

    Raises:
        ValueError: unknown name.
        FileNotFoundError: the files are not there.
        CheckpointError: the weights file does not match its recorded sha256.
    """
    from tta.models import get_model  # the registry imports this module

    weights, _ = _paths(name, directory)
    info = pretrained_info(name, directory)
    if not weights.is_file():
        raise FileNotFoundError(f"weights of pretrained model {name!r} not found: {weights}")
    actual = sha256_of(weights)
    if actual != info["sha256"]:
        raise CheckpointError(
            f"{weights} has sha256 {actual}, but {PRETRAINED[name]}.json records {info['sha256']}: "
            "the file is corrupt or was replaced"
        )
    model = get_model(info["model"]["name"], **info["model"]["kwargs"])
    model.load_state_dict(extract_state_dict(load_checkpoint(weights)), strict=True)
    return model.eval()
