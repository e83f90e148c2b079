"""Results files and caches: atomic writes, skip-if-done, recorded errors, content-keyed caches.

A job directory holds ``results.json`` + ``results.csv`` when the job succeeded, or
``error.json`` when it failed. The caches (corrupted cells as ``.npy``, source-model metrics as
``.json``) live under a cache directory and are keyed by the sha256 of their inputs' content,
so they are shared safely between jobs, processes and sweeps.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import traceback
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from tta._atomic import atomic_file

__all__ = ["RESULTS_JSON", "RESULTS_CSV", "ERROR_JSON", "atomic_write_bytes", "write_json",
           "read_json", "write_results", "write_error", "finished", "content_hash",
           "model_hash", "tensor_hash", "corruption_code_hash", "CellCache", "JsonCache"]

logger = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
ERROR_JSON = "error.json"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to a temporary file in the same directory, then renames it over
    ``path``: readers never see a partial file, concurrent writers of the same content are
    harmless."""
    with atomic_file(path, "wb") as f:
        f.write(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


# run-level columns repeated on every row of results.csv
_CSV_RUN_COLUMNS = ("method", "stream", "batch_size", "dataset", "model",
                    "params", "clean_accuracy")


def results_csv(results: Mapping[str, Any]) -> str:
    """One row per cell; run-level columns first (``params`` is the method's params as JSON)."""
    cell_columns: list[str] = []
    for cell in results["cells"]:
        cell_columns += [k for k in cell if k not in cell_columns]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*_CSV_RUN_COLUMNS, *cell_columns])
    for cell in results["cells"]:
        run = [json.dumps(results.get("params", {}), sort_keys=True) if c == "params"
               else results.get(c) for c in _CSV_RUN_COLUMNS]
        writer.writerow([*run, *(cell.get(c) for c in cell_columns)])
    return out.getvalue()


def write_results(directory: str | os.PathLike, results: Mapping[str, Any]) -> None:
    """Writes ``results.json`` and ``results.csv`` atomically (CSV first, so a present
    results.json means the job is complete) and removes a stale ``error.json``."""
    directory = Path(directory)
    atomic_write_bytes(directory / RESULTS_CSV, results_csv(results).encode())
    write_json(directory / RESULTS_JSON, results)
    (directory / ERROR_JSON).unlink(missing_ok=True)


def write_error(directory: str | os.PathLike, error: BaseException, config: Any = None) -> None:
    """Records a failed job in ``error.json`` (type, message, traceback, config)."""
    write_json(Path(directory) / ERROR_JSON, {
        "status": "error",
        "error_type": type(error).__name__,
        "error": str(error),
        "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
        "config": config,
    })


def finished(directory: str | os.PathLike, config: Mapping[str, Any]) -> bool:
    """Whether ``directory`` already holds results of ``config`` (the job can be skipped).

    Raises:
        ValueError: if it holds results of a *different* config (rather than silently skipping
            or overwriting them).
    """
    path = Path(directory) / RESULTS_JSON
    if not path.exists():
        return False
    try:
        stored = read_json(path).get("config")
    except (OSError, ValueError):
        return False  # unreadable: redo
    if stored != config:
        raise ValueError(f"{path} holds results of a different config; pass force=true to "
                         "overwrite them or choose another output directory (hydra.run.dir / "
                         "hydra.sweep.dir)")
    return True


# --- content hashes -------------------------------------------------------------------------

def content_hash(*parts: Any) -> str:
    """sha256 hex digest of JSON-able parts, bytes and tensors (by content)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Tensor):
            h.update(tensor_hash(part).encode())
        elif isinstance(part, (bytes, bytearray)):
            h.update(part)
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def tensor_hash(tensor: Tensor) -> str:
    t = tensor.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_hash(model: nn.Module) -> str:
    """Content hash of a model's architecture (class and module names) and state_dict."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, module in model.named_modules():
        h.update(f"{name}:{type(module).__qualname__};".encode())
    for name, value in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor_hash(value).encode())
    return h.hexdigest()


def corruption_code_hash() -> str:
    """Hash of the corruption suite's source files, so cached cells are recomputed whenever the
    implementation changes."""
    import tta.corruptions as corruptions

    h = hashlib.sha256()
    root = Path(corruptions.__file__).parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


# --- caches ---------------------------------------------------------------------------------

class CellCache:
    """Corrupted images as ``.npy`` files under ``directory/cells``, keyed by content hash;
    ``directory=None`` disables the disk cache. Recently used cells are also kept in memory
    (``memory`` of them), so the jobs of a basic-launcher sweep share them within a process."""

    _memory: dict[str, Tensor] = {}

    def __init__(self, directory: str | os.PathLike | None, memory: int = 16) -> None:
        self.directory = None if directory is None else Path(directory) / "cells"
        self.memory = memory

    def get(self, key: str) -> Tensor | None:
        if key in self._memory:
            images = self._memory[key]
            if self.directory is not None and not (self.directory / f"{key}.npy").exists():
                self.put(key, images)  # another cache directory than the one it came from
            return images
        if self.directory is not None:
            path = self.directory / f"{key}.npy"
            if path.exists():
                try:
                    images = torch.from_numpy(np.load(path, allow_pickle=False))
                except (OSError, ValueError) as error:
                    logger.warning("ignoring unreadable cache file %s: %s", path, error)
                    return None
                self._remember(key, images)
                return images
        return None

    def put(self, key: str, images: Tensor) -> None:
        self._remember(key, images)
        if self.directory is not None:
            buffer = io.BytesIO()
            np.save(buffer, images.cpu().numpy(), allow_pickle=False)
            atomic_write_bytes(self.directory / f"{key}.npy", buffer.getvalue())

    def _remember(self, key: str, images: Tensor) -> None:
        memory = type(self)._memory
        memory.pop(key, None)
        memory[key] = images
        while len(memory) > self.memory:
            memory.pop(next(iter(memory)))


class JsonCache:
    """Small JSON records under ``directory/name``, keyed by content hash (``None``: off)."""

    def __init__(self, directory: str | os.PathLike | None, name: str) -> None:
        self.directory = None if directory is None else Path(directory) / name

    def get(self, key: str) -> Any:
        if self.directory is None:
            return None
        path = self.directory / f"{key}.json"
        try:
            return read_json(path) if path.exists() else None
        except (OSError, ValueError):
            return None

    def put(self, key: str, value: Any) -> None:
        if self.directory is not None:
            write_json(self.directory / f"{key}.json", value)
