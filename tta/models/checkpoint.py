"""Safe checkpoint loading and atomic saving.

Checkpoints are loaded with ``torch.load(..., weights_only=True)`` only: a checkpoint is data,
and loading it never runs code. Files that are not checkpoints get an error that says what they
are, because the most common failure in the wild is a download that saved an HTML error page
or stopped half way.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tta._atomic import atomic_file

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint", "extract_state_dict"]

_HTML_SIGNATURES = (b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")


class CheckpointError(ValueError):
    """The file exists but is not a loadable checkpoint (truncated, HTML page, ...)."""


def _describe_bad_file(path: Path) -> str | None:
    """Returns why ``path`` is clearly not a checkpoint, judged from its first bytes."""
    size = path.stat().st_size
    if size == 0:
        return f"{path} is empty (0 bytes), not a checkpoint: the download or save probably failed"
    with path.open("rb") as f:
        head = f.read(512)
    sniff = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if sniff.startswith(_HTML_SIGNATURES):
        return (
            f"{path} is an HTML page, not a checkpoint: the download probably failed "
            f"(first bytes: {head[:60]!r})"
        )
    return None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> Any:
    """Loads a checkpoint with ``weights_only=True``.

    Args:
        path: file written by :func:`torch.save` (zip or legacy format).
        map_location: where tensors go, ``"cpu"`` by default.

    Returns:
        whatever was saved (typically a state_dict or a dict holding one).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is empty, an HTML page, truncated or otherwise unreadable.
        pickle.UnpicklingError: the file holds objects other than tensors and plain
            containers (``weights_only=True`` refuses to execute code).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    reason = _describe_bad_file(path)
    if reason is not None:
        raise CheckpointError(reason)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        size = path.stat().st_size
        raise CheckpointError(
            f"{path} ({size} bytes) is truncated or corrupt, not a readable checkpoint: {exc}"
        ) from exc


def save_checkpoint(obj: Any, path: str | os.PathLike) -> Path:
    """Saves ``obj`` with :func:`torch.save` atomically (temp file + :func:`os.replace`).

    A reader never sees a half-written file: it sees the old file or the new one.
    """
    path = Path(path)
    with atomic_file(path, "wb") as f:
        torch.save(obj, f)
    return path


def extract_state_dict(checkpoint: Any) -> dict[str, torch.Tensor]:
    """Returns the state_dict inside a loaded checkpoint.

    Accepts a bare state_dict or a dict holding one under ``state_dict``,
    ``model_state_dict`` or ``model`` (the layouts used by RobustBench, tta and common
    training scripts), and strips the ``module.`` prefix that ``DataParallel`` adds.
    """
    state = checkpoint
    if isinstance(state, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = state.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                state = inner
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = list(state)[:10] if isinstance(state, Mapping) else type(state).__name__
        raise CheckpointError(f"no state_dict found in checkpoint (top level: {keys})")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return dict(state)
