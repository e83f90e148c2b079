"""Safe checkpoint loading, atomic saving and the metadata that travels with a model.

Checkpoints are loaded with ``torch.load(..., weights_only=True)`` only: a checkpoint is data,
and loading it never runs code. Files that are not checkpoints get an error that says what they
are, because the most common failure in the wild is a download that saved an HTML error page,
a git-LFS pointer, or stopped half way.

A checkpoint written by tta (``scripts/train_source.py``, ``scripts/export_pretrained.py``) is
``{"state_dict": ..., "tta": metadata}``, where ``metadata`` (:func:`make_metadata`) records
everything needed to rebuild the model and reproduce its accuracy: the registered architecture
and its builder kwargs (``num_classes``, ``in_channels`` and the input ``mean``/``std``, which are
*not* in the state_dict), the dataset, its classes and the test accuracy. Loading attaches it to
the model, where :func:`model_info` reads it.
"""
from __future__ import annotations

import copy
import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tta._atomic import atomic_file

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "load_checkpoint",
    "save_checkpoint",
    "extract_state_dict",
    "load_weights",
    "METADATA_KEY",
    "METADATA_FORMAT",
    "make_metadata",
    "read_metadata",
    "attach_metadata",
    "model_info",
]

_HTML_SIGNATURES = (b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")
_LFS_SIGNATURE = b"version https://git-lfs.github.com/spec/"

METADATA_KEY = "tta"  # a tta checkpoint is {"state_dict": ..., METADATA_KEY: metadata}
METADATA_FORMAT = 1
_INFO_ATTRIBUTE = "_tta_metadata"  # where a loaded model keeps its metadata (not in its state_dict)


class CheckpointError(ValueError):
    """The file exists but is not a loadable checkpoint (truncated, HTML page, ...)."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """The checkpoint holds Python objects other than plain data, so it is not loaded."""


def _describe_bad_file(path: Path) -> str | None:
    """Returns why ``path`` is clearly not a checkpoint, judged from its first bytes."""
    size = path.stat().st_size
    if size == 0:
        return f"{path} is empty (0 bytes), not a checkpoint: the download or save probably failed"
    with path.open("rb") as f:
        head = f.read(512)
    if head.startswith(_LFS_SIGNATURE):
        return (
            f"{path} is a git-LFS pointer ({size} bytes), not the checkpoint itself: "
            "run `git lfs pull` in its repository to fetch the real file"
        )
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
        CheckpointError: the file is empty, an HTML page, a git-LFS pointer, truncated or
            otherwise unreadable (e.g. random bytes).
        UnsafeCheckpointError: the file holds objects other than tensors and plain containers
            (``weights_only=True`` refuses to execute code); a subclass of both
            :class:`CheckpointError` and :class:`pickle.UnpicklingError`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    reason = _describe_bad_file(path)
    if reason is not None:
        raise CheckpointError(reason)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message advises weights_only=False (running the file's code): say what the
        # file is instead, from torch's own diagnosis.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:
            raise UnsafeCheckpointError(
                f"{path} holds the Python object {found.group(1)}, not only tensors and plain "
                "containers; tta loads checkpoints as data and never runs code from them: "
                "save the model's state_dict (torch.save(model.state_dict(), path)) instead"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n|$)", str(exc))
        raise CheckpointError(
            f"{path} ({path.stat().st_size} bytes) is not a checkpoint written by torch.save: its "
            f"data cannot be read ({detail.group(1) if detail else type(exc).__name__})"
        ) from None
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


def load_weights(model: nn.Module, weights: Any, source: str | os.PathLike | None = None) -> nn.Module:
    """Loads ``weights`` into ``model`` with ``strict=True`` and returns ``model``.

    Args:
        model: the built architecture.
        weights: a checkpoint path (read by :func:`load_checkpoint`) or an already loaded
            checkpoint; any layout :func:`extract_state_dict` accepts (a bare state_dict,
            ``{"state_dict": ...}``, ``{"model": ...}``, ``module.`` prefixes).
        source: how to name the weights in errors (default: the path, or "the checkpoint").

    Raises:
        FileNotFoundError, CheckpointError: as :func:`load_checkpoint` / :func:`extract_state_dict`.
        CheckpointError: the keys or shapes do not fit ``model``; the message names the file,
            the architecture and the missing, unexpected and mis-shaped keys (first 5 each).
    """
    if isinstance(weights, (str, os.PathLike)):
        source = os.fspath(weights) if source is None else source
        weights = load_checkpoint(weights)
    source = "the checkpoint" if source is None else os.fspath(source)
    state = extract_state_dict(weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        from tta.models.normalization import Normalized

        bare = isinstance(model, Normalized) and not any(k.startswith("model.") for k in state)
        expected = (model.model if bare else model).state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        shapes = sorted(f"{k} {tuple(state[k].shape)} (model: {tuple(expected[k].shape)})"
                        for k in set(state) & set(expected) if state[k].shape != expected[k].shape)

        def show(keys: list[str]) -> str:
            return f"{len(keys)} {keys[:5]}{' ...' if len(keys) > 5 else ''}"

        detail = (f"missing keys {show(missing)}, unexpected keys {show(unexpected)}, "
                  f"shape mismatches {show(shapes)}" if missing or unexpected or shapes
                  else str(error).splitlines()[-1].strip())
        raise CheckpointError(f"{source} does not fit the {type(model).__name__} architecture "
                              f"(strict loading): {detail}") from None
    return model


# ---------------------------------------------------------------- metadata

_PLAIN_SCALARS = (str, int, float, bool, type(None))


def _plain(value: Any, where: str) -> Any:
    """``value`` as plain containers (dict/list/str/int/float/bool/None), the only types a
    ``weights_only=True`` load and JSON both accept; tuples become lists."""
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"metadata key {key!r} at {where} must be a str")
            out[key] = _plain(item, f"{where}.{key}")
        return out
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, _PLAIN_SCALARS):
        return value
    raise TypeError(
        f"metadata value {value!r} at {where} is a {type(value).__name__}; valid: dict, list, "
        "str, int, float, bool, None"
    )


def make_metadata(
    architecture: str,
    kwargs: Mapping[str, Any],
    *,
    dataset: str | None = None,
    classes: Sequence[str] | None = None,
    test_accuracy: float | None = None,
    split: str | None = "test",
    num_examples: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The metadata block of a tta checkpoint (format :data:`METADATA_FORMAT`).

    Args:
        architecture: the registered model name (``tta.models.get_model(architecture, **kwargs)``
            rebuilds the model).
        kwargs: the builder kwargs, including ``num_classes``, ``in_channels`` and the input
            ``mean``/``std`` (per channel, [0, 1] scale) where the model normalises its input.
        dataset: the registered dataset the model was trained on.
        classes: the class names, ``classes[label]``.
        test_accuracy: top-1 accuracy (fraction in [0, 1]) on ``num_examples`` images of split
            ``split`` of ``dataset``.
        **extra: anything else to record (``config``, ``history``, ``training_time_s``, ...).

    Returns:
        a dict of plain containers (loads with ``weights_only=True``; JSON-serialisable).

    Raises:
        TypeError: a value is not a plain container, string or number.
        ValueError: ``extra`` holds a reserved key (``format``, ``num_classes``, ``mean``,
            ``std``, ``source``); :class:`CheckpointError` for inconsistent values.
    """
    kwargs = _plain(dict(kwargs), "kwargs")
    reserved = sorted(set(extra) & {"format", "num_classes", "mean", "std", "source"})
    if reserved:
        raise ValueError(f"{reserved} are set by make_metadata or model_info, not extra metadata")
    metadata = {
        "format": METADATA_FORMAT,
        "architecture": architecture,
        "kwargs": kwargs,
        "dataset": dataset,
        "num_classes": kwargs.get("num_classes"),
        "classes": None if classes is None else [str(c) for c in classes],
        "test_accuracy": None if test_accuracy is None else float(test_accuracy),
        "split": split,
        "num_examples": num_examples,
        **_plain(extra, "metadata"),
    }
    return _validate(metadata, "the new metadata")


def _validate(metadata: dict[str, Any], source: str) -> dict[str, Any]:
    """Checks ``metadata`` and fills the optional keys with None (in place)."""

    def fail(message: str) -> None:
        raise CheckpointError(f"{source}: {message}")

    if not isinstance(metadata.get("format"), int) or metadata["format"] < 1:
        fail(f"metadata 'format' must be an int >= 1, got {metadata.get('format')!r}")
    if metadata["format"] > METADATA_FORMAT:
        fail(f"metadata format {metadata['format']} is newer than this tta reads "
             f"({METADATA_FORMAT}): upgrade tta")
    if not isinstance(metadata.get("architecture"), str):
        fail(f"metadata 'architecture' must be a model name (str), got {metadata.get('architecture')!r}")
    if not isinstance(metadata.get("kwargs"), dict):
        fail(f"metadata 'kwargs' must be a dict, got {metadata.get('kwargs')!r}")
    recorded = metadata["kwargs"].get("num_classes")
    metadata.setdefault("num_classes", recorded)
    for key in ("dataset", "classes", "test_accuracy", "split", "num_examples"):
        metadata.setdefault(key, None)
    num_classes, classes = metadata["num_classes"], metadata["classes"]
    if recorded is not None and num_classes != recorded:
        fail(f"metadata 'num_classes' {num_classes!r} differs from kwargs num_classes {recorded!r}")
    if classes is not None and (not isinstance(classes, list) or len(classes) != num_classes):
        fail(f"metadata 'classes' must be a list of num_classes={num_classes} names, got {classes!r}")
    accuracy = metadata.get("test_accuracy")
    if accuracy is not None and not (isinstance(accuracy, (int, float)) and 0.0 <= accuracy <= 1.0):
        fail(f"metadata 'test_accuracy' must be a fraction in [0, 1] or None, got {accuracy!r}")
    return metadata


def read_metadata(checkpoint: Any, source: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata recorded in a loaded checkpoint or shipped-model ``.json``, or ``None``.

    Reads the ``"tta"`` block (:func:`make_metadata`), or the layout of checkpoints written
    before it existed (``"model": {"name", "kwargs"}``, ``"clean_test_accuracy"``,
    ``"dataset"``: scripts/train_source.py and the shipped ``.json`` up to format 1).
    A plain state_dict (or any other layout) has no metadata: ``None``.

    Raises:
        CheckpointError: the metadata is there but malformed or inconsistent; the message
            names ``source``.
    """
    if not isinstance(checkpoint, Mapping):
        return None
    if METADATA_KEY in checkpoint:
        block = checkpoint[METADATA_KEY]
        if not isinstance(block, Mapping):
            raise CheckpointError(f"{source}: {METADATA_KEY!r} must be a dict of metadata, got {type(block).__name__}")
        metadata = copy.deepcopy(dict(block))
    else:
        legacy = checkpoint.get("model")
        if not (isinstance(legacy, Mapping) and isinstance(legacy.get("name"), str)
                and isinstance(legacy.get("kwargs"), Mapping)):
            return None
        kwargs = copy.deepcopy(dict(legacy["kwargs"]))
        accuracy = checkpoint.get("clean_test_accuracy")
        metadata = {
            "format": 1, "architecture": legacy["name"], "kwargs": kwargs,
            "dataset": checkpoint.get("dataset"), "split": "test",
            "test_accuracy": None if accuracy is None else float(accuracy),
        }
    return _validate(metadata, os.fspath(source))


def attach_metadata(model: nn.Module, metadata: Mapping[str, Any] | None, source: str | os.PathLike) -> nn.Module:
    """Records ``metadata`` (from ``source``: a path or a shipped name) on ``model`` for
    :func:`model_info`. An instance attribute: it survives ``copy.deepcopy`` and ``.to()``
    and is not part of the state_dict."""
    if metadata is not None:
        metadata = dict(copy.deepcopy(metadata), source=os.fspath(source))
    object.__setattr__(model, _INFO_ATTRIBUTE, metadata)
    return model


def _normalization(model: nn.Module) -> tuple[list[float] | None, list[float] | None]:
    from tta.models.normalization import InputNormalization

    for module in model.modules():
        if isinstance(module, InputNormalization):
            return module.mean.flatten().tolist(), module.std.flatten().tolist()
    return None, None


def model_info(model: nn.Module) -> dict[str, Any] | None:
    """The recorded metadata of a model loaded from a tta checkpoint or shipped model.

    Models built by ``get_model(name, weights=<tta checkpoint>)`` or ``load_pretrained(name)``
    carry it; others (random init, a plain state_dict) return ``None``.

    Returns:
        a new dict (changing it changes nothing) with at least

        - ``"architecture"`` (str): the registered model name,
        - ``"kwargs"`` (dict): its builder kwargs,
        - ``"dataset"`` (str or None): the dataset it was trained on,
        - ``"num_classes"`` (int), ``"classes"`` (list of names or None),
        - ``"mean"``, ``"std"`` (per-channel lists on the [0, 1] scale, or None): the input
          normalisation inside the model,
        - ``"test_accuracy"`` (fraction or None) on ``"num_examples"`` images of ``"split"``,
        - ``"source"`` (str): the checkpoint path or the shipped model's name,

        plus whatever else was recorded (``config``, ``history``, ...).
    """
    metadata = getattr(model, _INFO_ATTRIBUTE, None)
    if metadata is None:
        return None
    info = copy.deepcopy(metadata)
    kwargs = info["kwargs"]
    mean, std = _normalization(model)
    info["mean"] = kwargs.get("mean", mean)
    info["std"] = kwargs.get("std", std)
    return info
