"""Results files and caches: atomic writes, skip-if-done, recorded errors, content-keyed caches.

A job directory holds its latest outcome: ``results.json`` + ``results.csv`` when the job
succeeded, or ``error.json`` when it failed; earlier outcomes are moved to ``superseded/``.
One run at a time owns the directory (:func:`run_lock`). The caches (corrupted cells as
``.npy``, source-model metrics as ``.json``) live under a cache directory and are keyed by the
sha256 of their inputs' content, so they are shared safely between jobs, processes and sweeps.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import inspect
import io
import json
import logging
import os
import traceback
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, MutableMapping, TypeVar

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch import Tensor, nn

import tta
from tta._atomic import atomic_file

__all__ = ["RESULTS_JSON", "RESULTS_CSV", "ERROR_JSON", "SUPERSEDED", "LOCK_FILE",
           "OutputDirLocked", "atomic_write_bytes", "write_json", "read_json", "run_lock",
           "locked", "supersede", "write_results", "write_error", "sync_results_csv",
           "finished", "content_hash",
           "model_hash", "tensor_hash", "corruption_code_hash", "code_hash", "CellCache", "JsonCache"]

logger = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
ERROR_JSON = "error.json"
SUPERSEDED = "superseded"  # earlier outcomes, as superseded/<UTC time>.<file name>
LOCK_FILE = ".tta.lock"


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


class OutputDirLocked(RuntimeError):
    """Another run holds the output directory (see :func:`run_lock`)."""


def utc_now() -> str:
    """The current UTC time in ISO 8601 with microseconds (``2026-11-30T21:15:10.123456+00:00``)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike) -> Iterator[None]:
    """Holds the lock file ``directory/.tta.lock`` (a :class:`filelock.FileLock`; the directory
    is created), so that one run at a time owns the directory. Re-entrant within a thread.

    Raises:
        OutputDirLocked: at once, without waiting, when another process or thread holds it.
    """
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(directory / LOCK_FILE, timeout=0, is_singleton=True)
    try:
        lock.acquire()
    except Timeout:
        raise OutputDirLocked(f"output directory {directory} is in use by another run (it holds "
                              f"{directory / LOCK_FILE}); wait for that run to finish or choose "
                              "another directory (hydra.run.dir / hydra.sweep.dir)") from None
    try:
        yield
    finally:
        lock.release()


_F = TypeVar("_F", bound=Callable[..., Any])


def locked(function: _F) -> _F:
    """Decorator: ``function(output_dir, ...)`` runs holding :func:`run_lock` of ``output_dir``."""
    @functools.wraps(function)
    def wrapper(output_dir: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        with run_lock(output_dir):
            return function(output_dir, *args, **kwargs)
    return wrapper  # type: ignore[return-value]


# run-level columns repeated on every row of results.csv (run_id pairs it with results.json)
_CSV_RUN_COLUMNS = ("run_id", "method", "stream", "batch_size", "dataset", "model",
                    "params", "clean_accuracy")


def results_csv(results: Mapping[str, Any]) -> str:
    """One row per cell; run-level columns first (``params`` is the method's params as JSON)."""
    cell_columns: list[str] = []
    for cell in results["cells"]:
        cell_columns += [k for k in cell if k not in cell_columns
                         and not isinstance(cell[k], (list, dict))]  # confusion: JSON only
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*_CSV_RUN_COLUMNS, *cell_columns])
    for cell in results["cells"]:
        run = [json.dumps(results.get("params", {}), sort_keys=True) if c == "params"
               else results.get(c) for c in _CSV_RUN_COLUMNS]
        writer.writerow([*run, *(cell.get(c) for c in cell_columns)])
    return out.getvalue()


def supersede(directory: str | os.PathLike) -> list[Path]:
    """Moves the directory's outcome files (results.json first, results.csv, error.json) to
    ``superseded/<UTC time>.<name>``: the directory then shows no outcome and nothing is lost.

    Returns:
        the moved files' new paths.
    """
    directory = Path(directory)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    moved = []
    for name in (RESULTS_JSON, RESULTS_CSV, ERROR_JSON):
        path = directory / name
        if path.exists():
            target = directory / SUPERSEDED / f"{stamp}.{name}"
            target.parent.mkdir(exist_ok=True)
            os.replace(path, target)
            moved.append(target)
    return moved


def write_results(directory: str | os.PathLike, results: MutableMapping[str, Any]) -> None:
    """Makes ``results`` the directory's outcome: adds a new ``run_id`` (uuid4 hex) and
    ``finished_at`` (:func:`utc_now`) to it, moves the previous outcome to ``superseded/``,
    then writes ``results.csv`` and ``results.json`` atomically, in this order. Both carry the
    ``run_id``; a kill between the two writes leaves a results.csv without results.json, which
    :func:`sync_results_csv` sets aside. Call it holding :func:`run_lock`."""
    directory = Path(directory)
    results["run_id"] = uuid.uuid4().hex
    results["finished_at"] = utc_now()
    supersede(directory)
    atomic_write_bytes(directory / RESULTS_CSV, results_csv(results).encode())
    write_json(directory / RESULTS_JSON, results)


def write_error(directory: str | os.PathLike, error: BaseException, config: Any = None) -> None:
    """Records a failed job: moves the previous outcome to ``superseded/`` and writes
    ``error.json`` (status, error_type, error, traceback, config, finished_at)."""
    supersede(directory)
    write_json(Path(directory) / ERROR_JSON, {
        "status": "error",
        "error_type": type(error).__name__,
        "error": str(error),
        "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
        "config": config,
        "finished_at": utc_now(),
    })


def _csv_run_id(path: Path) -> str | None:
    try:
        with open(path, newline="") as f:
            return next(csv.DictReader(f), {}).get("run_id")
    except (OSError, ValueError, csv.Error):
        return None


def sync_results_csv(directory: str | os.PathLike) -> None:
    """Makes ``results.csv`` agree with ``results.json``, the authoritative file: rewrites it
    from results.json when its ``run_id`` differs (or it is missing), and moves a results.csv
    without results.json (a run killed between the two writes) to ``superseded/``. Call it
    holding :func:`run_lock`."""
    directory = Path(directory)
    csv_path, json_path = directory / RESULTS_CSV, directory / RESULTS_JSON
    if not json_path.exists():
        if csv_path.exists():
            supersede(directory)
        return
    try:
        results = read_json(json_path)
    except (OSError, ValueError):
        return  # unreadable: the job is redone, which rewrites both
    if not isinstance(results, dict) or not isinstance(results.get("cells"), list):
        return
    if results.get("run_id") is None or _csv_run_id(csv_path) != results["run_id"]:
        logger.warning("%s does not belong to %s: rewriting it from results.json", csv_path,
                       json_path)
        atomic_write_bytes(csv_path, results_csv(results).encode())


def finished(directory: str | os.PathLike, config: Mapping[str, Any],
             fingerprints: Mapping[str, Any] | None = None) -> bool:
    """Whether ``directory`` already holds results of ``config`` computed from the same inputs
    (the job can be skipped).

    Args:
        directory: the job's output directory.
        config: the protocol config (``results.json``'s ``config``).
        fingerprints: content hashes of the inputs (``results.json``'s ``fingerprints``:
            model, data, corruption code, baseline); ``None`` compares the config only.

    Returns:
        True only for a readable ``results.json`` holding a JSON object with the same
        ``config`` and ``fingerprints``. A missing file is False; an unreadable one, or one
        that is not a results object (``[]``, ``null``, ``42``), is False with a warning naming
        it (the job is redone); the same config with other fingerprints (an input changed at
        the same path: an overwritten weights file, a changed data folder) is False with a
        warning naming what changed, since those results are stale.

    Raises:
        ValueError: if it holds results of a *different* config (rather than silently skipping
            or overwriting them).
    """
    path = Path(directory) / RESULTS_JSON
    if not path.exists():
        return False
    try:
        stored = read_json(path)
    except (OSError, ValueError) as error:
        logger.warning("%s is unreadable (%s): redoing the job", path, error)
        return False
    if not isinstance(stored, dict) or "config" not in stored:
        logger.warning("%s is not a results object (it holds %.60r): redoing the job", path, stored)
        return False
    if stored["config"] != config:
        raise ValueError(f"{path} holds results of a different config; pass force=true to "
                         "overwrite them or choose another output directory (hydra.run.dir / "
                         "hydra.sweep.dir)")
    old = stored.get("fingerprints")
    old = old if isinstance(old, dict) else {}
    changed = [k for k in (fingerprints or {}) if old.get(k) != fingerprints[k]]
    if changed:
        logger.warning("%s was computed from other inputs (changed since: %s): its results are "
                       "stale, recomputing them", path,
                       "; ".join(f"{k} {old.get(k)} -> {fingerprints[k]}" for k in changed))
        return False
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
    h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")  # no copy
    return h.hexdigest()


def model_hash(model: nn.Module) -> str:
    """Content hash of everything that fixes a model's outputs: ``repr(model)`` (the module
    tree with every module's constructor arguments, i.e. its ``extra_repr``: shapes, strides,
    eps, the input normalisation's mean and std), the class of every module with, for classes
    defined outside torch, its source code, and every parameter and buffer by name and
    content, non-persistent buffers included (InputNormalization keeps mean and std out of the
    state_dict)."""
    h = hashlib.sha256(repr(model).encode())
    for cls in sorted({type(m) for m in model.modules()}, key=_class_name):
        h.update(f"{_class_name(cls)}:{_source_hash(cls)};".encode())
    tensors = [*model.named_parameters(remove_duplicate=False),
               *model.named_buffers(remove_duplicate=False)]
    for name, value in tensors:
        h.update(name.encode())
        h.update(tensor_hash(value).encode())
    return h.hexdigest()


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@functools.lru_cache(maxsize=None)
def _source_hash(cls: type) -> str:
    """sha256 of a module class's source ("" for torch's own classes, fixed by the torch
    version, and for classes whose source is unavailable)."""
    if cls.__module__.split(".")[0] == "torch":
        return ""
    try:
        return hashlib.sha256(inspect.getsource(cls).encode()).hexdigest()
    except (OSError, TypeError):
        return ""


def _sources_hash(root: Path, *extra: str) -> str:
    """sha256 over the ``*.py`` files below ``root`` (relative names and contents) and ``extra``."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    for text in extra:
        h.update(text.encode())
    return h.hexdigest()


def corruption_code_hash() -> str:
    """Hash of the corruption suite's source files, so cached cells are recomputed whenever the
    implementation changes."""
    import tta.corruptions as corruptions

    return _sources_hash(Path(corruptions.__file__).parent)


def code_hash() -> str:
    """Hash of the whole ``tta`` package's source files and of the torch and NumPy versions:
    results.json's ``fingerprints.code`` and part of the source-metrics cache key, so that a
    finished job or a cached record is recomputed after any change of the code that computed
    it (a method, the BatchNorm layer, the loop, the metrics, a library default) or of the
    numerical libraries, never silently reused."""
    return _sources_hash(Path(tta.__file__).parent, f"torch {torch.__version__}", f"numpy {np.__version__}")


# --- caches ---------------------------------------------------------------------------------

class CellCache:
    """Corrupted images as ``.npy`` files under ``directory/cells``, keyed by content hash;
    ``directory=None`` disables the disk cache. Recently used cells are also kept in memory
    (``memory`` of them), so the jobs of a basic-launcher sweep share them within a process.

    Safe for concurrent jobs (processes, threads, Slurm tasks on a shared file system with
    working ``flock``): every read, write and eviction of a cell holds the cell's lock file
    ``cells/<key>.lock`` (:class:`filelock.FileLock`), and :meth:`get_or_compute` computes a
    cell that is missing while holding it, so that a cell is computed once and other jobs wait
    for it and read it. Files are written atomically (temporary file, then rename).

    Args:
        directory: the cache directory (``cells/`` is created inside), or None.
        memory: how many cells to keep in memory (shared by all instances of a process).
        max_gb: bound on the total size of the ``.npy`` files, in GB (10**9 bytes); default
            ``$TTA_CACHE_MAX_GB``, else None (unbounded). Before a cell is written the least
            recently used cells (file mtime, renewed on every read) are deleted until it fits;
            a cell whose lock another job holds (being read or computed) is skipped. Bounded
            writes take turns (``cells/.evict.lock``). A cell larger than the bound is not
            written (a warning says so).

    Raises:
        ValueError: ``max_gb`` (or ``$TTA_CACHE_MAX_GB``) is not a positive number.
    """

    _memory: dict[str, Tensor] = {}

    def __init__(self, directory: str | os.PathLike | None, memory: int = 16,
                 max_gb: float | None = None) -> None:
        if max_gb is None and os.environ.get("TTA_CACHE_MAX_GB"):
            try:
                max_gb = float(os.environ["TTA_CACHE_MAX_GB"])
            except ValueError:
                raise ValueError(f"TTA_CACHE_MAX_GB must be a positive number of GB, got "
                                 f"{os.environ['TTA_CACHE_MAX_GB']!r}") from None
        if max_gb is not None and (isinstance(max_gb, bool) or not isinstance(max_gb, (int, float))
                                   or not 0 < max_gb < float("inf")):
            raise ValueError(f"max_gb (TTA_CACHE_MAX_GB) must be a positive number of GB or None, got {max_gb!r}")
        self.directory = None if directory is None else Path(directory) / "cells"
        self.memory = memory
        self.max_bytes = None if max_gb is None else int(max_gb * 1e9)

    def _lock(self, key: str) -> FileLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        return FileLock(self.directory / f"{key}.lock", is_singleton=True)  # re-entrant per key

    def get(self, key: str, shape: tuple[int, ...] | None = None) -> Tensor | None:
        """The cached uint8 images of ``key``, or None when there are none. An unreadable file,
        or one that is not uint8 or (given ``shape``) not of that shape, is ignored with a
        warning naming it, so that the caller recomputes (and overwrites) the cell."""
        images = self._memory.get(key)
        if self.directory is not None:
            with self._lock(key):
                images = self._read(key) if images is None else self._touch(key, images)
        if images is None:
            return None
        if images.dtype != torch.uint8 or (shape is not None and tuple(images.shape) != tuple(shape)):
            logger.warning("ignoring cache file %s: it holds %s %s, expected torch.uint8 %s",
                           self.directory / f"{key}.npy" if self.directory else key, images.dtype,
                           tuple(images.shape), shape)
            type(self)._memory.pop(key, None)
            return None
        self._remember(key, images)
        if self.max_bytes is None and self.directory is not None and not (self.directory / f"{key}.npy").exists():
            self.put(key, images)  # another cache directory than the one it came from (with a bound
            # the file may have been evicted: it is not written back on every read)
        return images

    def get_or_compute(self, key: str, compute: Callable[[], Tensor],
                       shape: tuple[int, ...] | None = None) -> Tensor:
        """The cached images of ``key`` (see :meth:`get`), else ``compute()``, stored. With a
        directory, ``compute`` runs holding the key's lock: concurrent callers of one key wait,
        then read the cell the first one wrote."""
        with contextlib.nullcontext() if self.directory is None else self._lock(key):
            images = self.get(key, shape)
            if images is None:
                images = compute()
                self.put(key, images)
        return images

    def put(self, key: str, images: Tensor) -> None:
        self._remember(key, images)
        if self.directory is None:
            return
        # the size check before serialising (a cell far over the bound is never copied); the
        # .npy header adds ~128 bytes, checked on the serialised bytes
        data = b""
        if self.max_bytes is None or images.numel() * images.element_size() <= self.max_bytes:
            buffer = io.BytesIO()
            np.save(buffer, images.cpu().numpy(), allow_pickle=False)
            data = buffer.getvalue()
        if self.max_bytes is not None and not 0 < len(data) <= self.max_bytes:
            logger.warning("not caching cell %s: its %d bytes exceed the cache bound of %d bytes "
                           "(TTA_CACHE_MAX_GB)", key, images.numel() * images.element_size() + 128,
                           self.max_bytes)
            return
        bounded = self.max_bytes is not None  # one eviction and write at a time keeps the bound
        with self._lock(key), FileLock(self.directory / ".evict.lock", is_singleton=True) if bounded \
                else contextlib.nullcontext():
            if bounded:
                self._evict(len(data), keep=key)
            atomic_write_bytes(self.directory / f"{key}.npy", data)

    def _read(self, key: str) -> Tensor | None:
        """The cell file of ``key`` (the caller holds its lock), its mtime renewed (LRU order)."""
        path = self.directory / f"{key}.npy"
        if not path.exists():
            return None
        try:
            images = torch.from_numpy(np.load(path, allow_pickle=False))
        except (OSError, ValueError, EOFError, TypeError) as error:
            logger.warning("ignoring unreadable cache file %s: %s", path, error)
            return None
        return self._touch(key, images)

    def _touch(self, key: str, images: Tensor) -> Tensor:
        with contextlib.suppress(FileNotFoundError):  # a cell held in memory only
            os.utime(self.directory / f"{key}.npy")
        return images

    def _evict(self, incoming: int, keep: str) -> None:
        """Deletes the least recently used cells (not ``keep``, nor one whose lock another job
        holds) until the other cells' total size plus ``incoming`` bytes (``keep``'s new
        file) is within the bound."""
        budget = self.max_bytes - incoming
        cells = []
        for path in self.directory.glob("*.npy"):
            with contextlib.suppress(FileNotFoundError):  # deleted by an unbounded job meanwhile
                stat = path.stat()
                if path.stem != keep:
                    cells.append((stat.st_mtime_ns, path.stem, stat.st_size))
        total = sum(size for _, _, size in cells)
        for _, key, size in sorted(cells):
            if total <= budget:
                break
            lock = self._lock(key)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue  # another job reads or computes it
            try:
                (self.directory / f"{key}.npy").unlink(missing_ok=True)
                type(self)._memory.pop(key, None)
                total -= size
                logger.info("cache bound: evicted cell %s (%d bytes)", key, size)
            finally:
                lock.release()
        if total > budget:
            logger.warning("cell cache %s: %d bytes with the new cell, over the bound of %d bytes "
                           "(cells in use by other jobs are kept)", self.directory, total + incoming,
                           self.max_bytes)

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

    def get(self, key: str, check: Callable[[Any], bool] | None = None) -> Any:
        """The record of ``key``, or None when there is none. An unreadable file, or (given
        ``check``) a record that ``check`` rejects, is ignored with a warning naming it, so
        that the caller recomputes (and overwrites) it."""
        if self.directory is None:
            return None
        path = self.directory / f"{key}.json"
        if not path.exists():
            return None
        try:
            record = read_json(path)
        except (OSError, ValueError) as error:
            logger.warning("ignoring unreadable cache file %s: %s", path, error)
            return None
        if check is not None and not check(record):
            logger.warning("ignoring cache file %s: not a valid record (%.80r)", path, record)
            return None
        return record

    def put(self, key: str, value: Any) -> None:
        if self.directory is not None:
            write_json(self.directory / f"{key}.json", value)
